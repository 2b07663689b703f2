"""Is a tool's output usable? Judged from the output itself, not from the tool's messages.

abc2midi and abcm2ps report "errors" on real collections ("Missing :| at end of tune", "Hornpipe must be in 2/4
or 4/4 time", "Malformed note"…) and still write a correct file, and a list of recoverable messages tuned on one
corpus refuses another's. So a MIDI is good when it parses, plays notes and lasts about what the tune's bars at
its tempo last; an SVG is good when it parses and draws staves. The tools' messages stay as warnings.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from chatmusician.abc.parse import parse_tune

# Repeats double a tune, pickups and endings shift it, an unusual Q: unit halves or doubles it: a MIDI is
# implausible only when it is an order of magnitude off what the bars say.
PLAUSIBLE_RATIO = (0.1, 10.0)
_TEMPO = re.compile(r"(\d+)\s*/\s*(\d+)\s*=\s*(\d+)")
_BARE_TEMPO = re.compile(r"^\s*(\d+)\s*$")
# Text that holds '|' without being a bar line: chord symbols/annotations, !decorations!, comments, fields.
_NOT_MUSIC = re.compile(r'"[^"\n]*"|![^!\n]*!|%[^\n]*|^[A-Za-z]:[^\n]*$|\[[A-Za-z]:[^\]\n]*\]', re.MULTILINE)
_BAR_LINE = re.compile(r"[:\[\]]*\|+[:\]\[]*\d?|::")
_BAR_REST = re.compile(r"[ZX](\d*)")
# abcm2ps draws a staff as one path of horizontal lines: "m x y h w M x y h w …".
_STAFF_PATH = re.compile(r'<path[^>]*\sd="\s*m[\d.]+ [\d.]+\s+h[\d.]+(?:\s+M[\d.]+ [\d.]+\s+h[\d.]+)*\s*"')


def midi_facts(path: Path) -> tuple[float, int]:
    """(length in seconds, notes played) of a MIDI file; mido raises on a malformed file."""
    import mido

    midi = mido.MidiFile(path)
    notes = sum(1 for track in midi.tracks for m in track if m.type == "note_on" and m.velocity > 0)
    return float(midi.length), notes


def beats_per_second(q_value: str | None, unit: Fraction) -> float:
    """Whole notes per second of a Q: value (abc2midi's default: 120 quarter notes a minute)."""
    if q_value:
        if m := _TEMPO.search(q_value):
            return int(m.group(1)) / int(m.group(2)) * int(m.group(3)) / 60
        if m := _BARE_TEMPO.match(q_value):  # ABC 1.6: unit lengths per minute
            return float(unit) * int(m.group(1)) / 60
    return 0.25 * 120 / 60


def expected_music_s(tune_text: str) -> float | None:
    """Roughly how long the tune plays once through: the note lengths of its longest voice (the validator's bar
    sums) at its tempo, or, where those cannot be read, bar lines per voice x the meter; None when it cannot be
    told (free meter and unreadable notes, no music)."""
    from chatmusician.abc.validate import bar_durations

    tune = parse_tune(tune_text)
    tempos = tune.headers.get("Q")
    rate = beats_per_second(tempos[-1] if tempos else None, tune.unit_length)  # abc2midi: the last Q: holds
    try:
        whole_notes = max(
            (sum(bars, Fraction(0)) for bars in bar_durations(tune).values()), default=Fraction(0)
        )
    except Exception:  # noqa: BLE001 - the third-party tokenizer; fall back to counting bar lines
        whole_notes = Fraction(0)
    if whole_notes > 0:
        # whole-bar rests: no length to the validator, Z4/X4 four bars to abc2midi (4/4 with no meter)
        rests = sum(int(n or 1) for n in _BAR_REST.findall(_NOT_MUSIC.sub(" ", tune.body)))
        whole_notes += rests * (tune.meter or 1) / max(1, len(tune.voices))
        return float(whole_notes) / rate
    bars = len(_BAR_LINE.findall(_NOT_MUSIC.sub(" ", tune.body)))
    if not tune.meter or not bars:
        return None
    return bars / max(1, len(tune.voices)) * float(tune.meter) / rate


def midi_problem(length_s: float, notes: int, tune_text: str) -> str | None:
    """Why a parsed MIDI is unusable (None: it is usable)."""
    if notes == 0:
        return "the MIDI plays no notes"
    expected = expected_music_s(tune_text)
    if expected is None or expected <= 0:
        return None
    low, high = PLAUSIBLE_RATIO
    if not low <= length_s / expected <= high:
        return (
            f"the MIDI lasts {length_s:.1f} s, but the tune's bars at its tempo last about {expected:.1f} s "
            f"(plausible: {low:g}x to {high:g}x)"
        )
    return None


def count_staves(svg: str) -> int:
    """Staves drawn in an abcm2ps SVG."""
    return len(_STAFF_PATH.findall(svg))
