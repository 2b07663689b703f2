"""The cluster recipe of docs/cluster.md as ``ray job submit`` jobs against a real ``ray start --head`` (own ports, own temp
dir, stopped by killing only its own process group): tokenize (sft) -> sft (tiny LoRA, 2 steps) -> merge ->
evaluate -> ``serve deploy`` of serve_config.yaml, each job SUCCEEDED and each reading what the one before wrote
under one "shared storage" folder; the deployed app then answers one HTTP request with the merged model. (It is
also the test of each job alone on ``ray start``: one head for all of them saves CI minutes.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, head_port_flags

from chatmusician import corpora
from chatmusician.client import AppClient
from chatmusician.eval.config import MTB_FIXTURE

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
REFUSED = ("No available agent", "Failed to connect to Ray")  # the job agent is not up yet (loaded host)


def sft_rows(path: Path, n: int = 24) -> None:
    """A text-to-music SFT set ({"instruction", "input", "output"}) from real Nottingham tunes."""
    text = (corpora.NOTTINGHAM_DIR / "reelsu-z.abc").read_text(errors="replace")
    tunes = ["X:" + t.strip() for t in text.split("X:")[1:]][:n]
    with path.open("w") as f:
        for tune in tunes:
            f.write(
                json.dumps({"instruction": "Compose a reel in ABC notation.", "input": "", "output": tune})
            )
            f.write("\n")


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_tokenize_sft_merge_evaluate_serve_chain_on_ray_start_head(tiny_model_path, tmp_path):
    shared = tmp_path / "shared"  # what every node would mount (NFS) on a real cluster
    shared.mkdir()
    sft_rows(shared / "sft.jsonl")
    tok_cfg = write_yaml(
        tmp_path / "tokenize.yaml",
        {
            "sources": [{"path": str(shared / "sft.jsonl"), "format": "jsonl"}],
            "mode": "sft",
            "tokenizer": tiny_model_path,
            "max_len": 128,
            "max_source_len": 64,
            "output_dir": str(shared / "shards"),
            "shard_rows": 16,
            "num_tokenizers": 1,
            "tokenizer_cpus": 0.5,
            "progress": False,
        },
    )
    sft_cfg = write_yaml(
        tmp_path / "sft.yaml",
        {
            "run_name": "sft",
            "storage_path": str(shared / "runs"),
            "model": tiny_model_path,
            "data": {"shards": str(shared / "shards")},
            "profile": "cpu",
            "zero_stage": 0,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "max_length": 128,
            "max_steps": 2,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "keep_last": 1,
            "max_failures": 0,
            "log_every": 1,
        },
    )
    eval_cfg = write_yaml(
        tmp_path / "eval.yaml",
        {
            "model": str(shared / "models" / "chat"),
            "precision": "fp32",
            "device": "cpu",
            "output_dir": str(shared / "eval"),
            "mtb": {
                "path": MTB_FIXTURE,
                "modes": ["ppl_zero_shot", "ppl_few_shot"],
                "limit": 2,
                "bootstrap": 50,
            },
            "pool": {"replicas": 1, "num_cpus": 1, "batch_size": 4},
        },
    )
    http_port = free_port()
    serve = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    serve["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = serve["applications"][0]
    app["args"] |= {
        "model": str(shared / "models" / "chat"),  # the merged model the chain produced
        "precision": "fp32",
        "device": "cpu",
        "torch_threads": 1,
        "web_ui": False,
    }
    for deployment in app["deployments"]:  # CPU override: no GPU, fractional CPUs, one replica each
        deployment["ray_actor_options"] = {"num_cpus": 0.25, "num_gpus": 0}
        deployment["autoscaling_config"] |= {"min_replicas": 1, "max_replicas": 1}
    renderer = next(d for d in app["deployments"] if d["name"] == "Renderer")
    renderer["ray_actor_options"]["resources"] = {"cpu_node": 0.001}  # the head's resource (cluster.yaml)
    serve_cfg = write_yaml(tmp_path / "serve_config.yaml", serve)

    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    with ray_head(env, 4, '--resources={"cpu_node": 1}') as cluster:
        submit, address = cluster.submit, cluster.address
        submit("chain-tokenize", "ray_jobs.tokenize", "--config", tok_cfg)
        manifest = json.loads((shared / "shards" / "manifest.json").read_text())
        assert manifest["mode"] == "sft" and manifest["sequences"] >= 8, manifest
        assert manifest["rows"]["read"] == manifest["rows"]["written"] == 24
        tables = [pq.read_table(shared / "shards" / s["file"]) for s in manifest["shards"]]
        assert sum(t.num_rows for t in tables) == manifest["sequences"]
        assert tables[0].column_names == ["input_ids", "labels"]  # sft rows are not packed: no position_ids

        # Jobs no node can hold fail at once with one line (Ray Train would retry its worker group forever).
        for job_id, args, expected in [
            ("typo-accelerator", ["--accelerator_type", "H100"], "accelerator_type:H100"),
            ("too-many-workers", ["--num_workers", "8", "--global_batch_size", "8", "--micro_batch_size", "1"],
             "8 worker(s) of profile 'cpu'"),
        ]:  # fmt: skip
            log = submit(job_id, "ray_jobs.sft", "--config", sft_cfg, *args, fails=True, timeout=180)
            error = next(line for line in log.splitlines() if "chatmusician sft: error:" in line)
            assert expected in error and "hold" in error, log[-3000:]
        # The live stream from the command line: the job connects before the pipeline sizes itself.
        stream_cfg = write_yaml(
            tmp_path / "sft_stream.yaml",
            {**yaml.safe_load(Path(sft_cfg).read_text()), "run_name": "sft_stream", "max_steps": 1,
             "data": {"stream": yaml.safe_load(Path(tok_cfg).read_text()) | {"output_dir": None}}},
        )  # fmt: skip
        log = submit("stream-sft", "ray_jobs.sft", "--config", stream_cfg)
        assert "[sft_stream] [########################] 1/1 loss" in log  # the run's progress line

        log = submit("chain-sft", "ray_jobs.sft", "--config", sft_cfg)
        assert "[sft] [########################] 2/2 loss" in log
        adapter = shared / "runs" / "sft" / "checkpoint_0000002" / "adapter"
        assert (adapter / "adapter_config.json").is_file()

        submit(
            "chain-merge",
            "ray_jobs.merge",
            "--adapter",
            str(adapter),
            "--out_dir",
            str(shared / "models" / "chat"),
        )
        assert (shared / "models" / "chat" / "config.json").is_file()

        log = submit("chain-evaluate", "ray_jobs.evaluate", "--config", eval_cfg)
        assert "| ppl_zero_shot | original" in log and "| ppl_few_shot | original" in log  # the results table
        results = json.loads((shared / "eval" / "results.json").read_text())
        mtb = results["mtb"]
        assert (
            mtb["ppl_zero_shot"]["original"]["questions"] == mtb["ppl_few_shot"]["original"]["questions"] == 2
        )

        deployed = subprocess.run(
            [SERVE, "deploy", serve_cfg, "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        with AppClient(f"http://127.0.0.1:{http_port}", timeout=120) as app:
            # The app comes up: replicas load the merged model (the cluster's head must stay up meanwhile).
            app.wait_healthy(deadline_s=300, alive=cluster.alive, interval_s=2)
            reply = app.chat([{"role": "user", "content": "Compose a reel."}], max_tokens=8)
        assert 0 < reply["usage"]["completion_tokens"] <= 8
        status = subprocess.run(
            [SERVE, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
        )
        assert "RUNNING" in status.stdout and "Composer" in status.stdout, status.stdout + status.stderr

        for job in ("tokenize", "sft", "merge", "evaluate"):
            status = subprocess.run(
                [RAY, "job", "status", "--address", address, f"chain-{job}"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert f"Job 'chain-{job}' succeeded" in status.stdout, status.stdout + status.stderr  # SUCCEEDED


@dataclass
class Head:
    submit: Callable[..., str]
    """``submit(job_id, module, *args, fails=False, timeout=600)``: ``ray job submit`` (blocking) and its output."""
    address: str
    alive: Callable[[], bool]


@contextmanager
def ray_head(env: dict, cpus: int = 4, *flags: str):
    """A ``ray start --head`` of its own (own ports, own temp dir, ``flags`` added) to submit jobs to; stopped by
    killing only its own process group."""
    temp_dir = tempfile.mkdtemp(prefix="cmhead-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--num-cpus={cpus}", *flags, "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *head_port_flags(dashboard)],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"

    def submit(job_id: str, module: str, *args: str, fails: bool = False, timeout: int = 600) -> str:
        """Retried only while the job agent refuses, up to a deadline. A job that must fail must do so within
        ``timeout`` (a hang raises TimeoutExpired)."""
        deadline = time.monotonic() + 240
        while True:
            done = subprocess.run(
                [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--",
                 sys.executable, "-m", module, *args],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            out = done.stdout + done.stderr
            if not any(r in out for r in REFUSED) or time.monotonic() > deadline:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)  # poll interval while the agent comes up
        if fails:
            assert done.returncode != 0 and "failed" in out, out[-4000:]
            return out
        assert done.returncode == 0 and "succeeded" in done.stdout, out[-4000:]
        return done.stdout

    try:
        yield Head(submit, address, lambda: head.poll() is None)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only this cluster's processes (its own session)
        try:
            head.wait(10)  # the raylet outlives SIGTERM: do not wait long for it
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_prefs_then_dpo_jobs_on_ray_start_head(tiny_model_path, tmp_path):
    """``ray_jobs.prefs`` samples through a Ray Data replica pool on the cluster and writes pairs; ``ray_jobs.dpo``
    trains on them (1 CPU worker, LoRA, 2 steps) and leaves an adapter."""
    shared = tmp_path / "shared"
    prompts = str(tmp_path / "prompts.json")
    Path(prompts).write_text(json.dumps([
        {"name": "reel", "family": "text_to_music", "fields": {"description": {"M": "4/4", "K": "D"}},
         "request": {"key": "D"}},
        {"name": "waltz", "family": "text_to_music", "fields": {"description": {"M": "3/4", "K": "G"}},
         "request": {"meter": "3/4"}},
    ]))  # fmt: skip
    prefs_cfg = write_yaml(tmp_path / "prefs.yaml", {
        "model": tiny_model_path, "device": "cpu", "prompts": prompts, "n_per_prompt": 4, "max_new_tokens": 40,
        "constrained": True, "pair_fraction": 0.5, "user_reward": "tests.test_prefs_rounds:tie_breaker",
        "output_dir": str(shared / "prefs"), "pool": {"replicas": 1, "num_cpus": 1, "batch_size": 8},
    })  # fmt: skip
    dpo_cfg = write_yaml(tmp_path / "dpo.yaml", {
        "run_name": "dpo", "storage_path": str(shared / "runs"), "model": tiny_model_path,
        "pairs": str(shared / "prefs"), "loss": "dpop", "profile": "cpu", "zero_stage": 0, "num_workers": 1,
        "cpus_per_worker": 1, "global_batch_size": 2, "micro_batch_size": 1, "max_length": 128,
        "max_prompt_length": 48, "max_steps": 2, "lr": 1e-3, "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 2,
        "keep_last": 1, "max_failures": 0, "log_every": 1,
    })  # fmt: skip
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    with ray_head(env) as cluster:
        submit = cluster.submit
        log = submit("prefs", "ray_jobs.prefs", "--config", prefs_cfg)
        manifest = json.loads((shared / "prefs" / "manifest.json").read_text())
        assert manifest["samples"] == 8 and manifest["pairs"] >= 1 and f'"pairs": {manifest["pairs"]}' in log
        pairs = pq.read_table(shared / "prefs" / "pairs.parquet")
        assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"} <= set(pairs.column_names)
        log = submit("dpo", "ray_jobs.dpo", "--config", dpo_cfg)
        assert "[dpo] step 2/2 loss" in log and "margin" in log
        assert (shared / "runs" / "dpo" / "checkpoint_0000002" / "adapter" / "adapter_config.json").is_file()
