"""One line of a tune's body scanned from a clean point (:mod:`chatmusician.abc.meter`): each note, rest, chord,
tuplet, broken rhythm, grace group, bar line and inline field, with abcnotes' arithmetic; a
:class:`~chatmusician.abc.meter_base.Violation` where the tune could no longer end metrically right."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

import abcnotes

from chatmusician.abc.meter_base import (
    _BAR,
    _CHORD_END,
    _INLINE,
    _NOTE,
    _REST,
    _SKIP,
    _TUPLET,
    UNITS,
    State,
    Violation,
    check_suffix,
    dotted,
    extensions,
    length,
    meter_may_be,
    on_grid,
    tuplet_fits,
    with_,
)

_COMMENT = re.compile(r"(?<!\\)%")
_PARTIAL_FIELD = re.compile(r"\[([A-Za-z]):([^\]]*)")
_OPEN_BRACKET = re.compile(r"\[([H-Zh-z]:?)?")
_SPACE = re.compile(r"\s+")
_BRACKET_BAR = re.compile(r"\[[\|\d]")
_BROKEN = re.compile("<+|>+")
_ACCIDENTAL = re.compile(r"\^\^?|__?|=")
_NOTE_START = frozenset("^=_abcdefgABCDEFG")


@lru_cache(maxsize=1024)
def _boundary(text: str) -> bool:
    """Is this bar line a section boundary (a repeat, a double bar or an ending)?"""
    bar = abcnotes.BarLine(line=0, char=0, text=text)
    return bool(bar.repeat_end or bar.double or bar.endings is not None or bar.repeat_start)


@lru_cache(maxsize=256)
def ratio(q: int, p: int) -> Fraction:
    return Fraction(q, p)


class _Line:
    """Scans one line (or its end so far) from a clean state; ``clean`` is the last clean state met."""

    def __init__(self, state: State, final: bool):
        self.s, self.final, self.at = state, final, 0
        self.clean, self.clean_at = state, 0  # the last clean state, and where in the line it is
        # A broken rhythm waiting for its right note: (count, right note longer, the left note's whole length).
        self.dots: tuple[int, bool, Fraction] | None = None
        self.tuplet: list | None = None  # [q, p, notes left]
        self.chord: Fraction | None = None  # the open chord's first note (units), once seen
        self.chord_open = self.grace = False
        self.last_sound: tuple[Fraction, bool, bool] | None = None  # whole-note length, in a tuplet, dotted
        self.chord_suffix: str | None = None  # the chord's first note's suffix, while it may still grow
        self.chord_lengthed = False  # the chord's first note has a length of its own
        self.tie_ok = False  # the last item was a note or a chord's end: a tie may follow
        self.grace_done = False  # a grace group closed and no note, rest or chord came after it yet
        self.base = 0  # where in the line the text given to music() starts (a resumed scan)
        self.snap: tuple[int, dict] | None = (
            None  # (position, scanner) at the last item start well before the end
        )

    @staticmethod
    def resumed(snap: tuple[int, dict], final: bool) -> _Line:
        """A scanner that continues from a :attr:`snap` (the text from its position on is scanned)."""
        at, attrs = snap
        other = _Line.__new__(_Line)
        other.__dict__.update(attrs)
        other.final, other.base, other.snap = final, at, snap
        return other

    def _fail(self, why: str) -> None:
        raise Violation(why)

    def _sound(self, raw: Fraction) -> None:
        """A note, rest or chord of ``raw`` units, with the broken rhythm and tuplet in progress applied."""
        s, factor = self.s, None
        if s.whole_rest:
            self._fail("a note after a whole-bar rest")
        dotted_now = self.dots is not None
        if self.dots is not None:
            if raw * s.unit != self.dots[2]:
                # abc2midi keeps a broken pair's total (C2>D lasts 3 units, abcnotes 7/2): equal notes only
                self._fail("a broken rhythm between notes of different lengths")
            factor = dotted(*self.dots[:2])
            self.dots = None
        in_tuplet = self.tuplet is not None
        if in_tuplet:
            q, p, left = self.tuplet
            factor = ratio(q, p) if factor is None else factor * ratio(q, p)
            self.tuplet = [q, p, left - 1] if left > 1 else None
        whole = raw * s.unit if factor is None else raw * factor * s.unit
        self.last_sound = (whole, in_tuplet, dotted_now)
        meter = s.bar_meter if s.sounding else s.meter
        self.s = with_(s, duration=s.duration + whole, sounding=True, bar_meter=meter)

    def _fits(self, state: State) -> bool:
        if state.bar_meter is None or state.whole_rest or not state.sounding:
            return True
        rest = state.bar_meter - state.duration
        if rest.numerator < 0:  # rest < 0 without Fraction's numbers.Rational check
            return False
        if self.tuplet is not None:
            q, p, left = self.tuplet
            return tuplet_fits(rest, state.unit, left, ratio(q, p))
        if self.dots is not None:
            return on_grid(rest - dotted(*self.dots[:2]) * self.dots[2], state.unit)
        return on_grid(rest, state.unit)

    def _check(self) -> None:
        if not self._fits(self.s):
            self._fail(f"bar of {self.s.duration} cannot fill {self.s.bar_meter}")

    def _bar(self, text: str, partial: bool) -> None:
        s = self.s
        if self.dots or self.tuplet or self.chord_open or self.grace:
            self._fail("a bar line inside a broken rhythm, tuplet, chord or grace group")
        boundary = _boundary(text) or partial
        pickup = s.pickup
        if s.sounding and s.bar_meter is not None and not s.whole_rest and s.duration != s.bar_meter:
            completes = pickup is not None and s.duration + pickup == s.bar_meter
            if s.closed == 0 and s.duration < s.bar_meter:
                pickup = s.duration
            elif not (boundary and completes):
                self._fail(f"bar closed at {s.duration} of {s.bar_meter}")
        closed = s.closed + s.sounding
        self.s = with_(
            s, duration=Fraction(0), sounding=False, whole_rest=False, closed=closed, pickup=pickup
        )
        self.s = with_(self.s, bar_meter=None)
        if not partial:
            self.clean, self.clean_at = self.s, self.at
        self.last_sound = None

    def _field(self, letter: str, value: str) -> None:
        if letter == "M":
            meter_may_be(value, True)
            try:
                m = abcnotes.parse_meter(value)
            except ValueError:
                self._fail(f"unreadable meter {value!r}")
            meter = Fraction(*m) if m and m[1] else None
            self.s = with_(self.s, meter=meter, meter_text=value.strip())
        elif letter == "L":
            try:
                n, d = ([int(x) for x in (value.strip() + "/1").split("/")[:2]] + [1])[:2]
            except ValueError:
                n, d = 1, 0
            if d == 0:
                self._fail("L: divides by zero")
            self.s = with_(self.s, unit=Fraction(n, d), unit_set=True)

    def music(self, line: str) -> State:
        if "%" in line:
            line = _COMMENT.split(line)[0]
        j, end = 0, len(line)
        while j < end:
            if j + 4 <= end and not self.final and line[j - 1 : j] != "\\":
                # Items that start here end before the text's last 4 characters: no token appended later can
                # change them, so a later scan may resume from here (MeterTracker: incremental).
                attrs = dict(self.__dict__)
                del attrs["snap"]
                self.snap = (self.base + j, attrs)
            part = line[j:]
            c = part[
                0
            ]  # each pattern below needs its first character in a set: skip the ones that cannot match
            after_note, self.tie_ok = self.tie_ok, False
            at_end = lambda m, n=len(part): m.end() == n and not self.final  # noqa: E731 - may still grow
            if c == "[" and len(part) > 3 and part[2] == ":":
                m = _INLINE.match(part)
                if m is not None:
                    if self.dots:
                        self._fail("an inline field inside a broken rhythm")
                    self.last_sound = None
                    self._field(m.group(1), m.group(2))
                    self._check()
                    j += m.end()
                    continue
            partial = _PARTIAL_FIELD.fullmatch(part) if c == "[" else None
            if not self.final and partial is not None:
                if self.dots:
                    self._fail("an inline field inside a broken rhythm")
                self.unit_may_change(partial.group(1), partial.group(2), done=False)
                return self.clean  # an inline field still being written
            if c == "[" and not self.final and len(part) < 4 and _OPEN_BRACKET.fullmatch(part):
                if self.dots and len(part) > 1:
                    self._fail("an inline field inside a broken rhythm")
                return self.clean  # an inline field or chord not yet told apart
            m = _SPACE.match(part) if c.isspace() else None
            if m is not None:
                j += m.end()
                continue
            m = _NOTE.match(part) if c in _NOTE_START else None
            if m is not None:
                check_suffix(*m.group(5, 6))
                raw = length(*m.group(4, 5, 6))
                suffix = part[m.end(3) : m.end()]  # groups 4 to 6, the match's end
                if self.grace:
                    if self.dots or self.tuplet:
                        self._fail("grace notes inside a broken rhythm or tuplet")
                elif self.chord_open:
                    if self.chord is None:
                        self._may_sound(tuple(raw * m for m in extensions("")))  # with the chord's length
                        self.chord = raw
                        self.chord_suffix = suffix if at_end(m) else None
                        self.chord_lengthed = bool(suffix)
                else:
                    self._pending_sound(raw, suffix if at_end(m) else None)
                self.tie_ok = not self.grace and not self.chord_open
                self.grace_done = self.grace_done and self.grace
                j += m.end()
                continue
            if c == "[" and _BRACKET_BAR.match(part) is None:
                self.chord_open, self.chord, self.chord_suffix = True, None, None
                j += 1
                continue
            m = _CHORD_END.match(part) if c == "]" else None
            if m is not None:
                check_suffix(*m.group(2, 3))
                if self.chord_open and self.chord is not None:
                    firsts = extensions(self.chord_suffix) if self.chord_suffix is not None else (self.chord,)
                    self.chord_open = False
                    suffix = m.group()[1:]
                    if self.chord_lengthed and suffix:
                        # abc2midi then takes the chord's own length alone ([C2E]2 lasts 2, abcnotes 4)
                        self._fail("a chord with lengths inside and outside")
                    sizes = (
                        extensions(suffix)
                        if at_end(m) and not self.chord_lengthed
                        else (length(*m.groups()),)
                    )
                    self._pending_sizes(tuple(sorted({a * b for a in firsts for b in sizes})))
                self.chord_open = False
                self.tie_ok = True
                j += m.end()
                continue
            m = _BAR.match(part) if c in "[|:" else None
            if m is not None:
                self.at = self.base + j + m.end()
                self._bar(m.group(), partial=at_end(m))
                j += m.end()
                continue
            m = _BROKEN.match(part) if c in "<>" else None
            if m is not None:
                if self.last_sound is None or self.chord_open or self.grace:
                    # abcnotes: no broken rhythm here (after a slur, grace group, decoration, bar...);
                    # abc2midi: one, on the notes around it
                    self._fail("'>' or '<' not right after a note, rest or chord")
                whole, in_tuplet, was_dotted = self.last_sound
                if in_tuplet or self.tuplet is not None or was_dotted:
                    self._fail("broken rhythm in a tuplet or after a broken rhythm's right note")
                n, longer_left = len(m.group()), m.group()[0] == ">"
                grow = whole * (dotted(n, longer_left) - 1)
                self.s = with_(self.s, duration=self.s.duration + grow)
                self.last_sound = None
                self.dots = (n, not longer_left, whole)
                self._check()
                j += m.end()
                continue
            m = _REST.match(part) if c in "XZxz" else None
            if m is not None:
                self.grace_done = False
                if m.group(1) in "XZ":
                    if self.s.sounding or self.dots or self.tuplet:
                        self._fail("a whole-bar rest after notes")
                    self._sound(Fraction(0))
                    self.s = with_(self.s, whole_rest=True)
                    self.last_sound = None
                else:
                    check_suffix(*m.group(3, 4))
                    suffix = m.group()[1:]
                    self._pending_sound(length(*m.group(2, 3, 4)), suffix if at_end(m) else None)
                j += m.end()
                continue
            m = _TUPLET.match(part) if c == "(" else None
            if m is not None:
                if ":" in m.group() or self.dots or self.s.whole_rest:
                    self._fail("a tuplet with ':' or after a broken rhythm")
                meter = abcnotes.parse_meter(self.s.meter_text) if self.s.meter is not None else None
                compound = meter is not None and meter[0] % 3 == 0 and meter[0] > 3
                if meter is not None and meter[0] == 3 and m.group(1) in "579":
                    # abc2midi counts 3/4, 3/8, 3/2 as compound here ((5 in the time of 3), abcnotes not
                    self._fail("(5, (7 or (9 in a meter of three beats")
                t = abcnotes.Tuplet(num=m.group(1), compound=compound, line=0, char=0, text="")
                self.tuplet = [t.q, t.p, t.r]
                self._check()
                j += m.end()
                continue
            if part[0] == "&":
                self._fail("voice overlay")
            if part[0] == "-" and not after_note:
                # abcnotes ties only the note just before; abc2midi also ties across spaces, lines, grace groups
                # and out of chords (its next note is then not struck)
                self._fail("a tie not right after a note or chord")
            if part[0] == "{":
                if self.dots or self.tuplet:
                    self._fail("grace notes inside a broken rhythm or tuplet")
                if self.grace_done:
                    self._fail("two grace groups with no note between them (abc2midi moves the notes after)")
                self.grace = True
            elif part[0] == "}":
                self.grace, self.grace_done = False, True
            if (
                c in "^_="
                and not self.final
                and _ACCIDENTAL.fullmatch(part)
                and not (self.grace or self.chord_open)
            ):
                self._may_sound(extensions(""))  # an accidental: a note follows
            m = _SKIP.match(part)
            if m is None and part[0] in '"!' and not self.final:
                return self.clean  # a chord symbol or decoration not yet closed
            if m is None or not m.group().isspace():
                self.last_sound = None  # abcnotes: '>' only follows a note, rest or chord (spaces between)
            j += m.end() if m is not None else 1
        if self.final:
            if self.dots or self.tuplet or self.chord_open:
                self._fail("a broken rhythm, tuplet or chord left open at the end of the line")
            self.clean = self.s
        return self.clean

    def unit_may_change(self, letter: str, value: str, done: bool) -> None:
        """Violation unless an L: value written so far (``done``: all of it) can leave the bar fillable, or
        an M: value so far can still become one of :data:`METERS`."""
        if letter == "M":
            meter_may_be(value, done)
        if letter != "L":
            return
        written = value.strip()
        options = (
            [written]
            if done or (written and value != value.rstrip())
            else [u for u in UNITS if u.startswith(written)]
        )
        before = self.s
        for option in options:
            try:
                self._field("L", option)
                self._check()
                return
            except Violation:
                pass
            finally:
                self.s = before
        self._fail(f"L:{written} leaves the bar unfillable")

    def _may_sound(self, sizes: tuple[Fraction, ...]) -> None:
        """Violation unless a sound of one of these sizes fits here (the state stays as it was)."""
        before = (self.s, self.dots, self.tuplet, self.last_sound)
        self._pending_sizes(sizes)
        self.s, self.dots, self.tuplet, self.last_sound = before

    def _pending_sound(self, raw: Fraction, suffix: str | None) -> None:
        self._pending_sizes(extensions(suffix) if suffix is not None else (raw,))

    def _pending_sizes(self, sizes: tuple[Fraction, ...]) -> None:
        """A sound whose length is one of ``sizes`` (several while its suffix may still grow)."""
        before = (self.s, self.dots, self.tuplet)
        for size in sizes:
            self.s, self.dots, self.tuplet = before[0], before[1], list(before[2]) if before[2] else None
            try:
                self._sound(size)
            except Violation:
                if before[1] is None:
                    raise
                continue  # a length unequal to the broken rhythm's left note
            if self._fits(self.s):
                return
            s = self.s
            if s.bar_meter is not None and s.sounding and not s.whole_rest and s.duration > s.bar_meter:
                break  # over-full: every longer size is too (sizes ascend)
        self._fail("no length of this note fits the bar")
