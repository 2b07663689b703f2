"""Grammar-constrained ABC generation with transformers: every constrained row writes a tune that parses.

llguidance (MIT, Microsoft's guidance-ai; Rust core) computes, for each constrained row and step, the set of
tokens that keep the text inside the ABC grammar (``chatmusician/abc/grammar.lark``), in about 0.1 ms a token
on this grammar; xgrammar took 20-90 ms a token inside the tune body (``benchmarks/constrained.py`` compares).

Supports: one matcher per row, and rows without one (unconstrained rows are never touched, so their greedy
output does not change); different constraints per row in one ``generate``; EOS only where the tune is complete
(the grammar accepts after a complete body line); ``max_new_tokens`` running out -> the answer cut back to the
last point the grammar accepted, and in the last 16 tokens of the budget a row ends its line and its
tune (EOS or newline forced where allowed) so that even a weak model ends with a whole tune; streaming that only ever emits text up to such a point. Batch users::

    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.model.constrained import generate

    texts = generate(model, tokenizer, [build_chat_prompt(q) for q in questions],
                     [AbcConstraints(meter="6/8"), None], max_new_tokens=512, do_sample=False)
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from chatmusician.abc.grammar import AbcConstraints, ConstraintError, tune_grammar

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEWLINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
# In the last tokens of the budget a constrained row ends its line, then its tune.
WRAP_UP_TOKENS = 16


def ll_tokenizer(tokenizer):
    """llguidance's view of a fast Hugging Face tokenizer (built once per tokenizer: ~1 s on a 32k vocabulary)."""
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError("constrained generation needs a fast tokenizer (tokenizer.json); got a slow one")
    with _LOCK:
        if tokenizer not in _TOKENIZERS:
            _TOKENIZERS[tokenizer] = llguidance.hf.from_tokenizer(tokenizer)
        return _TOKENIZERS[tokenizer]


@lru_cache(maxsize=64)
def _compiled(ll_tok, grammar: str):
    """A pristine matcher for one grammar text; rows get deep copies (compiling once, copying is cheap)."""
    import llguidance

    spec = llguidance.LLMatcher.grammar_from_lark(grammar)
    error = llguidance.LLMatcher.validate_grammar(spec, ll_tok)
    if error:
        raise ConstraintError("constraints", f"the ABC grammar does not compile: {error[:500]}")
    return llguidance.LLMatcher(ll_tok, spec, log_level=0)


def check_constraints(tokenizer, constraints: AbcConstraints) -> None:
    """Compile the grammar for ``constraints`` now (ConstraintError if it cannot be), before any generation."""
    _compiled(ll_tokenizer(tokenizer), tune_grammar(constraints))


def new_matcher(tokenizer, constraints: AbcConstraints | None):
    """A fresh matcher for one row (``None`` constraints -> ``None``: the row is not constrained)."""
    if constraints is None:
        return None
    return _compiled(ll_tokenizer(tokenizer), tune_grammar(constraints)).deep_copy()


class RowState:
    """One constrained row: its matcher and where the grammar last accepted (a complete body line)."""

    def __init__(self, matcher, eos_id: int):
        self.matcher, self.eos_id = matcher, eos_id
        self.consumed = 0  # generated tokens fed to the matcher
        self.last_accept = 0  # generated tokens up to the last accepting point
        self.error: str | None = None

    def consume(self, token: int) -> None:
        if self.error is not None or self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or "token rejected"
            return
        self.consumed += 1
        if token != self.eos_id and self.matcher.is_accepting():
            self.last_accept = self.consumed

    def finish(self, new_ids: Sequence[int]) -> tuple[list[int], str]:
        """Generated ids (EOS and padding included) -> (answer ids, finish_reason stop | length)."""
        ids = list(new_ids)
        end = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
        for token in ids[self.consumed : end]:  # the last token(s) the processor never saw
            self.consume(token)
        if end < len(ids) and self.error is None:
            return ids[:end], "stop"  # EOS was only allowed where the tune is complete
        return ids[: self.last_accept], "length"


class AbcLogitsProcessor:
    """A transformers ``LogitsProcessor``: masks each constrained row to the tokens its grammar allows.

    ``rows[i]`` is the row's :class:`RowState`, or ``None`` for an unconstrained row (left untouched).
    ``mask_seconds`` / ``steps`` add up the time spent computing masks (the benchmark reads them).
    """

    def __init__(
        self,
        rows: Sequence[RowState | None],
        vocab_size: int,
        eos_id: int,
        max_new_tokens: int | None = None,
        newline_ids: Sequence[int] = (),
        wrap_up_tokens: int = WRAP_UP_TOKENS,
    ):
        import torch

        self.rows = list(rows)
        self.active = [i for i, r in enumerate(self.rows) if r is not None]
        self.vocab_size, self.eos_id = vocab_size, eos_id
        words = (vocab_size + 31) // 32
        self.bitmask = torch.zeros((len(self.rows), words), dtype=torch.int32)
        self.bits = torch.arange(32, dtype=torch.int32)
        self.prompt_width: int | None = None
        self.mask_seconds, self.steps = 0.0, 0
        self.max_new_tokens, self.wrap_up_tokens = max_new_tokens, wrap_up_tokens
        self.newline_ids = list(newline_ids)

    def _wrapping_up(self) -> bool:
        return self.max_new_tokens is not None and self.max_new_tokens - self.steps <= self.wrap_up_tokens

    def _allows(self, i: int, token: int) -> bool:
        return bool((int(self.bitmask[i, token // 32]) >> (token % 32)) & 1)

    def _wrap_up(self, i: int) -> None:
        """Near the end of the budget: EOS where the tune may end, else a newline where one may come (a
        complete body line is an accepting point), so a weak model still ends with a whole tune."""
        for choice in [[self.eos_id], [t for t in self.newline_ids if self._allows(i, t)]]:
            if choice and all(self._allows(i, t) for t in choice):
                self.bitmask[i].zero_()
                for t in choice:
                    self.bitmask[i, t // 32] |= 1 << (t % 32)
                return

    def __call__(self, input_ids, scores):
        import llguidance.torch as llt
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
        for i in self.active:
            row = self.rows[i]
            if row.error is not None or row.matcher.is_stopped():
                self.bitmask[i].zero_()  # only EOS (set below): a broken or finished row just ends
                self.bitmask[i, self.eos_id // 32] = 1 << (self.eos_id % 32)
            else:
                llt.fill_next_token_bitmask(row.matcher, self.bitmask, i)
                if self._wrapping_up():
                    self._wrap_up(i)
        rows = torch.tensor(self.active)
        # [R, words] int32 -> [R, words*32] bool: bit b of word w allows token 32*w + b.
        allowed = ((self.bitmask[rows].unsqueeze(-1) >> self.bits) & 1).bool().flatten(1)
        allowed = allowed[:, : min(self.vocab_size, scores.shape[1])].to(scores.device)
        sub = scores[rows.to(scores.device)]
        width = allowed.shape[1]
        sub[:, :width] = sub[:, :width].masked_fill(~allowed, float("-inf"))
        sub[:, width:] = float("-inf")  # logits beyond the tokenizer's vocabulary (padded embeddings)
        scores[rows.to(scores.device)] = sub
        self.mask_seconds += time.perf_counter() - started
        self.steps += 1
        return scores


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
    tokenizer, constraints: Sequence[AbcConstraints | None], max_new_tokens: int | None = None
) -> tuple[AbcLogitsProcessor | None, list[RowState | None]]:
    """The processor for a batch whose row i obeys ``constraints[i]`` (None: unconstrained), and its row states.
    No processor at all when no row is constrained. With ``max_new_tokens`` the rows wrap up in time."""
    eos_id = tokenizer.eos_token_id
    rows = [None if c is None else RowState(new_matcher(tokenizer, c), eos_id) for c in constraints]
    if all(r is None for r in rows):
        return None, rows
    processor = AbcLogitsProcessor(
        rows, len(tokenizer), eos_id, max_new_tokens=max_new_tokens, newline_ids=newline_ids(tokenizer)
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


def generate_outputs(
    model,
    tokenizer,
    prompts: Sequence[str],
    constraints: Sequence[AbcConstraints | None],
    **generate_kwargs: Any,
) -> list[Generated]:
    """Like :func:`generate`, with ids and finish reasons."""
    import torch

    if len(prompts) != len(constraints):
        raise ValueError(f"{len(prompts)} prompts but {len(constraints)} constraints")
    if not prompts:
        return []
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):  # left padding: decoder-only models continue from the right end
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    budget = generate_kwargs.get("max_new_tokens")
    config = generate_kwargs.get("generation_config")
    if budget is None and config is not None:
        budget = config.max_new_tokens
    processor, rows = logits_processor(tokenizer, constraints, budget)
    kwargs = {"eos_token_id": eos_id, "pad_token_id": pad_id, **generate_kwargs}
    if processor is not None:
        kwargs["logits_processor"] = [*kwargs.get("logits_processor", []), processor]
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    results = []
    for i, row in enumerate(rows):
        answer, reason = finish(row, out[i, width:].tolist(), eos_id)
        results.append(Generated(tokenizer.decode(answer, skip_special_tokens=True), answer, reason))
    return results


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    constraints: Sequence[AbcConstraints | None],
    **generate_kwargs: Any,
) -> list[str]:
    """One batched ``model.generate`` over ``prompts`` (the model's input text, e.g. ``build_chat_prompt(q)``;
    no special tokens added); row i obeys ``constraints[i]`` (``AbcConstraints()`` = syntax only, ``None`` =
    unconstrained). ``generate_kwargs`` go to ``model.generate`` (max_new_tokens, do_sample, ...). Returns the
    answers; a constrained answer is always a complete tune (cut back when max_new_tokens ran out)."""
    return [g.text for g in generate_outputs(model, tokenizer, prompts, constraints, **generate_kwargs)]


def streamer_class():
    """:class:`ConstrainedStreamer` (built lazily: transformers is imported only when streaming)."""
    from transformers import TextIteratorStreamer

    class ConstrainedStreamer(TextIteratorStreamer):
        """A ``TextIteratorStreamer`` for one constrained row: it feeds its own matcher and only emits text up
        to the grammar's last accepting point, so the stream never shows a line the final answer cuts away."""

        def __init__(self, tokenizer, constraints: AbcConstraints, **kwargs):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
            self.row = RowState(new_matcher(tokenizer, constraints), tokenizer.eos_token_id)
            self.ids: list[int] = []
            self.sent = ""
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.ids.append(token)
                self.row.consume(token)
            self._emit(self.row.last_accept)

        def _emit(self, upto: int) -> None:
            text = self.tokenizer.decode(self.ids[:upto], skip_special_tokens=True)
            if len(text) > len(self.sent) and text.startswith(self.sent):
                self.on_finalized_text(text[len(self.sent) :])
                self.sent = text

        def end(self) -> None:
            answer, _ = self.row.finish(self.ids)
            self._emit(len(answer))
            self.on_finalized_text("", stream_end=True)

    return ConstrainedStreamer
