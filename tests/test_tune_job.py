"""``ray job submit -- python -m ray_jobs.sweep --config …`` against a real ``ray start --head`` (2 CPUs, own
ports, own temp dir, stopped in a finally by killing only its own process group): a 2-trial sweep of the tiny
model's SFT recipe SUCCEEDS, its results.csv / best.yaml / val_loss.png agree, and no placement group is left.

The SFT shards are made by a first job (``ray_jobs.tokenize``) on the same head, which also waits out the job
agent of a freshly started head (submissions are retried while it refuses them, with a deadline)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, head_port_flags, write_sweep_configs

from chatmusician import corpora

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MAX_STEPS = 4
LRS = [3e-3, 1e-6]  # one that learns, one that barely moves


def _until(deadline: float, attempt, what: str, head: subprocess.Popen):
    """Call ``attempt`` until it returns a value (not None) or the deadline passes."""
    while True:
        value = attempt()
        if value is not None:
            return value
        assert head.poll() is None, f"ray start --head exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def _submit(address: str, env: dict, head: subprocess.Popen, *entrypoint: str) -> subprocess.CompletedProcess:
    """``ray job submit`` (waits for the job to end), retried while a fresh head's job agent refuses it."""
    refused = ("No available agent", "Failed to connect to Ray", "Connection refused")

    def attempt():
        done = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--", sys.executable, "-m", *entrypoint],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return None if any(r in done.stdout + done.stderr for r in refused) else done

    return _until(time.monotonic() + 240, attempt, "the job agent to accept a job", head)


def _configs(folder: Path, model: str) -> tuple[Path, Path]:
    rows = []
    for tune in corpora.nottingham_tunes()[:80]:
        title = next((line[2:].strip() for line in tune.splitlines() if line.startswith("T:")), "a tune")
        rows.append({"instruction": f"Write a tune called {title}.", "input": "", "output": tune})
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    shards = folder / "shards"
    tokenize = {
        "sources": [{"path": str(folder / "rows.jsonl")}],
        "mode": "sft",
        "tokenizer": model,
        "max_len": 64,
        "max_source_len": 24,
        "packing": "greedy",
        "val_fraction": 0.1,
        "output_dir": str(shards),
        "num_tokenizers": 1,
        "tokenizer_cpus": 0.5,
        "progress": False,
    }
    (folder / "tokenize.yaml").write_text(yaml.safe_dump(tokenize))
    sweep = write_sweep_configs(
        folder, model, str(shards), "job", {"lr": {"grid": LRS}}, MAX_STEPS, search="grid", num_samples=1
    )
    return folder / "tokenize.yaml", sweep


def test_sweep_job_submitted_to_ray_start_head(tiny_model_path, tmp_path):
    tokenize_yaml, sweep_yaml = _configs(tmp_path, tiny_model_path)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "HF_HUB_OFFLINE": "1",
    }
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # this head only (the sweep sets the latter itself)
        env.pop(var, None)
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    temp_dir = tempfile.mkdtemp(prefix="cmtune-", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *head_port_flags(dashboard)],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        _until(
            time.monotonic() + 180,
            lambda: (
                subprocess.run(
                    [RAY, "job", "list", "--address", address], env=env, capture_output=True
                ).returncode
                == 0
                or None
            ),
            "the job API",
            head,
        )
        made = _submit(address, env, head, "ray_jobs.tokenize", "--config", str(tokenize_yaml))
        assert made.returncode == 0 and "succeeded" in made.stdout, made.stdout[-3000:] + made.stderr[-3000:]
        t1 = time.monotonic()
        swept = _submit(address, env, head, "ray_jobs.sweep", "--config", str(sweep_yaml))
        t2 = time.monotonic()
        assert swept.returncode == 0, swept.stdout[-4000:] + swept.stderr[-4000:]
        assert "succeeded" in swept.stdout
        jobs = json.loads(
            subprocess.run(
                [RAY, "list", "jobs", "--address", address, "--format", "json", "--limit", "100"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout  # fmt: skip
        )
        sweep_jobs = [j for j in jobs if "ray_jobs.sweep" in j["entrypoint"]]
        assert [j["status"] for j in sweep_jobs] == ["SUCCEEDED"]

        def no_placement_group_left():
            listed = subprocess.run(
                [RAY, "list", "placement-groups", "--address", address, "--format", "json", "--limit", "1000"],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if listed.returncode != 0:
                return None
            groups = json.loads(listed.stdout)
            return groups if all(pg["state"] == "REMOVED" for pg in groups) else None

        groups = _until(
            time.monotonic() + 60, no_placement_group_left, "every placement group to be removed", head
        )
        assert len(groups) >= len(LRS)  # the trials' Train groups were there, and are removed
        print(f"[timing] head+tokenize job {t1 - t0:.0f} s, sweep job {t2 - t1:.0f} s; {len(groups)} groups")
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only this cluster's processes (its own session)
        try:  # its raylet drains for ~30 s after SIGTERM; nothing of this cluster is needed any more
            head.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)

    root = tmp_path / "sweeps" / "job"
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["lr"]) for r in rows) == sorted(LRS)
    assert {r["status"] for r in rows} == {"finished"}
    assert all(0 < int(r["steps"]) <= MAX_STEPS for r in rows)
    best = min(rows, key=lambda r: float(r["best_val_loss"]))
    assert float(best["lr"]) == pytest.approx(3e-3)  # the learning rate that learns wins
    winner = yaml.safe_load((root / "best.yaml").read_text())
    assert winner["lr"] == pytest.approx(float(best["lr"])) and winner["max_steps"] == MAX_STEPS
    assert winner["data"]["shards"] == str(tmp_path / "shards")
    assert Path(best["adapter"]).is_dir() and best["adapter"] in (root / "best.yaml").read_text()
    assert json.loads((root / "best.json").read_text())["trial_id"] == best["trial_id"]
    assert best["trial_id"] in swept.stdout  # the summary table reached the job's log
    png = (root / "val_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
