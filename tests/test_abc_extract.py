"""extract_tunes: finding ABC tunes in model output and normalizing them."""

from __future__ import annotations

import random

import pytest

from chatmusician.abc import NO_ABC, extract_tunes, parse_tune, validate_tune

TUNE_BODY = "|:A|d2fd (3ded fd|g2bg f2ed:|"


@pytest.mark.parametrize("x_line", ["X:1", "X: 1", "X:  7", "X:", "X :3"])
def test_x_line_variants_are_normalized_to_x_number(x_line):
    result = extract_tunes(f"{x_line}\nT:Jig\nM:4/4\nL:1/8\nK:D\n{TUNE_BODY}\n")
    assert result.found and len(result.tunes) == 1
    first = result.tunes[0].splitlines()[0]
    digits = "".join(ch for ch in x_line if ch.isdigit())
    assert first == f"X:{int(digits) if digits else 1}"
    assert result.tunes[0].splitlines()[1:] == ["T:Jig", "M:4/4", "L:1/8", "K:D", TUNE_BODY]


def test_tune_without_x_line_gets_one_and_a_warning():
    result = extract_tunes(f"T:No number\nM:4/4\nL:1/8\nK:G\n{TUNE_BODY}")
    assert result.tunes == [f"X:1\nT:No number\nM:4/4\nL:1/8\nK:G\n{TUNE_BODY}"]
    assert [i.code for i in result.issues] == ["added_number"]


def test_prose_before_and_after_is_left_out():
    text = (
        "Sure! Here is a jig in D major, as you asked:\n\n"
        "X:3\nT:Test\nM:6/8\nL:1/8\nK:D\n|:A|dfa afd|cec ABc|dfa afd|e3 e2:|\n"
        "This tune uses a simple AABB form. Enjoy playing it!\n"
    )
    (tune,) = extract_tunes(text).tunes
    assert tune == "X:3\nT:Test\nM:6/8\nL:1/8\nK:D\n|:A|dfa afd|cec ABc|dfa afd|e3 e2:|"


def test_fenced_code_blocks_and_several_tunes():
    text = (
        "Two tunes:\n```abc\nX:1\nT:One\nM:3/4\nK:C\nC2 E2 G2 | c6 |]\n```\n"
        "and a second one\n~~~\nX:2\nT:Two\nM:3/4\nK:G\nG2 B2 d2 | g6 |]\n~~~\nThat's all."
    )
    result = extract_tunes(text)
    assert [parse_tune(t).title for t in result.tunes] == ["One", "Two"]
    assert result.message == "found 2 tunes"
    assert result.source_lines[1][0] == 11  # the second tune's X: line in the input


def test_blank_line_ends_a_tune_and_the_next_x_starts_another():
    result = extract_tunes("X:1\nT:a\nK:C\nCDEF|\n\nX:2\nT:b\nK:G\nGABc|\n")
    assert [t.splitlines()[-1] for t in result.tunes] == ["CDEF|", "GABc|"]


def test_headerless_tunes_split_at_their_titles():
    result = extract_tunes("T:One\nM:4/4\nK:C\nCDEF GABc|\nT:Two\nM:3/4\nK:G\nGAB|")
    assert [parse_tune(t).title for t in result.tunes] == ["One", "Two"]
    assert [parse_tune(t).number for t in result.tunes] == [1, 2]


def test_sft_single_line_form_is_split_one_field_per_line():
    text = "X:1 L:1/16 M:2/4 K:G G2BG A2cA | B2d2 d4 |]"
    result = extract_tunes(text)
    assert result.tunes == ["X:1\nL:1/16\nM:2/4\nK:G\nG2BG A2cA | B2d2 d4 |]"]
    assert "split_header" in [i.code for i in result.issues]
    assert validate_tune(result.tunes[0]) == []


def test_single_line_form_with_title_mode_and_several_tunes():
    text = "X:1 T:The Morning Air M:6/8 L:1/8 K:A dor ABA cBA|e3 e2d|\nX:2 L:1/8 M:3/4 K:Dmin D2 F2 A2|D6|]"
    first, second = extract_tunes(text).tunes
    assert first.splitlines() == ["X:1", "T:The Morning Air", "M:6/8", "L:1/8", "K:A dor", "ABA cBA|e3 e2d|"]
    assert second.splitlines()[3:] == ["K:Dmin", "D2 F2 A2|D6|]"]
    assert parse_tune(first).key.mode == "dorian"


def test_a_key_with_accidentals_on_its_own_line_is_not_split():
    (tune,) = extract_tunes("X:1\nK:D ^g clef=treble\nABcd|").tunes
    assert tune.splitlines()[1] == "K:D ^g clef=treble"


def test_a_fenced_body_without_header_is_kept_with_a_warning():
    result = extract_tunes("```\n|: GABc dedB | c2A2 G4 :|\n```")
    assert result.tunes == ["X:1\n|: GABc dedB | c2A2 G4 :|"]
    assert "no_header" in [i.code for i in result.issues]
    assert "missing_key" in [i.code for i in validate_tune(result.tunes[0])]


def test_title_with_a_colon_stays_one_field():
    (tune,) = extract_tunes("X:1\nT:Golden Gate: A Reel\nK:G\nGABc|").tunes
    assert "T:Golden Gate: A Reel" in tune.splitlines()


@pytest.mark.parametrize(
    "text", ["", "   \n\n", "I cannot write music, sorry.", "Q: what is a jig?\nA: a dance."]
)
def test_no_abc_is_a_clear_result(text):
    result = extract_tunes(text)
    assert not result.found and result.tunes == []
    assert result.message == NO_ABC
    assert [i.code for i in result.issues] == ["no_abc_found"]


def test_never_raises_on_random_text():
    rng = random.Random(1234)
    alphabet = "XTMLKV:|[]()\"!{}%`~\n 0123456789abcdefgABCDEFG/<>^_=,'-\x00\r\t"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        result = extract_tunes(text)
        assert result.found == bool(result.tunes)
        assert all(t.startswith("X:") for t in result.tunes)
        assert len(result.source_lines) == len(result.tunes)
    binary = bytes(rng.randrange(256) for _ in range(5000)).decode("latin-1")
    result = extract_tunes(binary)
    assert result.found == bool(result.tunes) and (result.found or result.message == NO_ABC)


@pytest.mark.parametrize(
    "text",
    [
        "A:b\n" * 20_000,  # field lines without a K: anywhere
        "X:1\nK:C\nCDEF|\n" + "T:x\n" * 20_000,  # titles in a body
        "X:1\n" + "junk line\n" * 20_000,  # a header that never ends
        "X:1\nK:C\n" + "C|\n\n" * 20_000,  # blank lines between music lines
    ],
)
def test_hostile_shapes_give_a_short_answer(text):
    """Shapes that once cost a forward scan per line (minutes at 1 MB): now one pass, and one warning per
    kind and tune rather than one per line."""
    result = extract_tunes(text)
    assert len(result.issues) <= 3
