"""The Nottingham round trip: ABC -> abc2midi -> the ingestion job's per-file work -> ABC, measured against
the original tune.

For each tune: the tune without its chord symbols, played by abc2midi, is the truth (its melody); the tune
with them (abc2midi adds a chord and bass accompaniment the job must leave out) is the job's input, as is, or
played like a performance (onsets and note ends jittered, velocities noised). The job's ABC, played by
abc2midi again, is compared with the truth: onset+pitch F1, exact top-note pitch sequence, meter, key, and
whether the bar lines fall where the original's do (the pickup found).

abc2midi plays tunes marked ``R:Hornpipe`` swung (2:1), a performance the notation leaves out: ``R:`` lines are
removed before the input is made (:func:`prepare`); the report measures the swung hornpipes apart
(``strip_rhythm=False``).

``scripts/midi_roundtrip.py`` runs every tune and writes ``reports/midi_roundtrip.md``; the tests run a
deterministic subset against the same thresholds.
"""

from __future__ import annotations

import io
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mido

from chatmusician.abc import bar_durations, parse_key, parse_meter, parse_tune
from chatmusician.ingest.config import IngestConfig
from chatmusician.ingest.pipeline import ingest_one
from chatmusician.ingest.roundtrip import abc_to_midi, agreement, midi_notes

THRESHOLDS = {"pitch_exact": 0.95, "onset_f1": 0.95, "meter": 1.0, "jitter_onset_f1": 0.85}
"""The issue's goals: exact pitch sequence, mean onset+pitch F1, meter agreement; F1 under jitter."""
_CHORD_SYMBOL = re.compile(r'"[^"]*"')
_R_FIELD = re.compile(r"^R:.*\n", re.MULTILINE)


@dataclass
class TuneFigures:
    index: int
    title: str
    jitter: bool
    reason: str = ""
    message: str = ""
    onset_f1: float = 0.0
    pitch_exact: bool = False
    pitch_ratio: float = 0.0
    meter_ok: bool = False
    key_ok: bool = False
    """Same tonic and mode, or the same key signature for modal tunes (K:Ador and K:G share one)."""
    key_exact: bool = False
    """Same tonic and mode."""
    pickup_ok: bool = False
    bar_agreement: float = 0.0
    snapped: bool = False
    seconds: float = 0.0
    abc: str = field(default="", repr=False)


def prepare(tune: str, strip_rhythm: bool = True) -> str:
    """The tune numbered X:1, without R: (abc2midi swings hornpipes) unless told, ending with a newline."""
    from chatmusician.render.pipeline import as_single_tune

    tune = as_single_tune(tune)
    return _R_FIELD.sub("", tune) if strip_rhythm else tune


def perturb(midi: bytes, jitter_ms: float, velocity_noise: int, seed: int) -> bytes:
    """A played-like copy: every note on and note off moved by up to ``jitter_ms`` (uniform, at the file's
    tempo), velocities moved by up to ``velocity_noise``; deterministic for a seed."""
    rng = random.Random(seed)
    mid = mido.MidiFile(file=io.BytesIO(midi))
    tempo = next((m.tempo for t in mid.tracks for m in t if m.type == "set_tempo"), 500_000)
    ticks_per_ms = mid.ticks_per_beat / (tempo / 1000)
    for t, track in enumerate(mid.tracks):
        events, now = [], 0
        for msg in track:
            now += msg.time
            if msg.type in ("note_on", "note_off"):
                at = max(0, now + round(rng.uniform(-jitter_ms, jitter_ms) * ticks_per_ms))
                if msg.type == "note_on" and msg.velocity > 0:
                    noisy = msg.velocity + rng.randint(-velocity_noise, velocity_noise)
                    msg = msg.copy(velocity=min(127, max(1, noisy)))
                events.append((at, 1 if msg.type == "note_on" and msg.velocity > 0 else 0, msg))
            else:
                events.append((now, -1, msg))
        new, now = mido.MidiTrack(), 0
        for at, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
            new.append(msg.copy(time=at - now))
            now = at
        mid.tracks[t] = new
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def _key_matches(original: str, converted: str) -> tuple[bool, bool]:
    try:
        a, b = parse_key(original), parse_key(converted)
    except ValueError:
        return False, False
    exact = (a.tonic, _mode(a.mode)) == (b.tonic, _mode(b.mode))
    return exact or _sharps(a) == _sharps(b), exact


def _mode(mode: str) -> str:
    return {"ionian": "major", "aeolian": "minor"}.get(mode, mode)


_MODE_SHIFT = {"major": 0, "ionian": 0, "minor": -3, "aeolian": -3, "dorian": -2, "phrygian": -4,
               "lydian": 1, "mixolydian": -1, "locrian": -5}  # fmt: skip
_TONIC_SHARPS = {"C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5, "F#": 6, "C#": 7, "F": -1, "Bb": -2, "Eb": -3,
                 "Ab": -4, "Db": -5, "Gb": -6, "Cb": -7, "G#": 8, "D#": 9, "A#": 10}  # fmt: skip


def _sharps(key) -> int | None:
    if key.tonic is None or key.tonic not in _TONIC_SHARPS:
        return None
    return _TONIC_SHARPS[key.tonic] + _MODE_SHIFT.get(key.mode, 0)


def _starting(tune, letter: str) -> str:
    """The field in force at the first note: the header's, or one on the body's first lines (M:4/4 K:D M:9/8)."""
    value = (tune.headers.get(letter) or [""])[-1]  # none in the header: maybe one after K: (M: below K:)
    for line in tune.body.split("\n"):
        if not re.match(r"^[A-Za-z]:", line):
            break
        if line.startswith(f"{letter}:"):
            value = line[2:].split("%")[0].strip()
    return value


def _pickup_beats(tune: str) -> float:
    parsed = parse_tune(tune)
    bars = next(iter(bar_durations(parsed).values()), [])
    if not bars or parsed.meter is None or bars[0] >= parsed.meter:
        return 0.0
    return float(bars[0] * 4)


def measure(
    index: int, tune: str, jitter: bool, cfg: IngestConfig, seed: int = 0, strip_rhythm: bool = True
) -> TuneFigures:
    """One tune through the job, compared with the original (see the module docstring)."""
    tune = prepare(tune, strip_rhythm)
    title = (parse_tune(tune).title or "").strip()
    out = TuneFigures(index, title, jitter)
    sandbox = cfg.convert.sandbox
    # the notation's rhythm: without R:, abc2midi plays even 8ths as written
    truth = midi_notes(abc_to_midi(_R_FIELD.sub("", _CHORD_SYMBOL.sub("", tune)), sandbox))
    midi = abc_to_midi(tune, sandbox)
    if jitter:
        midi = perturb(midi, 25.0, 12, seed * 100_003 + index)
    result = ingest_one(midi, f"nottingham:{index}", cfg)
    out.seconds = result.metrics.get("seconds", 0.0)
    out.snapped = bool(result.metrics.get("snapped"))
    if not result.ok:
        out.reason, out.message = result.reason, result.message
        return out
    out.abc = result.abc
    est = midi_notes(abc_to_midi(result.abc, sandbox))
    agree = agreement(truth, est, cfg.gate.onset_tolerance_beats)
    out.onset_f1, out.pitch_exact, out.pitch_ratio = agree.onset_f1, agree.pitch_exact, agree.pitch_ratio
    original, converted = parse_tune(tune), parse_tune(result.abc)
    try:
        out.meter_ok = parse_meter(_starting(original, "M")) == parse_meter(converted.headers["M"][-1])
    except (KeyError, ValueError):
        out.meter_ok = False
    out.key_ok, out.key_exact = _key_matches(_starting(original, "K"), converted.headers["K"][-1])
    out.pickup_ok = abs(_pickup_beats(tune) - result.metrics.get("pickup_beats", -1)) < 1e-6
    out.bar_agreement = result.metrics.get("bar_agreement", 0.0)
    return out


def _measure_args(args):
    return measure(*args)


def run_corpus(
    tunes: list[tuple[int, str]], cfg: IngestConfig, jitter: bool, workers: int = 2, strip_rhythm: bool = True
) -> list[TuneFigures]:
    """Every (index, tune) measured; processes, since the per-file work is mostly Python."""
    args = [(i, t, jitter, cfg, 0, strip_rhythm) for i, t in tunes]
    if workers <= 1:
        return [measure(*a) for a in args]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_measure_args, args, chunksize=4))


def summarize(figures: list[TuneFigures]) -> dict:
    """Rates over every tune (a rejected tune counts as a miss), and over the accepted ones."""
    n = len(figures)
    ok = [f for f in figures if not f.reason]
    reasons: dict[str, int] = {}
    for f in figures:
        if f.reason:
            reasons[f.reason] = reasons.get(f.reason, 0) + 1

    def rate(values) -> float:
        return round(sum(values) / n, 4) if n else 0.0

    return {
        "tunes": n,
        "accepted": len(ok),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "pitch_exact": rate(f.pitch_exact for f in figures),
        "onset_f1": rate(f.onset_f1 for f in figures),
        "onset_f1_accepted": round(sum(f.onset_f1 for f in ok) / len(ok), 4) if ok else 0.0,
        "meter": rate(f.meter_ok for f in figures),
        "meter_accepted": round(sum(f.meter_ok for f in ok) / len(ok), 4) if ok else 0.0,
        "key_signature": rate(f.key_ok for f in figures),
        "key_exact": rate(f.key_exact for f in figures),
        "pickup": rate(f.pickup_ok for f in figures),
        "bar_agreement": round(sum(f.bar_agreement for f in ok) / len(ok), 4) if ok else 0.0,
        "snapped": sum(f.snapped for f in figures),
        "seconds_p50": sorted(f.seconds for f in figures)[n // 2] if n else 0.0,
    }


def as_dicts(figures: list[TuneFigures]) -> list[dict]:
    return [{k: v for k, v in asdict(f).items() if k != "abc"} for f in figures]


def package_midi_files() -> list[Path]:
    """Real MIDI files that ship with installed packages: music21's test files (test04 has 18 tracks) and its
    Mozart K.525 movement, and partitura's example score when partitura is installed (a dev dependency)."""
    import music21

    root = Path(music21.__file__).parent
    files = sorted((root / "midi" / "testPrimitive").glob("*.mid")) + [root / "omr" / "k525MIDIMvt1.mid"]
    try:
        import partitura
    except ImportError:
        return [f for f in files if f.is_file()]
    return [f for f in files if f.is_file()] + [Path(partitura.EXAMPLE_MIDI)]


@dataclass
class FileFigures:
    name: str
    reason: str = ""
    message: str = ""
    voices: int = 0
    bars: int = 0
    bar_agreement: float = 0.0
    onset_f1: float = 0.0
    rendered: bool = False
    abc: str = field(default="", repr=False)


def measure_file(path: Path, cfg: IngestConfig, render_check: bool = True) -> FileFigures:
    """One real MIDI file through the job; accepted tunes also rendered (MIDI + SVG) by the render pipeline."""
    from chatmusician.render import RenderConfig, RenderRequest, render

    result = ingest_one(path.read_bytes(), path.name, cfg)
    out = FileFigures(path.name if "partitura" not in str(path) else f"partitura/{path.name}")
    out.reason, out.message = result.reason, result.message
    if not result.ok:
        return out
    out.abc = result.abc
    out.voices = max(1, sum(line.startswith("V:") for line in result.abc.split("\n")))
    out.bars = sum(len(b) for b in bar_durations(parse_tune(result.abc)).values())
    out.bar_agreement = result.metrics["bar_agreement"]
    out.onset_f1 = result.metrics["onset_f1"]
    if render_check:
        out.rendered = render(RenderRequest(result.abc, ["midi", "svg"]), RenderConfig()).ok
    return out
