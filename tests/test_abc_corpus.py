"""Real data: every Nottingham tune and every ABC tune bundled with music21 (Essen too, for validation only)
is extracted and validated without an exception; bar durations agree with music21; the abc2midi report runs."""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from chatmusician.abc import bar_durations, extract_tunes, parse_tune, validate_tune
from chatmusician.corpora import MUSIC21_COLLECTIONS, music21_abc_files, nottingham_tunes, read_tunes

CRASH_CODES = {"internal_error", "not_checked"}  # what validate_tune returns instead of raising


def _x_number(text: str) -> int | None:
    m = re.search(r"^X:\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def check_corpus(tunes: list[str]) -> Counter:
    """Extract + validate every tune; returns issue-code counts. Fails on a tune that is lost or crashes."""
    counts: Counter = Counter()
    for text in tunes:
        found = extract_tunes(text)
        assert len(found.tunes) == 1, (found.message, text[:200])
        assert _x_number(found.tunes[0]) == _x_number(text)
        issues = validate_tune(found.tunes[0])
        assert not [i for i in issues if i.code in CRASH_CODES], (issues, text[:200])
        counts.update({i.code for i in issues})
    return counts


@pytest.mark.integration
def test_every_nottingham_tune():
    tunes = nottingham_tunes()
    assert len(tunes) == 1034
    counts = check_corpus(tunes)
    # a clean, curated set: few tunes with a bar-duration warning, almost none with an error
    assert counts["bar_duration"] < 0.03 * len(tunes)
    assert (
        sum(counts[c] for c in ("unclosed_chord", "unclosed_quote", "missing_key", "invalid_key", "no_music"))
        <= 3
    )


@pytest.mark.integration
def test_every_music21_abc_tune_including_essen():
    tunes = read_tunes(music21_abc_files(MUSIC21_COLLECTIONS + ("essenFolksong",)))
    assert len(tunes) > 12_000
    counts = check_corpus(tunes)
    assert counts["bar_duration"] > 0  # Essen's phrase-per-line transcriptions do hold odd bars


@pytest.mark.integration
def test_bar_durations_agree_with_music21():
    """music21's own ABC parser measures the same bars (a slow, independent cross-check: ~0.2 s a tune)."""
    import music21

    # music21 misreads a "::" repeat at a line end, so the sample skips those tunes
    sample = [t for t in nottingham_tunes()[::97] if "::" not in t][:8]
    assert len(sample) == 8
    for text in sample:
        ours = [d for d in bar_durations(text)[""] if d]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part = music21.converter.parse(text, format="abc").parts[0]
        theirs = [
            Fraction(m.duration.quarterLength).limit_denominator(96) / 4
            for m in part.getElementsByClass("Measure")
        ]
        assert ours == [d for d in theirs if d], parse_tune(text).title


def _agreement_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "abc_agreement.py"
    spec = importlib.util.spec_from_file_location("abc_agreement", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_agreement_script_compares_with_real_abc2midi(tmp_path):
    book = tmp_path / "book.abc"
    book.write_text(
        "X:1\nT:Good\nM:4/4\nL:1/8\nK:G\nD2|GABc d2B2|c2A2 F2D2|G8|]\n\n"
        "X:2\nT:Long bar\nM:4/4\nL:1/8\nK:G\nD2|GABc d2B2 c2|c2A2 F2D2|G8|]\n\n"
        "X:3\nT:Short bar\nM:3/4\nL:1/4\nK:D\nD|F A d|c B|A3|d3|]\n"
    )
    agreement = _agreement_module()
    results = agreement.verdicts([book])
    assert [(v.number, v.ours, v.abc2midi) for v in results] == [
        (1, False, False),
        (2, True, True),
        (3, True, True),
    ]
    assert "time units while the time signature has" in results[1].abc2midi_messages[0]
    counts = agreement.confusion(results)
    assert counts == {"both": 2, "ours_only": 0, "abc2midi_only": 0, "neither": 1}
    assert agreement.agreement(counts) == 100.0
    report = agreement.markdown_report(results, seconds=1.0)
    assert "**100.0 %**" in report and "| ours: problem | 2 | 0 |" in report
