"""More than one machine, tested on one: a local five-node ``ray.cluster_utils.Cluster`` (tests/multi_node_cluster.py)
with nodes labelled like cluster.yaml's (CPU head, A800 and V100 nodes, CPU-backed). One cluster for every check,
as each costs a cluster start-up: tasks write the shards, placement by accelerator type, impossible jobs fail
fast with one line, the Renderer stays on the CPU node, and a run whose node is removed resumes to the same losses."""

import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from chatmusician import corpora
from chatmusician.data.config import SourceConfig, TokenizeConfig
from chatmusician.render.config import RenderConfig
from chatmusician.train.config import DataConfig, LoraConfig, TrainConfig

pytestmark = pytest.mark.integration
STEPS = 6
LOSS_TOLERANCE = 1e-4  # as tests/test_train_recipe.py: fp32 on CPU, ZeRO only reorders sums


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


@pytest.fixture(scope="module")
def cluster_run(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_node")
    shards = tmp / "shards"  # "shared storage": one folder every node of this one-host cluster reaches
    tokenize = TokenizeConfig(
        sources=[SourceConfig(path=str(corpora.NOTTINGHAM_DIR / "reelsu-z.abc"), format="abc")],
        tokenizer=tiny_model_path,
        max_len=64,
        packing="greedy",
        output_dir=str(shards),
        shard_rows=48,
        tokenizer_cpus=0.5,
        progress=False,
    )
    pretrain = TrainConfig(
        run_name="pretrain_a800",
        storage_path=str(tmp / "runs"),
        model=tiny_model_path,
        lora=LoraConfig(r=8, alpha=16),
        data=DataConfig(shards=str(shards), shuffle=True),
        profile="cpu",  # CPU-backed workers, placed by the accelerator type an A800 profile asks for
        accelerator_type="A800",
        resources_per_worker={"trainer_slot": 1},  # one worker per node: two nodes hold the run
        cpus_per_worker=0.5,
        zero_stage=2,
        num_workers=2,
        global_batch_size=8,
        micro_batch_size=2,
        max_length=64,
        max_steps=STEPS,
        lr=2e-3,
        checkpoint_every=2,
        keep_last=2,
        max_failures=0,
        log_every=100,
    )
    sft = replace_cfg(pretrain, run_name="sft_v100", accelerator_type="V100", num_workers=1, max_steps=2)
    render = RenderConfig()
    render.serve.resources = {"cpu_node": 0.001}
    job = {"tokenize": tokenize, "pretrain": pretrain, "sft": sft, "render": render}
    (tmp / "job.pkl").write_bytes(pickle.dumps(job))
    with tempfile.TemporaryDirectory(prefix="cmmn-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).parent / "multi_node_cluster.py"),
                str(tmp / "job.pkl"),
                str(tmp),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp / "report.json").read_text()), tmp, job


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_tasks_write_the_shards_on_a_multi_node_cluster(cluster_run):
    report, tmp, _ = cluster_run
    manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
    assert report["shards"] == len(manifest["shards"]) > 1
    assert sorted(p.name for p in (tmp / "shards").glob("part-*.parquet")) == [
        s["file"] for s in manifest["shards"]
    ]


def test_pretraining_lands_on_a800_sft_on_v100_the_renderer_on_the_cpu_node(cluster_run):
    report, _, _ = cluster_run
    assert sorted(report["labels"].values()) == ["a800-0", "a800-1", "a800-2", "cpu", "v100"]
    assert len(report["pretrain_nodes"]) == 2 and all(n.startswith("a800-") for n in report["pretrain_nodes"])
    assert report["sft_nodes"] == ["v100"]
    assert report["renderer_node"] == "cpu"


def test_a_sweep_starts_as_many_trials_as_the_mixed_cluster_holds_and_none_waits(cluster_run):
    """Three A800 nodes and one V100 node, 2 GPUs each: an A800 sweep of 2-worker trials fits 3 at once (cluster
    totals would say 4: the V100's GPUs counted); 3 trials' placement groups are all placed at once and hold
    every A800 GPU, so the V100's 2 are all that is left."""
    report, _, _ = cluster_run
    fit = report["tune"]
    assert fit["concurrent"] == fit["placed"] == 3 and fit["totals_would_say"] == 4, fit
    assert fit["gpus_left"] == 2.0, fit


def test_a_job_no_node_can_hold_fails_fast_with_one_clear_line(cluster_run):
    report, _, _ = cluster_run
    no_type, too_many = report["impossible"]
    assert no_type["error"] and "accelerator_type:H100" in no_type["error"] and "\n" not in no_type["error"]
    assert "accelerator types: accelerator_type:A800, accelerator_type:V100" in no_type["error"]
    assert too_many["error"] and "4 worker(s)" in too_many["error"] and "hold 3" in too_many["error"]


def test_a_removed_node_resumes_from_the_last_checkpoint_to_the_uninterrupted_losses(cluster_run):
    """The A800 node holding one of this run's two workers (found in this run's own placement group) is removed
    (``cluster.remove_node``: its raylet and all its processes die) once step 3 is logged. Ray Train starts a
    second worker group on the A800 nodes left, from the last checkpoint: the steps after it are logged twice,
    the steps before it once, the run ends at step 6, and every step's loss is the uninterrupted run's (which
    rows a rank reads depends only on seed, epoch and rank)."""
    report, tmp, _ = cluster_run
    loss = report["node_loss"]
    assert loss["node"].startswith("a800-"), loss
    assert 3 in loss["steps_logged"] and STEPS not in loss["steps_logged"], loss  # removed mid-run
    assert len(loss["groups"]) == 2, loss  # a worker was lost: a second worker group, not the first going on
    assert loss["node"] in loss["groups"][0] and loss["node"] not in loss["groups"][1], loss
    assert all(n.startswith("a800-") for group in loss["groups"] for n in group), loss  # before and after
    assert loss["final_step"] == STEPS and loss["final_checkpoint"] == f"checkpoint_{STEPS:07d}"
    steps = [m["step"] for m in metrics(tmp / "runs" / "node_loss")]
    repeated = sorted({s for s in steps if steps.count(s) == 2})
    assert repeated and repeated[0] - 1 in (2, 4), steps  # a restart: the steps after a checkpoint run again
    assert all(steps.count(s) == 1 for s in range(1, repeated[0])), steps  # resumed there, not from scratch
    assert sorted(set(steps)) == list(range(1, STEPS + 1)) and steps[-1] == STEPS, steps
    reference = losses_by_step(tmp / "runs" / "pretrain_a800")
    assert losses_by_step(tmp / "runs" / "node_loss") == pytest.approx(reference, abs=LOSS_TOLERANCE)
