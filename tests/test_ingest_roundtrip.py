"""The round trip with real tools: a deterministic subset of the Nottingham tunes (ABC -> abc2midi -> the job ->
ABC) against the report's thresholds, and real MIDI files that ship with music21 and partitura."""

from __future__ import annotations

import dataclasses

import pytest

from chatmusician.abc import validate_tune
from chatmusician.corpora import nottingham_tunes
from chatmusician.ingest.config import IngestConfig
from chatmusician.ingest.report import THRESHOLDS, measure_file, package_midi_files, run_corpus, summarize
from chatmusician.render import RenderConfig, RenderRequest, render

pytestmark = pytest.mark.integration
SUBSET = 40  # every 40th tune: 26 tunes of every file and rhythm (the report runs all 1,034)


@pytest.fixture(scope="module")
def subset():
    return list(enumerate(nottingham_tunes()))[::SUBSET]


def test_nottingham_subset_meets_the_goals(subset):
    figures = run_corpus(subset, IngestConfig(), jitter=False, workers=2)
    s = summarize(figures)
    assert s["tunes"] == 26
    assert s["pitch_exact"] >= THRESHOLDS["pitch_exact"], s
    assert s["onset_f1"] >= THRESHOLDS["onset_f1"], s
    assert s["meter_accepted"] == THRESHOLDS["meter"] and s["meter"] >= 0.95, s
    assert s["bar_agreement"] >= 0.99, s
    for f in figures:  # every accepted tune passes the validator and renders
        if not f.reason:
            assert not [i for i in validate_tune(f.abc) if i.severity == "error"], f.title
            assert render(RenderRequest(f.abc, ["midi", "svg"]), RenderConfig()).ok, f.title


# Tunes the full report once missed: melodies in double stops (abc2midi staggers a chord's notes by 1/48 beat),
# 3/2 bars of half notes (midi2abc hears triplets), an M: written after K:.
ONCE_MISSED = ["The Chaco Waltz", "Verdi's Waltz", "Mr Beveridge's Maggot", "Fram Apon Him", "Flapjack"]


def test_tunes_once_missed_round_trip_with_their_meter():
    tunes = [(i, t) for i, t in enumerate(nottingham_tunes()) if any(f"T:{n}\n" in t for n in ONCE_MISSED)]
    figures = run_corpus(tunes, IngestConfig(), jitter=False, workers=1)
    assert sorted(f.title for f in figures) == sorted(ONCE_MISSED)
    for f in figures:
        assert not f.reason and f.onset_f1 >= 0.95 and f.meter_ok, (f.title, f.reason, f.message, f.onset_f1)
    chaco = next(f for f in figures if f.title == "The Chaco Waltz")
    assert chaco.abc.count("[") >= 20  # its double stops stay chords


def test_nottingham_subset_played_like_a_performance(subset):
    s = summarize(run_corpus(subset, IngestConfig(), jitter=True, workers=2))
    assert s["snapped"] >= 0.9 * s["tunes"]  # the jitter is seen and snapped away
    assert s["onset_f1"] >= THRESHOLDS["jitter_onset_f1"], s


@pytest.mark.parametrize("voices", ["melody", "voices"])
def test_package_midi_files_convert_with_bounded_voices_and_render(voices):
    cfg = IngestConfig()
    # fixtures of a few notes: no minimum length (the default rejects them as too_short)
    cfg = dataclasses.replace(
        cfg, clean=dataclasses.replace(cfg.clean, voices=voices, min_notes=1, min_part_notes=1)
    )
    wanted = {"test02.mid", "test04.mid", "test11.mid", "k525MIDIMvt1.mid", "score_example.mid"}
    files = [p for p in package_midi_files() if p.name in wanted]
    assert {p.name for p in files} == wanted  # test04: 18 tracks; k525: a string quartet; partitura's score
    for path in files:
        f = measure_file(path, cfg)
        assert not f.reason, (path.name, f.reason, f.message)
        assert 1 <= f.voices <= (1 if voices == "melody" else cfg.clean.max_voices), path.name
        assert f.bar_agreement == 1.0 and f.onset_f1 >= cfg.gate.min_onset_f1, path.name
        assert f.rendered, path.name
    multi = measure_file(next(p for p in files if p.name == "test04.mid"), cfg)
    assert multi.voices == (1 if voices == "melody" else 4)
