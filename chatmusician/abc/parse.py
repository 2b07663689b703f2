"""Read one tune's header fields and body (ABC 2.1 sections 2.2 and 3): a light pass, no music tokenizing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from chatmusician.abc.fields import (
    Key,
    default_unit_length,
    parse_key,
    parse_meter,
    parse_tempo_bpm,
    parse_unit_length,
)
from chatmusician.abc.issues import ERROR, WARNING, Issue

FIELD_LINE = re.compile(r"^([A-Za-z+]):(.*)$")
# Letters that may start a field line inside the body (standard 3, table "tune body"); any other
# "A:" at the start of a body line is music (a note A then a repeat sign).
BODY_FIELD_LETTERS = frozenset("IKLMmNPQRrsTUVWw+")
INLINE_FIELD = re.compile(r"\[([A-Za-z]):([^\]\n]*)\]")
STANDARD_FIELD_LETTERS = frozenset("ABCDFGHIKLMmNOPQRrSsTUVWwXZ+")


@dataclass
class BodyField:
    """A K:/M:/L:/Q:/V:/... field inside the body, on its own line or inline ``[M:3/4]``."""

    letter: str
    value: str
    line: int
    """1-based line in the tune text."""
    column: int
    """1-based column of the value's first character."""
    inline: bool


@dataclass
class Tune:
    """One tune: its header fields, its body, and the musical context the header sets."""

    text: str
    """The tune as given."""
    headers: dict[str, list[str]] = field(default_factory=dict)
    """Header field letter -> values in order (up to and including the first K:)."""
    body: str = ""
    """Everything after the K: line."""
    body_line: int = 1
    """1-based line of ``text`` where the body starts."""
    number: int | None = None
    """The X: reference number."""
    title: str | None = None
    """The first T: field."""
    key: Key | None = None
    """The header K: field, parsed; None when missing or unreadable."""
    meter: Fraction | None = None
    """Header meter as a fraction of a whole note; None for free meter or no M:."""
    meter_text: str | None = None
    """The header M: value as written."""
    unit_length: Fraction = Fraction(1, 8)
    """Header unit note length (L:, or the standard's default from the meter)."""
    tempo_bpm: int | None = None
    """Header Q: tempo in beats per minute, when it gives one."""
    voices: list[str] = field(default_factory=list)
    """Voice ids (V:) in order of first appearance, header and body."""
    body_fields: list[BodyField] = field(default_factory=list)
    """Fields met in the body, in order."""
    issues: list[Issue] = field(default_factory=list)
    """Problems found while reading the header and body fields (validate_tune reports them)."""

    def header(self, letter: str) -> str | None:
        """The first value of a header field, or None."""
        values = self.headers.get(letter)
        return values[0] if values else None


def _split_lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n")]


def _value_column(raw: str) -> int:
    """1-based column of a field line's value (after "K:" and spaces)."""
    return 3 + len(raw[2:]) - len(raw[2:].lstrip())


def iter_body_fields(lines: list[str], first_line: int) -> Iterator[BodyField]:
    """Fields in body lines (``first_line`` = 1-based number of ``lines[0]``)."""
    for offset, line in enumerate(lines):
        number = first_line + offset
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        m = FIELD_LINE.match(stripped)
        if m and m.group(1) in BODY_FIELD_LETTERS:
            yield BodyField(m.group(1), m.group(2), number, indent + _value_column(stripped), inline=False)
            continue
        if stripped.startswith("%") or "[" not in line:
            continue
        code = line.split("%", 1)[0]
        for m in INLINE_FIELD.finditer(code):
            yield BodyField(m.group(1), m.group(2), number, m.start(2) + 1, inline=True)


def check_field_value(letter: str, value: str) -> tuple[str, str] | None:
    """(code, message) when a K:/M:/L:/Q: value cannot be read, else None."""
    parsers = {"K": (parse_key, "invalid_key"), "M": (parse_meter, "invalid_meter")}
    parsers |= {"L": (parse_unit_length, "invalid_unit_length"), "Q": (parse_tempo_bpm, "invalid_tempo")}
    if letter not in parsers:
        return None
    parse, code = parsers[letter]
    try:
        parse(value)
    except ValueError as e:
        return code, str(e)
    return None


def _severity(code: str) -> str:
    return WARNING if code == "invalid_tempo" else ERROR


def parse_tune(text: str) -> Tune:
    """Split one tune into header fields and body and read its key, meter, unit length, tempo and voices.

    Never raises: unreadable values become ``Tune.issues`` (and the value stays None/default).
    """
    tune = Tune(text=text)
    lines = _split_lines(text)
    first_music = _first_music_line(lines)
    key_line = next((i for i, line in enumerate(lines[:first_music]) if line.lstrip().startswith("K:")), None)
    header_end = key_line + 1 if key_line is not None else first_music
    positions: dict[str, tuple[int, int]] = {}  # first occurrence of each header letter -> (line, column)
    last_letter = None
    for i, raw in enumerate(lines[:header_end]):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        m = FIELD_LINE.match(line)
        if m is None:
            tune.issues.append(
                Issue(WARNING, "not_a_field", f"header line is not a field: {line[:60]!r}", i + 1, 1)
            )
            continue
        letter, value = m.group(1), m.group(2).strip()
        if letter == "+" and last_letter:  # continuation of the previous field
            tune.headers[last_letter][-1] += " " + value
            continue
        if letter not in STANDARD_FIELD_LETTERS:
            tune.issues.append(Issue(WARNING, "unknown_field", f"unknown header field {letter}:", i + 1, 1))
        tune.headers.setdefault(letter, []).append(value)
        positions.setdefault(letter, (i + 1, _value_column(line) + len(raw) - len(raw.lstrip())))
        last_letter = letter
    tune.body_line = header_end + 1
    tune.body = "\n".join(lines[header_end:])
    _read_header_values(tune, positions)
    tune.body_fields = list(iter_body_fields(lines[header_end:], header_end + 1))
    for f in tune.body_fields:
        problem = check_field_value(f.letter, f.value)
        if problem:
            tune.issues.append(Issue(_severity(problem[0]), problem[0], problem[1], f.line, f.column))
        if f.letter == "V":
            _add_voice(tune, f.value)
    return tune


def _first_music_line(lines: list[str]) -> int:
    """Index of the first line that is neither empty, a comment nor a field (len(lines) if none)."""
    for i, raw in enumerate(lines):
        line = raw.strip()
        if line and not line.startswith("%") and not FIELD_LINE.match(line):
            return i
    return len(lines)


def _add_voice(tune: Tune, value: str) -> None:
    voice_id = value.split()[0] if value.split() else ""
    if voice_id and voice_id not in tune.voices:
        tune.voices.append(voice_id)


def _read_header_values(tune: Tune, positions: dict[str, tuple[int, int]]) -> None:
    number = tune.header("X")
    if number is None:
        tune.issues.append(Issue(WARNING, "missing_number", "no X: reference number", 1, 1))
    elif re.fullmatch(r"\d+", number.strip()):
        tune.number = int(number)
    else:
        tune.issues.append(
            Issue(WARNING, "invalid_number", f"X: {number!r} is not a number", *positions["X"])
        )
    tune.title = tune.header("T")
    for letter in "KMLQ":
        value = tune.header(letter)
        problem = None if value is None else check_field_value(letter, value)
        if problem:
            tune.issues.append(Issue(_severity(problem[0]), problem[0], problem[1], *positions[letter]))
            continue
        if letter == "K" and value is not None:
            tune.key = parse_key(value)
        elif letter == "M" and value is not None:
            tune.meter, tune.meter_text = parse_meter(value), value
        elif letter == "L" and value is not None:
            tune.unit_length = parse_unit_length(value)
        elif letter == "Q" and value is not None:
            tune.tempo_bpm = parse_tempo_bpm(value)
    if tune.header("L") is None:
        tune.unit_length = default_unit_length(tune.meter)
    if tune.header("K") is None:
        tune.issues.append(
            Issue(ERROR, "missing_key", "no K: field (the header must end with one)", tune.body_line)
        )
    for value in tune.headers.get("V", []):
        _add_voice(tune, value)
