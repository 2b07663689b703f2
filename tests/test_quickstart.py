import json

from chatmusician.corpora import nottingham_tunes
from chatmusician.quickstart.data import header_description, manifest_summary, write_corpora


def test_header_description_takes_the_first_value_of_each_described_field():
    tune = "X: 1\nT:A and D\nS:EF\nM:4/4\nK:A\nM:6/8\nP:A\nf|ecc c2f|"
    assert header_description(tune) == {"Title": "A and D", "Meter": "4/4", "Key": "A"}


def test_write_corpora_makes_pt_and_text_to_music_sft_rows(tmp_path):
    tunes = nottingham_tunes()[:3]
    pt, sft = write_corpora(tunes, tmp_path)
    pt_rows = [json.loads(line) for line in pt.read_text().splitlines()]
    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert [r["text"] for r in pt_rows] == tunes
    assert sft_rows[0]["output"] == tunes[0]
    assert sft_rows[0]["instruction"].startswith(
        "Using ABC notation, recreate the given text as a musical score.\n"
    )
    assert "\nMeter 3/4\nNote Length 1/4\nKey G" in sft_rows[0]["instruction"]


def test_manifest_summary_reads_the_manifest_contract():
    manifest = {"rows": {"read": 10, "rejected": 2}, "sequences": 7}
    assert manifest_summary(manifest) == {"rows_read": 10, "rows_rejected": 2, "sequences": 7}


def test_quickstart_yaml_gives_cpu_sized_stages_that_the_cli_can_override():
    from pathlib import Path

    from chatmusician.config import load_config
    from chatmusician.quickstart import QuickstartConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(QuickstartConfig, path, **{"sft.max_steps": 7})
    assert (cfg.pretrain.profile, cfg.pretrain.num_workers, cfg.pretrain.zero_stage) == ("cpu", 2, 2)
    assert cfg.pretrain.max_steps == 300 and cfg.sft.max_steps == 7
    assert cfg.pretrain.run_name != cfg.sft.run_name  # two runs, two checkpoint folders
    # A random base learns from full training; LoRA is for the SFT stage.
    assert (cfg.pretrain.train_type, cfg.sft.train_type) == ("full", "lora")
    assert cfg.sweep.command == "sft" and len(cfg.sweep.space["lr"]["grid"]) == 2
    assert cfg.parse_goal == 0.8 and not cfg.force


def test_compose_prompts_start_with_the_original_example_and_describe_tunes_without_titles():
    from chatmusician.prompts import EXAMPLE_PROMPTS
    from chatmusician.quickstart.compose import compose_prompts

    prompts = compose_prompts(nottingham_tunes(), 5)
    assert len(prompts) == 5 and prompts[0] == EXAMPLE_PROMPTS[0]
    assert all("Title" not in p and "\nKey " in p for p in prompts[1:])
    assert len(set(prompts)) == 5


def test_parse_rate_first_parsing_and_best_values():
    from chatmusician.quickstart.compose import first_parsing, parse_rate
    from chatmusician.quickstart.sweep import best_values

    rows = [
        {"arm": "constrained", "parses": True, "abc": "X:1\nK:C\nC|"},
        {"arm": "free", "parses": False, "abc": None},
        {"arm": "free", "parses": True, "abc": "X:2\nK:G\nG|"},
    ]
    assert parse_rate([r for r in rows if r["arm"] == "free"]) == 0.5 and parse_rate([]) == 0.0
    assert first_parsing(rows)["abc"].startswith("X:2")  # the model's own free music first
    assert first_parsing(rows[:1])["arm"] == "constrained"
    assert first_parsing([rows[1]]) is None
    assert best_values({"lr": 3e-3, "best_val_loss": 1.0}, {"lr": {"grid": [1, 2]}}) == {"lr": 3e-3}


def test_judge_composition_uses_the_validator_and_the_midi_verdict():
    from chatmusician.quickstart.compose import judge_composition

    tune = nottingham_tunes()[0]
    assert judge_composition(tune, midi_ok=True)["parses"] is True
    assert judge_composition(tune, midi_ok=False)["parses"] is False
    prose = judge_composition("I cannot write music.", midi_ok=True)
    assert not prose["found"] and not prose["parses"]


def test_strict_validity_needs_every_bar_as_long_as_its_meter():
    from chatmusician.quickstart.compose import judge_composition, strict_rate

    right = judge_composition("X:1\nM:6/8\nL:1/8\nK:D\nA|dfe dcB|A3 A2:|\n", midi_ok=True)
    short = judge_composition("X:1\nM:6/8\nL:1/8\nK:D\nA|dfe dc|A3 A2 z|\n", midi_ok=True)
    assert right["parses"] and right["strict"]
    assert short["parses"] and not short["strict"]  # parses and plays, but a bar is an eighth short
    assert not judge_composition("X:1\nM:6/8\nL:1/8\nK:D\nA|dfe dcB|\n", midi_ok=False)["strict"]
    assert strict_rate([right, short]) == 0.5 and strict_rate([]) == 0.0


def test_a_finished_stage_is_reused_and_force_removes_only_the_jobs_folders(tmp_path):
    import io

    from chatmusician.quickstart.config import GENERATED
    from chatmusician.quickstart.console import Console
    from chatmusician.quickstart.stages import Stages, clean

    console = Console(io.StringIO(), io.StringIO())
    calls = []
    for _ in range(2):
        stages = Stages(tmp_path, console, {"timings_s": {}}, total=9)
        assert stages.run("model", "build", lambda: calls.append(1) or {"base": "b"}) == {"base": "b"}
    assert calls == [1] and "reused" in console.stream.getvalue()
    (tmp_path / "mine.txt").write_text("keep")
    clean(tmp_path)
    assert not any((tmp_path / g).exists() for g in GENERATED) and (tmp_path / "mine.txt").exists()


def test_console_and_log_keeps_library_output_off_the_terminal(tmp_path, capfd):
    import os

    from chatmusician.quickstart.console import console_and_log

    with console_and_log(tmp_path / "q.log") as console:
        console.say("[1/9] stage")
        os.write(2, b"Traceback (library noise)\n")
        os.write(1, b"worker line\n")  # what Ray echoes from workers and child processes write
    terminal = capfd.readouterr().out
    log = (tmp_path / "q.log").read_text()
    assert "[1/9] stage" in terminal and "worker line" not in terminal and "Traceback" not in terminal
    assert "[1/9] stage" in log and "worker line" in log and "Traceback (library noise)" in log


def test_default_budgets_fit_the_tunes_the_model_learns():
    """The failure this guards against: rows cut at 256 tokens taught the model tunes that never end, and a
    384-token budget cut a quarter of the corpus-length tunes it wrote mid-line (free parse 75 %)."""
    from chatmusician.model.loading import load_tokenizer
    from chatmusician.model.tiny import ensure_tiny
    from chatmusician.prompts import text_to_music
    from chatmusician.quickstart import QuickstartConfig

    cfg = QuickstartConfig()
    tok = load_tokenizer(str(ensure_tiny(cfg.model_size)))
    tunes = nottingham_tunes()
    tune_lengths = [len(ids) for ids in tok(tunes, add_special_tokens=False)["input_ids"]]
    prompts = [text_to_music(header_description(t)) for t in tunes]
    prompt_lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    fits_budget = sum(n < cfg.compose_max_new_tokens for n in tune_lengths) / len(tunes)
    whole_rows = sum(
        p + n + 1 <= cfg.max_len for p, n in zip(prompt_lengths, tune_lengths, strict=True)
    ) / len(tunes)
    assert fits_budget >= 0.95 and whole_rows >= 0.8, (fits_budget, whole_rows)


def test_progress_off_a_terminal_is_one_plain_line_per_milestone(tmp_path):
    import io

    from chatmusician.quickstart.console import Console

    console = Console(io.StringIO(), io.StringIO())
    with console.board() as board:
        board.update("pretrain", 1, 300, "loss 9.100")
        board.update("pretrain", 2, 300, "loss 9.000", milestone=False)  # a live bar's tick: no line
        board.update("pretrain", 10, 300, "loss 8.000")
        board.note("pretrain step 10 val_loss 8.100")
    terminal = console.stream.getvalue()
    assert terminal.splitlines() == [
        f"      pretrain [{'.' * 24}]   1/300 loss 9.100",
        f"      pretrain [#{'.' * 23}]  10/300 loss 8.000",
        "      pretrain step 10 val_loss 8.100",
    ]
    assert console.log.getvalue() == terminal and "\x1b[" not in terminal


def test_the_final_summary_is_a_table_and_keeps_long_paths_whole(tmp_path):
    import io

    from chatmusician.quickstart.console import Console
    from chatmusician.quickstart.summary import print_summary

    model = str(tmp_path / ("very-long-folder-name-" * 6) / "models" / "chatmusician-tiny")
    tune = nottingham_tunes()[0]
    summary = {
        "out_dir": str(tmp_path), "log": str(tmp_path / "quickstart.log"), "loss_plot": str(tmp_path / "loss.png"),
        "timings_s": {"tokenize_pt": 3, "tokenize_sft": 2, "pretrain": 60, "sweep": 90, "sft": 30, "eval": 40,
                      "serve": 15, "compose_render": 20, "total": 270},
        "pt_manifest": {"rows_read": 120, "sequences": 40}, "sft_manifest": {"sequences": 110},
        "loss": {"pretrain": [9.1, 3.2], "sft": [2.0, 1.1]},
        "sweep": {"dir": str(tmp_path / "sweep"), "values": {"lr": 0.003}, "best_val_loss": 1.234},
        "eval": {"dir": str(tmp_path / "eval"), "mtb_ppl_zero_shot": 0.5, "mtb_ppl_few_shot": None,
                 "abc_parse_success": 0.75},
        "api": "http://127.0.0.1:5555", "ui": "http://127.0.0.1:5555/ui/", "serving": False,
        "parse_rate": {"free": 0.5, "constrained": 1.0}, "parse_goal": 0.8, "parse_goal_met": False,
        "strict_rate": {"free": 0.25, "constrained": 1.0},
        "render": {"source": "composed (free) for prompt 1", "fallback_reason": None, "ok": True, "errors": [],
                   "abc": tune, "files": {"abc": str(tmp_path / "render" / "tune.abc")}},
        "final_model": model,
    }  # fmt: skip
    console = Console(io.StringIO(), io.StringIO())
    print_summary(summary, console)
    terminal = console.stream.getvalue()
    assert "\x1b[" not in terminal and console.log.getvalue() == terminal
    for row in ("tokenize", "pretrain", "sweep", "sft", "eval", "serve", "compose", "total"):
        assert any(line.lstrip().startswith(row) for line in terminal.splitlines()), row
    assert "loss 9.10 -> 3.20 over 2 steps" in terminal and "goal >= 80 % NOT met" in terminal
    assert "strictly valid (parses, plays, no bar-duration error): free 25 %, constrained 100 %" in terminal
    assert f"chatmusician chat --model {model}\n" in terminal  # a path longer than the width is not wrapped
    assert f"chatmusician serve --model {model}" in terminal and summary["api"] in terminal


def test_the_quickstart_is_the_top_layer_and_calls_the_app_only_through_the_client():
    """Nothing in the library imports the quickstart (the CLI names it by string); its stage modules stay small;
    no stage module speaks HTTP itself."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "chatmusician"

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    below = [p for p in package.rglob("*.py") if "quickstart" not in p.relative_to(package).parts]
    assert not [p for p in below if any(n.startswith("chatmusician.quickstart") for n in imports(p))]
    stages = sorted((package / "quickstart").glob("*.py"))
    assert stages and all(len(p.read_text().splitlines()) < 200 for p in stages)
    assert not [p.name for p in stages if imports(p) & {"httpx", "urllib.request", "requests"}]


def test_step_printer_follows_each_runs_metrics_with_its_own_row(tmp_path):
    import io

    from chatmusician.quickstart.console import Console, StepPrinter

    rows = [{"step": 1, "loss": 6.7, "lr": 1e-3, "tokens_per_s": 100}, {"step": 2, "loss": 6.2, "lr": 1e-3,
            "tokens_per_s": 120, "val_loss": 6.1}]  # fmt: skip
    for name in ("trial_a_00000", "trial_a_00001"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    console = Console(io.StringIO(), io.StringIO())
    with StepPrinter(console, "trial", lambda: sorted(tmp_path.glob("*/metrics.jsonl")), 2, 1, numbered=True):
        pass
    lines = console.stream.getvalue().splitlines()
    assert [line.split(" [")[0].strip() for line in lines] == ["trial 1", "trial 1", "trial 1 step 2 val_loss 6.100",
                                                               "trial 2", "trial 2", "trial 2 step 2 val_loss 6.100"]  # fmt: skip
    assert lines[1].endswith("2/2 loss 6.200 lr 1.00e-03 120 tok/s")
