"""Per-row sampling for a batched ``model.generate``: every row has its own parameters and its own RNG.

transformers' ``generate`` samples a whole batch with one set of parameters from torch's global RNG, so a
seeded answer changes when another request draws random numbers at the same time (a concurrent stream, a
batch neighbour). Here ``generate`` runs greedy (``do_sample=False``) and :class:`RowSampler`, the last
logits processor, does the sampling itself, row by row: repetition / presence / frequency penalties,
temperature, top-k, top-p, then one draw from the row's own ``torch.Generator`` (seeded per request, or from
the OS when unseeded), returned as a one-hot score row that greedy's argmax picks. :class:`LogprobRecorder`
(the first processor) keeps each row's raw log-probabilities for OpenAI ``logprobs``; :class:`RowStops` ends
rows one by one (their own token budget, stop strings, a cancelled request).

Pure torch; no Ray, no serving.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RowSampling:
    """What one row of a batch samples with (the serving layer validates the ranges)."""

    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on every token of prompt and answer (1 = off)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from tokens already in the answer."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted per occurrence in the answer."""
    seed: int | None = None
    """The row's generator seed; None = a fresh random seed."""


def _generator(seed: int | None, device):
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


class SuppressToken:
    """Logits processor that rules one token out (LLaMA pads with ``<unk>``: never part of an answer)."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores[:, self.token_id] = float("-inf")
        return scores


class LogprobRecorder:
    """First logits processor: records, per generated step, each row's raw log-probability of the token it then
    took and its ``tops[i]`` most likely tokens (``None`` rows record nothing). Only the latest step's full
    distribution is kept: the token chosen from it is read from ``input_ids`` at the next step."""

    def __init__(self, tops: Sequence[int | None]):
        self.tops = [-1 if t is None else t for t in tops]
        self.rows = [i for i, t in enumerate(self.tops) if t >= 0]
        self.chosen: list[list[float]] = []  # per step, per recorded row: logprob of the token taken
        self.top: list[tuple[list, list]] = []  # per step: (top ids [R, k], top logprobs [R, k])
        self.pending = None  # [R, V] log-softmax of the latest step

    def __call__(self, input_ids, scores):
        import torch

        if not self.rows:
            return scores
        rows = torch.tensor(self.rows, device=scores.device)
        if self.pending is not None:
            taken = input_ids[rows, -1]
            self.chosen.append(self.pending.gather(1, taken[:, None])[:, 0].tolist())
        self.pending = torch.log_softmax(scores[rows].float(), dim=-1)
        k = max(1, max(self.tops[i] for i in self.rows))
        top_lp, top_ids = self.pending.topk(k, dim=-1)
        self.top.append((top_ids.tolist(), top_lp.tolist()))
        return scores

    def row_logprobs(self, i: int, ids: Sequence[int]) -> list[tuple[float, list[tuple[int, float]]]]:
        """Row ``i``'s (logprob of the token taken, [(top id, top logprob), ...]) for its tokens ``ids``."""
        if self.tops[i] < 0:
            return []
        r, n = self.rows.index(i), self.tops[i]
        out = []
        for step, token in enumerate(ids[: len(self.top)]):
            if step < len(self.chosen):
                lp = self.chosen[step][r]
            else:  # the last step: its token never came back through a processor
                lp = float(self.pending[r, token])
            top_ids, top_lp = self.top[step]
            out.append((lp, list(zip(top_ids[r][:n], top_lp[r][:n], strict=True))))
        return out


class Verifier(Protocol):
    """Checks a drawn token before the sampler takes it (meter-aware constrained decoding): the sampler draws
    from the row's distribution as usual and only asks about what it drew."""

    def accepts(self, row: int, token: int) -> bool:
        """May row ``row`` take ``token``?"""

    def rescue(self, row: int, logits) -> int | None:
        """The best token of ``logits`` (one row) it accepts when no draw was accepted (None: none)."""


# Draws per row and step before the verifier's rescue: each failed draw is taken out of the distribution.
MAX_DRAWS = 8


class RowSampler:
    """Last logits processor: penalties, temperature, top-k, top-p and one draw per row from its generator.
    Returns scores that are 0 at the drawn token and -inf elsewhere, so greedy ``generate`` takes it.
    With a ``verifier``, a drawn token it refuses is removed and the row draws again (rejection sampling: the
    draw comes from the row's top-k/top-p distribution restricted to what the verifier accepts, at the cost of
    checking one or two tokens instead of every candidate); after :data:`MAX_DRAWS` refusals, or greedy at
    once, the verifier's rescue picks the best accepted token."""

    def __init__(self, rows: Sequence[RowSampling], device, verifier: Verifier | None = None):
        import torch

        self.rows = list(rows)
        self.generators = [_generator(r.seed, device) for r in self.rows]
        self.verifier = verifier

        def per_row(name: str):
            return torch.tensor([getattr(r, name) for r in self.rows], dtype=torch.float32, device=device)

        self.rep, self.presence, self.frequency = (
            per_row("repetition_penalty"),
            per_row("presence_penalty"),
            per_row("frequency_penalty"),
        )
        self.prompt_width: int | None = None

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        if bool((self.rep != 1).any()):  # CTRL-style, over prompt and answer as transformers does
            seen = torch.gather(scores, 1, input_ids)
            rep = self.rep[:, None]
            seen = torch.where(seen < 0, seen * rep, seen / rep)
            scores = scores.scatter(1, input_ids, seen)
        answer = input_ids[:, self.prompt_width :]
        if answer.shape[1] and bool((self.presence != 0).any() or (self.frequency != 0).any()):
            counts = torch.zeros_like(scores).scatter_add_(
                1, answer, torch.ones_like(answer, dtype=scores.dtype)
            )
            scores = scores - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0)
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for i, row in enumerate(self.rows):
            chosen[i] = self._draw(i, scores[i], row, self.generators[i])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), chosen] = 0.0
        return out

    def _draw(self, i: int, logits, row: RowSampling, generator) -> int:
        import torch

        verifier = self.verifier
        if row.temperature == 0:
            token = int(logits.argmax())
            if verifier is None or verifier.accepts(i, token):
                return token
            rescued = verifier.rescue(i, logits)
            return token if rescued is None else rescued
        warped = logits / row.temperature
        if row.top_k and row.top_k < warped.shape[0]:
            kth = warped.topk(row.top_k).values[-1]
            warped = warped.masked_fill(warped < kth, float("-inf"))
        if row.top_p < 1.0:
            sorted_logits, order = warped.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= row.top_p  # keep the smallest set reaching top_p
            warped = warped.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = warped.softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
        if verifier is None:
            return token
        for _ in range(MAX_DRAWS):
            if verifier.accepts(i, token):
                return token
            probs[token] = 0.0
            if not bool(probs.sum() > 0):
                break
            token = int(torch.multinomial(probs, 1, generator=generator))
        rescued = verifier.rescue(i, logits)
        return token if rescued is None else rescued


class RowStops:
    """A ``StoppingCriteria``: row i is done after ``budgets[i]`` new tokens, at EOS, when its answer contains one
    of ``stops[i]``, or when ``cancels[i]`` is set (the request went away). ``on_done(i, new_ids)`` is called once
    per row, in the step it finishes, with its generated ids (EOS included): a row's answer is ready then, not
    when the whole batch ends. ``first_token_at`` is the ``time.perf_counter()`` of the first step."""

    def __init__(
        self,
        tokenizer,
        budgets: Sequence[int],
        stops: Sequence[Sequence[str]],
        cancels: Sequence[threading.Event | None],
        on_done: Callable[[int, list[int]], None] | None = None,
    ):
        self.tokenizer, self.budgets = tokenizer, list(budgets)
        self.stops = [tuple(s) for s in stops]
        self.cancels = list(cancels)
        self.on_done = on_done
        self.done = [False] * len(self.budgets)
        self.prompt_width: int | None = None
        self.first_token_at: float | None = None
        # a stop string is complete within its last len(stop) tokens (every token decodes to >= 0 characters)
        self.windows = [max((len(s) for s in row), default=0) + 4 for row in self.stops]

    def _stops(self, i: int, row, n: int) -> bool:
        if n >= self.budgets[i] or (self.cancels[i] is not None and self.cancels[i].is_set()):
            return True
        if int(row[-1]) == self.tokenizer.eos_token_id:
            return True
        if self.stops[i]:
            tail = self.tokenizer.decode(row[-min(n, self.windows[i]) :].tolist(), skip_special_tokens=True)
            return any(s in tail for s in self.stops[i])
        return False

    def __call__(self, input_ids, scores, **kwargs):
        import time

        import torch

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1] - 1  # called after the first new token
        n = input_ids.shape[1] - self.prompt_width
        for i in range(input_ids.shape[0]):
            if not self.done[i] and self._stops(i, input_ids[i], n):
                self.done[i] = True
                if self.on_done is not None:
                    self.on_done(i, input_ids[i, self.prompt_width :].tolist())
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Streams text pieces minus the stop strings: holds back a possible stop prefix until it is decided."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is safe to send now ('' when held back or after a stop)."""
        if self.stopped:
            return ""
        self.buffer += piece
        text, found = cut_at_stop(self.buffer, self.stops)
        if found:
            self.stopped, self.buffer = True, ""
            return text
        if not self.stops or len(self.buffer) <= self.hold:
            out, self.buffer = (self.buffer, "") if not self.stops else ("", self.buffer)
            return out
        out, self.buffer = (
            self.buffer[: len(self.buffer) - self.hold],
            self.buffer[len(self.buffer) - self.hold :],
        )
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
