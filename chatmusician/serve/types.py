"""The Composer's request and answer types: plain data (no torch, no Ray, no engine), shared by every layer."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatmusician.abc.grammar import AbcConstraints


class ComposeError(ValueError):
    """A request the composer refuses, with a machine-readable code (becomes a 4xx structured error)."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.param, self.status = code, message, param, status

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "status": self.status}


@dataclass(frozen=True)
class GenerationParams:
    """Validated sampling parameters of one request (hashable: equal parameters share a batch)."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    """The answer ends before the first of these strings (not included)."""
    logprobs: int | None = None
    """Record each answer token's log-probability and this many most likely alternatives (None = none)."""

    def sampling(self):
        from chatmusician.model.sampling import RowSampling

        return RowSampling(
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            self.seed,
        )


MAX_STOPS, MAX_LOGPROBS = 4, 20
# name -> (type, lowest, highest, lowest allowed inclusive); max_new_tokens' upper bound is the config's cap.
PARAM_RANGES: dict[str, tuple[type, float, float, bool]] = {
    "temperature": (float, 0.0, 2.0, True),
    "top_p": (float, 0.0, 1.0, False),
    "top_k": (int, -1, 10_000, True),  # -1 (vLLM's "off") is read as 0
    "repetition_penalty": (float, 0.0, 10.0, False),
    "max_new_tokens": (int, 1, float("inf"), True),
    "seed": (int, 0, 2**63 - 1, True),
    "presence_penalty": (float, -2.0, 2.0, True),
    "frequency_penalty": (float, -2.0, 2.0, True),
    "logprobs": (int, 0, MAX_LOGPROBS, True),
}


@dataclass
class Prepared:
    """A request ready to generate: the user's message, the templated prompt's token ids, its ABC constraints."""

    prompt: str
    ids: list[int]
    constraints: AbcConstraints | None = None
    """None: unconstrained; AbcConstraints(): the tune grammar only."""
    adapter: str | None = None
    """The LoRA adapter (a configured name) generating this answer; None = the model itself."""
    prompt_logprobs: int | None = None
    """Also score the prompt (OpenAI ``echo`` + ``logprobs``): each prompt token's logprob and this many top ones."""
    cancel: threading.Event | None = dataclasses.field(default=None, compare=False, repr=False)
    """Set when the caller went away: the row stops at its next token."""
    on_text: Callable[[str], None] | None = dataclasses.field(default=None, compare=False, repr=False)
    """Streamed: called (from the generating thread) with each new piece of the answer's text."""
    on_done: Callable[[Completion], None] | None = dataclasses.field(default=None, compare=False, repr=False)
    """Called (from the generating thread) with the answer as soon as its row finishes, before the batch ends."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    """The answer's token ids (EOS excluded; up to the token that completed a stop string)."""
    logprobs: list[dict[str, Any]] | None = None
    """Per answer token ``{"id", "token", "logprob", "top": [[token, logprob], ...]}`` when asked for."""
    prompt_logprobs: list[dict[str, Any]] | None = None
    """Per prompt token, the same (the first token's logprob is None: nothing comes before it)."""
    first_token_at: float | None = dataclasses.field(default=None, compare=False)
    """``time.perf_counter()`` when the first answer token was there (time-to-first-token metric)."""
