"""Grammar-constrained ABC: each constrained row's grammar state (llguidance matchers over the ABC grammar, where
the tune may end, its shortest completion), shared by both engines and the stream; the decoding itself (the
logits processor and batched ``generate``) is :mod:`chatmusician.model.constrained_decoding`.

llguidance (MIT, Microsoft's guidance-ai; Rust core) computes, for each constrained row and step, the set of
tokens that keep the text inside the ABC grammar (``chatmusician/abc/grammar.lark``), in about 0.1 ms a token
on this grammar (the mean ``benchmarks/constrained.py`` prints; it has no xgrammar arm).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Sequence
from functools import lru_cache

from chatmusician.abc.grammar import AbcConstraints, ConstraintError, tune_grammar
from chatmusician.abc.meter import metrically_complete
from chatmusician.model.meter import (
    bar_fill,
    copy_tracker,
    field_endings,
    token_texts,
    tracker_for,
)

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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


@lru_cache(maxsize=4096)
def _tokenized(ll_tok, text: str) -> tuple[int, ...]:
    return tuple(ll_tok.tokenize_str(text))


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

    def __init__(
        self, matcher, eos_id: int, constraints: AbcConstraints | None = None, ll_tok=None, meter: bool = True
    ):
        self.matcher, self.eos_id, self.constraints, self.ll_tok = matcher, eos_id, constraints, ll_tok
        # Meter-aware (with ll_tok): every bar as long as its meter (chatmusician.model.meter).
        self.meter = tracker_for("") if meter and ll_tok is not None else None
        self.texts = token_texts(ll_tok) if self.meter is not None else None
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

    def ends_well(self, text: str) -> bool:
        """May the tune end after ``text`` (the validator passes it; meter-aware: its last bar is full)?"""
        return tune_ok(text) and (self.meter is None or metrically_complete(text))

    def _ends_here(self) -> bool:
        meter_ok = self.meter is None or self.meter.can_end()
        return meter_ok and tune_ok(self.ll_tok.decode_str(self.ids))

    def _meter_ends(self, more: str) -> bool:
        """Meter-aware: may the tune end after the text so far and ``more`` (incremental: the line only)?"""
        if self.meter is None:
            return True
        tracker = copy_tracker(self.meter)
        tracker.push(more)
        return tracker.can_end()

    def _fills(self, ll_tok, head: str) -> list[tuple[int, ...]]:
        """Meter-aware: after ``head``, the rest of an M:/L: line the row is in, the rests that fill the bar
        in progress, then the line's end (and EOS)."""
        if self.meter is None:
            return []
        out = []
        for field in field_endings(self.meter.tail + head):
            tracker = copy_tracker(self.meter)
            tracker.push(head + field)
            fill = bar_fill(tracker)
            if fill is None:
                continue
            lead = "\n" if field else ""
            ends = [fill + "|\n", fill + "\n"] + ([] if field else ["\n" + fill + "|\n", "\n" + fill + "\n"])
            out += [_tokenized(ll_tok, field + lead + end) + (self.eos_id,) for end in ends]
        return out

    def completion(self, ll_tok) -> list[int] | None:
        """The shortest tokens (EOS last) that end this row's tune with notes from where it stands (meter-aware:
        with its last bar full); None when none of the tried completions fits the grammar."""
        text = ll_tok.decode_str(self.ids)
        encoded, closers = _encoded_tails(ll_tok, self.constraints, self.eos_id, has_notes(text))
        for heads in closers:
            best = None
            for head in heads:
                if head and self.matcher.validate_tokens(list(head)) != len(head):
                    continue  # the grammar refuses the head: no tail after it can fit
                head_text = ll_tok.decode_str(list(head))
                tails = sorted([*encoded, *self._fills(ll_tok, head_text)], key=len)
                for tokens in tails:
                    candidate = head + tokens
                    if best is not None and len(candidate) >= len(best):
                        break  # tails are sorted by length
                    if self.matcher.validate_tokens(candidate) != len(candidate):
                        continue
                    more = ll_tok.decode_str(candidate[:-1])
                    if self._meter_ends(more) and tune_ok(text + more):
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
        if self.meter is not None:
            self.meter.push(self.texts[token])
        if self.ll_tok is None:
            if self.matcher.is_accepting():
                self.last_accept = self.consumed
            return
        if self.lazy:  # validated only when EOS could be sampled here, or at the cut-back
            self.can_end = None if self.matcher.is_accepting() else False
            if self.can_end is None:
                self.accepts.append(self.consumed)
            return
        self.can_end = self.matcher.is_accepting() and self._ends_here()
        if self.can_end:
            self.last_accept = self.consumed

    def end_ok(self) -> bool:
        """May the tune end here (lazy rows: the validator is run now, once per point)?"""
        if self.can_end is None:
            self.can_end = self._ends_here()
            self.checked[self.consumed] = self.can_end
        return bool(self.can_end)

    def _cut_back(self) -> int:
        if not self.lazy:
            return self.last_accept
        for pos in reversed(self.accepts):  # the last accepting point the validator passes
            ok = self.checked.get(pos)
            if ok is None:
                ok = self.ends_well(self.ll_tok.decode_str(self.ids[:pos]))
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
