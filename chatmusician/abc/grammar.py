"""The ABC tune grammar that constrained decoding enforces, and the request constraints that specialise it.

``grammar.lark`` (beside this file) is the one grammar, in llguidance's Lark dialect. :func:`tune_grammar`
returns it as it is, or with the header's key / meter / unit length fixed and the bar count bounded
(:class:`AbcConstraints`). Pure text work: the decoding library is only imported by ``chatmusician.model``.
The grammar guarantees syntax only; bar durations are still the validator's (``validate_tune``) to report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from chatmusician.abc.fields import parse_key, parse_meter, parse_unit_length

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")
MAX_BARS_LIMIT = 1000
GENERATION_TEXT_CHARS = 48
GENERATION_HEADER_FIELDS = 8
# Generation's K: modifiers: explicit accidentals (^^ __ ^ _ =; the validator rejects "=^b" or "^_b") and clefs
# (an unknown one voids the key line; octave= and
# transpose= and the perc clef pushed notes out of MIDI's range).
_GENERATION_MODIFIER = (
    'MODIFIER: ("^" "^"? | "_" "_"? | "=") /[A-Ga-g]/ | "clef="? ("treble" | "bass" | "alto" | "tenor")'
)
# Generation's quoted strings: an annotation (^ _ < > @ then text) or a plain chord symbol (abc2midi plays
# those and wrote broken MIDI files for empty or odd ones).
_GENERATION_QUOTED = (
    'QUOTED: "\\"" (/[\\^_<>@]/ /[^"\\x00-\\x1f\\x7f]/{1,40} | /[A-G]/ /[#b]/? ("m" | "maj" | "dim" | "aug"'
    ' | "sus")? /[679]/? ("/" /[A-G]/ /[#b]/?)?) "\\""'
)
# Generation's K: modes: the names the validator knows, whole or as three letters.
_MODES = ["major", "minor", "ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian"]
_GENERATION_MODE = (
    "MODE: SP? (" + " | ".join(['"m"'] + [f'"{m[:3]}"' for m in _MODES] + [f'"{m}"' for m in _MODES]) + ")"
)
# Generation's Q: a beat abc2midi takes (a power of two below) at 40-299 beats a minute.
_GENERATION_TEMPO = (
    'TEMPO: /[1-3]/ "/" ("2" | "4" | "8" | "16") "=" (/[4-9]/ /[0-9]/ | /[12]/ /[0-9]/ /[0-9]/)'
)
# Generation's note lengths: 1-8 units, halves to eighths (abc2midi wrote empty or broken MIDI for A/27; it
# reads //2 //4 //8 as // (a quarter unit), abcnotes and the validator as /2 /4 /8).
_GENERATION_LEN = 'LEN: /[1-8]/ ("/" ("2" | "4" | "8"))? | "/" ("2" | "4" | "8")? | "//"'
# Generation's decorations: !name! and the one-character ones that are not letters or are bowings (u, v):
# two other letters side by side make a word that ends a tune's body for every reader (extract_tunes).
_GENERATION_DECORATION = 'DECORATION: "!" /[a-zA-Z0-9.<>()+\\-]/{1,20} "!" | /[.~uv]/'
# Generation's field lines in the body: the typed ones and words/notes (no T:, which may start a tune, nor the
# P:, V:, I:, m:, s: that abc2midi parses).
_GENERATION_BODY_FIELD = 'FIELD_LINE: METER_LINE | LENGTH_LINE | TEMPO_LINE | KEY_LINE | /[NWw]/ ":" TEXT?'
# Characters a fixed header value may hold (it is spliced into the grammar as a string literal).
_SAFE_VALUE = re.compile(r"[A-Za-z0-9#^_=+\-/|() ]{1,40}")


class ConstraintError(ValueError):
    """A constraint the grammar cannot take, with the request field it came from (a 400, not a 500)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


@dataclass(frozen=True)
class AbcConstraints:
    """What a request asks of the tune besides valid syntax (all optional; hashable)."""

    key: str | None = None
    """The K: value the header must carry, e.g. "G", "Ador", "Bb minor"."""
    meter: str | None = None
    """The M: value the header must carry, e.g. "6/8", "C|"."""
    unit_length: str | None = None
    """The L: value the header must carry, e.g. "1/8"."""
    max_bars: int | None = None
    """At most this many bar lines in the body (a volta bracket ``[2`` is not one)."""

    def __post_init__(self) -> None:
        checks = {"key": parse_key, "meter": parse_meter, "unit_length": parse_unit_length}
        for name, parse in checks.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not _SAFE_VALUE.fullmatch(value.strip()):
                raise ConstraintError(name, f"{name} must be a short ABC value like 'G', '6/8' or '1/8'")
            try:
                parse(value)
            except ValueError as exc:
                raise ConstraintError(name, f"{name}: {exc}") from None
            object.__setattr__(self, name, value.strip())
        bars = self.max_bars
        if bars is not None and (
            isinstance(bars, bool) or not isinstance(bars, int) or not 1 <= bars <= MAX_BARS_LIMIT
        ):
            raise ConstraintError("max_bars", f"max_bars must be an integer from 1 to {MAX_BARS_LIMIT}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AbcConstraints:
        """From a request's fields (unknown names -> ConstraintError); None values are left out."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConstraintError(unknown[0], f"unknown constraint {unknown[0]!r}; known: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@lru_cache(maxsize=1)
def base_grammar() -> str:
    """The grammar file's text."""
    return GRAMMAR_PATH.read_text(encoding="utf-8")


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _replace_marked(grammar: str, marker: str, line: str) -> str:
    pattern = re.compile(rf"^.*#\s*@{marker}\s*$", re.MULTILINE)
    if len(pattern.findall(grammar)) != 1:
        raise RuntimeError(f"grammar.lark must have exactly one line marked @{marker}")
    first, *rest = line.split("\n")  # the marker stays on the first line: a later step may replace it again
    return pattern.sub(lambda _: "\n".join([f"{first}    # @{marker}", *rest]), grammar)


def _header_rules(c: AbcConstraints) -> str:
    """header: the free fields in any order, each fixed field exactly once (fixed M: and L: in either order)."""
    fixed = {}
    free = ["TEXT_LINE", "TEMPO_LINE", "COMMENT"]
    if c.meter is not None:
        fixed["fixed_meter"] = f"fixed_meter: {_literal('M:' + c.meter)} NL"
    else:
        free.append("METER_LINE")
    if c.unit_length is not None:
        fixed["fixed_length"] = f"fixed_length: {_literal('L:' + c.unit_length)} NL"
    else:
        free.append("LENGTH_LINE")
    other = f"header_other: ({' | '.join(free)}) NL"
    if not fixed:
        return f"header: header_field{{0,{GENERATION_HEADER_FIELDS}}}"
    names = list(fixed)
    orders = [names] if len(names) == 1 else [names, names[::-1]]
    body = " | ".join(" header_other{0,3} ".join(order) for order in orders)
    return "\n".join([f"header: header_other{{0,12}} ({body}) header_other{{0,12}}", other, *fixed.values()])


def tune_grammar(constraints: AbcConstraints | None = None, renderable: bool = True) -> str:
    """The grammar text for one request: the base grammar, specialised by ``constraints`` when given.

    ``renderable`` (generation) drops the one standard construct the renderers reject (the invisible bar
    ``[|]``, an error to abc2midi), keeps to the K: (a tonic first), L: (1/2^n), modes/modifiers and Q: forms the validator and abc2midi
    both read, keeps to the decorations and body fields every reader takes (see below), keeps '|', ':', brackets and
    backslashes out of free text (abc2midi reads ``T:||:`` as music),
    keeps header free text to the text-only fields, allows no comment after a
    typed header value (the validator reads it as part of the value) and bounds free text tighter (a weak model rambles in titles until
    max_new_tokens runs out); ``renderable=False`` is all the ABC the grammar knows (the coverage test).
    """
    grammar = base_grammar()
    if renderable:
        grammar = _replace_marked(grammar, "invisible", 'INVISIBLE_BAR: "[|"')
        grammar = _replace_marked(
            grammar, "text", f"TEXT: /[^\\x00-\\x1f\\x7f|:\\[\\]\\\\]/{{1,{GENERATION_TEXT_CHARS}}}"
        )
        grammar = _replace_marked(grammar, "header", f"header: header_field{{0,{GENERATION_HEADER_FIELDS}}}")
        grammar = _replace_marked(grammar, "textline", 'TEXT_LINE: /[TCOABDFGHNRSZW]/ ":" TEXT?')
        grammar = _replace_marked(grammar, "tail", "TAIL: SP")
        grammar = _replace_marked(grammar, "modifier", _GENERATION_MODIFIER)
        grammar = _replace_marked(grammar, "mode", _GENERATION_MODE)
        grammar = _replace_marked(grammar, "tempo", _GENERATION_TEMPO)
        grammar = _replace_marked(grammar, "decoration", _GENERATION_DECORATION)
        grammar = _replace_marked(grammar, "quoted", _GENERATION_QUOTED)
        grammar = _replace_marked(grammar, "len", _GENERATION_LEN)
        grammar = _replace_marked(grammar, "bodyfield", _GENERATION_BODY_FIELD)
        grammar = _replace_marked(grammar, "keyvalue", "KEY: TONIC MODE? (SP MODIFIER){0,4}")
        grammar = _replace_marked(grammar, "length", 'LENGTH: "1/" ("1" | "2" | "4" | "8" | "16" | "32")')
    c = constraints or AbcConstraints()
    if c == AbcConstraints():
        return grammar
    grammar = _replace_marked(grammar, "header", _header_rules(c))
    if c.key is not None:
        grammar = _replace_marked(grammar, "key", f"key_line: {_literal('K:' + c.key)} NL")
    if c.max_bars is not None:
        n = c.max_bars
        grammar = _replace_marked(
            grammar, "music", f"music: head_end | head (BAR seg){{0,{n - 1}}} BAR seg_end"
        )
    return grammar
