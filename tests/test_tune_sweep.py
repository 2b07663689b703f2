"""A real sweep on the tiny model: 4 trials of the SFT recipe on the shared Ray, driven by `ray_jobs.sweep` in a
subprocess so that its driver can be killed and the same command re-run. One sweep serves every assertion:
resume after the driver dies, ASHA, a trial that fails once, the output files, no leaked placement group, and
best.yaml run as an SFT config.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_sweep_configs

from chatmusician import corpora

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
LRS = [3e-3, 2e-3, 1e-6, 2e-6]  # two that learn, two that barely move: ASHA has something to stop


def _wait(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def sft_shards(ray_cluster, tiny_model_path, tmp_path_factory) -> str:
    """Raw instruction rows built from real tunes (title -> tune), SFT mode, with a held-out split."""
    from chatmusician.data.config import SourceConfig, TokenizeConfig
    from chatmusician.data.pipeline import write_shards

    out = tmp_path_factory.mktemp("sweep_data")
    rows = []
    for tune in corpora.nottingham_tunes()[:160]:
        title = next((line[2:].strip() for line in tune.splitlines() if line.startswith("T:")), "a tune")
        rows.append({"instruction": f"Write a tune called {title}.", "input": "", "output": tune})
    (out / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    manifest = write_shards(
        TokenizeConfig(
            sources=[SourceConfig(path=str(out / "rows.jsonl"))],
            mode="sft",
            tokenizer=tiny_model_path,
            max_len=64,
            max_source_len=24,
            packing="greedy",
            val_fraction=0.1,
            output_dir=str(out / "shards"),
            num_tokenizers=1,
            tokenizer_cpus=0.5,
            progress=False,
        )
    )
    assert manifest["val"]["sequences"] > 0
    return str(out / "shards")


def _write_configs(folder: Path, model: str, shards: str, name: str, space: dict, **sweep) -> Path:
    return write_sweep_configs(folder, model, shards, name, space, MAX_STEPS, **sweep)


def _sweep_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.sweep", "--config", str(config)]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def _finished_trials(sweep: Path) -> set[str]:
    """Trials Tune has saved as TERMINATED in its experiment state (what a restore reads)."""
    done = set()
    for state in sweep.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
            trials = [json.loads(entry[0]) for entry in data.get("trial_data", [])]
        except (json.JSONDecodeError, OSError, IndexError, TypeError):
            continue  # being rewritten
        done |= {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}
    return done


@pytest.fixture(scope="module")
def sweep_run(ray_cluster, tiny_model_path, sft_shards, tmp_path_factory):
    """Start the sweep, kill its driver once a trial has finished, run the same command again to the end."""
    folder = tmp_path_factory.mktemp("sweep")
    space = {"lr": {"grid": LRS}, "lora.target_modules": {"grid": ["attn_mlp"]}}
    config = _write_configs(
        folder,
        tiny_model_path,
        sft_shards,
        "lr",
        space,
        search="grid",
        num_samples=1,
        max_concurrent_trials=2,
        fail_trial_once=0,
        max_failures=1,
    )
    sweep = folder / "sweeps" / "lr"
    env = _env(RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    from ray.util import placement_group_table

    # Other modules' runs on the shared Ray are not this sweep's.
    earlier_groups = set(placement_group_table())
    log = open(folder / "first.log", "w")
    first = subprocess.Popen(
        _sweep_command(config),
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(lambda: _finished_trials(sweep), 1500, "a finished trial", first)
    except AssertionError:
        first.kill()
        raise AssertionError((folder / "first.log").read_text()[-4000:]) from None
    before = {
        t: (sweep / "trials" / f"trial_{t}" / "metrics.jsonl").read_text() for t in _finished_trials(sweep)
    }
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-sweep
    first.wait()
    second = subprocess.run(
        _sweep_command(config), env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500
    )
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return {"dir": sweep, "before": before, "stdout": second.stdout, "config": config,
            "earlier_groups": earlier_groups}  # fmt: skip


def _rows(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


def test_resumed_sweep_completes_exactly_the_configured_trials_and_keeps_finished_ones(sweep_run):
    sweep = sweep_run["dir"]
    rows = _rows(sweep)
    assert len(rows) == 4 and sorted(float(r["lr"]) for r in rows) == sorted(LRS)
    assert {r["status"] for r in rows} == {"finished"}
    assert "resuming" in sweep_run["stdout"]
    # Trials finished before the driver died were not run again: their Train logs are byte for byte the same.
    for trial, log in sweep_run["before"].items():
        assert (sweep / "trials" / f"trial_{trial}" / "metrics.jsonl").read_text() == log


def test_asha_stops_a_trial_early_and_the_outputs_agree(sweep_run):
    sweep = sweep_run["dir"]
    rows = _rows(sweep)
    early = [r for r in rows if r["stopped_early"] == "True"]
    assert early and all(int(r["steps"]) < MAX_STEPS for r in early)
    assert any(int(r["steps"]) == MAX_STEPS for r in rows)
    best = min(rows, key=lambda r: float(r["best_val_loss"]))
    assert float(best["lr"]) in (3e-3, 2e-3)  # a learning rate that learns wins
    winner = yaml.safe_load((sweep / "best.yaml").read_text())
    assert winner["lr"] == pytest.approx(float(best["lr"]))
    assert winner["lora"]["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert Path(best["adapter"]).is_dir() and best["adapter"] in (sweep / "best.yaml").read_text()
    # The adapter is the winner's checkpoint at its lowest val_loss (read from the trial's own log), not its last.
    log = sweep / "trials" / f"trial_{best['trial_id']}" / "metrics.jsonl"
    curve = {
        m["step"]: m["val_loss"] for m in map(json.loads, log.read_text().splitlines()) if "val_loss" in m
    }
    best_step = min(curve, key=curve.get)
    assert best["adapter"].endswith(f"checkpoint_{best_step:07d}/adapter"), (best["adapter"], curve)
    assert float(best["best_val_loss"]) == pytest.approx(curve[best_step])
    png = (sweep / "val_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "best" in sweep_run["stdout"] and best["trial_id"] in sweep_run["stdout"]  # the summary table


def test_a_trial_that_fails_once_is_retried_and_finishes_from_its_checkpoint(sweep_run):
    sweep = sweep_run["dir"]
    first = next(r for r in _rows(sweep) if r["trial_id"].endswith("_00000"))
    run = sweep / "trials" / f"trial_{first['trial_id']}"
    assert (run / ".failed_at_step_3").exists()  # it did fail (a worker died as step 3 started)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (
        steps[:2] == [1, 2] and steps.count(1) == 1
    )  # the retry resumed from checkpoint 2, not from scratch
    assert first["status"] == "finished" and int(first["steps"]) in (2, 4, MAX_STEPS)


def test_no_placement_group_is_left_after_the_sweep(sweep_run):
    from ray.util import placement_group_table

    def left() -> dict:
        """The sweep's placement groups (both drivers', the killed one's too) not yet removed."""
        return {
            pg_id: (pg["state"], pg.get("name"), pg.get("bundles"))
            for pg_id, pg in placement_group_table().items()
            if pg_id not in sweep_run["earlier_groups"] and pg["state"] != "REMOVED"
        }

    try:
        _wait(lambda: not left(), 300, "every placement group of the sweep to be removed")
    except AssertionError as error:
        raise AssertionError(f"{error}: {left()}") from None


def test_best_yaml_runs_unchanged_as_an_sft_config(sweep_run):
    from chatmusician.cli import run_command

    result = run_command("sft", ["--config", str(sweep_run["dir"] / "best.yaml")])
    assert result.metrics["step"] == MAX_STEPS and "val_loss" in result.metrics
