"""Checkpoints for exact resume plus a loadable export, written by every worker into one Ray Train checkpoint.

Layout of one checkpoint (Ray merges the workers' folders into ``<storage>/<run>/checkpoint_<step>/``)::

    deepspeed/state/...        DeepSpeed's sharded state of what trains: trainable weights, optimizer, scheduler
    deepspeed/latest           tag file DeepSpeed writes
    train_state.json           step, data position, and the run shape resume must match (world, batches, plan)
    adapter/                   rank 0: PEFT adapter in safetensors (train_type lora) - PeftModel.from_pretrained
    model/                     rank 0: full HF model in safetensors (train_type full)

A LoRA checkpoint never holds the frozen base (DeepSpeed's ``exclude_frozen_parameters``): at 7B the base is
13.5 GB per checkpoint (twice under ZeRO-2 on GPU: module state + frozen fragments), the trainable part a few
hundred MB. Resume loads the base from ``cfg.model`` again, then the trainable state on top.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
TRAIN_STATE = "train_state.json"


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    micro_batches: int = 0
    """Micro batches each worker has consumed (the data position: resume skips this many)."""
    skipped_steps: int = 0
    """fp16: optimizer steps DeepSpeed skipped on a gradient overflow (they do not count as steps)."""
    world_size: int | None = None
    """Workers of the run that wrote it: the data position and ZeRO shards are per rank."""
    micro_batch_size: int | None = None
    gradient_accumulation: int | None = None
    total_steps: int | None = None
    """Length of the schedule the learning rate follows."""
    data_plan: str | None = None
    """Fingerprint of the training rows (the shards' manifest, or the stream's config): what the position counts in."""


RUN_SHAPE = ("world_size", "micro_batch_size", "gradient_accumulation", "total_steps", "data_plan")


class ResumeMismatchError(ValueError):
    """The run's shape differs from the checkpoint it would resume: resuming would not continue that run."""


def check_resumable(saved: TrainState, current: TrainState, where: str) -> None:
    """One line naming every field of the run's shape that differs from the checkpoint's (fields a checkpoint
    written before they were recorded leaves unset are not compared)."""
    diffs = [
        f"{name} {getattr(saved, name)} -> {getattr(current, name)}"
        for name in RUN_SHAPE
        if getattr(saved, name) is not None and getattr(saved, name) != getattr(current, name)
    ]
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume {where}: the run changed ({'; '.join(diffs)}); resuming would not continue it exactly "
            "(ZeRO shards and the data position are per rank, the schedule per total steps): restore the old "
            "settings, or start a new run_name"
        )


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def save(engine, out_dir: str | Path, state: TrainState, train_type: str, rank: int) -> None:
    """Write this worker's part of a checkpoint into ``out_dir`` (every rank must call it: it is collective)."""
    out_dir = Path(out_dir)
    lora = train_type == "lora"
    engine.save_checkpoint(
        str(out_dir / DEEPSPEED_DIR),
        tag=DEEPSPEED_TAG,
        client_state=asdict(state),
        exclude_frozen_parameters=lora,
    )
    # ZeRO-3 partitions the weights: gather (layer by layer, collective) only what is exported; for LoRA that is
    # the trainable part, never the 7B base.
    full_state = (
        engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
        if engine.zero_optimization_stage() == 3
        else None
    )
    if rank == 0:
        export_dir = out_dir / ("adapter" if lora else "model")
        engine.module.save_pretrained(export_dir, state_dict=full_state, safe_serialization=True)
        (out_dir / TRAIN_STATE).write_text(json.dumps(asdict(state)))


def load(engine, ckpt_dir: str | Path) -> TrainState:
    """Restore the trained weights, optimizer and scheduler state into ``engine`` (built on the base model, so
    a LoRA checkpoint's missing frozen weights are already in place); return the step and data position."""
    load_path, client_state = engine.load_checkpoint(
        str(Path(ckpt_dir) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False
    )
    if load_path is None:
        raise RuntimeError(f"no DeepSpeed state found in {ckpt_dir}")
    return state_from(client_state)


def state_from(values: dict[str, Any]) -> TrainState:
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in values.items() if k in known})


def read_train_state(ckpt_dir: str | Path) -> TrainState:
    """The step and data position recorded in a checkpoint folder (no DeepSpeed needed)."""
    return state_from(json.loads((Path(ckpt_dir) / TRAIN_STATE).read_text()))


def latest_train_state(fs, run_root: str) -> tuple[str, TrainState] | None:
    """(folder, state) of the newest checkpoint under a run's storage folder, or None (a new run)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_root, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    for name in reversed([n for n in names if n.startswith("checkpoint_")]):
        path = f"{run_root}/{name}/{TRAIN_STATE}"
        if fs.get_file_info(path).is_file:
            with fs.open_input_stream(path) as f:
                return name, state_from(json.loads(f.read()))
    return None


# ---------------------------------------------------------------- where a run's storage is


def local_run_dir(cfg) -> Path | None:
    """``<storage>/<run>`` when storage is a local (or NFS-mounted) folder; None for URIs such as s3://."""
    if "://" in cfg.storage_path and not cfg.storage_path.startswith("file://"):
        return None
    return Path(cfg.storage_path.removeprefix("file://")).expanduser().absolute() / cfg.run_name


def storage_location(cfg, filesystem=None) -> tuple[Any, str]:
    """(pyarrow filesystem, root path) of ``cfg.storage_path``: a local folder or ``file://`` path (made
    absolute), a URI such as ``s3://bucket/prefix`` (its filesystem), or, with ``filesystem`` given, a path
    inside that filesystem (how tests stand in for s3 with a local one). The data stage's one resolver."""
    from chatmusician.data.manifest import resolve

    return resolve(cfg.storage_path, filesystem)


def fail_once(marker: str | Path) -> None:
    """Testing hook: kill this process the first time it gets here in a run (a marker file makes it once)."""
    marker = Path(marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("failed here once\n")
    os._exit(1)
