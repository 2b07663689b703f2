"""Shared fixtures: offline settings, the tiny model, and ONE local Ray cluster for the whole session.

A Ray cluster per test costs seconds of start-up on 2 cores, so every integration test that needs Ray takes
``ray_cluster``; tests that need their own cluster (``ray start`` for job submission) start it on free ports.
"""

from __future__ import annotations

import os

import pytest

# Keep every Ray listener on loopback (docs/TOOLS.md) and never reach a model hub from tests.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["WANDB_MODE"] = "offline"  # W&B writes its run files locally and never reaches its servers
os.environ.setdefault("WANDB_SILENT", "true")
# Ray gives its dashboard 60 s to come up; on a loaded 2-core host that is not always enough.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")


from chatmusician.ray_local import free_port  # noqa: E402 - test modules import it from here


def write_sweep_configs(folder, model: str, shards: str, name: str, space: dict, max_steps: int, **sweep):
    """base.yaml (a tiny 1-worker LoRA SFT run) and sweep.yaml over ``space`` in ``folder``; the sweep's path."""
    import yaml

    base = {
        "run_name": "tiny-sft",
        "storage_path": str(folder / "runs"),
        "model": model,
        "lora": {"r": 4, "alpha": 8},
        "data": {"shards": shards},
        "profile": "cpu",
        "zero_stage": 0,
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "max_length": 64,
        "max_steps": max_steps,
        "warmup_ratio": 0.0,
        "eval_every": 2,
        "checkpoint_every": 2,
        "keep_last": 1,
        "log_every": 100,
        "max_failures": 0,
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    config = {
        "base": str(folder / "base.yaml"),
        "command": "sft",
        "space": space,
        "name": name,
        "storage_path": str(folder / "sweeps"),
        "asha": {"grace_period": 2, "reduction_factor": 2},
        **sweep,
    }
    (folder / "sweep.yaml").write_text(yaml.safe_dump(config))
    return folder / "sweep.yaml"


def head_port_flags(dashboard_port: int) -> list[str]:
    """``ray start --head`` flags putting every listener of the head on a free port (never a fixed default that
    another cluster on the host may hold)."""
    flags = [
        "--port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
    ]
    flags += [
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    return [f"--dashboard-port={dashboard_port}", *[f"{flag}={free_port()}" for flag in flags]]


# The slowest files, slowest first (measured with --durations on 2 cores). `make test` runs two processes that
# each take a whole file at a time in this order: starting the long files first keeps one process from running
# a 10-minute file alone at the end while the other has finished.
SLOWEST_FIRST = (
    "test_train_recipe.py",
    "test_job_chain.py",
    "test_quickstart_run.py",
    "test_tune_sweep.py",
    "test_multi_node.py",
    "test_dpo_train.py",
    "test_tune_job.py",
    "test_serve_webui.py",
    "test_openai_api.py",
    "test_train_units.py",
    "test_prefs_rounds.py",
    "test_render_corpus.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The cached nano LLaMA + tokenizer (built once, ~10 s)."""
    from chatmusician.model.tiny import ensure_tiny

    return str(ensure_tiny("nano"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session: 4 logical CPUs so that Data tasks never starve 2 train workers
    (docs/TOOLS.md), the dashboard on a free port (Tune needs it), everything on loopback."""
    import ray

    if not ray.is_initialized():
        from chatmusician.ray_local import init_local

        init_local(  # address "local": never attach to a cluster another `ray start` left in /tmp/ray
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
        )
    yield ray
    from contextlib import suppress

    with suppress(Exception):
        from ray import serve

        serve.shutdown()
    ray.shutdown()
