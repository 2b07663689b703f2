"""Grammar-constrained ABC decoding with transformers: every constrained row writes a tune that parses.

The grammar state of each row is :mod:`chatmusician.model.constrained`.

Supports: one matcher per row, and rows without one (unconstrained rows are never touched, so their greedy
output does not change); different constraints per row in one ``generate``; EOS only where the tune is complete
(the grammar accepts after a complete body line); ``max_new_tokens`` running out -> the answer cut back to the
last point the grammar accepted; budget-aware decoding: near the end of the budget each row looks for the
shortest way to finish its tune with notes (close what is open, end the line, the rest of the header, ``K:``, a
one-note body line, EOS) and, once that completion just fits in what is left, forces it token by token, so
every constrained answer, of any model, ends as a complete tune that abc2midi plays; streaming that only ever
emits text up to such a point. Batch users::

    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.model.constrained_decoding import generate
    from chatmusician.model.sampling import RowSampling

    texts = generate(model, tokenizer, [build_chat_prompt(q) for q in questions],
                     [AbcConstraints(meter="6/8"), None], max_new_tokens=512,
                     sampling=RowSampling(temperature=0.8, top_p=0.95, seed=1))
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.model.constrained import (
    RESERVE_SLACK,
    RESERVE_TOKENS,
    WRAP_UP_TOKENS,
    RowState,
    ll_tokenizer,
    new_matcher,
)
from chatmusician.model.meter import first_allowed, meter_mask_row
from chatmusician.model.sampling import RowSampler, RowSampling, SuppressToken

_NEWLINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _bit(token: int) -> int:
    """Token's bit in its int32 mask word (bit 31 is the sign bit)."""
    value = 1 << (token % 32)
    return value - (1 << 32) if value >= 1 << 31 else value


class AbcLogitsProcessor:
    """A transformers ``LogitsProcessor``: masks each constrained row to the tokens its grammar allows.

    ``rows[i]`` is the row's :class:`RowState`, or ``None`` for an unconstrained row (left untouched).
    ``mask_seconds`` / ``steps`` add up the time spent computing masks (the benchmark reads them).
    The meter (every bar as long as its meter) is a mask here too, unless ``meter_in_sampler``: then the
    processor is the :class:`~chatmusician.model.sampling.RowSampler`'s verifier, asked only about the
    token each row draws (a token or two per step instead of every candidate a sampler might reach).
    """

    def __init__(
        self,
        rows: Sequence[RowState | None],
        vocab_size: int,
        eos_id: int,
        max_new_tokens: int | Sequence[int] | None = None,
        newline_ids: Sequence[int] = (),
        wrap_up_tokens: int = WRAP_UP_TOKENS,
        ll_tok=None,
        reserve_tokens: int = RESERVE_TOKENS,
        meter_in_sampler: bool = False,
    ):
        import torch

        self.rows = list(rows)
        self.active = [i for i, r in enumerate(self.rows) if r is not None]
        self.vocab_size, self.eos_id = vocab_size, eos_id
        words = (vocab_size + 31) // 32
        self.bitmask = torch.zeros((len(self.rows), words), dtype=torch.int32)
        self.prompt_width: int | None = None
        self.mask_seconds, self.steps = 0.0, 0
        # Each row's token budget (one for all, or per row: rows of one batch may ask different lengths).
        self.budgets = (
            [max_new_tokens] * len(self.rows)
            if not isinstance(max_new_tokens, Sequence)
            else list(max_new_tokens)
        )
        self.wrap_up_tokens = wrap_up_tokens
        self.newline_ids = list(newline_ids)
        self.ll_tok, self.reserve_tokens = ll_tok, reserve_tokens
        self.meter_in_sampler = meter_in_sampler
        self.free: set[int] = set()  # this step's rows the model chooses for (the meter checks those)

    def _wrapping_up(self, i: int) -> bool:
        return self.budgets[i] is not None and self.budgets[i] - self.steps <= self.wrap_up_tokens

    def _finish_tune(self, i: int) -> bool:
        """Budget-aware: in the reserve, keep the row's shortest completion at hand and, once it needs (nearly)
        all the tokens left, force it. True when this step's mask is a forced token."""
        if self.ll_tok is None or self.budgets[i] is None:
            return False
        row, left = self.rows[i], self.budgets[i] - self.steps
        token = row.next_forced()
        # Look again only when the last completion found nearly fills what is left (they grow slowly; the
        # validator run per search is most of constrained decoding's cost on a weak model).
        due = row.plan_len is None or left <= row.plan_len + RESERVE_SLACK + 4 or self.steps % 8 == 0
        if token is None and left <= self.reserve_tokens and due:
            plan = row.completion(self.ll_tok)
            row.plan_len = len(plan) if plan is not None else 0
            if plan is not None and len(plan) + RESERVE_SLACK >= left:
                row.forced, row.forced_from = plan, row.consumed
                token = plan[0]
        if token is None:
            return False
        self.bitmask[i].zero_()
        self.bitmask[i, token // 32] = _bit(token)
        return True

    def _allows(self, i: int, token: int) -> bool:
        return bool((int(self.bitmask[i, token // 32]) >> (token % 32)) & 1)

    def _wrap_up(self, i: int) -> None:
        """Near the end of the budget: EOS where the tune may end, else a newline where one may come (a
        complete body line is an accepting point), so a weak model still ends with a whole tune."""
        meter = self.rows[i].meter
        newlines = [
            t for t in self.newline_ids if self._allows(i, t) and (meter is None or meter.allows("\n"))
        ]
        for choice in [[self.eos_id], newlines]:
            if choice and all(self._allows(i, t) for t in choice):
                self.bitmask[i].zero_()
                for t in choice:
                    self.bitmask[i, t // 32] |= _bit(t)
                return

    def __call__(self, input_ids, scores):
        import llguidance.torch as llt
        import numpy
        import torch

        if not self.active:
            return scores
        started = time.perf_counter()
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        elif input_ids.shape[1] > self.prompt_width:
            last = input_ids[:, -1].tolist()
            for i in self.active:
                self.rows[i].consume(last[i])
        free = []  # rows the model chooses for (not forced, not ending): the meter masks those
        for i in self.active:
            row = self.rows[i]
            if row.error is not None or row.matcher.is_stopped():
                self.bitmask[i].zero_()  # only EOS (set below): a broken or finished row just ends
                self.bitmask[i, self.eos_id // 32] = _bit(self.eos_id)
            elif not self._finish_tune(i):
                free.append(i)
                llt.fill_next_token_bitmask(row.matcher, self.bitmask, i)
                if row.can_end is not True and self._allows(i, self.eos_id):
                    # The grammar may end here: EOS stays only where the validator passes the tune; an EOS
                    # far below the best token (e^-10) is masked without asking it.
                    row_scores = scores[i]
                    competitive = bool(row_scores[self.eos_id] >= row_scores.max() - 10)
                    if not (competitive and row.end_ok()):
                        self.bitmask[i, self.eos_id // 32] &= ~_bit(self.eos_id)
                if self._wrapping_up(i):
                    self._wrap_up(i)
        # [R, words] int32 -> [R, words*32] bool, True where a token is refused: bit b of word w (little-endian)
        # is token 32*w + b, so numpy's little-endian unpacking of the bytes lists the tokens in order.
        width = min(self.vocab_size, scores.shape[1])
        words = (~self.bitmask[self.active]).numpy().view(numpy.uint8)
        refused = torch.from_numpy(numpy.unpackbits(words, axis=1, bitorder="little")[:, :width].view(bool))
        refused = refused.to(scores.device)
        if len(self.active) == scores.shape[0]:
            scores[:, :width].masked_fill_(refused, float("-inf"))
            scores[:, width:] = float("-inf")  # logits beyond the tokenizer's vocabulary (padded embeddings)
        else:
            rows = torch.tensor(self.active, device=scores.device)
            sub = scores[rows]
            sub[:, :width].masked_fill_(refused, float("-inf"))
            sub[:, width:] = float("-inf")
            scores[rows] = sub
        self.free = {i for i in free if self.rows[i].meter is not None and not self.rows[i].meter.broken}
        if not self.meter_in_sampler:
            for i in self.free:
                row = self.rows[i]
                meter_mask_row(row.meter, scores[i], row.texts, self.eos_id)
        self.mask_seconds += time.perf_counter() - started
        self.steps += 1
        return scores

    def accepts(self, row: int, token: int) -> bool:
        """The sampler's verifier: may ``row`` take ``token`` by its meter? (Rows the processor forced, ended
        or does not constrain take what they drew.)"""
        if row not in self.free:
            return True
        started, state = time.perf_counter(), self.rows[row]
        ok = state.meter.can_end() if token == self.eos_id else state.meter.allows(state.texts[token])
        self.mask_seconds += time.perf_counter() - started
        return ok

    def rescue(self, row: int, logits) -> int | None:
        """The sampler's verifier: the best token the meter passes, when the row's draws all failed."""
        started, state = time.perf_counter(), self.rows[row]
        token = first_allowed(state.meter, logits, state.texts, self.eos_id)
        self.mask_seconds += time.perf_counter() - started
        return token


def newline_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that are exactly a newline (LLaMA: the byte-fallback token <0x0A>)."""
    with _LOCK:
        if tokenizer not in _NEWLINES:
            vocab = tokenizer.get_vocab()
            _NEWLINES[tokenizer] = tuple(
                i for t, i in vocab.items() if t in ("<0x0A>", "\n", "Ċ") and tokenizer.decode([i]) == "\n"
            )
        return _NEWLINES[tokenizer]


def logits_processor(
    tokenizer,
    constraints: Sequence[AbcConstraints | None],
    max_new_tokens: int | Sequence[int] | None = None,
    meter_in_sampler: bool = False,
) -> tuple[AbcLogitsProcessor | None, list[RowState | None]]:
    """The processor for a batch whose row i obeys ``constraints[i]`` (None: unconstrained), and its row states.
    No processor at all when no row is constrained. With ``max_new_tokens`` (one budget, or one per row) the
    rows wrap up in time. ``meter_in_sampler``: the processor is the verifier of a ``RowSampler`` that
    follows it (see :class:`AbcLogitsProcessor`)."""
    eos_id = tokenizer.eos_token_id
    ll_tok = ll_tokenizer(tokenizer) if any(c is not None for c in constraints) else None
    rows = [
        None if c is None else RowState(new_matcher(tokenizer, c), eos_id, c, ll_tok) for c in constraints
    ]
    if all(r is None for r in rows):
        return None, rows
    for r in rows:
        if r is not None:
            r.lazy = True
    processor = AbcLogitsProcessor(
        rows,
        len(tokenizer),
        eos_id,
        max_new_tokens=max_new_tokens,
        newline_ids=newline_ids(tokenizer),
        ll_tok=ll_tok,
        meter_in_sampler=meter_in_sampler,
    )
    return processor, rows


def finish(row: RowState | None, new_ids: Sequence[int], eos_id: int) -> tuple[list[int], str]:
    """Answer ids and finish_reason for one row (unconstrained: cut at EOS; constrained: see RowState.finish)."""
    if row is not None:
        return row.finish(new_ids)
    ids = list(new_ids)
    return (ids[: ids.index(eos_id)], "stop") if eos_id in ids else (ids, "length")


@dataclass
class Generated:
    text: str
    ids: list[int]
    finish_reason: str
    """stop (EOS) | length (max_new_tokens ran out; a constrained row was cut back to its last complete line)."""
    generated: int = 0
    """Tokens the model generated for the row, EOS included (a cut-back answer's dropped tokens too)."""


def generate_outputs(
    model,
    tokenizer,
    prompts: Sequence[str],
    constraints: Sequence[AbcConstraints | None],
    max_new_tokens: int,
    sampling: RowSampling | Sequence[RowSampling] = RowSampling(temperature=0.0),
) -> list[Generated]:
    """Like :func:`generate`, with ids, finish reasons and generated-token counts."""
    import torch
    from transformers import GenerationConfig

    if len(prompts) != len(constraints):
        raise ValueError(f"{len(prompts)} prompts but {len(constraints)} constraints")
    if not prompts:
        return []
    samplings = [sampling] * len(prompts) if isinstance(sampling, RowSampling) else list(sampling)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):  # left padding: decoder-only models continue from the right end
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    device = next(model.parameters()).device
    processor, rows = logits_processor(tokenizer, constraints, max_new_tokens, meter_in_sampler=True)
    chain = [SuppressToken(pad_id)] if pad_id != eos_id else []  # LLaMA pads with <unk>: never in an answer
    chain += [processor] if processor is not None else []
    chain.append(RowSampler(samplings, device, verifier=processor))
    # transformers fills every setting a passed config leaves unset from model.generation_config (a checkpoint's
    # repetition penalty, beams, banned n-grams...): set aside while the sampler applies every setting itself
    saved, model.generation_config = model.generation_config, GenerationConfig()
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id
    )
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config, logits_processor=chain)  # fmt: skip
    finally:
        model.generation_config = saved
    results = []
    for i, row in enumerate(rows):
        new = out[i, width:].tolist()
        generated = new.index(eos_id) + 1 if eos_id in new else len(new)
        answer, reason = finish(row, new, eos_id)
        text = tokenizer.decode(answer, skip_special_tokens=True)
        results.append(Generated(text, answer, reason, generated))
    return results


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    constraints: Sequence[AbcConstraints | None],
    max_new_tokens: int,
    sampling: RowSampling | Sequence[RowSampling] = RowSampling(temperature=0.0),
) -> list[str]:
    """One batched ``model.generate`` over ``prompts`` (the model's input text, e.g. ``build_chat_prompt(q)``;
    no special tokens added); row i obeys ``constraints[i]`` (``AbcConstraints()`` = syntax only, ``None`` =
    unconstrained) and samples with ``sampling`` (one for all rows, or one per row; greedy by default) from its
    own seeded generator (:class:`~chatmusician.model.sampling.RowSampler`: an answer does not depend on its
    batch). Returns the answers; a constrained answer is always a complete tune (cut back when
    ``max_new_tokens`` ran out)."""
    return [
        g.text for g in generate_outputs(model, tokenizer, prompts, constraints, max_new_tokens, sampling)
    ]
