"""Checkpoints for exact resume plus a loadable export, written by every worker into one Ray Train checkpoint.

Layout of one checkpoint (Ray merges the workers' folders into ``<storage>/<run>/checkpoint_<step>/``)::

    deepspeed/state/...        DeepSpeed's sharded model + optimizer + scheduler state (every rank its shard)
    deepspeed/latest           tag file DeepSpeed writes
    train_state.json           step, data position (micro batches consumed per worker), fp16 steps skipped
    adapter/                   rank 0: PEFT adapter in safetensors (train_type lora) - PeftModel.from_pretrained
    model/                     rank 0: full HF model in safetensors (train_type full)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

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


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def save(engine, out_dir: str | Path, state: TrainState, train_type: str, rank: int) -> None:
    """Write this worker's part of a checkpoint into ``out_dir`` (every rank must call it: it is collective)."""
    out_dir = Path(out_dir)
    engine.save_checkpoint(str(out_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state=asdict(state))
    # ZeRO-3 partitions the weights: gather a full state dict (collective) before rank 0 exports.
    full_state = (
        engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
    )
    if rank == 0:
        export_dir = out_dir / ("adapter" if train_type == "lora" else "model")
        engine.module.save_pretrained(export_dir, state_dict=full_state, safe_serialization=True)
        (out_dir / TRAIN_STATE).write_text(json.dumps(asdict(state)))


def load(engine, ckpt_dir: str | Path) -> TrainState:
    """Restore model, optimizer and scheduler state into ``engine``; return the step and data position."""
    load_path, client_state = engine.load_checkpoint(str(Path(ckpt_dir) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    if load_path is None:
        raise RuntimeError(f"no DeepSpeed state found in {ckpt_dir}")
    return TrainState(
        step=int(client_state["step"]),
        micro_batches=int(client_state["micro_batches"]),
        skipped_steps=int(client_state.get("skipped_steps", 0)),
    )


def read_train_state(ckpt_dir: str | Path) -> TrainState:
    """The step and data position recorded in a checkpoint folder (no DeepSpeed needed)."""
    return TrainState(**json.loads((Path(ckpt_dir) / TRAIN_STATE).read_text()))


def fail_once(marker: str | Path) -> None:
    """Testing hook: kill this process the first time it gets here in a run (a marker file makes it once)."""
    marker = Path(marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("failed here once\n")
    os._exit(1)
