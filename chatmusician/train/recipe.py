"""The training recipe: continual pretraining and SFT of a causal LM with Ray Train + DeepSpeed + LoRA.

Supports: base model by hub id or path in the hardware profile's precision (fp32 / bf16 / fp16 with dynamic
loss scaling); ``train_type`` lora (peft, modules_to_save embed_tokens + lm_head) or full; DeepSpeed ZeRO 0-3;
torch AdamW (fused on CUDA); 5 % linear warmup + cosine; gradient clipping; gradient accumulation up to the
global batch; optional activation checkpointing; data from materialized shards or the live Ray Data stream;
metrics (loss, lr, grad norm, tokens/s, MFU on GPUs) to TensorBoard + metrics.jsonl (rank 0) and
``ray.train.report``; checkpoints every N steps and at the end (DeepSpeed state for exact resume + a rank-0
safetensors export), keep-last-K, automatic restart from the last checkpoint on worker failure, and resume
when the same run name is launched again.

Shape: :func:`train` (the driver: validate, build the datasets, launch a ``TorchTrainer``) and
:func:`train_loop_per_worker` (setup -> resume -> loop -> checkpoint), with the pure helpers beside them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from chatmusician.train import checkpointing
from chatmusician.train.checkpointing import TrainState
from chatmusician.train.config import TrainConfig
from chatmusician.train.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps
from chatmusician.train.profiles import get_profile, mfu, peak_flops_for, resolve_zero_stage

IGNORE_INDEX = -100
TRAIN_TYPES = ("lora", "full")


class TrainConfigError(ValueError):
    """A train config that cannot run, found before any worker starts."""


# ---------------------------------------------------------------- pure helpers


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`TrainConfigError` (or the profile/batch errors, both ValueErrors) for a config that cannot run."""
    if cfg.train_type not in TRAIN_TYPES:
        raise TrainConfigError(f"train_type must be one of {TRAIN_TYPES}, got {cfg.train_type!r}")
    profile = get_profile(cfg.profile)
    resolve_zero_stage(profile, cfg.zero_stage)
    gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, cfg.num_workers)
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise TrainConfigError(f"max_steps must be positive, got {cfg.max_steps}")
    if cfg.checkpoint_every <= 0 or cfg.keep_last <= 0:
        raise TrainConfigError("checkpoint_every and keep_last must be positive")
    if cfg.max_length <= 1:
        raise TrainConfigError(f"max_length must be at least 2, got {cfg.max_length}")


def total_steps_for(rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps of ``cfg.epochs`` passes over ``rows`` rows (each worker gets rows // workers, whole
    micro batches only; leftover micro batches carry over into the next epoch)."""
    micro_per_worker = rows // cfg.num_workers // cfg.micro_batch_size
    accumulation = gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, cfg.num_workers)
    steps = cfg.epochs * micro_per_worker // accumulation
    if steps == 0:
        raise TrainConfigError(
            f"{rows} rows give no optimizer step with global_batch_size {cfg.global_batch_size}; add data or epochs"
        )
    return steps


def collate(batch: dict[str, np.ndarray], max_length: int, pad_id: int = 0) -> dict[str, Any]:
    """Ray Data batch of token rows -> model inputs: ``input_ids``, ``labels``, ``position_ids`` [batch, longest]
    (torch int64) plus ``num_tokens`` (real tokens in the batch, for throughput; not a model input).

    Rows are cut to ``max_length`` and right-padded (labels -100). No attention mask: the model builds a
    block-diagonal causal mask from ``position_ids`` (chatmusician.data.packing), so packed documents stay apart
    and the padding, whose positions restart at 0, is a segment of its own that no real token attends to.
    """
    import torch

    ids = [np.asarray(r, dtype=np.int64)[:max_length] for r in batch["input_ids"]]
    labels = [np.asarray(r, dtype=np.int64)[:max_length] for r in batch["labels"]]
    positions = batch.get("position_ids")
    longest = max(len(r) for r in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    label_arr = np.full((len(ids), longest), IGNORE_INDEX, dtype=np.int64)
    pos = np.tile(np.arange(longest, dtype=np.int64), (len(ids), 1))
    for i, row in enumerate(ids):
        n = len(row)
        input_ids[i, :n] = row
        label_arr[i, :n] = labels[i]
        if positions is not None and positions[i] is not None:
            pos[i, :n] = np.asarray(positions[i], dtype=np.int64)[:n]
        pos[i, n:] = np.arange(longest - n)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(label_arr),
        "position_ids": torch.from_numpy(pos),
        "num_tokens": torch.tensor(sum(len(r) for r in ids)),
    }


def step_seed(seed: int, step: int, rank: int) -> int:
    """RNG seed of one optimizer step on one worker: dropout draws depend only on (seed, step, rank), so a
    resumed run repeats exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**31)


def local_run_dir(cfg: TrainConfig) -> Path | None:
    """``<storage>/<run>`` when storage is a local (or NFS-mounted) folder; None for URIs such as s3://."""
    if "://" in cfg.storage_path and not cfg.storage_path.startswith("file://"):
        return None
    return Path(cfg.storage_path.removeprefix("file://")).absolute() / cfg.run_name


# ---------------------------------------------------------------- the worker


def _build_model(cfg: TrainConfig, precision: str):
    import torch

    from chatmusician.model.loading import load_model
    from chatmusician.model.lora import apply_lora

    model = load_model(cfg.model, precision)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train_type == "lora":
        torch.manual_seed(cfg.seed)  # same adapter init on every rank
        model = apply_lora(model, cfg.lora)
    return model


def _optimizer(model, cfg: TrainConfig, fused: bool):
    """AdamW with the original's betas/decay; no decay on norms and biases (1-D tensors)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def _batches(shard, cfg: TrainConfig, skip: int):
    """Endless micro batches of this worker's shard, epoch after epoch, skipping the first ``skip`` (resume)."""
    seen = 0
    while True:
        yielded = False
        for batch in shard.iter_batches(
            batch_size=cfg.micro_batch_size, batch_format="numpy", drop_last=True
        ):
            yielded = True
            seen += 1
            if seen > skip:
                yield collate(batch, cfg.max_length)
        if not yielded:
            raise RuntimeError("this worker's data shard holds less than one micro batch")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: setup, resume if a checkpoint exists, train to ``total_steps``, checkpoint."""
    import deepspeed
    import deepspeed.ops
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import CheckpointConsistencyMode
    from torch.optim.lr_scheduler import LambdaLR

    from chatmusician.model.loading import count_parameters
    from chatmusician.train.schedule import lr_multiplier

    cfg: TrainConfig = loop_config["cfg"]
    total_steps: int = loop_config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    profile = get_profile(cfg.profile)
    ds_config = build_deepspeed_config(cfg, world, profile)
    accumulation = ds_config["gradient_accumulation_steps"]
    device = torch.device("cuda", torch.cuda.current_device()) if profile.use_gpu else torch.device("cpu")

    if not profile.use_gpu:
        # DeepSpeed's shared-memory allreduce serves CPU inference only, and building it takes ~60 s on first use;
        # training's collectives go through gloo, so CPU runs skip it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    # ---- setup: model, optimizer, schedule, DeepSpeed engine
    model = _build_model(cfg, profile.precision)
    trainable, total_params = count_parameters(model)
    optimizer = _optimizer(model, cfg, fused=profile.fused_optimizer and profile.use_gpu)
    scheduler = LambdaLR(optimizer, lr_multiplier(total_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )

    # ---- resume: the last checkpoint of this run (after a worker failure, or a relaunch of the same run name)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = checkpointing.load(engine, ckpt_dir)

    run_dir = local_run_dir(cfg)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = (
            run_dir / "tensorboard" if run_dir else Path(tempfile.gettempdir()) / cfg.run_name / "tensorboard"
        )
        writer = SummaryWriter(str(log_dir))
    peak = None  # MFU only where a GPU's peak is known
    if profile.use_gpu:
        peak = peak_flops_for(torch.cuda.get_device_name(), profile.precision) or profile.peak_flops

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpointing.save(engine, tmp, state, cfg.train_type, rank)
            ray.train.report(
                {**metrics, "micro_batches": state.micro_batches},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpointing.checkpoint_dir_name(state.step),
            )
        # Wait until Ray has registered it: a worker lost right after a checkpoint then resumes from that one,
        # and a relaunch of the run finds it (otherwise the report can still be in flight when a worker dies).
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    # ---- train
    batches = _batches(ray.train.get_dataset_shard("train"), cfg, skip=state.micro_batches)
    engine.train()
    while state.step < total_steps:
        torch.manual_seed(step_seed(cfg.seed, state.step, rank))
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        for _ in range(accumulation):
            batch = next(batches)
            tokens += float(batch.pop("num_tokens"))
            loss = engine(
                **{k: v.to(device) for k, v in batch.items()}
            ).loss  # mean over this micro batch's target tokens
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            fallback_norm = (
                _unreported_grad_norm(engine) if engine.is_gradient_accumulation_boundary() else None
            )
            engine.step()  # steps the optimizer + schedule only at the accumulation boundary
            loss_sum += loss.detach().double().cpu()
            state.micro_batches += 1
        stats = torch.stack([loss_sum / accumulation, tokens]).to(device)
        dist.all_reduce(stats)  # over workers: summed loss means, summed tokens
        elapsed = time.perf_counter() - started
        state.step += 1
        tokens_per_s = float(stats[1]) / elapsed
        metrics = {
            "step": state.step,
            "loss": float(stats[0]) / world,
            "lr": lr,
            "grad_norm": _as_float(engine.get_global_grad_norm()) or fallback_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(total_params, tokens_per_s, peak, world),
            "loss_scale": _loss_scale(engine),
            "trainable_params": trainable,
        }
        if writer is not None:
            for key, value in metrics.items():
                if value is not None and key != "step":
                    writer.add_scalar(f"train/{key}", value, state.step)
            if run_dir is not None:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
        if rank == 0 and (state.step % cfg.log_every == 0 or state.step in (1, total_steps)):
            print(  # progress in the job's log (ray job logs / the driver's console)
                f"[{cfg.run_name}] step {state.step}/{total_steps} loss {metrics['loss']:.4f} "
                f"lr {lr:.2e} tokens/s {tokens_per_s:,.0f}",
                flush=True,
            )
        if cfg.fail_at_step is not None and state.step == cfg.fail_at_step and rank == world - 1 and run_dir:
            checkpointing.fail_once(run_dir / f".failed_at_step_{cfg.fail_at_step}")
        if state.step % cfg.checkpoint_every == 0 or state.step == total_steps:
            save_checkpoint(metrics)
        elif state.step % cfg.log_every == 0:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()


def _unreported_grad_norm(engine) -> float | None:
    """Plain fp32 without ZeRO clips with a norm DeepSpeed does not keep: measure the (already all-reduced)
    gradients before the step instead. None where DeepSpeed reports the norm itself."""
    import torch

    if engine.zero_optimization_stage() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def _loss_scale(engine) -> float | None:
    """Current fp16 loss scale (None when not training in fp16)."""
    if not engine.fp16_enabled():
        return None
    return float(getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", 0.0)))


# ---------------------------------------------------------------- the driver


def load_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """``{"train": ray.data.Dataset}`` from the data stage: materialized shards, else the live stream."""
    if cfg.data.shards:
        from chatmusician.data.pipeline import read_shards

        return {"train": read_shards(cfg.data.shards)}
    if cfg.data.stream is not None:
        from chatmusician.data.pipeline import build_dataset

        return {"train": build_dataset(cfg.data.stream)}
    raise TrainConfigError("set data.shards (a folder of tokenized shards) or data.stream (a TokenizeConfig)")


def scaling_config(cfg: TrainConfig):
    """Workers of the profile's kind: one GPU each plus ``accelerator_type:<A800|V100>`` so that Ray places
    pretraining on A800 nodes and SFT on V100 nodes; fractional CPUs on the cpu profile."""
    from ray.train import ScalingConfig

    profile = get_profile(cfg.profile)
    cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else profile.cpus_per_worker
    accelerator = profile.accelerator_type if cfg.accelerator_type is None else (cfg.accelerator_type or None)
    return ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=profile.use_gpu,
        resources_per_worker={"CPU": cpus, **({"GPU": 1} if profile.use_gpu else {})},
        accelerator_type=accelerator,
    )


def train(cfg: TrainConfig, datasets: dict[str, Any] | None = None):
    """Launch (or resume) the run ``cfg.run_name`` under ``cfg.storage_path``; returns the ``ray.train.Result``.

    ``datasets`` overrides ``cfg.data`` with ready Ray Datasets (``{"train": ...}``, rows per the shard contract).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    validate(cfg)
    profile = get_profile(cfg.profile)
    if cfg.max_steps is None and datasets is None and not cfg.data.shards:
        raise TrainConfigError("the live data stream has no row count: set max_steps")
    datasets = datasets or load_datasets(cfg)
    total_steps = cfg.max_steps or total_steps_for(datasets["train"].count(), cfg)

    storage = cfg.storage_path if local_run_dir(cfg) is None else str(Path(cfg.storage_path).absolute())
    # Deterministic row order and split: what makes "skip the consumed micro batches" an exact resume.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "total_steps": total_steps},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend=profile.backend),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
    )
    return trainer.fit()


def run(cfg: TrainConfig):
    """CLI entry (``chatmusician pretrain | sft``): train and print where the last checkpoint is."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    result = train(cfg)
    print(
        json.dumps({"run": cfg.run_name, "checkpoint": result.checkpoint.path if result.checkpoint else None})
    )
    return result
