"""Validate one tune: header values, balanced brackets/quotes/slurs, ties, repeats, and bar durations per voice.

The music is tokenized by ``abcnotes`` (PyPI, MIT, pure Python: notes, rests, chords, tuplets, broken rhythm,
grace notes, decorations, chord symbols, inline fields), a few milliseconds per tune. What it leaves out,
this module adds: multi-voice bar checks, positions relative to the text given, structured issues, and
never raising on hostile input (values it would choke on are blanked before it sees them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import abcnotes

from chatmusician.abc.config import AbcLimits
from chatmusician.abc.fields import parse_meter
from chatmusician.abc.issues import ERROR, WARNING, Issue
from chatmusician.abc.parse import Tune, check_field_value, iter_body_fields, parse_tune

DEFAULT_VOICE = ""


class _Tokenizer(abcnotes.Tune):
    """abcnotes' body tokenizer fed with our own header values (its parse_abc re-reads the header and
    raises on values we already report as issues)."""

    def __init__(self, header: dict[str, str]):
        self.strict = False  # unreadable characters become Unknown tokens
        self.header = header
        self.fields = []


@dataclass
class Bar:
    """One bar of one voice: its tokens (the opening bar line first, if any) and what it adds up to."""

    tokens: list = field(default_factory=list)
    duration: Fraction = Fraction(0)
    """Sum of the note/rest lengths (first layer, chords once, grace notes not), in whole notes."""
    meter: Fraction | None = None
    """The meter in force at its first note or rest; None for free meter."""
    first: object | None = None
    """Its first note or rest token (for the issue position)."""
    whole_bar_rest: bool = False
    """It holds a Z/X (multi-)measure rest: full by definition."""
    starts_part: bool = False
    """A P: field (a new part) opened it instead of a bar line."""

    @property
    def opening(self):
        return self.tokens[0] if self.tokens and isinstance(self.tokens[0], abcnotes.BarLine) else None


@dataclass
class _Voice:
    bars: list[Bar] = field(default_factory=lambda: [Bar()])
    slurs: list = field(default_factory=list)
    previous_note: object | None = None
    in_overlay: bool = False


def _position(tune: Tune, token) -> tuple[int, int]:
    return tune.body_line + token._line, token._char + 1


def _blank(value: str, replacement: str = "") -> str:
    """``replacement`` padded to the length of ``value`` so that later columns on the line stay put."""
    return replacement.ljust(len(value))


def _tokenizer_lines(tune: Tune) -> list[str]:
    """Body lines with unreadable M:/L:/Q: values blanked (parse_tune reports them) and every K: value
    blanked too: keys do not change durations, and the tokenizer rejects spellings we accept (K:EM,
    M:None); a blank M: is free meter to it."""
    lines = [line.rstrip("\r") for line in tune.body.split("\n")]
    for f in iter_body_fields(lines, tune.body_line):
        free_meter = (
            f.letter == "M"
            and f.value.strip()
            and check_field_value("M", f.value) is None
            and parse_meter(f.value) is None
        )
        if f.letter != "K" and not free_meter and check_field_value(f.letter, f.value) is None:
            continue
        replacement = (
            f"{tune.unit_length.numerator}/{tune.unit_length.denominator}" if f.letter == "L" else ""
        )
        i, start = f.line - tune.body_line, f.column - 1
        lines[i] = lines[i][:start] + _blank(f.value, replacement) + lines[i][start + len(f.value) :]
    return lines


def _tokenizer_header(tune: Tune) -> dict[str, str]:
    ok = {
        letter: tune.header(letter) is not None and check_field_value(letter, tune.header(letter)) is None
        for letter in "MQ"
    }
    header = {
        "key": "",  # see _tokenizer_lines
        "meter": tune.header("M") if ok["M"] and tune.meter is not None else "none",
        "unit note length": f"{tune.unit_length.numerator}/{tune.unit_length.denominator}",
    }
    if ok["Q"]:
        header["tempo"] = tune.header("Q")
    return header


def tokenize(tune: Tune) -> list:
    """abcnotes tokens of the body (token._line is the 0-based body line, token._char the 0-based column)."""
    return _Tokenizer(_tokenizer_header(tune)).tokenize(_tokenizer_lines(tune), {})


def _length(token) -> Fraction | None:
    """Length of a note or rest in whole notes; None when a length has a zero denominator."""
    return _whole_notes(*token.length, *token.time_sig._unit_len)


@lru_cache(maxsize=4096)
def _whole_notes(num: int, den: int, unit_num: int, unit_den: int) -> Fraction | None:
    if den == 0 or unit_den == 0:
        return None
    return Fraction(num, den) * Fraction(unit_num, unit_den)


class _BarSplitter:
    """Walks the tokens once: groups them by voice and bar, adds up durations, and notes bracket, quote,
    slur and tie problems on the way. One handler per token class; others just join the current bar."""

    def __init__(self, tune: Tune, issues: list[Issue]):
        self.tune, self.issues = tune, issues
        self.voices: dict[str, _Voice] = {}
        self.voice = self._switch(tune.voices[0] if tune.voices else DEFAULT_VOICE)
        self.chord_open = self.grace_open = None
        self.in_chord_first = False  # inside [..]: only the first note counts
        self.unknown_lines: set[int] = set()
        self.handlers = {
            abcnotes.Space: lambda token: None,
            abcnotes.Note: self._sound,
            abcnotes.Rest: self._sound,
            abcnotes.BarLine: self._bar_line,
            abcnotes.Newline: self._newline,
            abcnotes.BodyField: self._field,
            abcnotes.InlineField: self._field,
            abcnotes.ChordBracket: self._chord,
            abcnotes.GracenoteBrace: self._grace,
            abcnotes.Slur: self._slur,
            abcnotes.Unknown: self._unknown,
            abcnotes.VoiceOverlay: self._overlay,
        }

    def run(self, tokens: list) -> dict[str, list[Bar]]:
        handlers, default = self.handlers, self._other
        for token in tokens:
            handlers.get(type(token), default)(token)
        self._close_chord()
        for name, voice in self.voices.items():
            for slur in voice.slurs:
                where = f" in voice {name}" if name else ""
                self._add(WARNING, "unclosed_slur", f"slur '(' never closed{where}", slur)
        return {name: voice.bars for name, voice in self.voices.items()}

    def _add(self, severity: str, code: str, message: str, token) -> None:
        self.issues.append(Issue(severity, code, message, *_position(self.tune, token)))

    def _switch(self, name: str) -> _Voice:
        self.voice = self.voices.setdefault(name, _Voice())
        return self.voice

    def _close_chord(self) -> None:
        if self.chord_open is not None:
            message = "chord '[' not closed before the end of the bar/line"
            self._add(ERROR, "unclosed_chord", message, self.chord_open)
            self.chord_open = None

    def _other(self, token) -> None:
        self.voice.bars[-1].tokens.append(token)

    def _bar_line(self, token) -> None:
        self._close_chord()
        self.voice.bars.append(Bar(tokens=[token]))
        self.voice.in_overlay = False

    def _newline(self, token) -> None:
        self._close_chord()
        if self.grace_open is not None:
            self._add(ERROR, "unclosed_grace", "grace notes '{' not closed on this line", self.grace_open)
            self.grace_open = None

    def _field(self, token) -> None:
        text = token._text.strip("[]")
        if text.startswith("V:"):
            words = text[2:].split()
            self._switch(words[0] if words else DEFAULT_VOICE)
            return
        if text.startswith("P:") and self.voice.bars[-1].first is not None:
            self.voice.bars.append(Bar(starts_part=True))  # a new part ends the bar even without a bar line
        self._other(token)

    def _chord(self, token) -> None:
        self._other(token)
        if token._text == "[":
            self.chord_open, self.in_chord_first = token, True
        elif self.chord_open is None:
            self._add(ERROR, "unmatched_bracket", "']' without an opening '['", token)
        else:
            self.chord_open = None

    def _grace(self, token) -> None:
        self._other(token)
        if token._text != "}":
            self.grace_open = token
        elif self.grace_open is None:
            self._add(ERROR, "unmatched_brace", "'}' without an opening '{'", token)
        else:
            self.grace_open = None

    def _slur(self, token) -> None:
        self._other(token)
        if token._text == "(":
            self.voice.slurs.append(token)
        elif self.voice.slurs:
            self.voice.slurs.pop()
        else:
            self._add(WARNING, "unmatched_slur", "')' without an opening '('", token)

    def _unknown(self, token) -> None:
        self._other(token)
        if token._text == '"':
            self._add(
                ERROR, "unclosed_quote", "chord symbol or annotation '\"' not closed on this line", token
            )
        elif token._line not in self.unknown_lines:  # one per line is enough
            self.unknown_lines.add(token._line)
            self._add(WARNING, "unexpected_character", f"unexpected character {token._text!r}", token)

    def _overlay(self, token) -> None:
        self._other(token)
        self.voice.in_overlay = True  # '&' restarts the bar's time: count the first layer only

    def _sound(self, token) -> None:
        voice, bar = self.voice, self.voice.bars[-1]
        bar.tokens.append(token)
        if type(token) is abcnotes.Note:
            if token.grace:
                return
            previous, voice.previous_note = voice.previous_note, (None if self.chord_open else token)
            if previous is not None and previous.tie and self.chord_open is None:
                if (previous.note, previous.octave) != (token.note, token.octave):
                    message = f"tie from {previous._text} to a different note {token._text}"
                    self._add(WARNING, "tie_mismatch", message, previous)
            if self.chord_open is not None:
                if not self.in_chord_first:
                    return
                self.in_chord_first = False
        if voice.in_overlay:
            return
        length = _length(token)
        if length is None:
            self._add(ERROR, "invalid_note_length", f"length of {token._text!r} divides by zero", token)
            return
        if bar.first is None:
            bar.first = token
            meter = token.time_sig._meter
            bar.meter = Fraction(*meter) if meter and meter[1] else None
        if type(token) is abcnotes.Rest and token.symbol in "XZ":
            bar.whole_bar_rest = True
        else:
            bar.duration += length


def split_voices(tune: Tune, tokens: list, issues: list[Issue]) -> dict[str, list[Bar]]:
    """Group tokens by voice and bar, adding up durations; bracket/quote/slur/tie problems go to ``issues``."""
    return _BarSplitter(tune, issues).run(tokens)


def _is_boundary(bar: Bar | None) -> bool:
    """Whether a bar starts a section: a new part, or a repeat sign, double bar or ending opens it."""
    line = bar.opening if bar is not None else None
    return bar is not None and (
        bar.starts_part
        or (
            line is not None
            and (line.repeat_start or line.repeat_end or line.double or line.endings is not None)
        )
    )


def bar_duration_issues(tune: Tune, voice: str, bars: list[Bar]) -> list[Issue]:
    """Bars whose length differs from the meter. Tolerated: a short first bar (pickup), a short last bar,
    and a short bar opened or closed by a repeat sign, double bar, ending or P: part (a section's pickup or
    its completion). Bars with no notes, a measure rest, or a free meter are not checked."""
    issues = []
    sounding = [i for i, bar in enumerate(bars) if bar.first is not None]
    for n, i in enumerate(sounding):
        bar = bars[i]
        if bar.meter is None or bar.whole_bar_rest or bar.duration == bar.meter:
            continue
        if bar.duration < bar.meter:
            following = bars[i + 1] if i + 1 < len(bars) else None
            if n == 0 or n == len(sounding) - 1 or _is_boundary(bar) or _is_boundary(following):
                continue
        where = f" of voice {voice}" if voice else ""
        issues.append(
            Issue(
                WARNING,
                "bar_duration",
                f"bar {n + 1}{where} lasts {bar.duration} of a whole note; the meter asks for {bar.meter}",
                *_position(tune, bar.first),
            )
        )
    return issues


def _repeat_issues(tune: Tune, bars: list[Bar]) -> list[Issue]:
    groups = [bar.tokens for bar in bars if bar.tokens]
    try:
        problems = abcnotes.check_repeats(groups)
    except ValueError:  # ending numbers it cannot order, e.g. "[1-0"
        return [Issue(WARNING, "repeat_structure", "unreadable repeat or ending numbers", tune.body_line)]
    issues = []
    for index, message in problems:
        line, column = _position(tune, groups[index][0]) if groups[index] else (None, None)
        issues.append(Issue(WARNING, "repeat_structure", message, line, column))
    return issues


_ANY_FIELD_LINE = re.compile(r"^\s*[A-Za-z+]:.*$")
_ANY_INLINE_FIELD_START = re.compile(r"\[[A-Za-z]:")


def _without_fields(tune: Tune) -> list:
    """Tokens with every field blanked: the fallback when a field value the tokenizer cannot read got past
    our own checks (only seen on garbage). Bar durations are then unknown, the rest still checks."""
    blank = lambda m: " " * len(m.group())  # noqa: E731
    lines = [
        _ANY_INLINE_FIELD_START.sub(blank, _ANY_FIELD_LINE.sub(blank, line)) for line in tune.body.split("\n")
    ]
    header = {"key": "", "meter": "none", "unit note length": "1/8"}
    return _Tokenizer(header).tokenize(lines, {})


def _music_issues(tune: Tune) -> list[Issue]:
    issues: list[Issue] = []
    try:
        tokens, durations_known = tokenize(tune), True
    except (ValueError, ArithmeticError) as e:
        tokens, durations_known = _without_fields(tune), False
        message = f"bar durations not checked: a field the tokenizer cannot read ({e})"
        issues.append(Issue(WARNING, "not_checked", message[:200], tune.body_line))
    voices = split_voices(tune, tokens, issues)
    if not any(bar.first is not None for bars in voices.values() for bar in bars):
        issues.append(Issue(ERROR, "no_music", "the tune has no notes or rests", tune.body_line))
        return issues
    for name, bars in voices.items():
        if durations_known:
            issues += bar_duration_issues(tune, name, bars)
        issues += _repeat_issues(tune, bars)
    return issues


def bar_durations(text: str | Tune) -> dict[str, list[Fraction]]:
    """Voice id -> the duration of each bar with notes, in whole notes (what the bar check compares)."""
    tune = text if isinstance(text, Tune) else parse_tune(text)
    voices = split_voices(tune, tokenize(tune), [])
    return {name: [bar.duration for bar in bars if bar.first is not None] for name, bars in voices.items()}


def _sort_key(issue: Issue) -> tuple:
    return (issue.line or 0, issue.column or 0)


def validate_tune(text: str | Tune, limits: AbcLimits | None = None) -> list[Issue]:
    """Every problem found in one tune, sorted by position. Never raises.

    Checking costs ~10 µs per character (more on very long lines), so text over
    ``limits.max_input_bytes`` or with a line over ``limits.max_line_chars`` is refused unread
    (sanitize() is the gate for untrusted input; this keeps a direct call from taking seconds)."""
    limits = limits or AbcLimits()
    raw = text.text if isinstance(text, Tune) else str(text)
    if len(raw) > limits.max_input_bytes:
        message = f"tune of {len(raw)} characters; the limit is {limits.max_input_bytes}"
        return [Issue(ERROR, "input_too_large", message)]
    longest = max(raw.split("\n"), key=len)
    if len(longest) > limits.max_line_chars:  # the tokenizer slices each line per token
        line = raw.split("\n").index(longest) + 1
        message = f"line of {len(longest)} characters; the limit is {limits.max_line_chars}"
        return [Issue(ERROR, "line_too_long", message, line, limits.max_line_chars + 1)]
    try:
        tune = text if isinstance(text, Tune) else parse_tune(text)
        issues = list(tune.issues)
    except Exception as e:  # noqa: BLE001 - a request must get an answer, not a traceback
        return [Issue(ERROR, "internal_error", f"could not read the tune: {type(e).__name__}: {e}")]
    try:
        issues += _music_issues(tune)
    except Exception as e:  # noqa: BLE001 - the tokenizer is third-party; report, don't crash
        issues.append(Issue(WARNING, "not_checked", f"music not checked: {type(e).__name__}: {e}"))
    return sorted(issues, key=_sort_key)
