"""All 1,034 Nottingham tunes render to MIDI and SVG (≥ 99 % each); the failures, with their reasons, go to
reports/render_nottingham.{md,json}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatmusician.corpora import nottingham_tunes
from chatmusician.render.report import render_corpus, summarize, write_report

pytestmark = pytest.mark.integration

REPORTS = Path(__file__).resolve().parents[1] / "reports"
FORMATS = ["midi", "svg"]


def test_nottingham_renders_at_least_99_percent_with_failures_reported():
    tunes = nottingham_tunes()
    assert len(tunes) == 1034, "the Nottingham set in chatmusician/assets/nottingham is incomplete"
    summary = summarize(render_corpus(tunes, FORMATS, workers=4), FORMATS, "Nottingham (ABC_cleaned)")
    md, js = write_report(summary, REPORTS, "render_nottingham")
    for fmt in FORMATS:
        assert summary["formats"][fmt]["rate"] >= 0.99, md.read_text()
    # every failure is listed with at least one structured reason
    failures = json.loads(js.read_text())["failures"]
    assert len(failures) >= max(s["failed"] for s in summary["formats"].values())
    for failure in failures:
        assert failure["errors"] and all(e["code"] and e["message"] for e in failure["errors"])
        assert f"tune {failure['index']} " in md.read_text()


def test_every_music21_abc_collection_renders_at_least_99_percent_on_a_deterministic_subset(tmp_path):
    """Collections nobody here wrote (Ryan's Mammoth, O'Neill's, Aird's, Essen, Josquin…): every 25th tune of
    each. The full run (all 12,978 tunes) is scripts/render_music21.py -> reports/render_music21.md."""
    from chatmusician.render.report import corpus_markdown, corpus_report, music21_collections

    collections = music21_collections()
    assert {"ryansMammoth", "oneills1850", "airdsAirs", "essenFolksong", "josquin"} <= set(collections)
    report = corpus_report(collections, FORMATS, every=25)
    md = corpus_markdown(report, "music21 subset", "pytest")
    assert report["tunes"] >= 500
    for fmt in FORMATS:
        assert report["formats"][fmt]["rate"] >= 0.99, md
    for summary in report["collections"].values():
        for failure in summary["failures"]:  # each failure listed with a structured reason
            assert failure["errors"] and all(e["code"] and e["message"] for e in failure["errors"])
            assert f"tune {failure['index']} " in md
