"""Render success judged from the output: MIDI length against the tune's bars and tempo, staves in the SVG."""

from __future__ import annotations

import pytest

from chatmusician.render.judge import beats_per_second, count_staves, expected_music_s, midi_problem
from chatmusician.render.pipeline import _no_output
from chatmusician.render.sandbox import ToolRun

REEL = "X:1\nT:r\nM:4/4\nL:1/8\nQ:1/4=120\nK:D\n" + "|".join(["DFAF dFAF"] * 8) + "|]\n"


def test_expected_length_adds_up_the_longest_voice_at_the_tempo():
    assert expected_music_s(REEL) == pytest.approx(8 * 2.0)  # 8 bars of 4/4 at 120 quarters a minute
    two_voices = REEL.replace("K:D\n", "K:D\nV:1\n") + "V:2\n" + "|".join(["D8"] * 8) + "|]\n"
    assert expected_music_s(two_voices) == pytest.approx(16.0)
    # chord symbols and decorations holding '|' are not bar lines
    assert expected_music_s(REEL.replace("DFAF dFAF|", '"A|B"DFAF !x|y!dFAF|', 1)) == pytest.approx(16.0)
    # free meter and bar lines only at the end (music21's Josquin): the notes still tell the length
    assert expected_music_s(REEL.replace("M:4/4", "M:none")) == pytest.approx(16.0)
    assert expected_music_s("X:1\nM:C|\nL:1/4\nK:G\nz4 A4 c6 c2 c4 B2 G2 A4 G4 |]\n") == pytest.approx(
        16.0
    )  # 32 quarters
    assert expected_music_s("X:1\nM:4/4\nK:C\n") is None
    # whole-bar rests last their bars (the validator gives them no length): Z6 is six bars, X one
    assert expected_music_s(REEL.replace("|]", "|Z6|X|]")) == pytest.approx(16.0 + 7 * 2.0)
    assert expected_music_s(REEL.replace("M:4/4\n", "").replace("|]", "|X27|]")) == pytest.approx(16.0 + 54.0)
    assert expected_music_s(REEL.replace("Q:1/4=120", "Q:1/16=30\nQ:1/4=120")) == pytest.approx(16.0)
    assert beats_per_second("3/8=40", 1 / 8) == pytest.approx(0.25)
    assert beats_per_second("120", 0.125) == pytest.approx(0.25)  # ABC 1.6: unit lengths per minute
    assert beats_per_second(None, 0.125) == pytest.approx(0.5)  # abc2midi's default 1/4=120


def test_midi_problems():
    assert midi_problem(16.0, 64, REEL) is None
    assert midi_problem(33.0, 64, REEL) is None  # repeated: still plausible
    assert "plays no notes" in midi_problem(16.0, 0, REEL)
    assert "lasts 1000.0 s" in midi_problem(1000.0, 64, REEL)
    assert "lasts 0.5 s" in midi_problem(0.5, 3, REEL)
    assert midi_problem(1000.0, 5, "X:1\nK:C\n%no music\n") is None  # nothing to compare with


def test_staves_are_counted_in_abcm2ps_svg():
    staff = '<path d="m67.20 93.00\n\th470.00\n\tM67.20 87.00\n\th470.00\n\t" class="stroke"/>'
    assert count_staves(f"<svg>{staff}{staff}</svg>") == 2
    assert count_staves('<svg><path d="M299.90 93.00v-24.00"/><text>t</text></svg>') == 0


def test_a_tool_that_wrote_nothing_says_what_it_printed():
    run = ToolRun(
        ["abcm2ps"], 0, "", "abcm2ps-8.14.14 (July 2026)\nFile tune.abc: cannot compose\n", False, 0.1
    )
    (error,) = _no_output("abcm2ps", "SVG", run, [], "svg")
    assert (
        error["message"] == "abcm2ps wrote no SVG (exit status 0); it printed: File tune.abc: cannot compose"
    )
    own = [{"code": "abcm2ps_error", "message": "Bad note", "line": 3, "column": 2, "stage": "svg"}]
    assert _no_output("abcm2ps", "SVG", run, own, "svg") == own
