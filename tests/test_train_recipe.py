"""The training recipe end to end on the shared local Ray: 2 CPU workers, the tiny LLaMA, real ABC tunes.

One run per ZeRO stage x train type (a few steps each, shards read in order so that the live stream, which has
no shuffle, can follow the same curve), then a shuffled ZeRO-2 LoRA run is the uninterrupted reference of the
fault-tolerance runs: relaunch, a lost worker, and two nodes (a cluster of its own, in a subprocess). The first
run pays DeepSpeed's one-off comm-op build (~60 s on a cold cache).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from chatmusician import corpora
from chatmusician.data.config import SourceConfig, TokenizeConfig
from chatmusician.train.config import DataConfig, LoraConfig, TrainConfig
from chatmusician.train.schedule import lr_at

pytestmark = pytest.mark.integration

STEPS = 6
WARMUP = 0.3  # ceil(0.3 * 6) = 2 warmup steps: visible in the logged learning rates
COMBOS = [(0, "lora"), (2, "lora"), (3, "lora"), (0, "full"), (2, "full"), (3, "full")]
LOSS_TOLERANCE = 1e-4  # fp32 on CPU; ZeRO's partitioned reductions only reorder sums


def _tokenize_config(tiny_model_path: str, output_dir: str | None = None) -> TokenizeConfig:
    """Real ABC tunes (Nottingham reels U-Z), pretraining mode, packed into 64-token rows."""
    source = corpora.NOTTINGHAM_DIR / "reelsu-z.abc"
    return TokenizeConfig(
        sources=[SourceConfig(path=str(source), format="abc")],
        mode="pt",
        tokenizer=tiny_model_path,
        max_len=64,
        packing="greedy",
        val_fraction=0.1,  # a held-out split: data stage -> output_dir/val -> evaluated by the recipe
        output_dir=output_dir,
        shard_rows=48,  # several shards: the row order must hold across files
        num_tokenizers=1,
        tokenizer_cpus=0.5,
        read_cpus=0.25,
        progress=False,
    )


@pytest.fixture(scope="module")
def abc_shards(ray_cluster, tiny_model_path, tmp_path_factory) -> str:
    from chatmusician.data.pipeline import write_shards

    out = tmp_path_factory.mktemp("abc_shards")
    manifest = write_shards(_tokenize_config(tiny_model_path, str(out)))
    assert manifest["sequences"] >= 2 * 8 * STEPS  # enough rows for every run without a second epoch
    assert manifest["val"]["sequences"] >= 4 and (out / "val" / "manifest.json").is_file()
    return str(out)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def base_config(tiny_model_path, abc_shards, storage) -> TrainConfig:
    return TrainConfig(
        run_name="base",
        storage_path=str(storage),
        model=tiny_model_path,
        lora=LoraConfig(r=8, alpha=16),
        data=DataConfig(shards=abc_shards, shuffle=False),
        profile="cpu",
        zero_stage=2,
        num_workers=2,
        global_batch_size=8,
        micro_batch_size=2,  # 2 micro batches per worker per step: gradient accumulation is exercised
        max_length=64,
        max_steps=STEPS,
        lr=2e-3,
        warmup_ratio=WARMUP,
        eval_every=3,
        eval_hook="chatmusician.eval.hook:mtb_accuracy",  # MTB accuracy over time, beside the validation loss
        checkpoint_every=2,
        keep_last=2,
        max_failures=0,
        log_every=100,  # metrics.jsonl still gets every step; fewer report() barriers
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


def run_in_own_ray(script: str, cfg: TrainConfig, tmp_path: Path):
    """``python tests/<script> cfg.pkl`` in a subprocess with its own local Ray (a process joins one cluster);
    asserts it succeeded and returns the finished process."""
    import os
    import pickle
    import subprocess
    import sys
    import tempfile

    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    with tempfile.TemporaryDirectory(prefix="cmrun-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).parent / script), str(tmp_path / "cfg.pkl")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def combo_run(base_config, tiny_model_path, abc_shards):
    """Runs (and caches) one ZeRO stage x train type; ZeRO-3 LoRA reads the live Ray Data stream, not shards."""
    from chatmusician.train.recipe import train

    done: dict[tuple[int, str], tuple[Path, object]] = {}

    def run(stage: int, train_type: str):
        if (stage, train_type) not in done:
            cfg = replace(
                base_config, run_name=f"zero{stage}_{train_type}", zero_stage=stage, train_type=train_type
            )
            if (stage, train_type) == (3, "lora"):  # the stream's training rows; validation from the shards
                stream = DataConfig(stream=_tokenize_config(tiny_model_path), val_shards=f"{abc_shards}/val")
                cfg = replace(cfg, data=stream)
            result = train(cfg)
            done[stage, train_type] = (Path(cfg.storage_path) / cfg.run_name, result)
        return done[stage, train_type]

    return run


def _val_loss(model, val_shards: str) -> float:
    """A plain single-process evaluation: mean next-token loss over every target token of the split."""
    import pyarrow.parquet as pq
    import torch

    total, count = 0.0, 0
    for path in sorted(Path(val_shards).glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            ids = torch.tensor([row["input_ids"]])
            with torch.no_grad():
                # No cache: with one, transformers skips the packed-sequence mask that it builds from
                # position_ids, and a packed row's documents would attend to each other (as they never do in
                # training). The saved full model has use_cache off in its config; a reloaded base does not.
                positions = torch.tensor([row["position_ids"]])
                logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            labels = torch.tensor(row["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], labels, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def _eval_loss(model, shards: str) -> float:
    """Mean loss of ``model`` on the first 16 training rows."""
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(sorted(Path(shards).glob("*.parquet"))[0]).slice(0, 16)
    ids = torch.tensor(table["input_ids"].to_pylist())
    positions = torch.tensor(table["position_ids"].to_pylist())
    labels = torch.tensor(table["labels"].to_pylist())
    with torch.no_grad():
        return float(model(input_ids=ids, position_ids=positions, labels=labels).loss)


@pytest.mark.parametrize(("stage", "train_type"), COMBOS, ids=[f"zero{s}-{t}" for s, t in COMBOS])
def test_zero_stage_trains_on_two_cpu_workers(combo_run, stage, train_type, tiny_model_path, abc_shards):
    from chatmusician.model.loading import load_model
    from chatmusician.train.checkpointing import read_train_state

    run_dir, result = combo_run(stage, train_type)
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1] - 0.5, losses  # it learns the ABC tunes
    logged = metrics(run_dir)
    assert all(m["tokens_per_s"] > 0 and m["grad_norm"] > 0 for m in logged)
    # 2 linear warmup steps (half the peak, then the peak), then cosine down to min_lr 0 on the last step.
    lrs = [m["lr"] for m in logged]
    assert lrs == pytest.approx([lr_at(s, STEPS, 2e-3, WARMUP) for s in range(STEPS)], rel=1e-9)
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(0.0)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # Validation at steps 3 and 6 (eval_every 3, and the end), nowhere else.
    assert [m["step"] for m in logged if "val_loss" in m] == [3, 6]
    mtb = [m for m in logged if "mtb_accuracy" in m]  # the eval hook's metrics reach metrics.jsonl
    assert [m["step"] for m in mtb] == [3, 6] and all(0 <= m["mtb_accuracy"] <= 1 for m in mtb)
    assert all(m["mtb_questions"] == 12 for m in mtb)  # every fixture question scored
    final = logged[-1]
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))

    # Every 2 steps + keep-last-2 -> only 4 and 6 remain; the last holds the exact-resume position.
    assert checkpoints(run_dir) == ["checkpoint_0000004", "checkpoint_0000006"]
    assert Path(result.checkpoint.path).name == "checkpoint_0000006"
    last = run_dir / "checkpoint_0000006"
    state = read_train_state(last)
    assert (state.step, state.micro_batches) == (STEPS, STEPS * 2)
    assert (last / "deepspeed" / "state").is_dir()

    base = load_model(tiny_model_path).eval()
    if train_type == "lora":
        from peft import PeftModel

        assert (last / "adapter" / "adapter_model.safetensors").is_file()
        trained = PeftModel.from_pretrained(load_model(tiny_model_path), str(last / "adapter")).eval()
    else:
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(last / "model").eval()
    assert _eval_loss(trained, abc_shards) < _eval_loss(base, abc_shards) - 0.5
    # The reported validation loss is the checkpoint's loss on the held-out rows, as one process computes it.
    assert final["val_loss"] == pytest.approx(_val_loss(trained, f"{abc_shards}/val"), rel=1e-5)
    assert result.metrics["val_loss"] == final["val_loss"]

    # Same data, same init, same seeds: every ZeRO stage (and the live stream) follows ZeRO-0's loss curve.
    reference = losses_by_step(combo_run(0, train_type)[0])
    assert losses == pytest.approx(reference, abs=LOSS_TOLERANCE)


@pytest.fixture(scope="module")
def shuffled(base_config):
    """The uninterrupted reference of the fault tests: ZeRO-2 LoRA with the seeded shuffle on."""
    from chatmusician.train.recipe import train

    cfg = replace(base_config, run_name="shuffled", data=replace(base_config.data, shuffle=True))
    train(cfg)
    return cfg, losses_by_step(Path(cfg.storage_path) / cfg.run_name)


def test_shuffled_order_trains_on_other_rows_than_the_written_order(shuffled, combo_run):
    _, losses = shuffled
    in_order = losses_by_step(combo_run(2, "lora")[0])
    assert losses[STEPS] < losses[1] - 0.5
    assert all(abs(losses[s] - in_order[s]) > 1e-3 for s in range(1, STEPS + 1))  # other micro batches


def test_relaunch_and_lost_worker_both_resume_from_the_last_checkpoint(shuffled):
    """Launch 1 dies as step 3 starts (max_failures=0). Launch 2, same run name, resumes from checkpoint 2; a worker
    dies as step 5 starts and Ray Train restarts the group from checkpoint 4. The losses equal the uninterrupted
    run's. The fault hook fires before any collective of its step, so no rank can log that step: the log is
    exact, whatever the order of teardown."""
    import ray.train

    from chatmusician.train.recipe import train

    reference_cfg, reference = shuffled
    cfg = replace(reference_cfg, run_name="interrupted", fail_at_step=3, max_failures=0)
    run_dir = Path(cfg.storage_path) / cfg.run_name
    with pytest.raises(ray.train.TrainingFailedError):
        train(cfg)
    assert checkpoints(run_dir) == ["checkpoint_0000002"]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]

    result = train(replace(cfg, fail_at_step=5, max_failures=1))
    assert (run_dir / ".failed_at_step_3").exists() and (run_dir / ".failed_at_step_5").exists()
    # Relaunch: steps 1-2 never run again; worker loss at 5: the group restarts at checkpoint 4. Every step once.
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert Path(result.checkpoint.path).name == "checkpoint_0000006"
    assert result.metrics["step"] == STEPS
    assert losses_by_step(run_dir) == pytest.approx(reference, abs=LOSS_TOLERANCE)


def test_two_nodes_one_worker_each_resume_to_the_single_node_losses(shuffled, tmp_path):
    """A local two-node cluster (ray.cluster_utils.Cluster, loopback, a Ray temp dir of its own), one train worker
    per node: a worker dies at step 5 and the group restarts, wherever Ray places the ranks this time. Which rows
    a rank reads depends only on (seed, epoch, rank), so the losses equal the single-node uninterrupted run's."""

    reference_cfg, reference = shuffled
    cfg = replace(
        reference_cfg,
        run_name="two_nodes",
        storage_path=str(tmp_path / "runs"),
        fail_at_step=5,
        max_failures=1,
        resources_per_worker={"trainer_slot": 1},  # each node has one slot: one worker per node
    )
    proc = run_in_own_ray("two_node_train.py", cfg, tmp_path)
    cluster = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cluster["trainer_slots_per_node"] == [1, 1], cluster  # so the two ranks ran on two nodes
    run_dir = tmp_path / "runs" / "two_nodes"
    assert (run_dir / ".failed_at_step_5").exists()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert losses_by_step(run_dir) == pytest.approx(reference, abs=LOSS_TOLERANCE)


def test_remote_storage_gets_checkpoints_tensorboard_and_metrics(base_config, tmp_path):
    """``storage_path`` inside a non-local pyarrow filesystem (a SubTreeFileSystem over a temp folder stands in
    for s3://): the run's checkpoints, TensorBoard events and metrics.jsonl all end up under the run's storage,
    through the remote path (logs staged locally, copied up at each checkpoint and at the end)."""
    import pyarrow.fs as pafs

    from chatmusician.train.recipe import train

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    stand_in = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    cfg = replace(
        base_config, run_name="remote", storage_path="runs", max_steps=2, checkpoint_every=2, eval_hook=None
    )
    result = train(cfg, storage_filesystem=stand_in)
    run_dir = bucket / "runs" / "remote"
    assert checkpoints(run_dir) == ["checkpoint_0000002"]
    assert (run_dir / "checkpoint_0000002" / "adapter" / "adapter_model.safetensors").is_file()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert result.metrics["step"] == 2


def test_fp16_overflow_steps_are_skipped_reported_and_never_move_the_schedule(base_config, tmp_path):
    """DeepSpeed's real fp16 path on CPU workers (tests/fp16_cpu_train.py): the loss scale starts at 2**20, so
    the first steps overflow and DeepSpeed skips them. The run still takes exactly ``max_steps`` applied steps,
    each skipped one is logged as such with the scale halving, and the applied steps' learning rates walk the
    whole schedule (warmup, cosine, min_lr on the last step), as if nothing had been skipped."""

    from chatmusician.train.checkpointing import read_train_state

    cfg = replace(
        base_config,
        run_name="fp16",
        storage_path=str(tmp_path / "runs"),
        profile="cpu-fp16",  # registered by the script in every worker
        zero_stage=2,  # the V100 profile's stage
        max_steps=4,
        checkpoint_every=4,
        eval_every=None,
        eval_hook=None,
        min_lr=1e-4,
    )
    run_in_own_ray("fp16_cpu_train.py", cfg, tmp_path)
    run_dir = tmp_path / "runs" / "fp16"
    logged = metrics(run_dir)
    skipped = [m for m in logged if m.get("skipped")]
    applied = [m for m in logged if not m.get("skipped")]
    assert len(skipped) >= 2, logged  # the scale must fall below ~2**17 for this model (hysteresis 2)
    assert [m["step"] for m in applied] == [1, 2, 3, 4]
    assert [m["skipped_steps"] for m in skipped] == list(range(1, len(skipped) + 1))
    scales = [m["loss_scale"] for m in logged]
    assert scales[0] <= 2**20 and scales[-1] < scales[0] and scales == sorted(scales, reverse=True)
    lrs = [m["lr"] for m in applied]
    assert lrs == pytest.approx([lr_at(s, 4, 2e-3, WARMUP, 1e-4) for s in range(4)], rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(math.isfinite(m["loss"]) for m in applied)
    state = read_train_state(run_dir / "checkpoint_0000004")
    assert (state.step, state.skipped_steps) == (4, len(skipped))


# ---------------------------------------------------------------- checkpoints of what trains, trackers


SMALL_LORA = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=[])


@pytest.fixture(scope="module")
def adapter_runs(base_config, tmp_path_factory):
    """A model whose frozen part is ~450x its trainable part (a rank-2 adapter on q/v only, no trained
    embeddings), 4 steps, checkpoints at 2 and 4, per ZeRO stage. ZeRO-0 runs straight through and reports to
    TensorBoard, MLflow (a real local store) and W&B (offline); ZeRO-2 and ZeRO-3 lose a worker as step 3
    starts and resume from checkpoint 2 (whose frozen base was never saved). Validation is capped at one
    micro batch."""
    from chatmusician.train.recipe import train

    root = tmp_path_factory.mktemp("adapter_runs")
    tracking = f"sqlite:///{root}/mlflow.db"
    runs = {}
    for stage in (0, 2, 3):
        cfg = replace(
            base_config,
            run_name=f"adapter_zero{stage}",
            storage_path=str(root / "runs"),
            zero_stage=stage,
            lora=SMALL_LORA,
            max_steps=4,
            checkpoint_every=2,
            keep_last=2,
            eval_every=2,
            eval_max_batches=1,
            eval_hook=None,
            fail_at_step=3 if stage else None,
            max_failures=1,
            report_to=["tensorboard", "mlflow", "wandb"] if stage == 0 else ["tensorboard"],
            tracking_uri=tracking,
            experiment="adapter-test",
        )
        runs[stage] = (cfg, train(cfg))
    return runs, tracking


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_checkpoints_hold_what_trains_and_resume_without_the_frozen_base(
    adapter_runs, stage, tiny_model_path
):
    from safetensors import safe_open

    runs, _ = adapter_runs
    cfg, result = runs[stage]
    run_dir = Path(cfg.storage_path) / cfg.run_name
    last = run_dir / "checkpoint_0000004"
    with safe_open(str(last / "adapter" / "adapter_model.safetensors"), "pt") as f:
        trainable = sum(f.get_tensor(k).numel() for k in f.keys())
    frozen = sum(p.stat().st_size for p in Path(tiny_model_path).glob("*.safetensors")) // 4
    assert frozen >= 50 * trainable, (frozen, trainable)
    # fp32: the weights, Adam's two moments, ZeRO's fp32 master partition and the adapter export, + metadata.
    bound = trainable * 4 * 5 + 256 * 1024
    assert _bytes(last) <= bound < frozen * 4, (_bytes(last), bound, frozen * 4)
    # ...and resuming from such a checkpoint gives exactly the uninterrupted run's losses.
    if stage:
        assert (run_dir / ".failed_at_step_3").exists()
        assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]  # step 3 never logged before the loss
        assert losses_by_step(run_dir) == pytest.approx(
            losses_by_step(Path(runs[0][0].storage_path) / runs[0][0].run_name), abs=LOSS_TOLERANCE
        )
    assert result.metrics["step"] == 4


def test_validation_cap_reads_the_splits_first_rows_only(adapter_runs, abc_shards):
    """eval_max_batches 1 x micro batch 2: val_tokens counts the target tokens of the split's first 2 rows."""
    import pyarrow.parquet as pq

    runs, _ = adapter_runs
    cfg, _ = runs[0]
    first = sorted(Path(abc_shards, "val").glob("part-*.parquet"))[0]
    rows = pq.read_table(first).slice(0, 2).to_pylist()
    expected = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    logged = [m for m in metrics(Path(cfg.storage_path) / cfg.run_name) if "val_loss" in m]
    assert [m["step"] for m in logged] == [2, 4] and all(m["val_tokens"] == expected for m in logged)


def test_mlflow_and_wandb_get_params_every_step_and_the_adapter(adapter_runs):
    import mlflow

    runs, tracking = adapter_runs
    cfg, _ = runs[0]
    client = mlflow.tracking.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("adapter-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == cfg.run_name and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "2" and run.data.params["zero_stage"] == "0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    logged = losses_by_step(Path(cfg.storage_path) / cfg.run_name)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(logged, rel=1e-6)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in artifacts and "adapter/adapter_config.json" in artifacts
    # W&B offline: one run folder under the run's storage, its history file written.
    offline = list((Path(cfg.storage_path) / cfg.run_name / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_resume_refuses_a_run_whose_shape_changed(combo_run, base_config):
    """A relaunch of a finished run with another micro batch (and so another accumulation and length) is one
    line on the driver, before any worker starts: ZeRO shards and the data position are per rank, the schedule
    per total steps."""
    from chatmusician.train.config import TrainConfigError
    from chatmusician.train.recipe import train

    combo_run(0, "lora")
    cfg = replace(base_config, run_name="zero0_lora", zero_stage=0, micro_batch_size=1, max_steps=STEPS + 2)
    with pytest.raises(
        TrainConfigError, match=r"micro_batch_size 2 -> 1; gradient_accumulation 2 -> 4; total_steps 6 -> 8"
    ) as err:
        train(cfg)
    assert "\n" not in str(err.value)


def test_training_refuses_shards_that_do_not_fit_the_run(base_config, abc_shards):
    """The shards' manifest against the run, on the driver, before any worker: rows longer than max_length, the
    wrong tokenize mode for the command (pt shards given to sft), each one line naming both sides."""
    from chatmusician.train.config import SFTConfig, TrainConfigError
    from chatmusician.train.recipe import train

    with pytest.raises(TrainConfigError, match=r"max_len 64 tokens vs max_length 32") as err:
        train(replace(base_config, run_name="too_short", max_length=32))
    assert "\n" not in str(err.value)
    sft = SFTConfig(**{f: getattr(base_config, f) for f in base_config.__dataclass_fields__})
    with pytest.raises(TrainConfigError, match=r"mode pt vs sft"):
        train(replace(sft, run_name="wrong_mode"))
