"""Meter-aware constrained decoding: what the decoder allows, the validator passes and abc2midi plays in time.

The tracker (chatmusician.abc.meter), the per-request hook for engines (chatmusician.model.meter.MeterRow) and
the property test: the real logits processor driven by a random model (seeded random logits, tilted toward music
characters so that the budget goes into the body), many rows per batch; every answer has zero bar-duration
issues, parses, and abc2midi (through the renderer's sandbox) plays its bars where the validator says."""

from __future__ import annotations

import re
import shutil
from fractions import Fraction

import pytest

from chatmusician.abc import extract_tunes, parse_tune, validate_tune
from chatmusician.abc.grammar import AbcConstraints
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
        ("GABc defg|GABc d", "e(>f3/2 z/|", False),  # '>' after a slur: none to abcnotes, one to abc2midi
        ("GABc defg|GABc d", "f>g/ z5/4|", False),  # unequal notes: abc2midi keeps the pair's total,
        ("GABc defg|GABc de", "f/>g z3/4|", False),  # abcnotes (the validator) does not
        ("GABc defg|GABc", "f2>g2|", True),
        ("GABc defg|GABc de", "[fa]>[ga]|", True),
        ("GABc defg|GABc", "[f2a]2|", False),  # lengths inside and outside: abc2midi takes the outer alone
        ("GABc defg|GABc de", "[f2a]|", True),
        ("GABc defg|GABc de", "f//8", False),  # abc2midi reads //8 as //
        ("GABc defg|\n", "F:|", False),  # a note and a repeat to abcnotes, a field line to abc2midi
        ("GABc defg|\n", " X:|", False),  # the extractor reads a field line: a new tune starts there
        ("GABc defg|\n", "X ::", False),
        ("GABc defg|\n", "Z4|", True),  # a multi-bar rest
        ("GABc defg|\nL:1/4\n", "GABc|", True),
        ("GABc defg|\nM:none\n", "GABc defg abc|", True),  # free meter: nothing checked
    ],
)
def test_tracker_allows_only_what_fills_the_bar(prefix, text, ok):
    assert _tracker(HEAD + prefix).allows(text) is ok


def test_a_music_line_that_grows_into_a_field_line_is_refused_token_by_token():
    """Pushed piece by piece (the tracker resumes inside the line): " X :" would start a new tune to the
    extractor, "F:|" is a field line to abc2midi."""
    for pieces in ([" ", " X", " ", ":"], ["F", ":|"], [" ", "C", ":|"], ["  ", "X", " ::"]):
        tracker = _tracker("X:1\nM:4/4\nL:1/4\nK:C\nC4|\n")
        for piece in pieces[:-1]:
            tracker.push(piece)
        assert not tracker.allows(pieces[-1]), pieces


def test_a_second_meter_or_unit_line_in_the_header_is_refused():
    """abcnotes (the validator) keeps a header's first M:/L: line, abc2midi its last: no second one."""
    for header, line in [("X:1\nM:2/2\n", "M"), ("X:1\nM:2/2\nT:a\n", "M:4/2\n"), ("X:1\nL:1/8\n", "L:")]:
        assert not _tracker(header).allows(line)
    assert _tracker("X:1\nM:2/2\n").allows("L:1/8\nK:C\nC8|\nM:4/2\n")  # a change in the body is read alike


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
    "X:1\nM:3/4\nL:1/8\nK:G\nGABc de|Z3|f2 g2 a2|X|b2 a2 g2|\n",  # multi-bar and invisible rests
]


NO_ABC2MIDI = pytest.mark.skipif(
    shutil.which("abc2midi") is None, reason="abc2midi (Debian abcmidi) not installed"
)


@NO_ABC2MIDI
@pytest.mark.parametrize("tune", WRITTEN)
def test_abc2midi_plays_the_bars_the_tracker_passes_in_time(tune, tmp_path):
    assert metrically_complete(tune)
    onsets, tick = _midi_onsets(tune, tmp_path)
    starts = _bar_starts(tune)
    assert len(starts) >= 2
    assert not [t for t in starts if not any(abs(t - o) <= tick for o in onsets)], (starts, sorted(onsets))


# ------------------------------------------------------------------------------------------- property test
# Repeat signs and endings (inline fields, "[M:C|]", kept as they are).
_REPEATS = re.compile(r"(\[[A-Za-z]:[^\]]*\])|\[(?=\d)\d*|:*\|+[\]:]*\d*|::")


def _midi_onsets(tune_text: str, tmp_path) -> tuple[set[Fraction], Fraction]:
    """Note onsets (whole notes) of abc2midi's MIDI of the tune (run by the renderer's sandbox), its repeats
    played once (the written time line), read back with mido, and the ticks per whole note."""
    import mido

    from chatmusician.render.config import SandboxConfig
    from chatmusician.render.sandbox import run_tool, sandbox_available
    from chatmusician.render.tools import abc2midi_argv

    flat = []
    for line in tune_text.split("\n"):
        if re.match(r"^[A-Za-z]:", line):
            flat.append("X:1" if line.startswith("X:") else line)
        else:  # repeats and endings played once: the MIDI timeline is the written one
            flat.append(re.sub(_REPEATS, lambda m: m.group(1) or ("|" if "|" in m.group() else " "), line))
    (tmp_path / "t.abc").write_text("\n".join(flat) + "\n")
    config = SandboxConfig()
    if sandbox_available(config) is not None:
        config = SandboxConfig(kind="rlimits")
    run = run_tool(abc2midi_argv("t.abc", "t.mid"), tmp_path, config)
    assert run.returncode == 0 and (tmp_path / "t.mid").exists(), (tune_text, run)
    midi = mido.MidiFile(str(tmp_path / "t.mid"))
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
        if bar.whole_bar_rest:  # Z4: four bars (abcnotes gives the bar no length)
            rest = next(t for t in bar.tokens if type(t) is abcnotes.Rest)
            now += (bar.meter or 0) * Fraction(*rest.length)
        else:
            now += bar.duration
        # Tied into the next bar: its last note carries a tie, or a "-" (with spaces before it) follows it.
        last = [
            t for t in bar.tokens if type(t) is abcnotes.Tie or (type(t) is abcnotes.Note and not t.grace)
        ]
        tied = bool(last) and (type(last[-1]) is abcnotes.Tie or last[-1].tie)
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


def _random_rows(seed: int, rows: int, budget: int, in_sampler: bool) -> list[tuple[tuple[str, str], str]]:
    """One batch of ``rows`` meter-aware constrained rows (each its own meter and unit length) sampled from
    seeded random logits through the real logits processor (``in_sampler``: as the meter's verifier behind
    the serving engine's RowSampler, which draws, else as a mask); their answers."""
    import torch

    from chatmusician.model.constrained_decoding import finish, logits_processor
    from chatmusician.model.sampling import RowSampler, RowSampling

    tokenizer = _tokenizer()
    generator = torch.Generator().manual_seed(seed)
    pick = [HEADERS[(seed * rows + r) % len(HEADERS)] for r in range(rows)]
    constraints = [AbcConstraints(meter=m, unit_length=u, key="G") for m, u in pick]
    processor, states = logits_processor(tokenizer, constraints, budget, meter_in_sampler=in_sampler)
    sampler = RowSampler(
        [RowSampling(top_p=0.95, seed=seed * rows + r) for r in range(rows)], "cpu", processor
    )
    bias = _bias(tokenizer)
    ids = torch.zeros((rows, 1), dtype=torch.long)
    for _ in range(budget):
        scores = processor(ids, torch.randn((rows, len(bias)), generator=generator) * SPREAD + bias)
        if in_sampler:
            scores = sampler(ids, scores)
        token = scores.argmax(-1, keepdim=True)  # the logits are random already: greedy on them samples
        ids = torch.cat([ids, token], dim=1)
        if all(s.ids and s.ids[-1] == tokenizer.eos_token_id for s in states):
            break
    out = []
    for r, state in enumerate(states):
        answer, _ = finish(state, ids[r, 1:].tolist(), tokenizer.eos_token_id)
        out.append((pick[r], tokenizer.decode(answer, skip_special_tokens=True)))
    return out


# Random logits: N(0, SPREAD) per token plus the bias, taken greedily; a wide spread puts nearly all of the
# probability on a few tokens per step (cheap to check, as with a trained model) and every seed writes its own.
SPREAD = 12.0


def _bias(tokenizer):
    """Music characters and the M:/L:/K: lines likelier: a short budget then reaches well into the body."""
    import torch

    if "bias" not in _CACHE:
        bias = torch.zeros(len(tokenizer))
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            text = piece.replace("\u2581", " ")
            if text and all(ch in MUSIC for ch in text):
                bias[i] = 2.0 * SPREAD
            if text.strip() in ("M", "L", "K", "M:", "L:", "K:"):
                bias[i] = 4.7 * SPREAD
        bias[tokenizer.convert_tokens_to_ids("<0x0A>")] = 2.7 * SPREAD
        _CACHE["bias"] = bias
    return _CACHE["bias"]


def _body_notes(tune: str) -> int:
    body = tune.split("\nK:", 1)[1].split("\n", 1)[1]
    return len(
        re.findall(r"[A-Ga-g]", re.sub(r'"[^"]*"|![^!]*!|\[[A-Za-z]:[^\]]*\]|\n[A-Za-z]:[^\n]*', "", body))
    )


@pytest.mark.integration
@NO_ABC2MIDI
@pytest.mark.parametrize("in_sampler", [False, True], ids=["mask", "verifier"])
def test_random_model_constrained_tunes_have_every_bar_right_and_abc2midi_agrees(tmp_path, in_sampler):
    """Property: over SEEDS x ROWS random-model rows (six meters, three unit lengths), every constrained answer
    is one whole tune to the extractor, parses, has zero bar-duration issues, and abc2midi strikes each bar's
    first note where the validator puts the bar (onsets at the meter's multiples, pickup aside)."""
    checked, deep, problems = 0, 0, []
    for seed in range(SEEDS):
        for _header, text in _random_rows(seed, rows=ROWS, budget=BUDGET, in_sampler=in_sampler):
            tunes = extract_tunes(text).tunes
            if len(tunes) != 1 or len(tunes[0].strip().splitlines()) != len(text.strip().splitlines()):
                problems.append(("not one whole tune to the extractor", text))
                continue
            tune = tunes[0]
            issues = [i for i in validate_tune(tune) if i.severity == "error" or i.code == "bar_duration"]
            if issues:
                problems.append((issues, tune))
                continue
            where = tmp_path / f"{seed}-{checked}"
            where.mkdir()
            onsets, tick = _midi_onsets(tune, where)
            starts = _bar_starts(tune)
            missed = [t for t in starts if not any(abs(t - o) <= tick for o in onsets)]
            if missed:
                problems.append((f"abc2midi moves the bars at {missed}", tune))
            checked += 1
            deep += _body_notes(tune) >= 8
    if problems:
        pytest.fail(
            f"{len(problems)} of {checked + len(problems)} answers:\n\n"
            + "\n\n".join(f"{why}\n{tune}" for why, tune in problems[:3])
        )
    assert deep >= checked // 2, "the budget should reach well into the body"


SEEDS, ROWS, BUDGET = 5, 40, 96
