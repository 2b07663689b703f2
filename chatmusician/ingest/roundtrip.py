"""The round-trip quality gate: the normalised ABC back to MIDI with abc2midi (jailed), compared with the cleaned
input on the beat grid.

Measures (pure functions, also used by the report): onset+pitch F1 (notes matched one to one, same pitch,
onsets within a tolerance, both timelines starting at their first onset), pitch-sequence agreement (the top
note of each onset, in order: difflib's ratio, and whether they are identical), and bar durations against the
meter (the project's validator; pickups and section ends excepted).
"""

from __future__ import annotations

import difflib
import tempfile
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from chatmusician.abc import bar_durations, parse_tune, validate_tune
from chatmusician.ingest.config import CleanConfig, GateConfig
from chatmusician.ingest.convert import ConvertError, tool_failure
from chatmusician.ingest.midi import PPQ, MidiReject, Note, extract
from chatmusician.render import tools
from chatmusician.render.config import SandboxConfig
from chatmusician.render.sandbox import run_tool

# Any pitched notes abc2midi writes count; only the file limits matter for its own output.
_READ_BACK = CleanConfig(min_part_notes=1, min_notes=1)


@dataclass
class Agreement:
    onset_f1: float
    precision: float
    recall: float
    pitch_ratio: float
    """difflib ratio of the two top-note pitch sequences."""
    pitch_exact: bool
    ref_notes: int
    est_notes: int


def abc_to_midi(abc: str, sandbox: SandboxConfig) -> bytes:
    """abc2midi in the jail; :class:`ConvertError` (``unconvertible``) when it fails or reports an error."""
    with tempfile.TemporaryDirectory(prefix="chatmusician-ingest-") as tmp:
        job = Path(tmp)
        (job / "tune.abc").write_text(abc, encoding="utf-8")
        run = run_tool(tools.abc2midi_argv("tune.abc", "tune.mid"), job, sandbox)
        out = job / "tune.mid"
        midi = out.read_bytes() if out.is_file() else b""
    if why := tool_failure(run, "abc2midi"):
        raise ConvertError("unconvertible", why)
    errors = [m for m in tools.parse_abc2midi(run.stdout) if m.severity == "error" and not m.recoverable]
    if errors or run.returncode != 0 or len(midi) < 14:
        detail = errors[0].message if errors else f"exit {run.returncode}"
        raise ConvertError("unconvertible", f"abc2midi could not play the tune back: {detail}")
    return midi


def midi_notes(midi: bytes) -> list[Note]:
    """Every pitched note of a MIDI file (all parts), at :data:`PPQ`, sorted."""
    try:
        score = extract(midi, _READ_BACK)
    except MidiReject:
        return []
    return score.all_notes()


def _beats(notes: list[Note]) -> list[tuple[float, int]]:
    if not notes:
        return []
    first = min(n.start for n in notes)
    return [((n.start - first) / PPQ, n.pitch) for n in notes]


def onset_f1(ref: list[Note], est: list[Note], tolerance: float) -> tuple[float, float, float]:
    """(F1, precision, recall) of (onset, pitch) pairs matched one to one within ``tolerance`` beats."""
    ref_by_pitch: dict[int, list[float]] = defaultdict(list)
    for t, p in _beats(ref):
        ref_by_pitch[p].append(t)
    for times in ref_by_pitch.values():
        times.sort()
    used: dict[int, set[int]] = defaultdict(set)
    hits = 0
    for t, p in sorted(_beats(est)):
        times = ref_by_pitch.get(p, [])
        i = bisect_left(times, t - tolerance)
        while i < len(times) and times[i] <= t + tolerance:
            if i not in used[p]:
                used[p].add(i)
                hits += 1
                break
            i += 1
    if not ref or not est:
        return 0.0, 0.0, 0.0
    precision, recall = hits / len(est), hits / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return f1, precision, recall


def top_line(notes: list[Note], tolerance: float = 0.0) -> list[int]:
    """The highest pitch of each onset, in order; onsets within ``tolerance`` beats of a group's first are one."""
    tops: list[int] = []
    group_start = None
    for n in sorted(notes, key=lambda n: (n.start, n.pitch)):
        if group_start is None or n.start - group_start > tolerance * PPQ:
            tops.append(n.pitch)
            group_start = n.start
        else:
            tops[-1] = max(tops[-1], n.pitch)
    return tops


def agreement(ref: list[Note], est: list[Note], tolerance: float) -> Agreement:
    f1, precision, recall = onset_f1(ref, est, tolerance)
    a, b = top_line(ref, tolerance), top_line(est, tolerance)
    ratio = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 0.0
    return Agreement(f1, precision, recall, ratio, a == b, len(ref), len(est))


def bar_agreement(abc: str, issues: list | None = None) -> float:
    """Share of bars (every voice) that last what the meter asks; the validator's pickup and section-end
    exceptions apply. ``issues``: the validator's, if already at hand."""
    issues = validate_tune(abc) if issues is None else issues
    wrong = sum(1 for i in issues if i.code == "bar_duration")
    try:
        total = sum(len(bars) for bars in bar_durations(parse_tune(abc)).values())
    except Exception:  # noqa: BLE001 - the third-party tokenizer; the validator already reported it
        return 0.0
    return 1.0 - wrong / total if total else 0.0


def gate(
    abc: str, cleaned: list[Note], issues: list, sandbox: SandboxConfig, cfg: GateConfig
) -> tuple[Agreement, float]:
    """Round trip ``abc`` and compare with the ``cleaned`` notes; (agreement, bar agreement). ``issues``: the
    validator's for ``abc``."""
    est = midi_notes(abc_to_midi(abc, sandbox))
    return agreement(cleaned, est, cfg.onset_tolerance_beats), bar_agreement(abc, issues)
