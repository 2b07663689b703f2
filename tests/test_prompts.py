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


# The MusicPile-sft row the original's README shows (already in chat form).
README_ROW = {
    "instruction": "Construct melodies by blending the designated musical pattern with the supplied motif.",
    "input": "['Binary', 'Sectional: Verse/Chorus'];X:1 L:1/16 M:2/4 K:G ['G2BG A2cA B2dB', '(gf)(ge) (ed)(cB)' </s> ",
    "output": "Assistant: X:1 L:1/16 M:2/4 K:G G2BG A2cA | B2dB G2B2 | c2ec B2dB | ABAG (GF)(ED) | G2BG A2cA | "
    "B2dB c2ec | cBAG D2f2 | g2d2B2G2 || </s> ",
}


def test_chat_form_rows_are_used_verbatim_as_the_original():
    source, target = prompts.sft_source_target(README_ROW)
    assert source == README_ROW["instruction"] + README_ROW["input"]  # no separator, no template
    assert target == README_ROW["output"]
    assert "Human:" not in source and target.count("Assistant:") == 1
    assert prompts.sft_source_target(README_ROW, "never") == (source, target)
    # either sign of chat form is enough
    assert prompts.is_chat_form("Q", "", "Assistant: x")
    assert prompts.is_chat_form("Human: Q </s> ", "", "x")
    assert not prompts.is_chat_form("Q", "X:1", "x")


def test_raw_rows_are_put_into_the_same_chat_form():
    source, target = prompts.sft_source_target(
        {"instruction": "Do X.", "input": "X:1\nK:C\nCDEF|", "output": "ok"}
    )
    assert source == "Human: Do X.\nX:1\nK:C\nCDEF| </s> "
    assert target == "Assistant: ok </s> "
    # training source + the target's opening is exactly the inference prompt
    assert source + prompts.ASSISTANT == prompts.build_chat_prompt("Do X.\nX:1\nK:C\nCDEF|")
    assert prompts.sft_source_target({"instruction": "", "input": "only", "output": None}) == (
        "Human: only </s> ",
        "Assistant:  </s> ",
    )
    # never: the original's concatenation even for raw rows; always: wrap even chat-form rows
    assert prompts.sft_source_target({"instruction": "a", "input": "b", "output": "c"}, "never") == (
        "ab",
        "c",
    )
    wrapped, _ = prompts.sft_source_target(README_ROW, "always")
    assert wrapped.startswith("Human: Construct")
    with pytest.raises(ValueError, match="auto, always or never"):
        prompts.sft_source_target(README_ROW | {"output": "x", "input": "y"}, "sometimes")


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
