"""The training recipe: continual pretraining and SFT of a causal LM with Ray Train + DeepSpeed + LoRA.

Supports: base model by hub id or path in the hardware profile's precision (fp32 / bf16 / fp16 with dynamic
loss scaling); ``train_type`` lora (peft, modules_to_save embed_tokens + lm_head) or full; DeepSpeed ZeRO 0-3;
torch AdamW (fused on CUDA); 5 % linear warmup + cosine; gradient clipping; gradient accumulation up to the
global batch; optional activation checkpointing; data from materialized shards (a seeded shuffle, different
every epoch, that each worker reads itself: which rows a rank gets never depends on where Ray placed anything,
see chatmusician.train.data_order) or the live Ray Data stream; a held-out validation split evaluated every
``eval_every`` steps and at the end on all ranks (mean token loss, perplexity) plus an optional ``eval_hook``;
metrics (loss, lr, grad norm, tokens/s, MFU on GPUs, fp16 loss scale and skipped steps) to TensorBoard +
metrics.jsonl (rank 0, under the run's storage: a local folder, ``file://`` or a URI such as ``s3://``) and
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
    if cfg.data.shuffle_window < 1:
        raise TrainConfigError(f"data.shuffle_window must be positive, got {cfg.data.shuffle_window}")
    if cfg.eval_every is not None and cfg.eval_every <= 0:
        raise TrainConfigError(
            f"eval_every must be positive (or null: at the end only), got {cfg.eval_every}"
        )


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


def storage_location(cfg: TrainConfig, filesystem=None) -> tuple[Any, str]:
    """(pyarrow filesystem, root path) of ``cfg.storage_path``: a local folder or ``file://`` path (made
    absolute), a URI such as ``s3://bucket/prefix`` (its filesystem), or, with ``filesystem`` given, a path
    inside that filesystem (how tests stand in for s3 with a local one)."""
    import pyarrow.fs as pafs

    if filesystem is not None:
        return filesystem, cfg.storage_path
    run_dir = local_run_dir(cfg)
    if run_dir is not None:
        return pafs.LocalFileSystem(), str(run_dir.parent)
    return pafs.FileSystem.from_uri(cfg.storage_path)


def local_run_dir(cfg: TrainConfig) -> Path | None:
    """``<storage>/<run>`` when storage is a local (or NFS-mounted) folder; None for URIs such as s3://."""
    if "://" in cfg.storage_path and not cfg.storage_path.startswith("file://"):
        return None
    return Path(cfg.storage_path.removeprefix("file://")).expanduser().absolute() / cfg.run_name


def is_eval_step(step: int, total_steps: int, eval_every: int | None) -> bool:
    return step == total_steps or bool(eval_every and step % eval_every == 0)


def token_loss_sum(logits, labels) -> tuple[float, int]:
    """(sum of next-token cross entropies, number of target tokens) of one batch, in float64: the pieces of
    a mean token loss that sums exactly over batches and ranks (labels -100 = no loss; HF's shift)."""
    import torch.nn.functional as F

    shifted = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss.double()), int((shifted != IGNORE_INDEX).sum())


def resolve_hook(dotted: str):
    """``package.module:function`` -> the function (imported by name, so train/ imports no upper layer)."""
    import importlib

    module, _, attr = dotted.partition(":")
    if not module or not attr:
        raise TrainConfigError(f"eval_hook must look like 'package.module:function', got {dotted!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise TrainConfigError(f"eval_hook {dotted!r} cannot be imported: {err}") from None


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


def _stream_batches(shard, cfg: TrainConfig, skip: int):
    """Endless micro batches of a Ray Data shard (the live stream), epoch after epoch, skipping ``skip``."""
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


def _shard_batches(plan: dict[str, Any], cfg: TrainConfig, rank: int, world: int, skip: int):
    from chatmusician.train.data_order import ShardRowReader

    reader = ShardRowReader(
        plan["files"],
        plan["filesystem"],
        plan["chunks"],
        rank=rank,
        world=world,
        micro_batch_size=cfg.micro_batch_size,
        seed=cfg.seed,
        window=cfg.data.shuffle_window,
        shuffle=cfg.data.shuffle,
    )
    for batch in reader.batches(skip):
        yield collate(batch, cfg.max_length)


def evaluate(
    engine, plan: dict[str, Any], cfg: TrainConfig, rank: int, world: int, device
) -> dict[str, float]:
    """Mean token loss (and perplexity) of the whole validation split, every rank a contiguous part of it.
    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively): a rank whose
    part is shorter runs its last batch again with no target tokens."""
    import math

    import torch
    import torch.distributed as dist

    from chatmusician.train.data_order import ShardRowReader, eval_pieces

    reader = ShardRowReader(
        plan["files"],
        plan["filesystem"],
        plan["chunks"],
        rank=0,
        world=1,
        micro_batch_size=1,
        seed=0,
        window=1,
        shuffle=False,
        check_rows=False,
    )
    batch_rows = cfg.micro_batch_size
    mine, most = eval_pieces(plan["chunks"], rank, world)
    table = reader.read(mine) if mine else None
    sums = torch.zeros(2, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    last = None
    with torch.no_grad():
        for begin in range(0, most, batch_rows):
            rows = table.slice(begin, batch_rows) if table is not None and begin < table.num_rows else None
            if rows is not None and rows.num_rows:
                batch, real = collate(_as_numpy(rows), cfg.max_length), True
                last = batch
            else:
                batch, real = last, False
                if batch is None:  # this rank holds no row at all: the split's first row, no targets
                    first = reader.read(eval_pieces(plan["chunks"], 0, 1)[0][:1]).slice(0, 1)
                    batch = last = collate(_as_numpy(first), cfg.max_length)
            batch = dict(batch)
            batch.pop("num_tokens")
            labels = batch.pop("labels")
            logits = engine(**{k: v.to(device) for k, v in batch.items()}).logits
            if real:
                loss_sum, tokens = token_loss_sum(logits.cpu(), labels)
                sums += torch.tensor([loss_sum, tokens], dtype=torch.float64)
    if was_training:
        engine.train()
    sums = sums.to(device)
    dist.all_reduce(sums)
    loss = float(sums[0] / sums[1]) if float(sums[1]) else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1])}


def _as_numpy(table) -> dict[str, np.ndarray]:
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def _run_eval_hook(hook, engine, tokenizer, step: int, rank: int) -> dict[str, Any]:
    """Call ``hook(model, tokenizer, step)`` on rank 0 (weights gathered first under ZeRO-3, a collective)."""
    import contextlib

    import deepspeed
    import torch
    import torch.distributed as dist

    gathered = (
        deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    out: dict[str, Any] = {}
    was_training = engine.training
    engine.eval()
    with gathered, torch.no_grad():
        if rank == 0:
            out = dict(hook(engine.module, tokenizer, step) or {})
    if was_training:
        engine.train()
    dist.barrier()
    return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: setup, resume if a checkpoint exists, train to ``total_steps``, checkpoint."""
    import deepspeed
    import deepspeed.ops
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import CheckpointConsistencyMode
    from torch.optim.lr_scheduler import LambdaLR

    from chatmusician.train.profiles import compute_parameters
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    used_params = compute_parameters(model.named_parameters())
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

    logs = RunLogs(loop_config["storage"], cfg.run_name) if rank == 0 else None
    peak = None  # MFU only where a GPU's peak is known
    if profile.use_gpu:
        peak = peak_flops_for(torch.cuda.get_device_name(), profile.precision) or profile.peak_flops
    val_plan = loop_config.get("val_plan")
    hook = resolve_hook(cfg.eval_hook) if cfg.eval_hook else None
    tokenizer = None
    if hook is not None and rank == 0:
        from chatmusician.model.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)

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
    if loop_config.get("train_plan") is not None:
        batches = _shard_batches(loop_config["train_plan"], cfg, rank, world, skip=state.micro_batches)
    else:
        batches = _stream_batches(ray.train.get_dataset_shard("train"), cfg, skip=state.micro_batches)
    engine.train()
    while state.step < total_steps:
        if cfg.fail_at_step is not None and state.step + 1 == cfg.fail_at_step and rank == world - 1:
            # Before any collective of the step: no rank can log it, so what the log holds never races teardown.
            checkpointing.fail_once(loop_config["marker_dir"] + f"/.failed_at_step_{cfg.fail_at_step}")
        torch.manual_seed(step_seed(cfg.seed, state.step + state.skipped_steps, rank))
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
        # fp16: on a gradient overflow DeepSpeed skips the update and does not step the schedule; such a step
        # is not counted either, so the schedule still reaches min_lr on the last counted step.
        applied = advance(state, engine.was_step_applied())
        tokens_per_s = float(stats[1]) / elapsed
        metrics = {
            "step": state.step,
            "loss": float(stats[0]) / world,
            "lr": lr,
            "grad_norm": _as_float(engine.get_global_grad_norm()) or fallback_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(used_params, tokens_per_s, peak, world, trainable),
            "loss_scale": _loss_scale(engine),
            "skipped_steps": state.skipped_steps,
            "trainable_params": trainable,
        }
        if not applied:
            metrics["skipped"] = True
        evaluating = (
            applied and val_plan is not None and is_eval_step(state.step, total_steps, cfg.eval_every)
        )
        if evaluating:
            metrics |= evaluate(engine, val_plan, cfg, rank, world, device)
        if applied and hook is not None and is_eval_step(state.step, total_steps, cfg.eval_every):
            metrics |= _run_eval_hook(hook, engine, tokenizer, state.step, rank)
        if logs is not None:
            logs.write(metrics)
        if rank == 0 and (state.step % cfg.log_every == 0 or state.step in (1, total_steps) or evaluating):
            val = f" val_loss {metrics['val_loss']:.4f}" if evaluating else ""
            print(  # progress in the job's log (ray job logs / the driver's console)
                f"[{cfg.run_name}] step {state.step}/{total_steps} loss {metrics['loss']:.4f}{val} "
                f"lr {lr:.2e} tokens/s {tokens_per_s:,.0f}"
                + (" (skipped: fp16 overflow)" if not applied else ""),
                flush=True,
            )
        if not applied:
            continue
        if state.step % cfg.checkpoint_every == 0 or state.step == total_steps:
            if logs is not None:
                logs.sync()
            save_checkpoint(metrics)
        elif state.step % cfg.log_every == 0 or evaluating:
            ray.train.report(metrics)
    if logs is not None:
        logs.close()


def advance(state: TrainState, applied: bool) -> bool:
    """Count one optimizer step, or one skipped by DeepSpeed (fp16 overflow): only applied steps advance the
    step count that the schedule, checkpoints and the run's length are measured in."""
    if applied:
        state.step += 1
    else:
        state.skipped_steps += 1
    return applied


class RunLogs:
    """Rank 0's TensorBoard events and metrics.jsonl, under ``<storage>/<run>/``: written in place on a local
    folder; on a remote filesystem (s3://...) written to a local folder first (fetched back on resume) and
    copied up at each checkpoint and at the end."""

    def __init__(self, storage: tuple[Any, str], run_name: str):
        import pyarrow.fs as pafs
        from torch.utils.tensorboard import SummaryWriter

        self.fs, root = storage
        self.remote = f"{root.rstrip('/')}/{run_name}"
        self.local_fs = isinstance(self.fs, pafs.LocalFileSystem)
        if self.local_fs:
            self.dir = Path(self.remote)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{run_name}-logs-"))
            if self.fs.get_file_info(self.remote).type != pafs.FileType.NotFound:
                for name in ("metrics.jsonl", "tensorboard"):
                    info = self.fs.get_file_info(f"{self.remote}/{name}")
                    if info.type != pafs.FileType.NotFound:
                        pafs.copy_files(info.path, str(self.dir / name), source_filesystem=self.fs)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, metrics["step"])
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def sync(self) -> None:
        self.writer.flush()
        if not self.local_fs:
            import pyarrow.fs as pafs

            self.fs.create_dir(self.remote, recursive=True)
            pafs.copy_files(str(self.dir), self.remote, destination_filesystem=self.fs)

    def close(self) -> None:
        self.writer.close()
        self.sync()


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


def shard_plan(path: str) -> dict[str, Any]:
    """What workers need to read a shards folder themselves: its files, filesystem and row groups."""
    from chatmusician.data.pipeline import MANIFEST, output_filesystem, read_manifest
    from chatmusician.train.data_order import plan_chunks

    fs, root = output_filesystem(path)
    if not fs.get_file_info(f"{root}/{MANIFEST}").is_file:
        raise TrainConfigError(
            f"{path}: no {MANIFEST}; not a finished `chatmusician tokenize` output (re-run it, or fix data.shards)"
        )
    files = [f"{root}/{s['file']}" for s in read_manifest(path)["shards"]]
    chunks = plan_chunks(files, fs)
    return {"files": files, "filesystem": fs, "chunks": chunks, "rows": sum(c.rows for c in chunks)}


def val_shards_path(cfg: TrainConfig) -> str | None:
    """The validation shards: ``data.val_shards``, else ``<shards>/val`` when the data stage wrote it."""
    if cfg.data.val_shards:
        return cfg.data.val_shards
    if cfg.data.shards:
        from chatmusician.data.pipeline import MANIFEST, output_filesystem

        fs, root = output_filesystem(cfg.data.shards)
        if fs.get_file_info(f"{root}/val/{MANIFEST}").is_file:
            return f"{cfg.data.shards.rstrip('/')}/val"
    return None


def load_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """``{"train": ray.data.Dataset}`` of the live stream (shards are read by the workers themselves)."""
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
        resources_per_worker={
            "CPU": cpus,
            **({"GPU": 1} if profile.use_gpu else {}),
            **cfg.resources_per_worker,
        },
        accelerator_type=accelerator,
    )


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one train worker asks Ray for: CPUs, a GPU on GPU profiles, custom resources and the
    ``accelerator_type:<X>`` share that Ray Train adds for ``ScalingConfig(accelerator_type=X)``."""
    sc = scaling_config(cfg)
    need = dict(sc.resources_per_worker or {})
    if sc.accelerator_type:
        need[f"accelerator_type:{sc.accelerator_type}"] = 0.001
    return {k: v for k, v in need.items() if v}


def workers_that_fit(need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers needing ``need`` the nodes (their total resources) hold at most."""
    return sum(
        int(min((node.get(k, 0.0) + 1e-9) // v for k, v in need.items())) if need else 1 << 30
        for node in nodes
    )


def check_placement(cfg: TrainConfig) -> None:
    """Fail in a second with one clear line when no set of the cluster's nodes can ever hold the run's workers
    (an accelerator type no node has, too few such nodes): Ray would otherwise wait for them forever."""
    import ray

    need = worker_resources(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if workers_that_fit(need, nodes) >= cfg.num_workers:
        return
    have = sorted({k for n in nodes for k in n if k.startswith("accelerator_type:")}) or ["none"]
    raise TrainConfigError(
        f"{cfg.num_workers} worker(s) of profile {cfg.profile!r} need {need} each, but the cluster's "
        f"{len(nodes)} node(s) hold {workers_that_fit(need, nodes)} (accelerator types: {', '.join(have)}): "
        "add such nodes, or change profile / accelerator_type / num_workers"
    )


def trainer_for(
    cfg: TrainConfig, datasets: dict[str, Any] | None = None, storage_filesystem=None, callbacks=None
):
    """The ``TorchTrainer`` of run ``cfg.run_name`` (not started): what :func:`train` fits, and what a Tune
    trial builds for itself (``callbacks``: Ray Train user callbacks, e.g. Tune's report callback)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    validate(cfg)
    profile = get_profile(cfg.profile)
    import ray

    if ray.is_initialized():
        check_placement(cfg)  # before any worker is asked for: an impossible placement never hangs
    if cfg.eval_hook:
        resolve_hook(cfg.eval_hook)  # a bad path is a config error now, not a worker crash later
    loop_config: dict[str, Any] = {"cfg": cfg}
    if datasets is None and cfg.data.shards:
        plan = shard_plan(cfg.data.shards)
        loop_config["train_plan"] = plan
        total_steps = cfg.max_steps or total_steps_for(plan["rows"], cfg)
    else:
        if cfg.max_steps is None and datasets is None:
            raise TrainConfigError("the live data stream has no row count: set max_steps")
        datasets = datasets or load_datasets(cfg)
        total_steps = cfg.max_steps or total_steps_for(datasets["train"].count(), cfg)
    val_path = val_shards_path(cfg)
    if val_path:
        loop_config["val_plan"] = shard_plan(val_path)
    loop_config["total_steps"] = total_steps

    fs, root = storage_location(cfg, storage_filesystem)
    loop_config["storage"] = (fs, root)
    # The fault-test marker: on the storage when it is local, else beside the worker (testing only).
    run_dir = local_run_dir(cfg)
    loop_config["marker_dir"] = str(run_dir if run_dir else Path(tempfile.gettempdir()) / cfg.run_name)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the stream: deterministic row order, what makes skipping rows a resume
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend=profile.backend),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
            callbacks=callbacks,
        ),
        datasets=datasets or {},
        # No locality hints: the stream's split must not follow where blocks were produced.
        dataset_config=DataConfig(execution_options=ingest, enable_shard_locality=False),
    )


def train(cfg: TrainConfig, datasets: dict[str, Any] | None = None, storage_filesystem=None):
    """Launch (or resume) the run ``cfg.run_name`` under ``cfg.storage_path``; returns the ``ray.train.Result``.

    ``datasets`` overrides ``cfg.data`` with ready Ray Datasets (``{"train": ...}``, rows per the shard contract).
    ``storage_filesystem``: a pyarrow filesystem that ``storage_path`` is a path in (instead of a URI's).
    """
    return trainer_for(cfg, datasets, storage_filesystem).fit()


def run(cfg: TrainConfig):
    """CLI entry (``chatmusician pretrain | sft``): train and print where the last checkpoint is."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    result = train(cfg)
    print(
        json.dumps({"run": cfg.run_name, "checkpoint": result.checkpoint.path if result.checkpoint else None})
    )
    return result
