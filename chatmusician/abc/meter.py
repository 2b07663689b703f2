"""Bar durations as text arrives: the validator's duration model, incremental, for meter-aware decoding.

The arithmetic is abcnotes' own (the tokenizer the validator reads durations with): ``note_length`` for a
length suffix, ``dotted_length`` for broken rhythm (``>``/``<``), the tuplet defaults of ``abcnotes.Tuplet``,
a chord as its first note times the chord's length, grace notes and ``y`` without duration, ``Z``/``X`` a
whole bar, ``M:``/``L:`` in the header, on body lines and inline. Bars close where abcnotes splits them.

:class:`MeterTracker` says, for a prefix of a tune (header and body), whether it can still end as a tune
whose every bar is as long as its meter: each closed bar full, except a short first bar (an anacrusis) and a
short bar closed by a repeat/double bar/ending that completes it; the bar in progress never over-full and
fillable with the lengths the generation grammar allows; the last bar full or completing the anacrusis.
The validator's ``bar_duration`` check tolerates more (any short bar beside a section boundary), so what
the tracker passes the validator passes. To stay exact it rejects the constructs whose timing abcnotes
and abc2midi read differently (each found by playing random-model tunes through abc2midi): ``&`` overlays,
tuplets with ``:``, ``(5``/``(7``/``(9`` in 3/4, 3/8, 3/2 (abc2midi: in the time of 3, abcnotes: of 2), broken
rhythm inside or into a tuplet, between notes of different lengths (abc2midi keeps the pair's total) or
chained, ``>``/``<`` not right after a note, rest or chord (abcnotes: none, abc2midi: one), grace notes or a
tuplet or an inline field while a broken rhythm waits for its note, a chord with lengths both inside and outside
(abc2midi takes the outer alone), ``//2``/``//4``/``//8`` (abc2midi: ``//``), a body line starting like a field
line (``F:|``: abc2midi skips it), a tie not right after a note or chord or inside a chord or grace group
(abc2midi ties across them), two grace groups with no note between them, notes after a ``Z``/``X`` in its bar,
a second ``M:`` or ``L:`` line in the header (abcnotes keeps the first, abc2midi the last), a music line that
the tune extractor reads as a field line (`` X :|``: it would start a new tune there).
"""

from __future__ import annotations

import re
from fractions import Fraction

import abcnotes

from chatmusician.abc.fields import default_unit_length, parse_unit_length
from chatmusician.abc.meter_base import (  # noqa: F401 - the names the decoder imports from here
    _FIELD_LINE,
    LENGTHS,
    METERS,
    UNITS,
    State,
    Violation,
    extensions,
    length,
    meter_may_be,
    split_suffix,
    with_,
)
from chatmusician.abc.meter_line import _Line

# What the tune extractor (chatmusician.abc.extract) reads as a field line: a letter and a colon, with spaces
# around the letter (" X :|" would start a new tune there).
_FIELD_LIKE = re.compile(r"[ \t]*[A-Za-z][ \t]*:")


def header_line(state: State, line: str) -> State:
    """A complete header line: M:/L: set the meter and unit; K: ends the header."""
    m = _FIELD_LINE.match(line)
    if m is None:
        return state
    letter, value = m.group(1), line[2:].strip()
    if letter == "M":
        try:
            meter = abcnotes.parse_meter(value)
        except ValueError:
            meter = None
        frac = Fraction(*meter) if meter and meter[1] else None
        state = with_(state, meter=frac, meter_text=value, meter_set=True)
    elif letter == "L":
        try:
            state = with_(state, unit=parse_unit_length(value), unit_set=True)
        except ValueError:
            pass
    elif letter == "K":
        unit = state.unit if state.unit_set else default_unit_length(state.meter)
        state = with_(state, body=True, unit=unit)
    return state


def scan(
    state: State, text: str, final: bool, mid_line: bool = False, resume=None, out: dict | None = None
) -> tuple[State, int]:
    """The state after ``text`` (lines from a clean point; ``mid_line``: it starts after a bar line), or
    Violation. Non-final: the text may still grow (its last note may get a longer suffix, its last line more
    notes); then the state returned is the last clean point and the offset is where in ``text`` it is.
    ``resume``: a :attr:`_Line.snap` in ``text``'s first line (positions counted from ``text``'s start): the
    scan goes on from there. ``out["line"]``: the last line's scanner, with the
    offset of its line in ``text`` (``out["at"]``), when the scan stopped inside a body line."""
    lines, offset = text.split("\n"), 0
    for k, line in enumerate(lines):
        if k == 0 and resume is not None:
            if not mid_line and _FIELD_LIKE.match(line):  # the line grew into one a reader takes for a field
                raise Violation("a music line that starts like a field line")
            complete = len(lines) > 1
            scanner = _Line.resumed(resume, complete or final)
            clean = scanner.music(line[scanner.base :])
            if not (complete or final):
                if out is not None:
                    out["line"], out["at"] = scanner, 0
                return clean, scanner.clean_at
            state = clean
            continue
        if k:
            offset += len(lines[k - 1]) + 1
            mid_line = False
        complete = k < len(lines) - 1
        if not complete and not final and line == "":
            return state, offset
        if not state.body:
            if line[:2] in ("M", "M:", "L", "L:") and (state.meter_set if line[0] == "M" else state.unit_set):
                # the validator (abcnotes) keeps the first, abc2midi the last
                raise Violation(f"a second {line[0]}: line in the header")
            if line.startswith("M:"):
                meter_may_be(line[2:], complete or final)
            if complete:
                state = header_line(state, line)
                continue
            return state, offset
        field = None if mid_line else _FIELD_LINE.match(line)
        if field is None and not mid_line and _FIELD_LIKE.match(line):
            raise Violation("a music line that the tune extractor reads as a field line (' X :|')")
        if field is not None and field.group(1) not in abcnotes.tune_body_fields:
            # "F:|..." is a note and a repeat to abcnotes (and the validator), a field line to abc2midi
            raise Violation(f"a music line that starts like a field line: {line[:2]!r}")
        if field is not None and field.group(1) in abcnotes.tune_body_fields:
            if not complete:
                _Line(state, False).unit_may_change(field.group(1), line[2:], done=final)
                return state, offset
            scanner = _Line(state, True)
            scanner._field(field.group(1), line[2:])
            scanner._check()  # a new unit or meter mid-bar must leave the bar fillable
            state = scanner.s
            continue
        if not complete and not final and len(line) == 1 and line in "MLQKNWw" and not mid_line:
            return state, offset  # a field line not yet told apart
        scanner = _Line(state, complete or final)
        clean = scanner.music(line)
        if not (complete or final):
            if out is not None:
                out["line"], out["at"] = scanner, offset
            return clean, offset + scanner.clean_at
        state = clean
    return state, len(text)


def can_end(state: State) -> bool:
    """May the tune end at this clean point (its last bar full, or completing the anacrusis)?"""
    s = state
    if not s.sounding or s.bar_meter is None or s.whole_rest or s.duration == s.bar_meter:
        return True
    return s.pickup is not None and s.duration + s.pickup == s.bar_meter


class MeterTracker:
    """One tune's text as it arrives: may it go on with ``text`` (:meth:`allows`), may it end here?"""

    def __init__(self) -> None:
        self.state = State()
        self.tail = ""  # the text since the last clean point (scanned again with each candidate)
        self.mid_line = False  # the tail starts after a bar line, not at a line start
        self.broken = False  # text it could not follow was pushed (a forced token): it checks nothing more
        self.snap: tuple[int, dict] | None = None  # a scanner inside the tail to resume from (cheap checks)
        # allows()/can_end() answers at this point (a function of state, tail and mid_line): a step's
        # candidates asked twice, copies asked what the original was; push() starts a fresh dict
        self.verdicts: dict[str | None, bool] = {}

    def copy(self) -> MeterTracker:
        """The same tracker, to push to without moving this one (shares the verdicts until either pushes)."""
        other = MeterTracker.__new__(MeterTracker)
        other.__dict__.update(self.__dict__)
        return other

    def _scan(self, text: str, final: bool, out: dict | None = None) -> tuple[State, int]:
        return scan(self.state, text, final, self.mid_line, self.snap, out)

    def allows(self, text: str) -> bool:
        if self.broken:
            return True
        ok = self.verdicts.get(text)
        if ok is None:
            try:
                self._scan(self.tail + text, final=False)
                ok = True
            except Violation:
                ok = False
            self.verdicts[text] = ok
        return ok

    def push(self, text: str) -> None:
        if self.broken:
            return
        self.verdicts = {}
        self.tail += text
        out: dict = {}
        try:
            state, at = self._scan(self.tail, final=False, out=out)
        except Violation:
            self.broken, self.snap = True, None
            return
        line = out.get("line")
        snap = line.snap if line is not None else None
        self.snap = None
        if snap is not None and out["at"] + snap[0] >= at:  # rebased onto the tail that is kept
            attrs = dict(snap[1], clean_at=snap[1]["clean_at"] + out["at"] - at)
            self.snap = (snap[0] + out["at"] - at, attrs)
        if at:
            self.mid_line = not self.tail[:at].endswith("\n") if "\n" not in self.tail[at - 1 : at] else False
            self.state, self.tail = state, self.tail[at:]

    def can_end(self) -> bool:
        if self.broken:
            return False
        ok = self.verdicts.get(None)  # None: the end of the tune
        if ok is None:
            try:
                ok = can_end(self._scan(self.tail, final=True)[0])
            except Violation:
                ok = False
            self.verdicts[None] = ok
        return ok


def metrically_complete(text: str) -> bool:
    """Does this whole tune (header and body) end metrically right by the tracker's rules?"""
    tracker = MeterTracker()
    tracker.push(text)
    return tracker.can_end()
