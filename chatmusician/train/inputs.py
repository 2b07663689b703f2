"""What a run trains and validates on, resolved on the driver before any worker starts: the shard plans
(files and row groups each worker reads itself), the validation split, or the live Ray Data stream."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from chatmusician.train.config import TrainConfig, TrainConfigError


def shard_plan(path: str) -> dict[str, Any]:
    """What workers need to read a shards folder themselves: its files, filesystem and row groups, plus a
    fingerprint of its rows (what a checkpoint's data position counts in)."""
    from chatmusician.data.pipeline import MANIFEST, output_filesystem, read_manifest
    from chatmusician.train.data_order import plan_chunks

    fs, root = output_filesystem(path)
    if not fs.get_file_info(f"{root}/{MANIFEST}").is_file:
        raise TrainConfigError(
            f"{path}: no {MANIFEST}; not a finished `chatmusician tokenize` output (re-run it, or fix data.shards)"
        )
    manifest = read_manifest(path)
    files = [f"{root}/{s['file']}" for s in manifest["shards"]]
    chunks = plan_chunks(files, fs)
    return {
        "files": files,
        "filesystem": fs,
        "chunks": chunks,
        "rows": sum(c.rows for c in chunks),
        "manifest": manifest,
        "fingerprint": _digest({"shards": manifest["shards"], "sequences": manifest.get("sequences")}),
    }


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
