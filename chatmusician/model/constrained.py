"""Grammar-constrained ABC generation with transformers: every constrained row writes a tune that parses.

llguidance (MIT, Microsoft's guidance-ai; Rust core) computes, for each constrained row and step, the set of
tokens that keep the text inside the ABC grammar (``chatmusician/abc/grammar.lark``), in about 0.1 ms a token
on this grammar (the mean ``benchmarks/constrained.py`` prints; it has no xgrammar arm).

Supports: one matcher per row, and rows without one (unconstrained rows are never touched, so their greedy
output does not change); different constraints per row in one ``generate``; EOS only where the tune is complete
(the grammar accepts after a complete body line); ``max_new_tokens`` running out -> the answer cut back to the
last point the grammar accepted; budget-aware decoding: near the end of the budget each row looks for the
shortest way to finish its tune with notes (close what is open, end the line, the rest of the header, ``K:``, a
one-note body line, EOS) and, once that completion just fits in what is left, forces it token by token, so
every constrained answer, of any model, ends as a complete tune that abc2midi plays; streaming that only ever
emits text up to such a point. Batch users::

    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.model.constrained import generate

    texts = generate(model, tokenizer, [build_chat_prompt(q) for q in questions],
                     [AbcConstraints(meter="6/8"), None], max_new_tokens=512, do_sample=False)
"""

from __future__ import annotations

import re
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
# Budget-aware finish: a row starts looking for its shortest completion this many tokens before the end...
RESERVE_TOKENS = 48
# ...and forces it when it needs all but this many of the tokens left (one model token, e.g. the "Q" of a new
# field, may lengthen it by several).
RESERVE_SLACK = 10
# Characters that may close what a row left open (a quote, chord, grace group, decoration, field value...),
# tried one and two at a time in front of the completion tails.
CLOSERS = tuple('"]}!1/8 =:|)C')
# Text that holds note letters without being notes: chord symbols, decorations, comments, inline fields.
_NOT_NOTES = re.compile(r'"[^"\n]*"?|![^!\n]*!?|%[^\n]*|\[[A-Za-z]:[^\]\n]*\]?')
_FIELD_LINE = re.compile(r"^[A-Za-z]:")


def tune_ok(text: str) -> bool:
    """Is this complete tune one the validator passes (bar durations aside: the grammar guarantees syntax only)?
    The grammar cannot tell a body of letters the validator reads as words from notes."""
    from chatmusician.abc import extract_tunes, validate_tune

    try:
        found = extract_tunes(text)  # what every tool downstream reads of the answer
        if not found.tunes:
            return False
        issues = validate_tune(found.tunes[0])
    except Exception:  # noqa: BLE001 - any validator failure: not a tune to end on
        return False
    return not any(i.severity == "error" and "bar" not in i.code for i in issues)


def has_notes(text: str) -> bool:
    """Does the body (after the first ``K:`` line) of this possibly unfinished tune play a note?"""
    lines = text.split("\n")
    key = next((i for i, line in enumerate(lines) if line.startswith("K:")), None)
    if key is None:
        return False
    for line in lines[key + 1 :]:
        if _FIELD_LINE.match(line):
            continue
        if re.search(r"[A-Ga-g]", _NOT_NOTES.sub(" ", line)):
            return True
    return False


def completion_tails(constraints: AbcConstraints | None) -> list[str]:
    """Ways to end a tune from wherever a row stands, shortest first: end the line; a one-note body line;
    the rest of the header (the fixed M:/L: lines the row may still owe, then K:) before it; the X: line too."""
    c = constraints or AbcConstraints()
    body = ["C|\n", "C\n"]
    key = f"K:{c.key or 'C'}\n"
    fixed = [f"M:{c.meter}\n"] * (c.meter is not None) + [f"L:{c.unit_length}\n"] * (
        c.unit_length is not None
    )
    owed = [""] + fixed + (["".join(fixed), "".join(fixed[::-1])] if len(fixed) == 2 else [])
    heads = [o + key for o in owed]
    tails = ["", "\n", "|\n"] + body + ["\n" + b for b in body] + [" " + b for b in body]
    tails += [h + b for h in heads for b in body] + ["\n" + h + b for h in heads for b in body]
    tails += ["X:1\n" + h + b for h in heads for b in body] + ["1\n" + h + b for h in heads for b in body]
    # The rest of a fixed header line the row is in the middle of (K:Bb min|or).
    tails += [h[k:] + b for h in heads for k in range(1, len(h)) for b in body]
    return sorted(dict.fromkeys(tails), key=len)


@lru_cache(maxsize=256)
def _encoded_tails(ll_tok, constraints: AbcConstraints | None, eos_id: int, notes: bool):
    """:func:`completion_tails` as tokens (EOS last; with notes in them unless the body has some already) and
    the closer prefixes as tokens (none, one, two), tokenized once per tokenizer and constraints."""
    tails = [t for t in completion_tails(constraints) if notes or "C" in t]
    encoded = tuple(tuple(ll_tok.tokenize_str(t)) + (eos_id,) if t else (eos_id,) for t in tails)
    groups = ([""], CLOSERS, [a + b for a in CLOSERS for b in CLOSERS])
    closers = tuple(tuple(tuple(ll_tok.tokenize_str(p)) if p else () for p in group) for group in groups)
    return encoded, closers


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


def shortest_tune_tokens(tokenizer, constraints: AbcConstraints) -> int:
    """Tokens (EOS included) of the shortest complete tune with notes under ``constraints``: a smaller budget
    can only give an empty answer (0 when no tried completion fits: nothing to refuse on)."""
    return _shortest(ll_tokenizer(tokenizer), tokenizer.eos_token_id, constraints)


@lru_cache(maxsize=64)
def _shortest(ll_tok, eos_id: int, constraints: AbcConstraints) -> int:
    matcher = _compiled(ll_tok, tune_grammar(constraints)).deep_copy()
    plan = RowState(matcher, eos_id, constraints, ll_tok).completion(ll_tok)
    return len(plan) if plan else 0


def new_matcher(tokenizer, constraints: AbcConstraints | None):
    """A fresh matcher for one row (``None`` constraints -> ``None``: the row is not constrained)."""
    if constraints is None:
        return None
    return _compiled(ll_tokenizer(tokenizer), tune_grammar(constraints)).deep_copy()


class RowState:
    """One constrained row: its matcher and where the grammar last accepted (a complete body line)."""

    def __init__(self, matcher, eos_id: int, constraints: AbcConstraints | None = None, ll_tok=None):
        self.matcher, self.eos_id, self.constraints, self.ll_tok = matcher, eos_id, constraints, ll_tok
        # With ll_tok, an accepting point counts (EOS allowed, cut-back target) only where the validator passes
        # the tune too.
        self.can_end = ll_tok is None
        self.consumed = 0  # generated tokens fed to the matcher
        self.last_accept = 0  # generated tokens up to the last accepting point
        self.error: str | None = None
        self.ids: list[int] = []  # the generated tokens fed to the matcher
        self.forced: list[int] | None = None  # the completion being forced (EOS last), once committed
        self.forced_from = 0  # self.consumed when it was committed
        self.plan_len: int | None = None  # length of the last completion looked for
        # Lazy (the processor's rows): accepting points are validated only when needed (EOS competitive, or
        # the cut-back); the streamer's row stays eager (it emits up to last_accept as it goes).
        self.lazy = False
        self.accepts: list[int] = []
        self.checked: dict[int, bool] = {}

    def completion(self, ll_tok) -> list[int] | None:
        """The shortest tokens (EOS last) that end this row's tune with notes from where it stands; None when
        none of the tried completions fits the grammar."""
        text = ll_tok.decode_str(self.ids)
        encoded, closers = _encoded_tails(ll_tok, self.constraints, self.eos_id, has_notes(text))
        for heads in closers:
            best = None
            for head in heads:
                for tokens in encoded:
                    candidate = head + tokens
                    if best is not None and len(candidate) >= len(best):
                        break  # tails are sorted by length
                    if self.matcher.validate_tokens(candidate) != len(candidate):
                        continue
                    if tune_ok(text + ll_tok.decode_str(candidate[:-1])):
                        best = candidate
                        break
            if best is not None:
                return list(best)
        return None  # nothing completes it (e.g. a line of words ended the tune): cut back at the end

    def next_forced(self) -> int | None:
        """The token the committed completion forces now (None: not committed, or the row left it)."""
        if self.forced is None:
            return None
        k = self.consumed - self.forced_from
        if k < len(self.forced) and self.ids[self.forced_from :] == self.forced[:k]:
            return self.forced[k]
        self.forced = None
        return None

    def consume(self, token: int) -> None:
        if self.error is not None or self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or "token rejected"
            return
        self.consumed += 1
        self.ids.append(token)
        if token == self.eos_id:
            return
        if self.ll_tok is None:
            if self.matcher.is_accepting():
                self.last_accept = self.consumed
            return
        if self.lazy:  # validated only when EOS could be sampled here, or at the cut-back
            self.can_end = None if self.matcher.is_accepting() else False
            if self.can_end is None:
                self.accepts.append(self.consumed)
            return
        self.can_end = self.matcher.is_accepting() and tune_ok(self.ll_tok.decode_str(self.ids))
        if self.can_end:
            self.last_accept = self.consumed

    def end_ok(self) -> bool:
        """May the tune end here (lazy rows: the validator is run now, once per point)?"""
        if self.can_end is None:
            self.can_end = tune_ok(self.ll_tok.decode_str(self.ids))
            self.checked[self.consumed] = self.can_end
        return bool(self.can_end)

    def _cut_back(self) -> int:
        if not self.lazy:
            return self.last_accept
        for pos in reversed(self.accepts):  # the last accepting point the validator passes
            ok = self.checked.get(pos)
            if ok is None:
                ok = tune_ok(self.ll_tok.decode_str(self.ids[:pos]))
            if ok:
                return pos
        return 0

    def finish(self, new_ids: Sequence[int]) -> tuple[list[int], str]:
        """Generated ids (EOS and padding included) -> (answer ids, finish_reason stop | length)."""
        ids = list(new_ids)
        end = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
        for token in ids[self.consumed : end]:  # the last token(s) the processor never saw
            self.consume(token)
        if end < len(ids) and self.error is None:
            return ids[:end], "stop"  # EOS was only allowed where the tune is complete
        return ids[: self._cut_back()], "length"


def _bit(token: int) -> int:
    """Token's bit in its int32 mask word (bit 31 is the sign bit)."""
    value = 1 << (token % 32)
    return value - (1 << 32) if value >= 1 << 31 else value


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
        max_new_tokens: int | Sequence[int] | None = None,
        newline_ids: Sequence[int] = (),
        wrap_up_tokens: int = WRAP_UP_TOKENS,
        ll_tok=None,
        reserve_tokens: int = RESERVE_TOKENS,
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
        # Each row's token budget (one for all, or per row: rows of one batch may ask different lengths).
        self.budgets = (
            [max_new_tokens] * len(self.rows)
            if not isinstance(max_new_tokens, Sequence)
            else list(max_new_tokens)
        )
        self.wrap_up_tokens = wrap_up_tokens
        self.newline_ids = list(newline_ids)
        self.ll_tok, self.reserve_tokens = ll_tok, reserve_tokens

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
        for choice in [[self.eos_id], [t for t in self.newline_ids if self._allows(i, t)]]:
            if choice and all(self._allows(i, t) for t in choice):
                self.bitmask[i].zero_()
                for t in choice:
                    self.bitmask[i, t // 32] |= _bit(t)
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
                self.bitmask[i, self.eos_id // 32] = _bit(self.eos_id)
            elif not self._finish_tune(i):
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
    tokenizer,
    constraints: Sequence[AbcConstraints | None],
    max_new_tokens: int | Sequence[int] | None = None,
) -> tuple[AbcLogitsProcessor | None, list[RowState | None]]:
    """The processor for a batch whose row i obeys ``constraints[i]`` (None: unconstrained), and its row states.
    No processor at all when no row is constrained. With ``max_new_tokens`` (one budget, or one per row) the
    rows wrap up in time."""
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
