"""The duration arithmetic and the clean-point state of meter-aware decoding (:mod:`chatmusician.abc.meter`):
abcnotes' own lengths, broken rhythm and tuplet factors, the lengths and meters generation writes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import abcnotes

# The generation grammar's note lengths (grammar.py's _GENERATION_LEN), and none.
LENGTHS = ("",) + tuple(
    [f"{a}" for a in range(1, 9)]
    + [f"{a}/{b}" for a in range(1, 9) for b in (2, 4, 8)]
    + ["/", "//", "/2", "/4", "/8"]  # not //2 //4 //8: abc2midi reads them as // (abcnotes: 1/4 1/8 1/16)
)
# The generation grammar's L: values.
UNITS = ("1/1", "1/2", "1/4", "1/8", "1/16", "1/32")
# The meters meter-aware decoding lets a tune write (a random model writes M:(41+11+15)/1, whose bars no
# budget fills): up to two whole notes, denominators 2 to 16, C, C| and free meter.
METERS = frozenset(
    [f"{n}/{d}" for d in (2, 4, 8, 16) for n in range(1, 2 * d + 1) if n <= 16] + ["C", "C|", "none"]
)
_FIELD_LINE = re.compile(r"^([A-Za-z+]):")
_NOTE = re.compile(r"(\^|\^\^|=|_|__)?([a-gA-G])([,']*)(\d+)?(/+)?(\d+)?")
_CHORD_END = re.compile(r"\](\d+)?(/+)?(\d+)?")
_BAR = re.compile(r"((?:\[\|\]|\|\]|\[\||[\|\:])+(?:\[(?=\d))?|\[(?=\d))(\d+(?:[\-,]\d+)*|[\-,])?")
_REST = re.compile(r"([XZxz])(\d+)?(/+)?(\d+)?")
_TUPLET = re.compile(r"\(([2-9])(?::(\d*))?(?::(\d*))?")
_INLINE = re.compile(r"\[([" + "".join(abcnotes.inline_fields) + r"]):([^\]]+)\]")
_SKIP = re.compile(r'\s+|[.~H-Wh-w]|![^! ]+!|"[^"]*"|[y$`#*;?@()\-]|\{[/\\]?|\}|\\$')


@lru_cache(maxsize=1024)
def length(num: str | None, slash: str | None, den: str | None) -> Fraction:
    """A length suffix's value in units (abcnotes.note_length: A2 -> 2, A/ -> 1/2, A3/2 -> 3/2)."""
    n, d = abcnotes.note_length(num, slash, den)
    return Fraction(n, d)


def check_suffix(slashes: str | None, den: str | None) -> None:
    """Violation for a length abc2midi times differently from abcnotes (``//`` then a number)."""
    if slashes and len(slashes) > 1 and den:
        raise Violation(f"the length {slashes}{den}")


def split_suffix(suffix: str) -> tuple[str | None, str | None, str | None]:
    m = re.fullmatch(r"(\d+)?(/+)?(\d+)?", suffix)
    return m.groups() if m else (None, None, None)


@lru_cache(maxsize=256)
def extensions(suffix: str) -> tuple[Fraction, ...]:
    """The lengths (units) a length suffix written so far may still become."""
    return tuple(sorted({length(*split_suffix(s)) for s in LENGTHS if s.startswith(suffix)}))


@lru_cache(maxsize=64)
def dotted(n_dots: int, longer: bool) -> Fraction:
    """Factor of a broken rhythm (abcnotes.dotted_length): '>' 3/2 then 1/2, '>>' 7/4 then 1/4."""
    num, den = abcnotes.dotted_length((1, 1), n_dots, longer)
    return Fraction(num, den)


def on_grid(rest: Fraction, unit: Fraction) -> bool:
    """Can plain notes fill ``rest`` (whole notes) exactly? They are multiples of an eighth of the unit."""
    # rest / unit * 8 is whole (integer arithmetic: Fraction division is slow in the decoder's hot path)
    return (
        rest.numerator >= 0
        and (rest.numerator * unit.denominator * 8) % (rest.denominator * unit.numerator) == 0
    )


@lru_cache(maxsize=4096)
def tuplet_fits(rest: Fraction, unit: Fraction, left: int, factor: Fraction) -> bool:
    """Can ``left`` tuplet notes (lengths scaled by ``factor``) leave a rest plain notes fill? ``left`` notes
    add up to any multiple of 1/8 unit from left/8 (one note: the grammar's lengths)."""
    if left <= 0:
        return on_grid(rest, unit)
    sums = extensions("") if left == 1 else [Fraction(k, 8) for k in range(left, 64 * left + 1)]
    return any(on_grid(rest - s * factor * unit, unit) for s in sums if s * factor * unit <= rest)


@dataclass(frozen=True)
class State:
    """Where a tune stands at a clean point (a line start or just after a bar line)."""

    body: bool = False
    """Past the K: line."""
    meter: Fraction | None = None
    """The meter in force (None: free meter, nothing checked)."""
    meter_text: str = "none"
    meter_set: bool = False
    """An M: line in the header has set the meter."""
    unit: Fraction = Fraction(1, 8)
    unit_set: bool = False
    """An L: line has set the unit (else it follows the header's meter)."""
    duration: Fraction = Fraction(0)
    """Of the bar in progress, in whole notes."""
    bar_meter: Fraction | None = None
    """The meter at the bar's first note or rest (what the validator compares)."""
    sounding: bool = False
    whole_rest: bool = False
    closed: int = 0
    """Bars with notes closed so far."""
    pickup: Fraction | None = None
    """The short first bar's length."""


def with_(state: State, **changes) -> State:
    """``dataclasses.replace`` without its per-call field introspection (the scanner's hot path)."""
    new = object.__new__(State)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


class Violation(Exception):
    """The text cannot end as a metrically right tune."""


def meter_may_be(value: str, done: bool) -> None:
    """Violation unless the M: value written so far (``done``: all of it) is, or may become, one of
    :data:`METERS`."""
    written = value.strip()
    if done or (written and value != value.rstrip()):  # "M: " may still get its value
        ok = written in METERS
    else:
        ok = any(m.startswith(written) for m in METERS)
    if not ok:
        raise Violation(f"meter {written!r} is not one meter-aware decoding writes")
