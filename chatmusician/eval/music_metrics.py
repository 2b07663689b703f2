"""Music metrics the field reports for generated symbolic music, on ABC tunes (pure functions).

* ``bar_alignment_error`` (after NotaGen, Wang et al. 2025, BAE): the share of checked bars whose duration
  disagrees with the M:/L: in force. Bars are the validator's (``chatmusician.abc.validate``: per voice, inline
  M:/L: followed, chords counted once, grace notes not, tuplets applied); tolerated as NotaGen and the ABC
  standard allow: a short first bar (pickup), a short last bar, and a short bar opened or closed by a repeat
  sign, double bar, volta/ending or P: (a section's pickup or completion). Measure rests and free meter are not
  checked.
* MusPy's metrics (Dong et al. 2020, ``muspy.metrics``), on the notes of the tune as written (repeats not
  expanded, ties merged, grace notes left out, key signature and bar accidentals applied), at MusPy's default
  resolution of 24 steps per quarter note: ``pitch_range`` (highest minus lowest MIDI pitch),
  ``pitch_class_entropy`` (Shannon entropy in bits of the pitch-class histogram), ``scale_consistency`` (the
  largest share of notes inside one of the 24 major/minor scales), ``groove_consistency`` (1 - the mean Hamming
  distance between the onset patterns of successive measures, measured from time 0 in bars of the header
  meter) and ``empty_beat_rate`` (the share of quarter-note beats where no note sounds).
* Per prompt (over its samples): ``distinct_n`` (distinct n-grams / all n-grams of the music tokens, pooled)
  and ``self_similarity`` (mean pairwise normalised edit similarity of the bodies).
* Memorisation (NotaGen's plagiarism check): ``nearest_train_similarity``, the normalised edit similarity
  ``1 - Levenshtein(a, b) / max(len a, len b)`` of the body to the nearest training tune, and the share of tunes
  above 0.95.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations

import abcnotes

from chatmusician.abc.validate import (
    _length,
    _Tokenizer,
    _tokenizer_header,
    bar_duration_issues,
    split_voices,
    tokenize,
)

RESOLUTION = 24
"""MusPy's default time steps per quarter note."""
MEMORISED = 0.95
"""NotaGen's plagiarism bar: a tune this similar to a training tune counts as copied."""
_MAJOR = (1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1)
_MINOR = (1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0)
_FIELD_LINE = re.compile(r"^\s*[A-Za-z+]:.*$", re.M)
_COMMENT = re.compile(r"%.*")


@dataclass(frozen=True)
class Note:
    """One sounding note: MIDI pitch, onset and duration in whole notes from the start of its voice."""

    pitch: int
    onset: Fraction
    duration: Fraction


# --- bar alignment -------------------------------------------------------------------------------------------


def bar_alignment(tune) -> tuple[int, int]:
    """(misaligned bars, checked bars) over every voice (see the module docstring)."""
    try:
        voices = split_voices(tune, tokenize(tune), [])
    except Exception:  # noqa: BLE001 - the tokenizer is third-party; an unreadable tune has no bars to check
        return 0, 0
    wrong = checked = 0
    for name, bars in voices.items():
        checked += sum(b.first is not None and b.meter is not None and not b.whole_bar_rest for b in bars)
        wrong += len(bar_duration_issues(tune, name, bars))
    return wrong, checked


def bar_alignment_error(tune) -> float | None:
    """The share of checked bars whose duration disagrees with the meter; None with no bar to check."""
    wrong, checked = bar_alignment(tune)
    return wrong / checked if checked else None


# --- notes ---------------------------------------------------------------------------------------------------


def _pitch_tokens(tune) -> list:
    """Tokens with the key signature applied (the validator's blank K: for durations only), or, where the
    tokenizer refuses the key as written, without it."""
    header = _tokenizer_header(tune) | {"key": tune.header("K") or ""}
    try:
        return _Tokenizer(header).tokenize(tune.body.split("\n"), {})
    except Exception:  # noqa: BLE001 - a key or field value abcnotes cannot read
        return tokenize(tune)


def notes(tune) -> list[Note]:
    """The sounding notes of every voice (middle C = ABC ``C`` = MIDI 60)."""
    out: list[Note] = []
    cursors: dict[str, Fraction] = {}
    voice = tune.voices[0] if tune.voices else ""
    bar_start: dict[str, Fraction] = {}
    layer_end: Fraction | None = None
    chord: tuple[Fraction, Fraction | None] | None = None  # (onset, its first note's length)
    tied: dict[str, int | None] = {}  # voice -> index in out of a note tied onwards
    for tok in _pitch_tokens(tune):
        kind = type(tok)
        now = cursors.setdefault(voice, Fraction(0))
        if kind in (abcnotes.BodyField, abcnotes.InlineField) and tok._text.strip("[]").startswith("V:"):
            words = tok._text.strip("[]")[2:].split()
            voice = words[0] if words else ""
        elif kind is abcnotes.BarLine:
            if layer_end is not None:
                cursors[voice], layer_end = max(now, layer_end), None
            bar_start[voice] = cursors[voice]
        elif kind is abcnotes.VoiceOverlay:  # '&': a second layer from the start of the bar
            layer_end = max(now, layer_end or now)
            cursors[voice] = bar_start.get(voice, Fraction(0))
        elif kind is abcnotes.ChordBracket:
            if tok._text.startswith("["):
                chord = (now, None)
            elif chord is not None:
                cursors[voice] = chord[0] + (chord[1] or 0)
                chord = None
        elif kind is abcnotes.Rest:
            length = _length(tok) or Fraction(0)
            if tok.symbol in "XZ":  # measure rests: bars of the meter in force
                meter = tok.time_sig._meter
                length = Fraction(*meter) * tok.length[0] if meter and meter[1] else Fraction(0)
            cursors[voice] = now + length
            tied[voice] = None
        elif kind is abcnotes.Note and not tok.grace:
            length = _length(tok) or Fraction(0)
            onset = chord[0] if chord is not None else now
            pitch = 60 + tok.pitch.abs_value
            i = tied.get(voice)
            if i is not None and out[i].pitch == pitch and out[i].onset + out[i].duration == onset:
                out[i] = Note(pitch, out[i].onset, out[i].duration + length)  # a tie: one longer note
            else:
                i = len(out)
                out.append(Note(pitch, onset, length))
            tied[voice] = i if tok.tie else None
            if chord is not None:
                chord = (chord[0], chord[1] if chord[1] is not None else length)
            else:
                cursors[voice] = now + length
    return out


# --- MusPy's metrics -----------------------------------------------------------------------------------------


def _ticks(x: Fraction) -> int:
    return round(x * 4 * RESOLUTION)


def pitch_range(ns: Sequence[Note]) -> float:
    """MusPy ``pitch_range``: highest minus lowest pitch, in semitones (0 with no notes, as MusPy)."""
    return float(max(n.pitch for n in ns) - min(n.pitch for n in ns)) if ns else 0.0


def pitch_class_entropy(ns: Sequence[Note]) -> float:
    """MusPy ``pitch_class_entropy``: ``-sum p log2 p`` over the 12 pitch classes' shares of the notes."""
    if not ns:
        return math.nan
    counts = Counter(n.pitch % 12 for n in ns)
    return -sum(c / len(ns) * math.log2(c / len(ns)) for c in counts.values())


def scale_consistency(ns: Sequence[Note]) -> float:
    """MusPy ``scale_consistency``: the largest share of notes in one major or minor scale (24 tried)."""
    if not ns:
        return math.nan
    best = 0.0
    for scale in (_MAJOR, _MINOR):
        for root in range(12):
            inside = sum(scale[(n.pitch - root) % 12] for n in ns)
            best = max(best, inside / len(ns))
    return best


def empty_beat_rate(ns: Sequence[Note]) -> float:
    """MusPy ``empty_beat_rate``: beats (quarter notes) from 0 to the end in which no note sounds, over all beats
    (a note covers the beats from its onset's to its end's, both included, as MusPy counts)."""
    length = max((_ticks(n.onset + n.duration) for n in ns), default=0)
    if length < 1:
        return math.nan
    n_beats = length // RESOLUTION + 1
    empty = [True] * n_beats
    for n in ns:
        for beat in range(_ticks(n.onset) // RESOLUTION, _ticks(n.onset + n.duration) // RESOLUTION + 1):
            empty[beat] = False
    return sum(empty) / n_beats


def groove_consistency(ns: Sequence[Note], measure: Fraction | None) -> float:
    """MusPy ``groove_consistency`` with ``measure_resolution`` the steps of one bar of ``measure`` (whole
    notes): 1 - Hamming distance between successive bars' onset patterns / (steps per bar x (bars - 1)); nan
    with fewer than two bars or a free meter."""
    steps = _ticks(measure) if measure else 0
    if steps < 1:  # free meter: no bar to compare
        return math.nan
    length = max((_ticks(n.onset + n.duration) for n in ns), default=0)
    n_measures = length // steps + 1  # MusPy's count (a tune ending on a bar line gets an empty last bar)
    if n_measures < 2:
        return math.nan
    patterns = [[False] * steps for _ in range(n_measures)]
    for n in ns:
        bar, position = divmod(_ticks(n.onset), steps)
        patterns[bar][position] = True
    pairs = zip(patterns, patterns[1:], strict=False)
    distance = sum(a != b for prev, nxt in pairs for a, b in zip(prev, nxt, strict=True))
    return 1 - distance / (steps * (n_measures - 1))


def muspy_metrics(tune) -> dict[str, float]:
    """The five MusPy metrics of one tune (nan where MusPy gives nan)."""
    ns = notes(tune)
    return {
        "pitch_range": pitch_range(ns),
        "pitch_class_entropy": pitch_class_entropy(ns),
        "scale_consistency": scale_consistency(ns),
        "groove_consistency": groove_consistency(ns, tune.meter),
        "empty_beat_rate": empty_beat_rate(ns),
    }


# --- diversity and memorisation ------------------------------------------------------------------------------


def normalised_body(body: str) -> str:
    """The music of a body with field lines, comments and whitespace removed (what similarity compares)."""
    return re.sub(r"\s+", "", _COMMENT.sub("", _FIELD_LINE.sub("", body)))


def music_tokens(tune) -> list[str]:
    """The body's music symbols as written (notes, rests, chords, bar lines, ...), spaces and line ends dropped."""
    try:
        return [t._text for t in tokenize(tune) if type(t) not in (abcnotes.Space, abcnotes.Newline)]
    except Exception:  # noqa: BLE001
        return list(normalised_body(tune.body))


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float | None:
    """Distinct n-grams / all n-grams, pooled over the samples of one prompt (None with no n-gram)."""
    grams = [tuple(ts[i : i + n]) for ts in token_lists for i in range(len(ts) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def similarity(a: str, b: str) -> float:
    """Normalised edit similarity ``1 - Levenshtein(a, b) / max(len a, len b)`` (1 for two empty strings)."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(a, b))


def self_similarity(bodies: Sequence[str]) -> float | None:
    """Mean pairwise similarity of one prompt's samples (None with fewer than two)."""
    pairs = list(combinations(bodies, 2))
    return sum(similarity(a, b) for a, b in pairs) / len(pairs) if pairs else None


def nearest(body: str, train_bodies: Sequence[str]) -> tuple[float, int | None]:
    """(similarity to the nearest training body, its index); (0.0, None) with no training tunes."""
    if not train_bodies:
        return 0.0, None
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    _, score, index = process.extractOne(body, train_bodies, scorer=Levenshtein.normalized_similarity)
    return float(score), int(index)
