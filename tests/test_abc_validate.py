"""validate_tune: bar durations against the meter, unbalanced brackets/quotes/slurs, header problems."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from chatmusician.abc import AbcLimits, Issue, bar_durations, parse_tune, validate_tune

# One reel using tuplets, chords, broken rhythm, grace notes, decorations and chord symbols, every bar 4/4.
REEL = """X:1
T:Everything
M:4/4
L:1/8
K:D
|:A|"D"d2 fd (3ded fd|"G"{a}g2 bg ~f2 ed|[DFA]2 [DFA]2 A>B c<d|!trill!e4 z4:|
|"A7"(3:2:3cBA (3BAG A2 ag|f/g/a/g/ fe (3d/c/B/ A B2|"D"d8|]"""


def codes(issues: list[Issue]) -> list[str]:
    return [i.code for i in issues]


def test_a_correct_tune_has_no_issue():
    assert validate_tune(REEL) == []
    assert set(bar_durations(REEL)[""][1:]) == {Fraction(1)}  # every bar after the pickup is a whole 4/4


def test_accepts_a_parsed_tune_too():
    assert validate_tune(parse_tune(REEL)) == []


@pytest.mark.parametrize(
    ("old", "new", "column"),
    [
        ("ed|[DFA]", "e|[DFA]", 29),  # a short bar: a note missing (the grace note before g is no start)
        ("A>B c<d", "A>B c<d e", 43),  # broken rhythm plus one note too many
        ("(3ded", "ded", 8),  # the triplet mark lost: three eighths instead of two
        ("[DFA]2 [DFA]2", "[DFA]2 [DFA]3", 43),  # a chord one unit longer
        ("{a}g2", "a/g2", 26),  # a grace note turned into a real one
    ],
)
def test_a_wrong_bar_is_reported_where_it_starts(old, new, column):
    issues = validate_tune(REEL.replace(old, new))
    bars = [i for i in issues if i.code == "bar_duration"]
    assert len(bars) == 1, issues
    assert (bars[0].severity, bars[0].line, bars[0].column) == ("warning", 6, column)


def test_pickup_and_closing_bars_are_tolerated_but_not_in_the_middle():
    tune = "X:1\nM:6/8\nL:1/8\nK:G\nD|GAB c2d|e3 d2B|c2A F2D|G3 G2|]"
    assert validate_tune(tune) == []
    issues = validate_tune(tune.replace("e3 d2B", "e3 d2"))
    assert codes(issues) == ["bar_duration"] and "5/8" in issues[0].message


def test_short_bars_at_repeats_and_endings_are_section_pickups():
    tune = "X:1\nM:4/4\nL:1/8\nK:G\nB2|:c4 d4|e6 :|[1 c2|e8:|[2 e2 d2|g8|]"
    assert "bar_duration" not in codes(validate_tune(tune))
    too_long = "X:1\nM:4/4\nL:1/8\nK:G\nB2|:c4 d4|e6 f4:|g8|]"
    assert codes(validate_tune(too_long)) == ["bar_duration"]


def test_meter_and_unit_changes_in_the_body_apply():
    tune = "X:1\nM:3/4\nL:1/4\nK:C\nC D E|F G A|\nM:2/4\nc2|[L:1/8]c4|[M:3/4]c6|]"
    assert validate_tune(tune) == []
    assert codes(validate_tune(tune.replace("[L:1/8]c4", "[L:1/8]c2"))) == ["bar_duration"]


def test_free_meter_and_measure_rests_are_not_checked():
    assert validate_tune("X:1\nM:none\nL:1/8\nK:C\nCDE|CDEFGAB|C|CD|]") == []
    assert validate_tune("X:1\nM:None\nL:1/8\nK:EM\nCDE|CDEFGAB|[M:FREE]C|CD|]") == []
    assert validate_tune("X:1\nM:4/4\nL:1/8\nK:C\nC8|Z2|z8|C8|]") == []


def test_multi_voice_bars_are_checked_per_voice():
    tune = (
        "X:1\nT:Duet\nM:3/4\nL:1/4\nV:1\nV:2 clef=bass\nK:C\nV:1\nC D E|F G A|c3|]\nV:2\nC,3|F,2 G,|C,3|]\n"
    )
    assert validate_tune(tune) == []
    broken = validate_tune(tune.replace("F,2 G,", "F,2"))
    assert codes(broken) == ["bar_duration"]
    assert "voice 2" in broken[0].message and (broken[0].line, broken[0].column) == (11, 5)
    inline = "X:1\nM:2/4\nL:1/4\nK:C\n[V:1] C D|E F|G2|]\n[V:2] C,2|E,|G,2|]"
    (issue,) = validate_tune(inline)
    assert issue.code == "bar_duration" and "voice 2" in issue.message


def test_voice_overlay_counts_the_first_layer():
    assert validate_tune("X:1\nM:4/4\nL:1/4\nK:C\nC D E F|G4 & E2 D2|c4|]") == []


@pytest.mark.parametrize(
    ("body", "code", "severity", "column"),
    [
        ('"G CDEF|', "unclosed_quote", "error", 1),
        ("[CEG CDEF|", "unclosed_chord", "error", 1),
        ("CEG] CDEF|", "unmatched_bracket", "error", 4),
        ("{g CDEF|", "unclosed_grace", "error", 1),
        ("(CDEF|", "unclosed_slur", "warning", 1),
        ("CD) EF|", "unmatched_slur", "warning", 3),
        ("C-D EF|", "tie_mismatch", "warning", 1),
        ("CD\u00e9EF|", "unexpected_character", "warning", 3),
    ],
)
def test_unbalanced_brackets_quotes_slurs(body, code, severity, column):
    issues = [i for i in validate_tune(f"X:1\nM:none\nK:C\n{body}") if i.code == code]
    assert [(i.severity, i.line, i.column) for i in issues] == [(severity, 4, column)]


def test_balanced_constructs_are_fine():
    body = '"Am"(A>B) [CEG]2 {/g}A !fermata!B- B (3ABc "^text"d|'
    assert validate_tune(f"X:1\nM:none\nK:C\n{body}") == []


def test_header_problems_are_errors_and_music_still_checked():
    issues = validate_tune("X:1\nM:4/4\nL:1/8\nK:H\nC8|C7|C8|]")
    assert [(i.code, i.severity, i.line) for i in issues] == [
        ("invalid_key", "error", 4),
        ("bar_duration", "warning", 5),
    ]
    assert codes(validate_tune("X:1\nM:FREI\nK:C\nC8|C7|C8|]")) == [
        "invalid_meter"
    ]  # unknown meter: no bar check
    assert codes(validate_tune("X:1\nT:t\nM:4/4\nC8|C8|]")) == ["missing_key"]


def test_a_tune_without_notes_is_an_error():
    assert codes(validate_tune("X:1\nT:Empty\nK:C\n")) == ["no_music"]


def test_never_raises_on_hostile_bodies():
    bodies = [
        "[Q:1/0=120] A|",
        "[M:None] A|",
        "A/0 B|",
        "(0abc|",
        "(9:0:0abc|",
        "|1-|",
        "[K:]",
        "[L:0/0]C|",
        "A" * 3000 + "|",
        "]" * 50,
        "\x00\x01",
    ]
    for body in bodies:
        issues = validate_tune(f"X:1\nM:4/4\nK:C\n{body}")
        assert all(isinstance(i, Issue) and i.severity in ("error", "warning") for i in issues)
        assert not {"not_checked", "internal_error"} & set(codes(issues)), (body, issues)
    assert "invalid_note_length" in codes(validate_tune("X:1\nM:4/4\nK:C\nA/0 B|"))
    assert codes(validate_tune("X:1\nQ:1/0=120\nK:C\nA|")) == ["invalid_tempo"]


def test_oversized_tunes_are_refused_unread():
    huge = "X:1\nM:4/4\nL:1/8\nK:G\n" + "GABc dedB|" * 30_000
    assert codes(validate_tune(huge)) == ["input_too_large"]
    small = "X:1\nM:4/4\nL:1/8\nK:G\n" + "GABc dedB|" * 100
    assert codes(validate_tune(small, AbcLimits(max_input_bytes=500))) == ["input_too_large"]
    assert validate_tune(small) == []
    one_line = "X:1\nM:4/4\nL:1/8\nK:G\n" + "GABc dedB|" * 1_001
    (issue,) = validate_tune(one_line)
    assert (issue.code, issue.line) == ("line_too_long", 5)


def test_issues_serialize_to_plain_dicts():
    (issue,) = validate_tune("X:1\nM:4/4\nL:1/8\nK:G\nG8|G7|G8|]")
    assert issue.to_dict() == {
        "severity": "warning",
        "code": "bar_duration",
        "message": "bar 2 lasts 7/8 of a whole note; the meter asks for 1",
        "line": 5,
        "column": 4,
    }


KNOWN_CODES = {
    "bar_duration", "unclosed_chord", "unmatched_bracket", "unclosed_grace", "unmatched_brace", "unclosed_slur",
    "unmatched_slur", "unclosed_quote", "unexpected_character", "tie_mismatch", "repeat_structure", "no_music",
    "invalid_note_length", "invalid_key", "invalid_meter", "invalid_unit_length", "invalid_tempo", "not_checked",
}  # fmt: skip


def test_random_bodies_give_known_issues_only():
    """Garbage in, structured issues out: the tokenizer's own failures become a partial check, not a crash."""
    rng = random.Random(3)
    alphabet = list("ABCDEFGabcdefgzxZX|[]():\"!{}/<>^_=,'-0123456789 \n&%.~HTuvMKLQVP+")
    alphabet += [
        "[K:",
        "[M:",
        "[L:",
        "[V:",
        "(3",
        "(3:2:",
        "|1",
        ":|",
        "|:",
        "::",
        "[1",
        "M:",
        "K:",
        "V:",
        "L:",
    ]
    for _ in range(500):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
        issues = validate_tune("X:1\nM:4/4\nL:1/8\nK:G\n" + body)
        assert set(codes(issues)) <= KNOWN_CODES, (body, issues)
        assert not any(i.code == "not_checked" and "bar durations" not in i.message for i in issues)
