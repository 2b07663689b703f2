"""Constrained decoding inside the Composer's batched generate and its stream, on the tiny model."""

from __future__ import annotations

import pytest

from chatmusician.abc.grammar import AbcConstraints, tune_grammar
from chatmusician.serve.config import EngineConfig
from chatmusician.serve.requests import prepare_request
from chatmusician.serve.types import ComposeError, GenerationParams

GREEDY = GenerationParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=48)
SAMPLED = GenerationParams(
    temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=48, seed=3
)


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    from chatmusician.serve.engines.hf import TransformersEngine

    return TransformersEngine(EngineConfig(model=tiny_model_path, device="cpu", torch_threads=1))


def complete_tune(engine, text: str, constraints: AbcConstraints) -> bool:
    import llguidance

    from chatmusician.model.constrained import ll_tokenizer

    spec = llguidance.LLMatcher.grammar_from_lark(tune_grammar(constraints))
    matcher = llguidance.LLMatcher(ll_tokenizer(engine.tokenizer), spec, log_level=0)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def with_constraints(prepared, constraints):
    import dataclasses

    return dataclasses.replace(prepared, constraints=constraints)


def test_mixed_batch_rows_obey_their_own_grammar_and_unconstrained_rows_do_not_change(engine):
    p = engine.prepare("Write a jig in D")
    fixed = AbcConstraints(key="D", meter="6/8")
    plain = engine.generate([(p, GREEDY), (p, GREEDY), (p, GREEDY)])
    mixed = engine.generate(
        [(p, GREEDY), (with_constraints(p, AbcConstraints()), GREEDY), (with_constraints(p, fixed), GREEDY)]
    )
    assert mixed[0] == plain[0]  # greedy output of the unconstrained row is identical
    for completion, constraints in zip(mixed[1:], [AbcConstraints(), fixed], strict=True):
        # A complete tune, even from a random model in 48 tokens (budget-aware decoding finishes it in time).
        assert complete_tune(engine, completion.text, constraints), completion.text
    assert mixed[1].text != plain[1].text or plain[1].text == ""


def test_sampled_constrained_answers_are_complete_tunes_with_the_asked_header(engine):
    p = engine.prepare("Compose a tune")
    fixed = AbcConstraints(key="G", meter="3/4", unit_length="1/8")
    params = GenerationParams(**{**SAMPLED.__dict__, "max_new_tokens": 400})
    outputs = engine.generate([(with_constraints(p, fixed), params)])
    text = outputs[0].text
    assert complete_tune(engine, text, fixed), text  # budget-aware decoding: always a whole tune
    lines = text.strip().split("\n")
    assert lines[0].startswith("X:") and "M:3/4" in lines and "L:1/8" in lines
    assert next(line for line in lines if line.startswith("K:")) == "K:G"


def test_cut_back_to_the_last_complete_line_and_eos_only_when_complete(engine):
    from chatmusician.model.constrained import RowState, new_matcher
    from chatmusician.model.constrained_decoding import AbcLogitsProcessor

    tok = engine.tokenizer
    head = "X:1\nM:4/4\nK:C\nCDEF GABc|\n"
    ids = tok(head + "cBAG", add_special_tokens=False)["input_ids"]
    row = RowState(new_matcher(tok, AbcConstraints()), tok.eos_token_id)
    answer, reason = row.finish(ids)  # no EOS: the budget ran out mid-line
    assert reason == "length" and tok.decode(answer) == head

    import torch

    processor = AbcLogitsProcessor(
        [RowState(new_matcher(tok, AbcConstraints()), tok.eos_token_id)], len(tok), 2
    )
    header = tok("X:1\nK:C\n", add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([[5, 6]])
    scores = processor(prompt, torch.zeros((1, len(tok))))
    for token in header:  # teacher-force the header
        assert scores[0, token] == 0
        prompt = torch.cat([prompt, torch.tensor([[token]])], dim=1)
        scores = processor(prompt, torch.zeros((1, len(tok))))
    assert scores[0, tok.eos_token_id] == float("-inf")  # no EOS before a body line
    for token in tok("CDEF|\n", add_special_tokens=False)["input_ids"]:
        prompt = torch.cat([prompt, torch.tensor([[token]])], dim=1)
        scores = processor(prompt, torch.zeros((1, len(tok))))
    assert scores[0, tok.eos_token_id] == 0  # a complete line: the tune may end


def test_stream_shows_only_what_the_answer_keeps(engine):
    p = with_constraints(engine.prepare("Write a reel"), AbcConstraints(max_bars=8))
    params = GenerationParams(**{**SAMPLED.__dict__, "max_new_tokens": 300})
    pieces = list(engine.stream(p, params))
    completion = pieces[-1]
    assert "".join(pieces[:-1]) == completion.text
    assert complete_tune(engine, completion.text, AbcConstraints(max_bars=8)), completion.text


@pytest.mark.parametrize(
    "request_fields, code_param",
    [
        ({"constrained": True, "constraints": {"key": "Q"}}, "key"),
        ({"constrained": True, "constraints": {"meter": "x/8"}}, "meter"),
        ({"constrained": True, "constraints": {"max_bars": 0}}, "max_bars"),
        ({"constrained": False, "constraints": {"key": "G"}}, "key"),
        ({"constrained": "yes"}, "constrained"),
    ],
)
def test_bad_constraints_are_a_400(engine, request_fields, code_param):
    with pytest.raises(ComposeError) as info:
        prepare_request(engine, engine.config, {"prompt": "a jig", **request_fields})
    assert (info.value.code, info.value.param, info.value.status) == ("invalid_constraint", code_param, 400)


def test_request_fields_reach_the_composer():
    from chatmusician.serve.openai_api import ChatCompletionRequest, ComposeRequest

    body = ComposeRequest(prompt="a jig", constrained=True, key="D", meter="6/8", unit_length="1/8")
    assert body.constraint_request() == {
        "constrained": True,
        "constraints": {"key": "D", "meter": "6/8", "unit_length": "1/8", "max_bars": None},
    }
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], constrained=True)
    assert chat.constraint_request()["constrained"] is True
    with pytest.raises(ValueError):
        ComposeRequest(prompt="a jig", constrained=True, tempo="120")  # still strict: unknown fields refused


def usable_tune(text: str) -> str | None:
    """Why ``text`` is not a tune every tool downstream takes (None: it is): the validator finds no error but
    bar durations, abc2midi writes a MIDI and the renderer's judge finds it usable (it plays notes)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from chatmusician.abc import extract_tunes, validate_tune
    from chatmusician.render.judge import midi_facts, midi_problem

    found = extract_tunes(text)
    if not found.tunes:
        return "no tune"
    tune = found.tunes[0]
    errors = [i.code for i in validate_tune(tune) if i.severity == "error" and "bar" not in i.code]
    if errors:
        return f"validator: {errors}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.abc").write_text(tune + "\n", encoding="utf-8")
        number = tune.split("\n", 1)[0][2:].strip() or "1"
        run = subprocess.run(
            ["abc2midi", "t.abc", number, "-o", "t.mid"], cwd=tmp, capture_output=True, text=True, timeout=30
        )
        midi = Path(tmp) / "t.mid"
        if run.returncode != 0 or not midi.exists():
            return f"abc2midi: {run.stdout[-300:]}"
        length_s, notes = midi_facts(midi)
        return midi_problem(length_s, notes, tune)


COMBOS = [
    AbcConstraints(),
    AbcConstraints(key="G", meter="6/8"),
    AbcConstraints(key="Bb minor", meter="3/4", unit_length="1/8"),
    AbcConstraints(unit_length="1/16", max_bars=2),
]


@pytest.mark.parametrize("max_new_tokens", [32, 96])
def test_random_model_constrained_tunes_always_render_to_a_midi_with_notes(engine, max_new_tokens):
    """Budget-aware decoding: a random model rambles, yet every constrained answer (sampled, several seeds,
    constraint combos, a small budget) is a complete tune that the validator passes and abc2midi plays."""
    p = engine.prepare("Write a jig")
    for seed in range(3):
        params = GenerationParams(**{**SAMPLED.__dict__, "max_new_tokens": max_new_tokens, "seed": seed})
        outputs = engine.generate([(with_constraints(p, c), params) for c in COMBOS])
        for completion, constraints in zip(outputs, COMBOS, strict=True):
            assert complete_tune(engine, completion.text, constraints), (seed, completion.text)
            assert completion.finish_reason == "stop"  # it ended itself, inside the budget
            assert usable_tune(completion.text) is None, (seed, completion.text, usable_tune(completion.text))
            lines = completion.text.split("\n")
            for field, value in [
                ("K", constraints.key),
                ("M", constraints.meter),
                ("L", constraints.unit_length),
            ]:
                if value is not None:
                    assert f"{field}:{value}" in lines
