"""`chatmusician chat`: the interactive REPL (multi-turn, commands) and batch mode (prompts file -> JSON)."""

from __future__ import annotations

import json

import pytest

from chatmusician.chat import predict, read_prompts, repl
from chatmusician.cli import main
from chatmusician.prompts import EXAMPLE_PROMPTS, build_chat_prompt, style
from chatmusician.serve.config import ChatConfig, GenerationDefaults
from chatmusician.serve.engines.hf import TransformersEngine


@pytest.fixture(scope="module")
def config(tiny_model_path):
    return ChatConfig(
        model=tiny_model_path,
        torch_threads=1,
        max_prompt_tokens=300,
        generation=GenerationDefaults(max_new_tokens=6),
        seed=1,
    )


class Recording(TransformersEngine):
    """The real engine, remembering the exact prompt text of every request."""

    def __init__(self, config):
        super().__init__(config)
        self.prompts: list[str] = []

    def prepare(self, prompt, history=()):
        prepared = super().prepare(prompt, history)
        self.prompts.append(self.tokenizer.decode(prepared.ids))
        return prepared


@pytest.fixture(scope="module")
def engine(config):
    return Recording(config)


def scripted(lines):
    feed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read


def test_repl_keeps_multi_turn_history_and_its_commands_work(engine, config):
    out: list[str] = []
    engine.prompts.clear()
    turns = repl(engine, config, read=scripted(["Compose a jig.", "Now a reel."]), write=out.append)
    assert [q for q, _ in turns] == ["Compose a jig.", "Now a reel."]
    assert engine.prompts == [
        build_chat_prompt("Compose a jig."),
        build_chat_prompt("Now a reel.", [turns[0]]),  # the earlier turn, its answer included
    ]
    assert turns[1][1] in "".join(out)  # answers are printed

    engine.prompts.clear()
    turns = repl(
        engine,
        config,
        read=scripted(["Compose a jig.", "/reset", "/example 4", "/quit", "never read"]),
        write=out.append,
    )
    assert engine.prompts[-1] == build_chat_prompt(EXAMPLE_PROMPTS[3])  # /reset forgot the first turn
    assert [q for q, _ in turns] == [EXAMPLE_PROMPTS[3]] == [style("Bach")] and len(engine.prompts) == 2
    assert "history cleared" in "".join(out)


def test_repl_refuses_too_long_prompts_and_survives_end_of_input(engine, config):
    out: list[str] = []
    turns = repl(engine, config, read=scripted(["/example 9", "ABC " * 400, "/examples"]), write=out.append)
    text = "".join(out)
    assert turns == [] and "refused" in text and "prompt_too_long" not in text and EXAMPLE_PROMPTS[1] in text
    assert "use /example N" in text


def test_batch_predictions_are_in_order_and_refusals_are_reported(engine, config):
    results = predict(engine, config, ["Compose a jig.", "   ", "Compose a reel.", "Hi"])
    assert [r["prompt"] for r in results] == ["Compose a jig.", "   ", "Compose a reel.", "Hi"]
    assert results[1]["error"]["code"] == "empty_prompt" and results[1]["output"] is None
    assert all(
        isinstance(r["output"], str) and r["completion_tokens"] <= 7 for r in results if "error" not in r
    )
    assert {"abc", "validation", "finish_reason"} <= results[0].keys()


def test_read_prompts_from_txt_jsonl_json(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    rows = [{"prompt": "free"}, {"task": {"family": "style", "fields": {"style": "Bach"}}}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_prompts(tmp_path / "p.jsonl") == ["free", style("Bach")]
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]))
    assert read_prompts(tmp_path / "p.json") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"task": {"family": "fugue"}}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown task family"):
        read_prompts(tmp_path / "bad.jsonl")


def test_cli_batch_mode_writes_json_predictions(tiny_model_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Compose a jig.\nCompose a reel.\n")
    out = tmp_path / "predictions.json"
    args = ["chat", "--model", tiny_model_path, "--prompts_file", str(prompts), "--output", str(out)]
    assert main([*args, "--generation.max_new_tokens", "4", "--seed", "3"]) == 0
    first = json.loads(out.read_text())
    assert [p["prompt"] for p in first] == ["Compose a jig.", "Compose a reel."]
    assert all(p["completion_tokens"] <= 5 for p in first)
    main([*args, "--generation.max_new_tokens", "4", "--seed", "3"])
    assert json.loads(out.read_text()) == first  # a seed makes batch predictions reproducible
    assert main(["chat", "--model", tiny_model_path, "--prompts_file", str(tmp_path / "missing.txt")]) == 2


def test_prompts_file_errors_name_the_line_and_answers_without_abc_say_so(tmp_path, capsys):
    from chatmusician.chat import prediction
    from chatmusician.serve.types import Completion

    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n\n{"prompt": "cut\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: malformed JSON"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.json").write_text('[\n"a",\n"b"\n"c"]')
    with pytest.raises(ValueError, match=r"p.json:4: malformed JSON"):
        read_prompts(tmp_path / "p.json")
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"task": {"family": "chords", "fields": {"chords": 5}}}) + "\n"
    )
    with pytest.raises(ValueError, match=r"t.jsonl:1: .*'chords' must be a non-empty list of strings"):
        read_prompts(tmp_path / "t.jsonl")
    no_tune = prediction("p", Completion("I would rather talk about music.", "stop", 3, 7))
    assert no_tune["abc"] is None and no_tune["error"]["code"] == "no_abc"
    tune = prediction("p", Completion("X:1\nK:G\nGABc|", "stop", 3, 7))
    assert tune["abc"].startswith("X:1") and "error" not in tune
