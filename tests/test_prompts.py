import pytest

from chatmusician import prompts


def test_single_turn_template_is_exactly_the_originals():
    assert prompts.build_chat_prompt("Hi") == "Human: Hi </s> Assistant: "


def test_multi_turn_joins_closed_turns():
    text = prompts.build_chat_prompt("q3", [("q1", "a1"), ("q2", "a2")])
    assert (
        text
        == "Human: q1 </s> Assistant: a1 </s> Human: q2 </s> Assistant: a2 </s> Human: q3 </s> Assistant: "
    )


def test_sft_row_split():
    source, target = prompts.sft_source_target(
        {"instruction": "Do X.", "input": "X:1\nK:C\nCDEF|", "output": "ok"}
    )
    assert source == "Human: Do X.\nX:1\nK:C\nCDEF| </s> Assistant: "
    assert target == "ok"
    assert prompts.sft_source_target({"instruction": "", "input": "only", "output": None}) == (
        "Human: only </s> Assistant: ",
        "",
    )


def test_task_builders_pin_the_strings():
    assert prompts.text_to_music({"M": "6/8", "K": "G", "R": "jig"}) == (
        "Using ABC notation, recreate the given text as a musical score.\nMeter 6/8\nKey G\nRhythm jig"
    )
    assert (
        prompts.chord_conditioned(["Dm", "C"])
        == "Develop a musical piece using the given chord progression.\n'Dm', 'C'"
    )
    assert prompts.motif_and_form("ABCA", "E2GB d2c2|") == (
        "Create music by following the alphabetic representation of the assigned musical structure and the "
        "given motif.\n'ABCA';E2GB d2c2|"
    )
    assert prompts.style("Bach") == "Develop a tune influenced by Bach's compositions."
    assert prompts.harmonization("K:C\nCDEF|").startswith("Construct smooth-flowing chord progressions")
    assert prompts.musical_form("AABB").endswith("'AABB'.")
    assert prompts.analyze_form("K:C\nC|").endswith("\nK:C\nC|")
    assert "motif" in prompts.analyze_motif("K:C")


def test_build_task_prompt_errors_name_the_problem():
    assert prompts.build_task_prompt(prompts.Task("style", {"style": "Bach"})) == prompts.style("Bach")
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        prompts.build_task_prompt(prompts.Task("nope", {}))
    with pytest.raises(ValueError, match="needs field 'chords'"):
        prompts.build_task_prompt(prompts.Task("chords", {}))
