"""The main job itself, end to end at the smallest budget: `python -m ray_jobs.quickstart` in a subprocess (its
own embedded Ray, as a user runs it), every stage, then a second run that reuses them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mido
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["model", "tokenize_pt", "tokenize_sft", "pretrain", "sweep", "sft", "preference", "eval"]
SMALL = [  # every stage, a few steps each: the test checks the wiring and the output, not the music
    "--max_tunes", "120",
    "--pretrain.max_steps", "6",
    "--sweep.overrides", json.dumps({"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1}),
    "--sft.max_steps", "4",
    "--sft.eval_every", "2",
    "--eval.abc_quality.max_new_tokens", "48",
    "--compose_prompts", "2",
    "--compose_max_new_tokens", "64",
    "--prefs_prompts", "2",
    "--rounds.prefs.n_per_prompt", "4",
    "--rounds.prefs.max_new_tokens", "48",
    "--rounds.eval_n_per_prompt", "1",
    "--rounds.eval_max_new_tokens", "48",
    "--dpo.max_steps", "2",
]  # fmt: skip


def quickstart(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    argv = ["-m", "ray_jobs.quickstart", "--config", "configs/quickstart.yaml", "--out_dir", str(out_dir)]
    return subprocess.run(
        [sys.executable, *argv, *SMALL, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_quickstart_runs_every_stage_prints_what_to_do_next_and_reuses_its_stages(tmp_path):
    out = tmp_path / "qs"
    first = quickstart(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    terminal = first.stdout
    assert "Traceback" not in terminal and "\x1b[" not in terminal  # readable: no tracebacks, no cursor codes
    assert len(terminal.splitlines()) < 80, terminal
    summary = json.loads((out / "summary.json").read_text())
    assert set(STAGES) <= set(summary["timings_s"]) and summary["timings_s"]["total"] > 0
    assert summary["pt_manifest"]["rows_read"] == 120 and summary["sft_manifest"]["sequences"] > 0
    sft_rows = json.loads((out / "shards" / "sft" / "manifest.json").read_text())["rows"]
    assert sft_rows["truncated"] == 0  # SFT learns whole tunes only: an over-long one is left out, not cut
    assert summary["sweep"]["values"]["lr"] in (5e-4, 3e-3)  # the winner of the 2-trial grid went on to SFT
    assert len((out / "sweep" / "results.csv").read_text().strip().splitlines()) == 1 + 2
    rates = summary["parse_rate"]
    assert set(rates) == {"free", "constrained"} and all(0.0 <= r <= 1.0 for r in rates.values())
    assert len(summary["compose"]["rows"]) == 4 and all(
        r["status"] == 200 for r in summary["compose"]["rows"]
    )

    # The preference round ran and measured its guards; a barely trained model may give no valid pair, and then
    # the round says so and the SFT model goes on.
    pref = summary["preference"]
    assert set(pref["before"]) >= {"strict_validity", "diversity", "val_perplexity"}
    assert pref["status"] == "ok" or pref["status"].startswith("stopped:")
    assert summary["final_model"] == pref["model"] and (pref["status"] != "ok" or pref["after"])
    assert "preference" in terminal and "strict validity" in terminal

    final = Path(summary["final_model"])
    assert (final / "config.json").is_file() and f"chatmusician chat --model {final}" in terminal
    assert f"chatmusician serve --model {final}" in terminal and summary["api"] in terminal
    render = out / "render"
    abc = (render / "tune.abc").read_text()
    assert abc.startswith("X:") and "K:" in abc  # the tune that was rendered, beside its renders
    # A composed tune, or (the model is barely trained here) a reference tune with the reason said.
    assert summary["render"]["ok"] and (summary["render"]["fallback_reason"] is None) == summary["render"][
        "source"
    ].startswith("composed")
    midi = mido.MidiFile(render / "tune.mid")
    assert sum(m.type == "note_on" and m.velocity > 0 for t in midi.tracks for m in t) > 0
    assert b"<svg" in (render / "tune.svg").read_bytes()[:1000]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = Path(summary["log"])
    assert log.is_file() and str(log) in terminal  # Ray's and the workers' output went to the log, named

    again = quickstart(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    reused = [line for line in again.stdout.splitlines() if ": reused (" in line]
    assert len(reused) == len(STAGES), again.stdout
    assert json.loads((out / "summary.json").read_text())["final_model"] == str(final)
