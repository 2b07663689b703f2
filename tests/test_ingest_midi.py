"""MIDI cleaning, normalisation, SFT rows and hostile files: pure functions, plus the sandboxed tools where
a whole file goes through :func:`ingest_one`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import symusic

from chatmusician.abc import validate_tune
from chatmusician.ingest.config import CleanConfig, ConvertConfig, IngestConfig
from chatmusician.ingest.convert import normalise
from chatmusician.ingest.midi import (
    PPQ,
    MidiReject,
    Note,
    Score,
    extract,
    off_grid_fraction,
    read_score,
    snap,
    straighten_swing,
)
from chatmusician.ingest.tasks import sft_rows


def make_midi(parts, tpq=PPQ, meter=(4, 4), key=None, qpm=120.0, drums=None) -> bytes:
    """parts: [(program, [(start, end, pitch, velocity)])] in ticks at ``tpq``; drums: notes on channel 10."""
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, qpm=qpm))
    score.time_signatures.append(symusic.TimeSignature(0, *meter))
    if key is not None:
        score.key_signatures.append(symusic.KeySignature(0, key, 0))
    for program, notes in parts:
        track = symusic.Track("", program, False)
        for start, end, pitch, vel in notes:
            track.notes.append(symusic.Note(start, end - start, pitch, vel))
        score.tracks.append(track)
    if drums:
        track = symusic.Track("drums", 0, True)
        for start, end, pitch, vel in drums:
            track.notes.append(symusic.Note(start, end - start, pitch, vel))
        score.tracks.append(track)
    return bytes(score.dumps_midi())


def scale_line(n=32, step=PPQ // 2, base=67):
    """An 8th-note melody: up and down a G major scale."""
    pitches = [0, 2, 4, 5, 7, 9, 11, 12, 11, 9, 7, 5, 4, 2]
    return [(i * step, (i + 1) * step, base + pitches[i % len(pitches)], 90) for i in range(n)]


def chords(n_bars=4):
    """Whole-note triads, low: an accompaniment."""
    return [(b * 4 * PPQ, (b + 1) * 4 * PPQ, p, 70) for b in range(n_bars) for p in (43, 47, 50)]


def test_melody_is_chosen_over_accompaniment_and_drums_dropped():
    data = make_midi(
        [(0, chords()), (73, scale_line())], drums=[(i * PPQ, i * PPQ + 60, 36, 100) for i in range(16)]
    )
    score = read_score(data, CleanConfig())
    assert len(score.parts) == 1
    assert [n.pitch for n in score.parts[0].notes] == [n[2] for n in scale_line()]
    voices = read_score(data, CleanConfig(voices="voices", max_voices=2))
    assert len(voices.parts) == 2  # melody first, then the chords; never the drums
    assert voices.parts[0].program == 73 and all(n.pitch < 60 for n in voices.parts[1].notes)


def test_voices_are_bounded_and_empty_parts_dropped():
    parts = [(0, scale_line(base=60 + k)) for k in range(6)] + [(0, [(0, 240, 60, 80)])]  # last: 1 note
    score = read_score(make_midi(parts), CleanConfig(voices="voices", max_voices=3))
    assert len(score.parts) == 3
    assert all(len(p.notes) >= 8 for p in score.parts)


def test_rejects_are_reasons():
    with pytest.raises(MidiReject) as drums:
        read_score(make_midi([], drums=[(i * PPQ, i * PPQ + 60, 36, 100) for i in range(40)]), CleanConfig())
    assert drums.value.reason == "drums_only"
    with pytest.raises(MidiReject) as short:
        read_score(make_midi([(0, scale_line(10))]), CleanConfig())
    assert short.value.reason == "too_short"
    dense = [(i * 10, i * 10 + 10, 60 + i % 24, 90) for i in range(2000)]  # 48 notes a beat
    with pytest.raises(MidiReject) as many:
        read_score(make_midi([(0, dense)]), CleanConfig())
    assert many.value.reason == "too_dense"


def test_jittered_performance_snaps_back_to_the_grid():
    import random

    rng = random.Random(3)
    clean = scale_line(48, step=PPQ // 2) + [
        (48 * 240 + k * 160, 48 * 240 + (k + 1) * 160, 70, 80) for k in range(3)
    ]
    played = [(max(0, s + rng.randint(-24, 24)), e + rng.randint(-24, 24), p, v) for s, e, p, v in clean]
    notes = [Note(s, e, p, v) for s, e, p, v in played]
    assert off_grid_fraction(notes, (4, 3)) > 0.3  # well past the 0.1 that makes "auto" snap
    assert off_grid_fraction([Note(s, e, p, v) for s, e, p, v in clean], (4, 3)) == 0
    snapped = snap(notes, (4, 3), legato_gap=0.25)
    assert [(n.start, n.pitch) for n in snapped] == [(s, p) for s, _, p, _ in clean]  # 8ths and a triplet
    score = read_score(make_midi([(0, played)]), CleanConfig())
    assert score.snapped and [n.start for n in score.parts[0].notes] == [s for s, *_ in clean]


def test_swung_pairs_become_even_eighths():
    swung = [
        Note(b * PPQ + o, b * PPQ + o + d, 60 + b % 5, 90)
        for b in range(16)
        for o, d in ((0, 320), (320, 160))
    ]
    straight, swing = straighten_swing(swung, 0.5)
    assert swing and {n.start % PPQ for n in straight} == {0, 240}
    _, untouched = straighten_swing([Note(b * PPQ, b * PPQ + 240, 60, 90) for b in range(8)], 0.5)
    assert not untouched


def test_pickup_found_from_accents():
    # 3/4 with a one-beat pickup: accented long notes on every downbeat after it.
    notes = [(0, PPQ, 62, 80)]
    for bar in range(8):
        start = PPQ + bar * 3 * PPQ
        notes += [(start, start + 2 * PPQ, 67, 110), (start + 2 * PPQ, start + 3 * PPQ, 69, 70)]
    score = read_score(make_midi([(0, notes)], meter=(3, 4)), CleanConfig())
    assert score.pickup_beats == 1.0
    # a file whose first note sits after a rest keeps its own bar grid
    later = [(s + 2 * PPQ, e + 2 * PPQ, p, v) for s, e, p, v in scale_line(16)]
    assert read_score(make_midi([(0, later)]), CleanConfig()).pickup_beats == 2.0


RAW = textwrap.dedent(
    """\
    X: 1
    T: from in.mid
    M: 6/8
    L: 1/8
    Q:1/4=120
    K:A % 3 sharps
    V:1
    %%MIDI program 0
    K:C % 0 sharps
    z5f| \\
    ecc c2f| \\
    ecc c2f| \\
    eca a2  ^g|
    a6|
    a3 a2
    """
)


def test_normalise_to_training_style():
    score = Score(parts=[], meters=[(0, 6, 8)], keys=[(0, 3, False)], title="A and D", lead_in=5 * 240)
    abc = normalise(RAW, score, ConvertConfig(bars_per_line=4))
    assert abc == ("X:1\nT:A and D\nM:6/8\nL:1/8\nQ:1/4=120\nK:A\nf|ecc c2f|ecc c2f|eca a2 ^g|\na6|a3 a2|]\n")
    assert "from in.mid" not in abc and "\\" not in abc and "%" not in abc
    assert not [i for i in validate_tune(abc) if i.severity == "error"]


def test_sft_rows_in_musicpile_sft_form():
    abc = "X:1\nM:4/4\nL:1/8\nK:G\nGABc dedB|GABc d2d2|\nGABc dedB|c2A2 G4|]\n"
    rows = dict(sft_rows(abc, ["continue", "header", "harmonize"], 0.5, 4))
    assert set(rows) == {"continue", "header"}  # one voice: nothing to harmonize
    assert (
        rows["continue"]["input"].endswith("GABc d2d2|")
        and rows["continue"]["output"] == "GABc dedB|c2A2 G4|]"
    )
    assert rows["header"]["instruction"].endswith("Meter 4/4\nNote Length 1/8\nKey G")
    assert all(set(r) == {"instruction", "input", "output"} for r in rows.values())
    two = "X:1\nM:4/4\nL:1/8\nK:G\nV:1\nGABc dedB|\nV:2\nG,4 D,4|\n"
    harmonize = dict(sft_rows(two, ["harmonize"], 0.5, 4))["harmonize"]
    assert "V:2" not in harmonize["instruction"] and harmonize["output"] == two.strip()


# --- hostile files: a child process with a memory and wall-clock limit runs them all ---------------------------


def hostile_files(tmp_path):
    good = make_midi([(0, scale_line(64))])
    files = {
        "truncated": good[: len(good) // 2],
        "zero_length": b"",
        "huge_tempo": make_midi([(0, scale_line(64))], qpm=60_000_000.0),
        "glacial_tempo": make_midi([(0, scale_line(64))], qpm=4.0),
        "not_midi": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "text": b"X:1\nK:C\nCDEF|\n",
        "tracks_10000": b"MThd"
        + struct.pack(">IHHH", 6, 1, 10_000, 480)
        + b"MTrk\x00\x00\x00\x04\x00\xff\x2f\x00" * 10_000,
        "lying_header": b"MThd"
        + struct.pack(">IHHH", 6, 1, 3, 480)
        + b"MTrk\x00\x00\x00\x04\x00\xff\x2f\x00",
        "chunk_overrun": b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk\xff\xff\xff\xff\x00\x90\x3c",
        "smpte": b"MThd" + struct.pack(">IHHH", 6, 0, 1, 0xE728) + b"MTrk\x00\x00\x00\x04\x00\xff\x2f\x00",
        "hours_apart": make_midi([(0, [(i * 2_000_000, i * 2_000_000 + 240, 60, 90) for i in range(20)])]),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.mid"
        paths[name].write_bytes(data)
    big = tmp_path / "fifty_mb.mid"
    with big.open("wb") as f:  # a valid header, then 50 MB
        f.write(good[:14])
        f.truncate(50 * 2**20)
    paths["fifty_mb"] = big
    return paths


EXPECTED = {
    "truncated": "truncated",
    "zero_length": "empty_file",
    "huge_tempo": "bad_tempo",
    "glacial_tempo": "bad_tempo",
    "not_midi": "not_midi",
    "text": "not_midi",
    "tracks_10000": "too_many_tracks",
    "lying_header": "truncated",
    "chunk_overrun": "truncated",
    "smpte": "unsupported",
    "hours_apart": "too_long",
    "fifty_mb": "too_large",
}


@pytest.mark.integration
def test_hostile_midi_is_rejected_with_a_reason_within_limits(tmp_path):
    paths = hostile_files(tmp_path)
    child = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from chatmusician.ingest.config import IngestConfig
        from chatmusician.ingest.pipeline import convert_items
        import pyarrow as pa
        cfg = IngestConfig(sources=[{"path": sys.argv[1]}])
        from chatmusician.ingest.config import MidiSourceConfig
        cfg.sources = [MidiSourceConfig(path=sys.argv[1])]
        paths = json.loads(sys.argv[2])
        out = convert_items(pa.Table.from_pylist([{"source": 0, "paths": paths, "row_group": -1}]), cfg)
        print(json.dumps({Path(r["id"]).stem: [r["reason"], r["message"]] for r in out.to_pylist()}))
        """
    )
    ordered = [str(p) for p in paths.values()]
    # 1.5 GiB of address space and 120 s for all twelve: a file that made the parser balloon or spin fails here
    run = subprocess.run(
        ["prlimit", f"--as={3 * 2**29}", sys.executable, "-c", child, str(tmp_path), json.dumps(ordered)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert {name: got[name][0] for name in EXPECTED} == EXPECTED
    assert all(message for _, message in got.values())


def test_bytes_limits_apply_before_parsing():
    with pytest.raises(MidiReject) as large:
        extract(b"MThd" + b"\0" * 5_000_000, CleanConfig())
    assert large.value.reason == "too_large"
    from chatmusician.ingest.pipeline import ingest_one

    assert ingest_one(None, "null", IngestConfig()).reason == "empty_file"
