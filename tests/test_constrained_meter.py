"""Meter-aware constrained decoding: what the decoder allows, the validator passes and abc2midi plays in time.

The tracker (chatmusician.abc.meter) and the per-request hook for engines (chatmusician.model.meter.MeterRow) are
tested here; wiring them into the constrained processors (issue 29) is not done yet, so decoding is unchanged."""

from __future__ import annotations

import re
import shutil
import subprocess
from fractions import Fraction

import pytest

from chatmusician.abc import parse_tune
from chatmusician.abc.meter import MeterTracker, metrically_complete

HEADERS = [("6/8", "1/8"), ("3/4", "1/8"), ("4/4", "1/16"), ("2/4", "1/8"), ("C|", "1/4"), ("9/8", "1/8")]
MUSIC = set("ABCDEFGabcdefgz|/2345678 \n>(3[]:-{}^_=,'")


def _tracker(text: str) -> MeterTracker:
    tracker = MeterTracker()
    tracker.push(text)
    return tracker


HEAD = "X:1\nM:4/4\nL:1/8\nK:G\n"


@pytest.mark.parametrize(
    ("prefix", "text", "ok"),
    [
        ("GABc defg|GABc de", "f4 ", False),  # over-full
        ("GABc defg|GABc de", "|", False),  # a short bar that is not the first
        ("GABc defg|GABc de", "fg|", True),
        ("GABc de", "|", True),  # an anacrusis
        ("GABc defg|GABc def", "(3gab|", False),  # the triplet's 2 eighths do not fit
        ("GABc defg|GABc de", "(3fga|", True),
        ("GABc defg|GABc de", "f>g|", True),  # broken rhythm adds up to two eighths
        ("GABc defg|GABc de", "[fa]2|", True),  # a chord lasts its first note times its length
        ("GABc defg|", "Z|", True),
        ("GABc defg|G", "Z", False),  # a whole-bar rest after notes
        ("GABc defg|GABc de", "{ag}fg|", True),  # grace notes take no time
        ("GABc defg|[M:3/4]", "GABc de|", True),
        ("GABc defg|GABc d", "e(>f3/2 z/|", True),  # after a slur ">" is no broken rhythm (abcnotes)
        ("GABc defg|\nL:1/4\n", "GABc|", True),
        ("GABc defg|\nM:none\n", "GABc defg abc|", True),  # free meter: nothing checked
    ],
)
def test_tracker_allows_only_what_fills_the_bar(prefix, text, ok):
    assert _tracker(HEAD + prefix).allows(text) is ok


@pytest.mark.parametrize(
    ("body", "ends"),
    [
        ("A|dfe dcB|A3 A2:|\n", True),  # the last bar completes the anacrusis at a repeat
        ("dfe dcB|A3 A2|\n", False),  # a short last bar
        ("dfe dcB|A3 A2 z|\n", True),
        ("dfe dcB|\n", True),
    ],
)
def test_a_tune_may_end_only_with_its_last_bar_full(body, ends):
    assert metrically_complete("X:1\nM:6/8\nL:1/8\nK:D\n" + body) is ends


# ----------------------------------------------------------------------------------------------- MIDI
WRITTEN = [  # metrically right tunes in the shapes the tracker allows: abc2midi must play their bars in time
    "X:1\nM:6/8\nL:1/8\nK:D\nA|dfe dcB|A3 A2:|\n",
    "X:1\nM:4/4\nL:1/8\nK:G\nG>A B<c (3ded c2|[GB]4 z4|{a}g2 f2 e2 d2|\n",
    "X:1\nM:3/4\nL:1/8\nK:G\nGABc de|[M:2/4]f2 g2|\nL:1/4\nab|\n",
    "X:1\nM:4/4\nL:1/16\nK:G\nG4 A4 B4 c4|d8 e8|\n",
]


@pytest.mark.skipif(shutil.which("abc2midi") is None, reason="abc2midi (Debian abcmidi) is not installed")
@pytest.mark.parametrize("tune", WRITTEN)
def test_abc2midi_plays_the_bars_the_tracker_passes_in_time(tune, tmp_path):
    assert metrically_complete(tune)
    onsets, tick = _midi_onsets(tune, tmp_path)
    starts = _bar_starts(tune)
    assert len(starts) >= 2
    assert not [t for t in starts if not any(abs(t - o) <= tick for o in onsets)], (starts, sorted(onsets))


# ------------------------------------------------------------------------------------------- property test
def _midi_onsets(tune_text: str, tmp_path) -> tuple[set[Fraction], Fraction]:
    """Note onsets (whole notes) of abc2midi's MIDI of the tune, its repeats played once (the written time
    line), and the ticks per whole note."""
    import mido

    flat = []
    for line in tune_text.split("\n"):
        if re.match(r"^[A-Za-z]:", line):
            flat.append(line)
        else:  # repeats and endings played once: the MIDI timeline is the written one
            flat.append(
                re.sub(r"\[(?=\d)\d*|:*\|+[\]:]*\d*|::", lambda m: "|" if "|" in m.group() else " ", line)
            )
    source = tmp_path / "t.abc"
    source.write_text("\n".join(flat) + "\n")
    out = tmp_path / "t.mid"
    subprocess.run(["abc2midi", str(source), "-o", str(out)], capture_output=True, timeout=30, check=False)
    midi = mido.MidiFile(str(out))
    whole = 4 * midi.ticks_per_beat
    onsets = set()
    for track in midi.tracks:
        now = 0
        for message in track:
            now += message.time
            if message.type == "note_on" and message.velocity > 0:
                onsets.add(Fraction(now, whole))
    return onsets, Fraction(1, whole)


def _bar_starts(tune_text: str) -> list[Fraction]:
    """Where each bar that starts with a struck note (not a rest, not tied into) starts, in whole notes."""
    import abcnotes

    from chatmusician.abc.validate import split_voices, tokenize

    tune = parse_tune(tune_text)
    bars = next(iter(split_voices(tune, tokenize(tune), []).values()))
    starts, now, tied = [], Fraction(0), False
    for bar in bars:
        if bar.first is None:
            continue
        if type(bar.first) is abcnotes.Note and not tied and not bar.first.grace:
            starts.append(now)
        now += bar.duration if not bar.whole_bar_rest else bar.meter or 0
        notes = [t for t in bar.tokens if type(t) is abcnotes.Note and not t.grace]
        tied = bool(notes) and notes[-1].tie
    return starts


_CACHE: dict = {}


def _tokenizer():
    if "tok" not in _CACHE:
        from transformers import AutoTokenizer

        from chatmusician.model.tiny import ensure_tiny

        _CACHE["tok"] = AutoTokenizer.from_pretrained(str(ensure_tiny("nano")))
    return _CACHE["tok"]


def test_meter_row_for_an_engine_hook_masks_tokens_that_overflow_the_bar():
    import torch

    from chatmusician.model.constrained import ll_tokenizer
    from chatmusician.model.meter import MeterRow

    tokenizer = _tokenizer()
    row = MeterRow(ll_tokenizer(tokenizer), tokenizer.eos_token_id)
    ids = tokenizer("X:1\nM:2/4\nL:1/8\nK:G\nGABc|de", add_special_tokens=False)["input_ids"]
    logits = torch.zeros(len(tokenizer))
    bar = tokenizer.convert_tokens_to_ids("|")
    logits[bar] = 5.0  # the best token closes a bar that is two eighths short
    row(ids, logits)
    assert logits[bar] == float("-inf") and torch.isfinite(logits).any()
    assert row.fill() == "z2" and not row.may_end()
