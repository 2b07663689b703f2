"""Meter-aware decoding: on top of the grammar's mask, a constrained row may take only the tokens after which
its tune can still end with every bar as long as its meter (``chatmusician.abc.meter``, the validator's
duration model, incremental).

The grammar (llguidance) keeps syntax; the meter is checked one of two ways. Behind our own sampler
(``chatmusician.model.sampling.RowSampler``) only the token drawn is checked, and :func:`first_allowed` picks
the best token the meter passes when the draws all fail. Where the sampler is not ours (vLLM),
:func:`meter_mask_row` masks: it looks at the row's best tokens the grammar allows, in score order, and keeps
those the tracker passes until they hold nearly all of the probability the sampler could reach (or
:data:`MAX_KEPT` passed, or :data:`MAX_TRIED` were tried); everything else is masked. Both are engine-neutral:
they take a row's tracker and its logits (see docs/serving/constrained.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from fractions import Fraction

from chatmusician.abc.meter import LENGTHS, METERS, UNITS, MeterTracker, Violation, length, split_suffix

# Candidates tried per row and step, at most; candidates kept, at most; the probability they must cover.
MAX_TRIED = 64
MAX_KEPT = 8
MASS = 0.98
_SUFFIX_START = frozenset("/12345678]")
_TEXTS: dict[
    int, tuple[object, list[str]]
] = {}  # id(ll_tok) -> (ll_tok, texts): llguidance's are not weak-referable
_LOCK = threading.Lock()


def token_texts(ll_tok) -> list[str]:
    """Each token's text as it extends a tune (llguidance's bytes: a LLaMA "▁A" is " A"), once per tokenizer."""
    with _LOCK:
        held = _TEXTS.get(id(ll_tok))
        if held is None or held[0] is not ll_tok:
            texts = [ll_tok.decode_bytes([i]).decode("utf-8", "replace") for i in range(ll_tok.vocab_size)]
            held = _TEXTS[id(ll_tok)] = (ll_tok, texts)
        return held[1]


def copy_tracker(tracker: MeterTracker) -> MeterTracker:
    return tracker.copy()


def tracker_for(text: str) -> MeterTracker:
    tracker = MeterTracker()
    tracker.push(text)
    return tracker


def _rest_text(units: Fraction) -> str:
    """Rests (z with the grammar's lengths, longest first) that last ``units`` units exactly."""
    by_value = {}
    for suffix in LENGTHS:
        value = length(*split_suffix(suffix))
        if suffix == "" or len(suffix) < len(by_value.get(value, "x" * 9)):
            by_value[value] = suffix
    values = sorted(by_value, reverse=True)
    out, left = [], units
    while left > 0:
        value = next((v for v in values if v <= left), None)
        if value is None:
            return ""
        out.append("z" + by_value[value])
        left -= value
    return "".join(out)


def field_endings(text: str) -> list[str]:
    """Where ``text`` ends inside an M:/L: body line: the shortest few ways to finish its value ([""]
    elsewhere: nothing to finish)."""
    last = text.rsplit("\n", 1)[-1]
    if last in ("K", "K:"):
        return [":C"[len(last) - 1 :]]
    line = last + ":" if last in ("M", "L") else last
    if not (line.startswith("M:") or line.startswith("L:")):
        return [""]
    if line[2:] != line[2:].rstrip():
        return [""]  # the value is written: the line just ends
    written = line[2:].lstrip()
    values = sorted((v for v in (UNITS if line[0] == "L" else METERS) if v.startswith(written)), key=len)
    colon = ":" * (line != last)
    return [colon + v[len(written) :] for v in values[:4]]


def bar_fill(tracker: MeterTracker, again: bool = True) -> str | None:
    """Rests that fill the bar in progress exactly ("" when it is empty or full; None when unknown); a broken
    rhythm waiting for its second note gets a rest as long as its first one."""
    try:
        state, _ = tracker._scan(tracker.tail, final=True)
    except Violation:
        out: dict = {}
        try:
            tracker._scan(tracker.tail, final=False, out=out)
        except Violation:
            return None
        line = out.get("line")
        if not again or line is None or not line.dots or line.tuplet or line.chord_open or line.grace:
            return None
        right = _rest_text(line.dots[2] / line.s.unit)
        if right.count("z") != 1:
            return None
        after = copy_tracker(tracker)
        after.push(right)
        rest = None if after.broken else bar_fill(after, again=False)
        return None if rest is None else right + rest
    if not state.body or not state.sounding or state.bar_meter is None or state.whole_rest:
        return ""
    return _rest_text((state.bar_meter - state.duration) / state.unit)


def keep_row(
    tracker: MeterTracker,
    order: Sequence[int],
    probs: Sequence[float],
    texts: Sequence[str],
    eos_id: int,
    beyond: float = 0.0,
    limit: int = MAX_KEPT,
) -> list[int]:
    """Of the candidates ``order`` (best first, all allowed by the grammar, with their probabilities; ``beyond``:
    the probability of the allowed tokens after them), those the meter allows, stopping once they hold
    :data:`MASS` of the probability not yet known to fail (what the sampler can reach once the meter has
    masked the failures), or ``limit`` passed."""
    rest = [0.0] * len(probs)  # probability of the candidates after each one, and beyond
    total = beyond
    for i in range(len(probs) - 1, -1, -1):
        rest[i] = total
        total += probs[i]
    kept, mass = [], 0.0
    for i, token in enumerate(order):
        ok = tracker.can_end() if token == eos_id else tracker.allows(texts[token])
        if ok:
            kept.append(token)
            mass += probs[i] if i < len(probs) else 0.0
            if len(kept) >= limit or mass >= MASS * (mass + (rest[i] if i < len(rest) else 0.0)) > 0.0:
                break
    return kept


def _rescue(tracker: MeterTracker, order: list[int], texts: Sequence[str], eos_id: int) -> list[int]:
    """The best of the remaining allowed tokens ``order`` (best first) that the meter passes, when the best
    all failed: the row may need a length to finish its last note ("d4" -> "d4/8" in a full bar), so those
    first."""
    suffixes = [t for t in order if texts[t][:1] in _SUFFIX_START]
    return keep_row(tracker, suffixes, [], texts, eos_id, limit=1) or keep_row(
        tracker, order, [], texts, eos_id, limit=1
    )


def first_allowed(tracker: MeterTracker, scores, texts: Sequence[str], eos_id: int) -> int | None:
    """The highest-scoring token of a row (a 1-D torch tensor, -inf where the grammar forbids) that the meter
    passes; None when none does. A sampler that drew only failing tokens ends here (greedy: at once)."""
    import torch

    n = int(torch.isfinite(scores).sum())
    if n == 0:
        return None
    order = torch.topk(scores, min(n, MAX_TRIED)).indices.tolist()
    kept = keep_row(tracker, order, [], texts, eos_id, limit=1)
    if not kept and n > MAX_TRIED:
        kept = _rescue(tracker, torch.argsort(scores, descending=True)[MAX_TRIED:n].tolist(), texts, eos_id)
    return kept[0] if kept else None


def meter_mask_row(tracker: MeterTracker, scores, texts: Sequence[str], eos_id: int):
    """Mask one row's scores (a 1-D torch tensor, already masked by the grammar: -inf where not allowed) to
    the tokens the meter allows; returns the kept token ids. With none kept, the scores stay as they were
    (the grammar alone decides; the validator then reports what went wrong)."""
    import torch

    allowed = torch.isfinite(scores)
    n = int(allowed.sum())
    if n == 0:
        return []
    k = min(n, MAX_TRIED)
    top = torch.topk(scores, k)
    all_probs = torch.softmax(scores.double(), dim=-1)
    probs = all_probs[top.indices]
    beyond = float(all_probs.sum() - probs.sum()) if n > k else 0.0
    kept = keep_row(tracker, top.indices.tolist(), probs.tolist(), texts, eos_id, max(0.0, beyond))
    if not kept and n > k:
        kept = _rescue(tracker, torch.argsort(scores, descending=True)[k:n].tolist(), texts, eos_id)
    if kept:  # -inf everywhere else (as a masked_fill_ of the others, without a vocabulary-wide bool mask)
        index = torch.tensor(kept, device=scores.device)
        values = scores[index]
        scores.fill_(float("-inf"))
        scores[index] = values
    return kept


class MeterRow:
    """One request's meter-aware mask for an engine's own per-request logits-processing hook (vLLM's):
    ``row(output_token_ids, logits)`` masks ``logits`` in place and returns it. The tracker follows the ids
    incrementally. ``logits`` must already be -inf where the grammar forbids a token (else call with
    ``allowed``, a bool tensor of the grammar's tokens): this only narrows the grammar's choice."""

    def __init__(self, ll_tok, eos_id: int):
        self.texts, self.eos_id = token_texts(ll_tok), eos_id
        self.tracker, self.seen = MeterTracker(), 0

    def __call__(self, output_token_ids: Sequence[int], logits, allowed=None):
        for token in output_token_ids[self.seen :]:
            if token != self.eos_id:
                self.tracker.push(self.texts[token])
        self.seen = len(output_token_ids)
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        if not self.tracker.broken:
            meter_mask_row(self.tracker, logits, self.texts, self.eos_id)
        return logits

    def may_end(self) -> bool:
        """May the tune end here (EOS / stop) with its last bar full or completing the anacrusis?"""
        return self.tracker.can_end()

    def fill(self) -> str | None:
        """Rests that fill the bar in progress (for a budget ending: write them, then "|\n")."""
        return bar_fill(self.tracker)
