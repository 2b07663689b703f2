"""The training recipe end to end on the shared local Ray: 2 CPU workers, the tiny LLaMA, real ABC tunes.

One run per ZeRO stage x train type (a few steps each), then the fault-tolerance runs reuse the ZeRO-2 LoRA run as
the uninterrupted reference. The first run pays DeepSpeed's one-off comm-op build (~60 s on a cold cache).
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

pytestmark = pytest.mark.integration

STEPS = 6
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
        data=DataConfig(shards=abc_shards),
        profile="cpu",
        zero_stage=2,
        num_workers=2,
        global_batch_size=8,
        micro_batch_size=2,  # 2 micro batches per worker per step: gradient accumulation is exercised
        max_length=64,
        max_steps=STEPS,
        lr=2e-3,
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


@pytest.fixture(scope="module")
def combo_run(base_config, tiny_model_path):
    """Runs (and caches) one ZeRO stage x train type; ZeRO-3 LoRA reads the live Ray Data stream, not shards."""
    from chatmusician.train.recipe import train

    done: dict[tuple[int, str], tuple[Path, object]] = {}

    def run(stage: int, train_type: str):
        if (stage, train_type) not in done:
            cfg = replace(
                base_config, run_name=f"zero{stage}_{train_type}", zero_stage=stage, train_type=train_type
            )
            if (stage, train_type) == (3, "lora"):
                cfg = replace(cfg, data=DataConfig(stream=_tokenize_config(tiny_model_path)))
            result = train(cfg)
            done[stage, train_type] = (Path(cfg.storage_path) / cfg.run_name, result)
        return done[stage, train_type]

    return run


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
    assert [round(m["lr"], 10) for m in logged][:2] == [
        2e-3,
        2e-3,
    ]  # ceil(5% of 6) = 1 warmup step, then cosine
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

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

    # Same data, same init, same seeds: every ZeRO stage (and the live stream) follows ZeRO-0's loss curve.
    reference = losses_by_step(combo_run(0, train_type)[0])
    assert losses == pytest.approx(reference, abs=LOSS_TOLERANCE)


def test_relaunch_and_lost_worker_both_resume_from_the_last_checkpoint(combo_run, base_config):
    """Launch 1 dies at step 3 (max_failures=0). Launch 2, same run name, resumes from checkpoint 2; a worker is
    killed at step 5 and Ray Train restarts the group from checkpoint 4. The losses equal the uninterrupted run's."""
    import ray.train

    from chatmusician.train.recipe import train

    reference = losses_by_step(combo_run(2, "lora")[0])
    cfg = replace(base_config, run_name="interrupted", fail_at_step=3, max_failures=0)
    run_dir = Path(cfg.storage_path) / cfg.run_name
    with pytest.raises(ray.train.TrainingFailedError):
        train(cfg)
    assert checkpoints(run_dir) == ["checkpoint_0000002"]

    result = train(replace(cfg, fail_at_step=5, max_failures=1))
    assert (run_dir / ".failed_at_step_3").exists() and (run_dir / ".failed_at_step_5").exists()
    # Relaunch: steps 1-2 never run again; worker loss at 5: only step 5 runs twice. Exactly STEPS steps in the end.
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 3, 4, 5, 5, 6]
    assert Path(result.checkpoint.path).name == "checkpoint_0000006"
    assert result.metrics["step"] == STEPS
    assert losses_by_step(run_dir) == pytest.approx(reference, abs=LOSS_TOLERANCE)
