"""The Ray Data tokenization stage: read + tokenize + pack (one stage of tasks) -> training rows, streamed.

    plan (work items: parquet row groups / files, sources interleaved)
      -> one stage of tasks (tokenizer loaded once per worker process), per work item:
         read (sources.read_item_tables: rows, bad ones become reasons, mixture repeats)
         -> tokenize + pack in batches (tokenize.process_batch, columnar)
      -> build_dataset: the stream, for training directly
      -> write_shards: each task writes its work items' rows as parquet shards straight to the (shared)
         output storage, named by the item (part-IIIII-KKKK.parquet: item I's K-th shard); only counts and
         shard names reach the driver, which writes manifest.json

Everything streams (bounded blocks in flight), and with ``preserve_order`` the same input and config give the
same rows in the same order; a work item's rows never depend on which task or node packed them, so the shards
are byte-identical and a training run can resume at a row. The driver moves no token ids: on a cluster the
writing scales with the tasks (a driver writing every shard capped it at one core's ~360 MB/s of ids).
Re-running into the same output_dir rewrites the same shard names and deletes stale ones: never duplicates.
On more than one node ``output_dir`` must be storage every node reaches at the same path (NFS) or a URI (s3://).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chatmusician.config import to_dict
from chatmusician.data import sources
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.tokenize import SFT_RESERVED, BackendTokenizer, empty_stats, process_batch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "chatmusician.tokenized/1"
_SHARD = re.compile(
    r"^part-\d{5}(-\d{4})?\.parquet$"
)  # this layout's names and the earlier driver-written ones
READ_SCHEMA = sources.READ_SCHEMA


# --- Ray stages (thin: the logic is in sources.py / tokenize.py / packing.py) ---------------------------------


def _read(items: pa.Table, cfg: TokenizeConfig, class_weights: tuple[float, float]):
    for item in items.to_pylist():
        yield from sources.read_item_tables(item, cfg, class_weights)


def _batches(tables, batch_size: int):
    """Re-cut a stream of tables into tables of ``batch_size`` rows (the last may be shorter); slices, no copies."""
    pending, rows = [], 0
    for table in tables:
        pending.append(table)
        rows += table.num_rows
        while rows >= batch_size:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, batch_size)
            pending, rows = [joined.slice(batch_size)], rows - batch_size
    if rows:
        yield pa.concat_tables(pending)


_TOKENIZERS: dict[str, BackendTokenizer] = {}  # per worker process: loaded by its first task, reused after


def _tokenizer(tokenizer_json: str, eos_token_id: int, cpus: float) -> BackendTokenizer:
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        # Rust threads = the CPUs a task holds (tasks side by side must not each spawn one per core).
        threads = max(1, int(cpus))
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = BackendTokenizer.from_str(tokenizer_json, eos_token_id)
    return _TOKENIZERS[key]


def is_val_row(row_ids, fraction: float, seed: int):
    """Per row id: held out for validation? A hash of the id (salted apart from the mixture draws), so the
    split is deterministic, never depends on where or in which order rows were read, and a row and all its
    repeats land on the same side."""
    import numpy as np

    return np.fromiter((sources.uniform(f"val:{r}", seed) < fraction for r in row_ids), bool, len(row_ids))


def _split_rows(tables, cfg: TokenizeConfig, split: str | None):
    """Keep the rows of one split (all rows when there is no validation fraction)."""
    for table in tables:
        if split is None or cfg.val_fraction <= 0:
            yield table
            continue
        val = is_val_row(table["row_id"].to_pylist(), cfg.val_fraction, cfg.seed)
        yield table.filter(pa.array(val if split == "val" else ~val))


def _tokenize_items(
    items: pa.Table,
    cfg: TokenizeConfig,
    with_stats: bool,
    class_weights: tuple[float, float],
    tokenizer_json: str,
    eos_token_id: int,
    split: str | None = None,
    write_to: str | None = None,
):
    """Task: read work items, then tokenize + pack them batch by batch. Reading here rather than in separate
    read tasks saves a Ray Data stage (the text never crosses the object store); tasks rather than an actor
    pool run in Ray's already started workers, where an actor pool starts new processes on every run (seconds).

    ``write_to``: the task writes each item's rows itself, as shards ``part-<item>-<k>.parquet`` in that
    folder, and yields only the stats rows plus one row per item naming its shards (``shards`` column)."""
    tokenizer = _tokenizer(tokenizer_json, eos_token_id, cfg.tokenizer_cpus)
    for item in items.to_pylist():
        index = item.pop("index")
        tables = _split_rows(sources.read_item_tables(item, cfg, class_weights), cfg, split)
        if write_to is None:
            for batch in _batches(tables, cfg.batch_size):
                yield process_batch(batch, tokenizer, cfg, with_stats)
            continue
        writer = ShardWriter(write_to, cfg.shard_rows, prefix=f"part-{index:05d}")
        for batch in _batches(tables, cfg.batch_size):
            rows, stats = split_stats_rows(process_batch(batch, tokenizer, cfg, with_stats=True))
            for part in rows:
                writer.add(part)
            yield pa.table({"stats": [json.dumps(s) for s in stats], "shards": [""] * len(stats)})
        yield pa.table({"stats": [""], "shards": [json.dumps(writer.close())]})


def _ordered(ds, cfg: TokenizeConfig):
    ds.context.execution_options.preserve_order = True  # deterministic rows, byte-identical shards
    # One stage does all the work: Ray Data's default reservation keeps half of the CPUs for other operators,
    # which left one of two tokenize tasks idle on a 2-CPU node (measured: 7.3 s -> 5.6 s on 24 M chars).
    ds.context.op_resource_reservation_enabled = False
    ds.context.enable_progress_bars = cfg.progress
    return ds


def _read_dataset(cfg: TokenizeConfig, class_weights: tuple[float, float] = (1.0, 1.0)):
    import ray

    items = sources.item_dicts(sources.plan(cfg))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cfg.read_cpus,
        fn_kwargs={"cfg": cfg, "class_weights": class_weights},
    )
    return _ordered(ds, cfg)


def class_weights(cfg: TokenizeConfig) -> tuple[float, float]:
    """(verbal, score) weights that reach ``cfg.verbal_score_ratio``: one extra read pass counts the classes."""
    if not cfg.verbal_score_ratio:
        return 1.0, 1.0
    if len(cfg.verbal_score_ratio) != 2:
        raise ValueError(
            f"verbal_score_ratio needs two numbers (verbal, score), got {cfg.verbal_score_ratio}"
        )
    counts = [0, 0]
    for batch in (
        _read_dataset(cfg).select_columns(["repeats", "is_score"]).iter_batches(batch_format="pyarrow")
    ):
        for score in (False, True):
            chosen = batch.filter(pc.equal(batch["is_score"], score))
            counts[int(score)] += pc.sum(chosen["repeats"]).as_py() or 0
    return sources.ratio_multipliers(counts[0], counts[1], tuple(cfg.verbal_score_ratio))


def build_dataset(
    cfg: TokenizeConfig,
    *,
    with_stats: bool = False,
    weights: tuple[float, float] | None = None,
    tokenizer: Any = None,
    split: str = "train",
    write_to: str | None = None,
):
    """The streaming ``ray.data.Dataset`` of training rows (``split="val"``: the held-out validation rows of
    ``cfg.val_fraction``; "train" leaves them out): ``input_ids``, ``labels`` (list<int32>, -100 = no
    loss) and, when packed, ``position_ids``. Lazy: nothing runs until it is consumed.

    ``with_stats=True`` adds a ``stats`` column: "" on training rows, and on one extra row per batch (empty
    ids) a JSON object with that batch's counts (see tokenize.process_batch); :func:`write_shards` uses it
    for the manifest. Filter those rows out before training (``stats == ""``). ``tokenizer``: the already
    loaded tokenizer of ``cfg.tokenizer``, if the caller has one (saves loading it again).

    One stage: tasks read, tokenize and pack work items (parquet row groups, files), at most
    ``pool_size(cfg)`` at a time, several items each (see :func:`items_per_task`); a batch never spans two
    items.

    ``write_to``: a folder (shared storage on a cluster) where the tasks write the shards themselves (see
    :func:`write_shards`); the dataset then holds only ``stats`` and ``shards`` rows (JSON strings)."""
    import ray

    from chatmusician.model.loading import load_tokenizer

    _check(cfg)
    weights = weights if weights is not None else class_weights(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    items = [{**item, "index": k} for k, item in enumerate(sources.item_dicts(sources.plan(cfg)))]
    pool = pool_size(cfg)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _tokenize_items,
        batch_size=items_per_task(len(items), pool),
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(
            size=tasks_in_flight(pool, cfg.tokenizer_cpus, ray.cluster_resources().get("CPU", 0))
        ),
        num_cpus=cfg.tokenizer_cpus,
        fn_kwargs={
            "cfg": cfg,
            "with_stats": with_stats,
            "class_weights": weights,
            "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
            "eos_token_id": tokenizer.eos_token_id,
            "split": split,
            "write_to": write_to,
        },
    )
    return _ordered(ds, cfg)


def items_per_task(num_items: int, pool: int, tasks_per_slot: int = 4, most: int = 16) -> int:
    """Work items per tokenize task: several, to spread each task's fixed costs (scheduling, a new output
    stream), but at least ``tasks_per_slot`` tasks per concurrent slot, which keeps the last ones balanced."""
    return max(1, min(most, num_items // (tasks_per_slot * pool)))


def tasks_in_flight(pool: int, task_cpus: float, cluster_cpus: float) -> int:
    """Tokenize tasks submitted at once. When the pool takes every CPU, twice the pool: the extra tasks wait in
    Ray's queue (no CPU is free for them) and start the moment a worker finishes, where Ray Data would notice
    the finish and submit the next task up to 0.1 s later (6 M chars on 2 CPUs: 2.0 -> 1.6 s, median of 5).
    With CPUs to spare, exactly the pool: queued tasks would start beside it."""
    return 2 * pool if (pool + 1) * task_cpus > cluster_cpus else pool


def pool_size(cfg: TokenizeConfig) -> int:
    """Tokenize tasks (they also read) run at once: as many as the cluster's CPUs hold, or
    ``cfg.num_tokenizers``; more than the cluster holds would never start, so that is a clear error."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_tokenizers is None:
        return max(1, int(cpus // cfg.tokenizer_cpus))
    need = cfg.num_tokenizers * cfg.tokenizer_cpus
    if need > cpus:
        raise ValueError(
            f"num_tokenizers={cfg.num_tokenizers} x tokenizer_cpus={cfg.tokenizer_cpus} = {need} CPUs, "
            f"but the cluster has {cpus}: lower them (or leave num_tokenizers unset)"
        )
    return cfg.num_tokenizers


def _check(cfg: TokenizeConfig) -> None:
    if cfg.max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {cfg.max_len}")
    if cfg.mode == "sft" and not 0 < cfg.max_source_len <= cfg.max_len - SFT_RESERVED:
        raise ValueError(
            f"max_source_len {cfg.max_source_len} does not fit max_len {cfg.max_len}: pass --max_source_len "
            f"between 1 and {cfg.max_len - SFT_RESERVED} (max_len - 3; the original: 1536 of 2048)"
        )
    if min(cfg.shard_rows, cfg.batch_size, cfg.read_rows, cfg.num_tokenizers or 1) < 1:
        raise ValueError("shard_rows, batch_size, read_rows and num_tokenizers must be positive")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")


# --- output ---------------------------------------------------------------------------------------------------


def output_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def tokenizer_fingerprint(name_or_path: str, tokenizer: Any = None) -> dict[str, Any]:
    """Name plus a SHA-256 of the serialized fast tokenizer (vocabulary, merges, normalizer, special tokens);
    ``tokenizer``: that tokenizer already loaded, if the caller has it."""
    from chatmusician.model.loading import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    blob = tok.backend_tokenizer.to_str().encode()
    return {
        "name": name_or_path,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


class ShardWriter:
    """Writes rows in order into ``part-NNNNN.parquet`` shards of exactly ``shard_rows`` rows (the last may be
    shorter), streamed as row groups of ``row_group_rows`` rows: only the last row group is left to write when
    the stream ends, and the driver holds at most one row group. A shard is written under a temporary name
    and renamed when complete. Row groups are cut by row count, never by how the stream arrived in blocks, so
    the same rows give byte-identical files.

    ``prefix``: a tokenize task's writer of one work item: shards ``<prefix>-KKKK.parquet``; it touches no other
    file (the driver prepared the folder and cleans it up at the end)."""

    def __init__(
        self, output_dir: str, shard_rows: int, row_group_rows: int = 256, prefix: str | None = None
    ):
        self.fs, self.root = output_filesystem(output_dir)
        self.prefix = prefix
        self.shard_rows = shard_rows
        self.row_group_rows = min(row_group_rows, shard_rows)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[dict[str, Any]] = []
        self._open: pq.ParquetWriter | None = None  # the shard being written
        self._open_rows = self._open_tokens = 0
        if prefix is None:
            self.prepare()
        else:  # a task's: the folder may be new to this node (shared storage: the driver made it already)
            self.fs.create_dir(self.root, recursive=True)

    def prepare(self) -> None:
        """Create the folder; no manifest while a run is in progress: a crashed run never looks complete."""
        self.fs.create_dir(self.root, recursive=True)
        self._delete([MANIFEST])

    @classmethod
    def manifest_only(cls, output_dir: str) -> ShardWriter:
        """A writer that only writes the manifest of shards already written (no deletions)."""
        writer = cls.__new__(cls)
        writer.fs, writer.root = output_filesystem(output_dir)
        return writer

    def _delete(self, names):
        for name in names:
            if self.fs.get_file_info(f"{self.root}/{name}").is_file:
                self.fs.delete_file(f"{self.root}/{name}")

    def _listing(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return [i.base_name for i in infos if i.is_file]

    def _name(self) -> str:
        if self.prefix is not None:
            return f"{self.prefix}-{len(self.shards):04d}.parquet"
        return f"part-{len(self.shards):05d}.parquet"

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self._next_cut():
            self._write_group(self._next_cut())

    def _next_cut(self) -> int:
        """Rows of the next row group: a full one, or what the current shard still lacks."""
        return min(self.row_group_rows, self.shard_rows - self._open_rows)

    def _write_group(self, n_rows: int) -> None:
        table = pa.concat_tables(self.pending)
        group, rest = table.slice(0, n_rows), table.slice(n_rows)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._open is None:
            # No dictionary encoding: token ids barely gain from it, and writing and reading are 2-3x faster without.
            self._open = pq.ParquetWriter(
                f"{self.root}/.{self._name()}.tmp",
                group.schema,
                filesystem=self.fs,
                compression="zstd",
                use_dictionary=False,
            )
        self._open.write_table(group.combine_chunks(), row_group_size=max(n_rows, 1))
        self._open_rows += group.num_rows
        self._open_tokens += _token_count(group)
        if self._open_rows == self.shard_rows:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._open.close()
        name = self._name()
        self.fs.move(f"{self.root}/.{name}.tmp", f"{self.root}/{name}")
        self.shards.append({"file": name, "rows": self._open_rows, "tokens": self._open_tokens})
        self._open, self._open_rows, self._open_tokens = None, 0, 0

    def close(self) -> list[dict[str, Any]]:
        if self.pending_rows:
            self._write_group(self.pending_rows)
        if self._open is not None:
            self._finish_shard()
        if self.prefix is None:
            self.remove_stale({s["file"] for s in self.shards})
        return self.shards

    def remove_stale(self, written: set[str]) -> None:
        """Delete shards not in ``written`` and unfinished temp files: what an earlier, longer or crashed run
        left behind (never duplicates)."""
        self._delete(
            [
                n
                for n in self._listing()
                if (_SHARD.match(n) and n not in written) or n.endswith(".parquet.tmp")
            ]
        )

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = f"{self.root}/.{MANIFEST}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        self.fs.move(tmp, f"{self.root}/{MANIFEST}")


def _token_count(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)


class PaddingMeter:
    """Streaming padding fraction of consecutive rows batched ``batch_size`` at a time: padded to the batch's
    longest row, and padded to ``max_len``."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.tokens = self.padded_longest = self.rows = 0
        self.open: list[int] = []

    def add(self, lengths) -> None:
        for n in lengths:
            self.open.append(n)
            if len(self.open) == self.batch_size:
                self._close()

    def _close(self):
        if self.open:
            self.tokens += sum(self.open)
            self.rows += len(self.open)
            self.padded_longest += len(self.open) * max(self.open)
            self.open = []

    def result(self) -> dict[str, float]:
        self._close()
        return {
            f"pad_to_longest_batch_{self.batch_size}": self._fraction(self.padded_longest),
            "pad_to_max_len": self._fraction(self.rows * self.max_len),
        }

    def _fraction(self, padded: int) -> float:
        return round(1 - self.tokens / padded, 6) if padded else 0.0


def split_stats_rows(block: pa.Table) -> tuple[list[pa.Table], list[dict[str, Any]]]:
    """A block of ``build_dataset(with_stats=True)`` -> (its training rows as zero-copy slices, in order, without
    the ``stats`` column; the parsed stats rows). A block may end with rows whose stats row is in the next one."""
    is_stats = pc.not_equal(block["stats"], "").to_numpy(zero_copy_only=False)
    rows, parts, stats, start = block.drop_columns(["stats"]), [], [], 0
    for end in [*is_stats.nonzero()[0].tolist(), block.num_rows]:
        if end > start:
            parts.append(rows.slice(start, end - start))
        if end < block.num_rows:
            stats.append(json.loads(block["stats"][end].as_py()))
        start = end + 1
    return parts, stats


VAL_DIR = "val"


def write_shards(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run the pipeline; write shards + ``manifest.json`` into ``cfg.output_dir`` (None: count only) and
    return the manifest: tokenizer name and hash, mode, lengths, rows read / written / rejected by reason (with
    sample row ids), token counts, padding fraction, shard list. With ``val_fraction`` the held-out rows go to
    ``output_dir/val`` (shards + a manifest of their own, from a second pass that tokenizes only them), where
    training finds them; the manifest's ``val`` entry describes them."""
    from chatmusician.model.loading import load_tokenizer

    _check(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    weights = class_weights(cfg)
    manifest = _write_split(cfg, "train", tokenizer, weights, cfg.output_dir)
    val_dir = f"{cfg.output_dir.rstrip('/')}/{VAL_DIR}" if cfg.output_dir else None
    if cfg.val_fraction > 0:
        val = _write_split(cfg, "val", tokenizer, weights, val_dir)
        manifest["val"] = {"path": VAL_DIR, "fraction": cfg.val_fraction}
        manifest["val"] |= {k: val[k] for k in ("rows", "sequences", "tokens")}
    elif val_dir:  # the validation split of an earlier run must not pass for this one's
        fs, root = output_filesystem(val_dir)
        if fs.get_file_info(f"{root}/{MANIFEST}").is_file:
            fs.delete_dir(root)
    if cfg.output_dir:
        ShardWriter.manifest_only(cfg.output_dir).write_manifest(manifest)
    return manifest


def _write_split(
    cfg: TokenizeConfig, split: str, tokenizer, weights, output_dir: str | None
) -> dict[str, Any]:
    """One pass of the pipeline over one split's rows: its shards (and, for val, its manifest)."""
    folder = ShardWriter(output_dir, cfg.shard_rows) if output_dir else None  # prepared: no manifest in it
    ds = build_dataset(
        cfg, with_stats=True, weights=weights, tokenizer=tokenizer, split=split, write_to=output_dir
    )
    totals, rejected, samples, shards = empty_stats(), Counter(), [], []
    padding = PaddingMeter(cfg.train_batch_size, cfg.max_len)
    sequences = tokens = loss_tokens = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if folder:  # the tasks wrote the rows: only stats and shard names come here
            for written in batch["shards"].to_pylist():
                shards += json.loads(written) if written else []
            block_stats = [json.loads(s) for s in batch["stats"].to_pylist() if s]
        else:
            block_stats = split_stats_rows(batch)[1]
        for stats in block_stats:
            for key in ("read", "accepted", "sampled_out", "truncated", "documents"):
                totals[key] += stats[key]
            rejected.update(stats["rejected"])
            samples += stats["samples"][: max(cfg.reject_samples - len(samples), 0)]
            padding.add(stats["lengths"])
            sequences += len(stats["lengths"])
            tokens += stats["tokens"]
            loss_tokens += stats["loss_tokens"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "mode": cfg.mode,
        "packing": cfg.packing,
        "max_len": cfg.max_len,
        "max_source_len": cfg.max_source_len if cfg.mode == "sft" else None,
        "tokenizer": tokenizer_fingerprint(cfg.tokenizer, tokenizer),
        "columns": ["input_ids", "labels"] + (["position_ids"] if cfg.packing != "none" else []),
        "rows": {
            "read": totals["read"],
            "written": totals["documents"],
            "accepted": totals["accepted"],
            "sampled_out": totals["sampled_out"],
            "truncated": totals["truncated"],
            "rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "reject_samples": [{"row_id": r, "reason": why} for r, why in samples],
        },
        "class_weights": {"verbal": weights[0], "score": weights[1]},
        "sequences": sequences,
        "tokens": {"input": tokens, "loss": loss_tokens},
        "padding_fraction": padding.result(),
        "shards": sorted(shards, key=lambda s: s["file"]),  # item order, then the item's own shards
        "config": to_dict(cfg),
        "split": split,
    }
    if folder:
        folder.remove_stale({s["file"] for s in shards})
        if split == "val":
            folder.write_manifest(manifest)
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    fs, root = output_filesystem(path)
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        return json.loads(f.read())


def read_shards(path: str):
    """The shards that :func:`write_shards` wrote into ``path``, in order, as a ``ray.data.Dataset`` (same
    columns). The manifest names the shards; a folder without one is an unfinished run: a clear error."""
    import ray

    fs, root = output_filesystem(path)
    if not fs.get_file_info(f"{root}/{MANIFEST}").is_file:
        raise FileNotFoundError(
            f"{path}: no {MANIFEST}; the run that wrote it did not finish (re-run write_shards)"
        )
    files = [f"{root}/{s['file']}" for s in read_manifest(path)["shards"]]
    if not files:
        return ray.data.from_items([])
    ds = ray.data.read_parquet(files, filesystem=fs)
    ds.context.execution_options.preserve_order = True
    return ds


# --- entrypoint -----------------------------------------------------------------------------------------------


def run(cfg: TokenizeConfig) -> dict[str, Any]:
    """CLI / ``ray job submit`` entry: connect to the cluster (``RAY_ADDRESS``) or start a local Ray, write the
    shards, print a summary, and shut down only what it started."""
    from chatmusician.ray_local import ray_session

    _check(cfg)  # config mistakes fail here, in a second, not after Ray started
    sources.check_local_sources(cfg)
    with ray_session():
        manifest = write_shards(cfg)
    summary = {
        k: manifest[k]
        for k in ("mode", "packing", "max_len", "rows", "sequences", "tokens", "padding_fraction")
    }
    summary["rows"] = {k: v for k, v in summary["rows"].items() if k != "reject_samples"}
    summary["output_dir"] = cfg.output_dir
    summary["shards"] = len(manifest["shards"])
    print(json.dumps(summary, indent=2))
    return manifest
