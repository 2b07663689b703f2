"""What a run trains and validates on, resolved on the driver before any worker starts: the shard plans
(files and row groups each worker reads itself), the validation split, or the live Ray Data stream."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from chatmusician.train.config import TrainConfig, TrainConfigError

_RUN_MODE = object()


def shard_plan(path: str, cfg: TrainConfig, where: str = "shards", mode: Any = _RUN_MODE) -> dict[str, Any]:
    """What workers need to read a shards folder themselves, from its manifest alone (files and row groups:
    no footer is read, so a launch or a Tune trial costs one small read however many files there are), after
    checking the shards fit this run (tokenizer, vocabulary, mode, ``max_len`` <= ``max_length``: one line
    naming both sides), plus a fingerprint of its rows (what a checkpoint's data position counts in). ``mode``:
    the mode the shards must have (default: the run's ``MODE``; None: any)."""
    from chatmusician.data.manifest import ShardMismatch, ShardsNotFinished, checked_plan

    try:
        plan = checked_plan(
            path,
            model=cfg.model,
            max_length=cfg.max_length,
            mode=getattr(cfg, "MODE", None) if mode is _RUN_MODE else mode,
        )
    except ShardsNotFinished:
        raise TrainConfigError(
            f"{path}: no manifest.json; not a finished `chatmusician tokenize` output (re-run it, or fix data.shards)"
        ) from None
    except ShardMismatch as err:
        raise TrainConfigError(f"{where}: {err}") from None
    manifest = plan["manifest"]
    return plan | {
        "fingerprint": _digest({"shards": manifest["shards"], "sequences": manifest.get("sequences")})
    }


def val_shards_path(cfg: TrainConfig) -> str | None:
    """The validation shards: ``data.val_shards``, else ``<shards>/val`` when the data stage wrote it."""
    from chatmusician.data.manifest import val_path

    if cfg.data.val_shards:
        return cfg.data.val_shards
    return val_path(cfg.data.shards) if cfg.data.shards else None


def stream_dataset(cfg: TrainConfig):
    """The live stream's ``ray.data.Dataset`` (tokenized while training reads it)."""
    if cfg.data.stream is None:
        raise TrainConfigError(
            "set data.shards (a folder of tokenized shards) or data.stream (a TokenizeConfig)"
        )
    from chatmusician.data.pipeline import build_dataset

    return build_dataset(cfg.data.stream)


def stream_fingerprint(cfg: TrainConfig) -> str:
    return _digest(dataclasses.asdict(cfg.data.stream))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
