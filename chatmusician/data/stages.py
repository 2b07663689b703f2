"""The tasks of the tokenize stage (Ray Data runs them; pipeline.py builds the datasets): read a work item once,
split its rows into train / val by a hash of the row id, tokenize + pack each split in batches, and either
stream the rows (training from the live stream) or stage them as parquet for the merge step (data/shards.py),
handing the driver only counts and file names. Plain functions over Arrow tables: tests call them directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from chatmusician.data import sources
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.manifest import join
from chatmusician.data.shards import ShardWriter, Slice, merge_files, staged_name
from chatmusician.data.stats import split_stats_rows
from chatmusician.data.tokenize import BackendTokenizer, process_batch

SPLITS = ("train", "val")


def _read(items: pa.Table, cfg: TokenizeConfig, class_weights: tuple[float, float]):
    for item in items.to_pylist():
        item.pop("index", None)
        yield from sources.read_item_tables(item, cfg, class_weights)


class Rebatcher:
    """Re-cuts a stream of tables into tables of ``size`` rows (the last may be shorter); slices, no copies."""

    def __init__(self, size: int):
        self.size, self.pending, self.rows = size, [], 0

    def add(self, table: pa.Table) -> Iterator[pa.Table]:
        self.pending.append(table)
        self.rows += table.num_rows
        while self.rows >= self.size:
            joined = pa.concat_tables(self.pending)
            yield joined.slice(0, self.size)
            self.pending, self.rows = [joined.slice(self.size)], self.rows - self.size

    def flush(self) -> Iterator[pa.Table]:
        if self.rows:
            yield pa.concat_tables(self.pending)
        self.pending, self.rows = [], 0


def _batches(tables: Iterable[pa.Table], batch_size: int) -> Iterator[pa.Table]:
    batcher = Rebatcher(batch_size)
    for table in tables:
        yield from batcher.add(table)
    yield from batcher.flush()


_TOKENIZERS: dict[str, BackendTokenizer] = {}  # per worker process: loaded by its first task, reused after


def _tokenizer(spec: dict[str, Any], cpus: float) -> BackendTokenizer:
    key = hashlib.sha256(pickle.dumps(sorted(spec.items()))).hexdigest()
    if key not in _TOKENIZERS:
        # Rust threads = the CPUs a task holds (tasks side by side must not each spawn one per core).
        threads = max(1, int(cpus))
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = BackendTokenizer.from_spec(spec, threads)
    return _TOKENIZERS[key]


def is_val_row(row_ids, fraction: float, seed: int):
    """Per row id: held out for validation? A hash of the id (salted apart from the mixture draws), so the
    split is deterministic, never depends on where or in which order rows were read, and a row and all its
    repeats land on the same side."""
    import numpy as np

    return np.fromiter((sources.uniform(f"val:{r}", seed) < fraction for r in row_ids), bool, len(row_ids))


def split_table(table: pa.Table, cfg: TokenizeConfig) -> dict[str, pa.Table]:
    """One read table's rows of each split (every row is training's when there is no validation fraction)."""
    if cfg.val_fraction <= 0:
        return {"train": table, "val": table.slice(0, 0)}
    val = pa.array(is_val_row(table["row_id"].to_pylist(), cfg.val_fraction, cfg.seed))
    return {"train": table.filter(pc.invert(val)), "val": table.filter(val)}


def _split_rows(tables, cfg: TokenizeConfig, split: str | None):
    """Keep the rows of one split (all rows when there is no validation fraction)."""
    for table in tables:
        yield table if split is None or cfg.val_fraction <= 0 else split_table(table, cfg)[split]


def split_batches(
    tables: Iterable[pa.Table], cfg: TokenizeConfig, splits: tuple[str, ...]
) -> Iterator[tuple[str, pa.Table]]:
    """(split, batch of ``cfg.batch_size`` rows) from one read of a work item: each split is batched on its
    own, exactly as a stream of that split alone would be (so the shards equal :func:`build_dataset`'s rows)."""
    batchers = {s: Rebatcher(cfg.batch_size) for s in splits}
    for table in tables:
        parts = split_table(table, cfg)
        for s in splits:
            yield from ((s, b) for b in batchers[s].add(parts[s]))
    for s in splits:
        yield from ((s, b) for b in batchers[s].flush())


def _stream_items(
    items: pa.Table,
    cfg: TokenizeConfig,
    with_stats: bool,
    class_weights: tuple[float, float],
    tokenizer_spec: dict[str, Any],
    split: str,
):
    """Task: read work items, then tokenize + pack one split's rows batch by batch. Reading here rather than in
    separate read tasks saves a Ray Data stage (the text never crosses the object store); tasks rather than an
    actor pool run in Ray's already started workers, where an actor pool starts new processes every run."""
    tokenizer = _tokenizer(tokenizer_spec, cfg.tokenizer_cpus)
    for item in items.to_pylist():
        item.pop("index")
        tables = sources.read_item_tables(item, cfg, class_weights)
        for _, batch in split_batches(tables, cfg, (split,)):
            yield process_batch(batch, tokenizer, cfg, with_stats)


def _meta(split: str, stats: str = "", staged: str = "", retries: int = 0) -> pa.Table:
    return pa.table({"split": [split], "stats": [stats], "staged": [staged], "retries": [retries]})


def _stage_items(
    items: pa.Table,
    cfg: TokenizeConfig,
    class_weights: tuple[float, float],
    tokenizer_spec: dict[str, Any],
    staging: str | None,
):
    """Task: read each work item once, tokenize + pack both splits, and (``staging`` set) stream each split's
    rows into ``<staging>/<split>/item-IIIII.parquet``. Yields only meta rows: a ``stats`` row per batch and a
    ``staged`` row per item and split (its file and row groups), never token ids."""
    tokenizer = _tokenizer(tokenizer_spec, cfg.tokenizer_cpus)
    splits = SPLITS if cfg.val_fraction > 0 else ("train",)
    for item in items.to_pylist():
        index = item.pop("index")
        retries = sources.RetryCount()
        tables = sources.read_item_tables(item, cfg, class_weights, retries)
        writers = {}
        if staging is not None:
            writers = {
                s: ShardWriter(join(staging, s), 2**62, name=lambda _, i=index: staged_name(i))
                for s in splits
            }
        for split, batch in split_batches(tables, cfg, splits):
            rows, stats = split_stats_rows(process_batch(batch, tokenizer, cfg, with_stats=True))
            for part in rows:
                if writers:
                    writers[split].add(part)
            yield _meta(split, stats=json.dumps(stats[0]))
        yield _meta("train", retries=retries.count)
        for split, writer in writers.items():
            for entry in writer.close():
                entry["file"] = join(writer.root, entry["file"])  # the path inside the output's filesystem
                yield _meta(split, staged=json.dumps({"item": index, **entry}))


def _merge(plans: pa.Table, shard_rows: int):
    """Task: write the merged shards of ``plans`` (one per row: index, output folder, slices)."""
    for plan in plans.to_pylist():
        slices = [Slice(*s) for s in json.loads(plan["slices"])]
        entry = merge_files(plan["index"], slices, plan["output_dir"], shard_rows)
        yield pa.table({"split": [plan["split"]], "shard": [json.dumps(entry)]})


def _ordered(ds, cfg: TokenizeConfig):
    ds.context.execution_options.preserve_order = True  # deterministic rows, byte-identical shards
    # One stage does all the work: Ray Data's default reservation keeps half of the CPUs for other operators,
    # which left one of two tokenize tasks idle on a 2-CPU node (measured: 7.3 s -> 5.6 s on 24 M chars).
    ds.context.op_resource_reservation_enabled = False
    ds.context.enable_progress_bars = cfg.progress
    return ds
