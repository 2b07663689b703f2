"""The ABC tune grammar: what it accepts token by token with the real tokenizer, and the request constraints."""

from __future__ import annotations

import pytest

from chatmusician.abc.grammar import AbcConstraints, ConstraintError, tune_grammar


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from chatmusician.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_path)


def accepts(tokenizer, grammar: str, text: str) -> bool:
    """The whole text is accepted token by token and the grammar is in an accepting state at its end."""
    import llguidance

    from chatmusician.model.constrained import ll_tokenizer

    spec = llguidance.LLMatcher.grammar_from_lark(grammar)
    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), spec, log_level=0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()


TUNE = 'X:1\nT:Test\nM:6/8\nL:1/8\nK:G\n|:"G"GAB d2e|[1 c3 B3:|[2 {c}B2A G3|]\nw:la la\n'


def test_tune_shapes(tokenizer):
    g = tune_grammar()
    assert accepts(tokenizer, g, " " + TUNE)  # the leading space of the model's first token "▁X"
    assert not accepts(tokenizer, g, TUNE.replace("K:G\n", ""))  # no K: line
    assert not accepts(tokenizer, g, "T:Test\n" + TUNE)  # X: must come first
    assert not accepts(tokenizer, g, TUNE.replace("|]\n", "|]\n\nabc|\n"))  # a blank line ends a tune
    for blank in (" ", "  \t"):  # so does a line of spaces only, before the music or inside it
        assert not accepts(tokenizer, g, TUNE.replace("K:G\n", f"K:G\n{blank}\n"))
        assert not accepts(tokenizer, g, TUNE.replace("|]\n", f"|]\n{blank}\nabc|\n"))
    spaced = TUNE.replace("K:G\n|:", "K:G\n |:").replace("3:|", "3 :|  \n")  # spaces beside music and bars
    assert accepts(tokenizer, g, spaced)
    assert not accepts(tokenizer, g, TUNE.rstrip("\n"))  # not complete before the line's newline
    assert not accepts(tokenizer, g, TUNE.replace("M:6/8", "M:six"))  # typed header values
    assert not accepts(tokenizer, g, TUNE.replace("K:G", "K:H"))
    assert not accepts(tokenizer, g, TUNE.replace("T:Test", "%%abc-include /etc/passwd"))  # directives
    assert not accepts(tokenizer, g, TUNE.replace("T:Test", "T:" + "x" * 200))  # bounded free text
    assert accepts(tokenizer, tune_grammar(renderable=False), TUNE.replace("GAB", "G[|]AB"))
    assert not accepts(tokenizer, g, TUNE.replace("GAB", "G[|]AB"))  # abc2midi errors on the invisible bar


def test_every_body_line_the_grammar_takes_is_music_to_the_extractor(tokenizer):
    """Property over random body lines built from the body's elements: a line the grammar accepts stays in
    the tune the extractor finds (else a constrained answer with a line such as " .%" loses its tune there)."""
    import random

    from chatmusician.abc import extract_tunes

    pieces = ["G", "a2", "z", "Z2", "y", "X", "(3", ".", "~", "u", "-", ">", "(", ")", "`", "&", "[CE]"]
    pieces += ["{g}", '"C"', "[K:D]", "[1", "\\", "!trill!", " ", "|", "::", ":|", "%c", "%."]
    g, rng, taken = tune_grammar(), random.Random(0), 0
    for _ in range(400):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
        tune = f"X:1\nM:6/8\nL:1/8\nK:G\nGAB d2e|\n{line}\nc3 B3|]\n"
        if accepts(tokenizer, g, tune):
            taken += 1
            assert extract_tunes(tune).tunes == ["\n".join(x.rstrip() for x in tune.splitlines())], line
    assert 100 < taken < 350  # both kinds drawn
    for weak in (" .%", "(3", "~ -", "y", "X4"):  # no note, rest, chord, bar: prose to the extractor
        assert not accepts(tokenizer, g, f"X:1\nK:G\nGAB|\n{weak}\nc3|]\n")


def test_constraints_fix_header_values_and_bound_bars(tokenizer):
    c = AbcConstraints(key="G", meter="6/8", unit_length="1/8")
    assert accepts(tokenizer, tune_grammar(c), TUNE)
    assert accepts(tokenizer, tune_grammar(c), TUNE.replace("M:6/8\nL:1/8", "L:1/8\nM:6/8"))  # either order
    assert not accepts(tokenizer, tune_grammar(c), TUNE.replace("K:G", "K:D"))
    assert not accepts(tokenizer, tune_grammar(c), TUNE.replace("M:6/8", "M:3/4"))
    assert not accepts(tokenizer, tune_grammar(c), TUNE.replace("L:1/8\n", ""))  # a fixed field must be there
    # TUNE's body has 4 bar lines (|: :| [2 is a volta, not a bar line |]): 4 fit, 3 do not.
    assert accepts(tokenizer, tune_grammar(AbcConstraints(max_bars=4)), TUNE)
    assert not accepts(tokenizer, tune_grammar(AbcConstraints(max_bars=3)), TUNE)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"key": "H#"}, "key"),
        ({"meter": "7/0"}, "meter"),
        ({"unit_length": '1/8"]'}, "unit_length"),
        ({"max_bars": 0}, "max_bars"),
        ({"max_bars": True}, "max_bars"),
        ({"tempo": "120"}, "tempo"),
    ],
)
def test_bad_constraints_are_refused_with_the_field(fields, param):
    with pytest.raises(ConstraintError) as info:
        AbcConstraints.from_mapping(fields)
    assert info.value.param == param and info.value.message
