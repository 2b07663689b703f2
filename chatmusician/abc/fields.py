"""Values of the musical header fields (K: key, M: meter, L: unit length, Q: tempo), as pure functions.

Each ``parse_*`` returns the value or raises ``ValueError`` with a message fit for an :class:`Issue`.
Written against the ABC 2.1 standard (sections 3.1.6-3.1.14), liberal where the tools are liberal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MODES = ("major", "minor", "ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian")

# Tonic and mode at the start of a K: value; the mode word is case-insensitive and may be abbreviated to
# three letters ("Ador", "G Mixolydian", "Bbm"). Used on its own to find where a key ends and music begins
# in the single-line form "K:G G2BG".
KEY_START = re.compile(
    r"(?P<tonic>[A-Ga-g])(?P<acc>[#b]?)"
    r"(?:\s*(?P<mode>(?i:m(?![a-z])|(?:maj|min|ion|dor|phr|lyd|mix|aeo|loc)[a-z]*)))?"
    r"|(?P<special>none|HP|Hp)(?![A-Za-z])"
)
_KEY_MODIFIER = re.compile(
    r"(?:\^\^|\^|__|_|=)[A-Ga-g]"  # explicit accidentals: K:D ^g
    r"|(?i:exp|treble|alto|tenor|bass|perc|none)(?:[+-]8)?"  # bare clef names, "exp" (explicit only)
    r"|[A-Za-z][\w-]*=\S*"  # clef=bass, middle=d, transpose=-2, octave=1, stafflines=5, ...
    r"|[+-]8"
)


@dataclass(frozen=True)
class Key:
    """A parsed K: field."""

    tonic: str | None
    """Tonic as written with its accidental ("F#", "Bb"); None for K:none."""
    mode: str
    """One of MODES."""
    text: str
    """The K: value as written."""

    @property
    def name(self) -> str:
        return "none" if self.tonic is None else f"{self.tonic} {self.mode}"


def parse_key(value: str) -> Key:
    """Parse a K: value: tonic (A-G, optional #/b), mode, then accidentals/clef modifiers; empty means C."""
    text = value.strip()
    if not text:
        return Key("C", "major", value)
    m = KEY_START.match(text)
    if m is None:
        if _KEY_MODIFIER.fullmatch(text.split()[0]):  # clef or accidentals only: the key stays C
            m_rest, tonic, mode = text, "C", "major"
        else:
            raise ValueError(f"unrecognized key {text!r} (expected a tonic A-G, e.g. K:G, K:Ador, K:Bbm)")
    else:
        m_rest = text[m.end() :]
        if m.group("special") == "none":
            tonic, mode = None, "major"
        elif m.group("special"):  # Highland pipes: the D major signature
            tonic, mode = "D", "major"
        else:
            tonic = m.group("tonic").upper() + m.group("acc")
            word = (m.group("mode") or "major").lower()
            mode = "minor" if word == "m" else next((x for x in MODES if x.startswith(word)), None)
            if mode is None:
                raise ValueError(f"unrecognized mode {m.group('mode')!r} in key {text!r}")
    for token in m_rest.split():
        if not _KEY_MODIFIER.fullmatch(token):
            raise ValueError(f"unrecognized {token!r} in key {text!r}")
    return Key(tonic, mode, value)


_METER = re.compile(r"\(?(\d+(?:\+\d+)*)\)?/(\d+)")


def parse_meter(value: str) -> Fraction | None:
    """Parse an M: value to a fraction of a whole note; None for free meter ("none", or empty)."""
    text = re.sub(r"\s+", "", value)
    if text.lower() in ("", "none", "free"):
        return None
    if text == "C":
        return Fraction(4, 4)
    if text == "C|":
        return Fraction(2, 2)
    m = _METER.fullmatch(text)
    if m is None:
        raise ValueError(f"unrecognized meter {value.strip()!r} (expected e.g. M:6/8, M:C, M:none)")
    numerator, denominator = sum(int(x) for x in m.group(1).split("+")), int(m.group(2))
    if numerator == 0 or denominator == 0:
        raise ValueError(f"meter {value.strip()!r} has a zero")
    return Fraction(numerator, denominator)


def parse_unit_length(value: str) -> Fraction:
    """Parse an L: value ("1/8", "1/16", "1") to a fraction of a whole note."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(\d+))?\s*", value)
    if m is None or int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        raise ValueError(f"unrecognized unit note length {value.strip()!r} (expected e.g. L:1/8)")
    return Fraction(int(m.group(1)), int(m.group(2) or 1))


def default_unit_length(meter: Fraction | None) -> Fraction:
    """The unit length when there is no L: field (standard 3.1.7): 1/16 below 3/4, else 1/8."""
    return Fraction(1, 16) if meter is not None and meter < Fraction(3, 4) else Fraction(1, 8)


_TEMPO = re.compile(r"(?:(?P<beats>(?:\d+/\d+\s*)+|[Cc]\d*)\s*=\s*)?(?P<bpm>\d+)")


def parse_tempo_bpm(value: str) -> int | None:
    """Beats per minute of a Q: value ("1/4=120", "120", '"Allegro" 3/8=40'); None for text-only tempos."""
    text = re.sub(r'"[^"]*"', " ", value).strip()
    if not text:
        return None
    m = _TEMPO.fullmatch(text)
    if m is None or re.search(r"/0+(?!\d)", m.group("beats") or ""):
        raise ValueError(f"unrecognized tempo {value.strip()!r} (expected e.g. Q:1/4=120)")
    return int(m.group("bpm"))
