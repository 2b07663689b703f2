"""Every subcommand turns a user's mistake into one line on stderr and a non-zero exit, checked before any
Ray or model work (no traceback; ``--debug`` shows it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmusician.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZE = str(ROOT / "configs" / "tokenize_tiny.yaml")
TRAIN_TINY = str(ROOT / "configs" / "train_tiny.yaml")


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"chatmusician {argv[0]}: error: "), err
    return err


def test_bad_values_and_unknown_arguments_are_one_line(capsys):
    assert "max_len" in one_line_error(capsys, ["tokenize", "--max_len", "abc"])
    assert "unrecognized arguments" in one_line_error(capsys, ["tokenize", "--nope", "1"])
    assert "render.input" in one_line_error(capsys, ["render"])
    assert main(["no-such-command"]) == 2 and "invalid choice" in capsys.readouterr().err


def test_tokenize_lengths_are_checked_before_ray_starts(capsys, tiny_model_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):  # this process may hold another test's Ray already: no start may be asked
        raise AssertionError("Ray was started before the lengths were checked")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # so that a start would be asked here
    err = one_line_error(
        capsys,
        [
            "tokenize",
            "--config",
            TINY_TOKENIZE,
            "--tokenizer",
            tiny_model_path,
            "--mode",
            "sft",
            "--max_len",
            "256",
        ],
    )
    assert "--max_source_len between 1 and 253" in err


def test_missing_sources_model_paths_and_offline_hub_ids_say_what_to_pass(capsys, tiny_model_path, tmp_path):
    err = one_line_error(
        capsys,
        ["tokenize", "--tokenizer", tiny_model_path, "--sources", f'[{{"path": "{tmp_path}/none.jsonl"}}]'],
    )
    assert "does not exist" in err and "pass a file, folder or glob" in err
    err = one_line_error(
        capsys, ["tokenize", "--config", TINY_TOKENIZE, "--tokenizer", str(tmp_path / "nope")]
    )
    assert "no such folder" in err and "--tokenizer" in err
    err = one_line_error(
        capsys, ["chat", "--model", "someone/not-cached-model"]
    )  # HF_HUB_OFFLINE=1 (conftest)
    assert "hub is offline" in err and "--model" in err
    err = one_line_error(capsys, ["merge", "--adapter", str(tmp_path / "no-adapter")])
    assert "PEFT adapter folder" in err


def test_training_config_mistakes_are_one_line(capsys, tiny_model_path, tmp_path):
    base = ["--config", TRAIN_TINY, "--model", tiny_model_path]
    assert "unknown hardware profile" in one_line_error(capsys, ["pretrain", *base, "--profile", "nope"])
    err = one_line_error(capsys, ["sft", *base, "--global_batch_size", "7"])
    assert "not a multiple" in err
    err = one_line_error(capsys, ["pretrain", *base, "--data.shards", str(tmp_path / "no-shards")])
    assert "manifest.json" in err


def test_render_and_abc_check_missing_files_and_chat_prompt_files(capsys, tmp_path):
    empty = tmp_path / "empty.abc"
    empty.write_text("")
    missing = str(tmp_path / "missing.abc")
    assert main(["render", missing]) != 0
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    err = one_line_error(capsys, ["chat", "--model", str(tmp_path), "--prompts_file", str(bad)])
    assert f"{bad}:2" in err


def test_debug_shows_the_traceback(tiny_model_path):
    with pytest.raises(ValueError, match="max_source_len"):
        main(
            [
                "tokenize",
                "--config",
                TINY_TOKENIZE,
                "--tokenizer",
                tiny_model_path,
                "--mode",
                "sft",
                "--max_len",
                "256",
                "--debug",
            ]
        )
