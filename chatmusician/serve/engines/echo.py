"""The echo engine: answers with the user's message, a deterministic stand-in for UI and API tests."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.prompts import build_chat_prompt
from chatmusician.serve.config import EngineConfig
from chatmusician.serve.requests import check_prompt_length
from chatmusician.serve.types import Completion, ComposeError, GenerationParams, Prepared


class EchoEngine:
    """Answers with the user's message (cut to max_new_tokens words): deterministic, for UI tests and demos."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def check_constraints(self, constraints: AbcConstraints) -> None:
        """Constraints are validated (a bad one is still a 400) but the echo answer ignores them."""

    def shortest_tune(self, constraints: AbcConstraints) -> int:
        return 0

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ComposeError("empty_prompt", "the prompt is empty", "prompt")
        text = build_chat_prompt(prompt, [tuple(t) for t in history])
        check_prompt_length(len(text.split()), self.config.max_prompt_tokens)
        return Prepared(prompt, list(range(len(text.split()))))

    def prepare_raw(self, prompt: str | Sequence[int]) -> Prepared:
        """A completions prompt; token ids are echoed as their numbers."""
        text = prompt if isinstance(prompt, str) else " ".join(str(i) for i in prompt)
        return self.prepare(text)

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.config.lora_adapters:
            raise ComposeError("model_not_found", f"no adapter named {adapter!r}", "model", status=404)

    def probe(self) -> None:
        """Health check: nothing to probe."""

    def _completion(self, prepared: Prepared, params: GenerationParams) -> tuple[list[str], Completion]:
        from chatmusician.model.sampling import cut_at_stop

        words = re.findall(r"\S+\s*|\s+", prepared.prompt)  # one "token" = a word and its trailing space
        pieces = words[: params.max_new_tokens]
        reason = "length" if len(words) > len(pieces) else "stop"
        text, stopped = cut_at_stop("".join(pieces), params.stop)
        if stopped:
            reason, pieces = "stop", re.findall(r"\S+\s*|\s+", text)
        logprobs = None
        if params.logprobs is not None:  # certainty: each word has probability 1
            starts = [len("".join(pieces[:i])) for i in range(len(pieces))]
            logprobs = [
                {"id": i, "token": p, "logprob": 0.0, "top": [[p, 0.0]][: params.logprobs], "offset": at}
                for i, (p, at) in enumerate(zip(pieces, starts, strict=True))
            ]
        completion = Completion(
            text, reason, len(prepared.ids), len(pieces), list(range(len(pieces))), logprobs
        )
        if prepared.prompt_logprobs is not None:
            completion.prompt_logprobs = [
                {"id": i, "token": w, "logprob": None if i == 0 else 0.0, "top": []}
                for i, w in enumerate(prepared.prompt.split())
            ]
        return pieces, completion

    continuous_batching = True
    """Nothing to batch: the Composer hands it each request alone (so that it runs without a Serve replica)."""

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        return [self._completion(prepared, params)[1] for prepared, params in items]

    async def agenerate(self, prepared: Prepared, params: GenerationParams, on_cancel=None) -> Completion:
        return self._completion(prepared, params)[1]

    def stream(
        self, prepared: Prepared, params: GenerationParams, cancel: threading.Event | None = None
    ) -> Iterator[str | Completion]:
        pieces, completion = self._completion(prepared, params)
        yield from pieces
        yield completion
