"""The Ray Data tokenization stage: read + tokenize + pack (one stage of tasks) -> training rows, streamed.

    plan (work items: parquet row groups / files, sources interleaved; hub sources pinned to a commit)
      -> one stage of tasks (tokenizer loaded once per worker process), per work item:
         read (sources.read_item_tables: rows, bad ones become reasons, mixture repeats, transient errors retried)
         -> split train / val by a hash of the row id -> tokenize + pack in batches (tokenize.process_batch)
      -> build_dataset: one split's stream, for training directly
      -> write_shards: each task stages each work item's rows of both splits (one read of the sources), then
         merge tasks write shards of ``shard_rows`` rows (data/shards.py); only counts and names reach the
         driver, which writes manifest.json (data/manifest.py: the contract the trainer reads)

Everything streams (bounded blocks in flight), and with ``preserve_order`` the same input and config give the
same rows in the same order; a work item's rows never depend on which task or node packed them, so the shards
are byte-identical and a training run can resume at a row. The driver moves no token ids: on a cluster the
writing scales with the tasks (a driver writing every shard capped it at one core's ~360 MB/s of ids).
Re-running into the same output_dir rewrites the same shard names and deletes stale ones: never duplicates.
On more than one node ``output_dir`` must be storage every node reaches at the same path (NFS) or a URI (s3://).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from chatmusician.config import to_dict
from chatmusician.data import sources
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    VAL_DIR,
    join,
    read_manifest,
    resolve,
    tokenizer_fingerprint,
    write_manifest,
)
from chatmusician.data.shards import (
    STAGING,
    ShardWriter,
    merge_plan,
    prepare_folder,
    remove_folder,
    remove_staging,
    remove_stale,
)
from chatmusician.data.stages import (
    SPLITS,
    _merge,
    _ordered,
    _read,
    _split_rows,
    _stage_items,
    _stream_items,
    is_val_row,
    split_batches,
)
from chatmusician.data.stats import PaddingMeter, SplitTotals, split_stats_rows
from chatmusician.data.tokenize import SFT_RESERVED

# Names other modules import from here (train/recipe.py, benchmarks, tests); their home is data/manifest.py,
# data/shards.py, data/stages.py and data/stats.py.
__all__ = [
    "MANIFEST",
    "PaddingMeter",
    "ShardWriter",
    "VAL_DIR",
    "build_dataset",
    "is_val_row",
    "split_batches",
    "_split_rows",
    "output_filesystem",
    "read_manifest",
    "read_shards",
    "run",
    "split_stats_rows",
    "tokenizer_fingerprint",
    "write_shards",
]


def output_filesystem(path: str):
    """(filesystem, path) of a folder: :func:`chatmusician.data.manifest.resolve` (the one resolver)."""
    return resolve(path)


def _read_dataset(cfg: TokenizeConfig, items: list[dict[str, Any]], class_weights=(1.0, 1.0)):
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cfg.read_cpus,
        fn_kwargs={"cfg": cfg, "class_weights": class_weights},
    )
    return _ordered(ds, cfg)


def class_weights(cfg: TokenizeConfig, items: list[dict[str, Any]] | None = None) -> tuple[float, float]:
    """(verbal, score) weights that reach ``cfg.verbal_score_ratio``: one extra read pass counts the classes
    (of the same pinned revisions as the main pass: ``items`` from :func:`plan_items`)."""
    if not cfg.verbal_score_ratio:
        return 1.0, 1.0
    if len(cfg.verbal_score_ratio) != 2:
        raise ValueError(
            f"verbal_score_ratio needs two numbers (verbal, score), got {cfg.verbal_score_ratio}"
        )
    items = items if items is not None else plan_items(sources.pin(cfg)[0])
    counts = [0, 0]
    columns = ["repeats", "is_score"]
    for batch in _read_dataset(cfg, items).select_columns(columns).iter_batches(batch_format="pyarrow"):
        for score in (False, True):
            chosen = batch.filter(pc.equal(batch["is_score"], score))
            counts[int(score)] += pc.sum(chosen["repeats"]).as_py() or 0
    return sources.ratio_multipliers(counts[0], counts[1], tuple(cfg.verbal_score_ratio))


def plan_items(cfg: TokenizeConfig, counter: sources.RetryCount | None = None) -> list[dict[str, Any]]:
    """The work items of ``cfg`` (hub sources at the revisions it names: see sources.pin), each with its
    ``index``."""
    return [{**item, "index": k} for k, item in enumerate(sources.item_dicts(sources.plan(cfg, counter)))]


def _task_pool(cfg: TokenizeConfig, num_items: int) -> dict[str, Any]:
    """map_batches arguments of a stage of tokenize-sized tasks over ``num_items`` rows."""
    import ray

    pool = pool_size(cfg)
    return {
        "batch_size": items_per_task(num_items, pool),
        "batch_format": "pyarrow",
        "compute": ray.data.TaskPoolStrategy(
            size=tasks_in_flight(pool, cfg.tokenizer_cpus, ray.cluster_resources().get("CPU", 0))
        ),
        "num_cpus": cfg.tokenizer_cpus,
    }


def build_dataset(
    cfg: TokenizeConfig,
    *,
    with_stats: bool = False,
    weights: tuple[float, float] | None = None,
    tokenizer: Any = None,
    split: str = "train",
    items: list[dict[str, Any]] | None = None,
):
    """The streaming ``ray.data.Dataset`` of training rows (``split="val"``: the held-out validation rows of
    ``cfg.val_fraction``; "train" leaves them out): ``input_ids``, ``labels`` (list<int32>, -100 = no
    loss) and, when packed, ``position_ids``. Lazy: nothing runs until it is consumed.

    ``with_stats=True`` adds a ``stats`` column: "" on training rows, and on one extra row per batch (empty
    ids) a JSON object with that batch's counts (see tokenize.process_batch). Filter those rows out before
    training (``stats == ""``). ``tokenizer``: the already loaded tokenizer of ``cfg.tokenizer``, if the caller
    has one (saves loading it again).

    One stage: tasks read, tokenize and pack work items (parquet row groups, files), at most
    ``pool_size(cfg)`` at a time, several items each (see :func:`items_per_task`); a batch never spans two
    items."""
    import ray

    from chatmusician.data.tokenize import tokenizer_spec
    from chatmusician.model.loading import load_tokenizer

    _check(cfg)
    cfg = sources.pin(cfg)[0]  # every task reads the same hub commit, even if main moves meanwhile
    items = items if items is not None else plan_items(cfg)
    weights = weights if weights is not None else class_weights(cfg, items)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _stream_items,
        **_task_pool(cfg, len(items)),
        fn_kwargs={
            "cfg": cfg,
            "with_stats": with_stats,
            "class_weights": weights,
            "tokenizer_spec": tokenizer_spec(tokenizer, cfg),
            "split": split,
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
    if cfg.read_retries < 0 or cfg.retry_backoff_s < 0:
        raise ValueError("read_retries and retry_backoff_s must not be negative")


# --- writing shards ---------------------------------------------------------------------------------------------


def write_shards(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run the pipeline; write shards + ``manifest.json`` into ``cfg.output_dir`` (None: count only) and
    return the manifest: tokenizer fingerprint and the ids it gives, sources and the commits read, mode,
    lengths, rows read / written / rejected by reason (with sample row ids), token counts, padding fraction,
    read retries, and the shards with their row groups. With ``val_fraction`` the held-out rows go to
    ``output_dir/val`` (shards + a manifest of their own, from the same single read), where training finds
    them; the manifest's ``val`` entry describes them."""

    from chatmusician.data.tokenize import tokenizer_spec
    from chatmusician.model.loading import load_tokenizer

    _check(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    planning = sources.RetryCount()
    cfg_pinned, pinned_sources = sources.pin(cfg, planning)
    items = plan_items(cfg_pinned, planning)
    weights = class_weights(cfg_pinned, items)
    out = cfg.output_dir
    if out and "://" not in out:  # tasks run in other working directories (and on other nodes)
        out = str(Path(out).expanduser().absolute())
    dirs = {"train": out, "val": join(out, VAL_DIR)} if out else {}
    staging = join(out, STAGING) if out else None
    if out:
        prepare_folder(out)
    spec = tokenizer_spec(tokenizer, cfg)
    ds = stage_dataset(cfg_pinned, items, weights, spec, staging)
    totals = {s: SplitTotals(cfg.train_batch_size, cfg.max_len, cfg.reject_samples) for s in SPLITS}
    staged: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    retries = planning.count
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for split, stats, entry, n in zip(*(batch[c].to_pylist() for c in batch.column_names), strict=True):
            retries += n
            if stats:
                totals[split].add(json.loads(stats))
            if entry:
                staged[split].append(json.loads(entry))
    shards = _merge_staged(cfg, staged, dirs) if out else {s: [] for s in SPLITS}
    common = {
        "format": MANIFEST_FORMAT,
        "mode": cfg.mode,
        "packing": cfg.packing,
        "max_len": cfg.max_len,
        "max_source_len": cfg.max_source_len if cfg.mode == "sft" else None,
        "tokenizer": {**tokenizer_fingerprint(cfg.tokenizer, tokenizer), **spec["describe"]},
        "columns": ["input_ids", "labels"] + (["position_ids"] if cfg.packing != "none" else []),
        "sources": pinned_sources,
        "read_retries": retries,
        "class_weights": {"verbal": weights[0], "score": weights[1]},
        "config": to_dict(cfg),
    }
    manifests = {
        s: {**common, **totals[s].manifest(), "split": s, "shard_rows": cfg.shard_rows, "shards": shards[s]}
        for s in SPLITS
    }
    manifest = manifests["train"]
    if cfg.val_fraction > 0:
        manifest["val"] = {"path": VAL_DIR, "fraction": cfg.val_fraction}
        manifest["val"] |= {k: manifests["val"][k] for k in ("rows", "sequences", "tokens")}
    if out:
        remove_staging(out)
        if cfg.val_fraction > 0:
            write_manifest(dirs["val"], manifests["val"])
        else:  # the validation split of an earlier run must not pass for this one's
            remove_folder(dirs["val"])
        write_manifest(out, manifest)  # last: the folder is complete
    return manifest


def stage_dataset(
    cfg: TokenizeConfig,
    items: list[dict[str, Any]],
    weights: tuple[float, float],
    spec: dict[str, Any],
    staging: str | None,
):
    """The first step of :func:`write_shards`: tasks stage both splits of every item (one read each) into
    ``staging`` (None: count only) and hand the driver meta rows only (split, stats, staged, retries)."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    fn_kwargs = {"cfg": cfg, "class_weights": weights, "tokenizer_spec": spec, "staging": staging}
    return _ordered(ds.map_batches(_stage_items, **_task_pool(cfg, len(items)), fn_kwargs=fn_kwargs), cfg)


def _merge_staged(
    cfg: TokenizeConfig, staged: dict[str, list[dict[str, Any]]], dirs: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Merge tasks: each split's staged item files (in item order) -> ``shard_rows``-row shards in its folder;
    stale shards removed. The manifest's shard entries of each split, in order."""
    import ray

    plans = []
    for split in SPLITS:
        if split == "val" and cfg.val_fraction <= 0:
            continue
        if split == "val":
            prepare_folder(dirs[split])
        ordered = sorted(staged[split], key=lambda e: e["item"])
        for index, slices in enumerate(merge_plan(ordered, cfg.shard_rows)):
            plans.append(
                {"split": split, "index": index, "output_dir": dirs[split], "slices": json.dumps(slices)}
            )
    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    if plans:
        ds = ray.data.from_items(plans, override_num_blocks=len(plans))
        ds = ds.map_batches(_merge, **_task_pool(cfg, len(plans)), fn_kwargs={"shard_rows": cfg.shard_rows})
        for batch in _ordered(ds, cfg).iter_batches(batch_format="pyarrow", batch_size=None):
            for split, entry in zip(batch["split"].to_pylist(), batch["shard"].to_pylist(), strict=True):
                shards[split].append(json.loads(entry))
    for split, entries in shards.items():
        entries.sort(key=lambda e: e["file"])
        if split in dirs and (split == "train" or cfg.val_fraction > 0):
            remove_stale(dirs[split], {e["file"] for e in entries})
    return shards


def read_shards(path: str):
    """The shards that :func:`write_shards` wrote into ``path``, in order, as a ``ray.data.Dataset`` (same
    columns). The manifest names the shards; a folder without one is an unfinished run: a clear error."""
    import ray

    fs, root = resolve(path)
    files = [join(root, s["file"]) for s in read_manifest(path)["shards"]]
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
        for k in (
            "mode",
            "packing",
            "max_len",
            "rows",
            "sequences",
            "tokens",
            "padding_fraction",
            "read_retries",
        )
    }
    summary["rows"] = {k: v for k, v in summary["rows"].items() if k != "reject_samples"}
    summary["output_dir"] = cfg.output_dir
    summary["shards"] = len(manifest["shards"])
    summary["sources"] = manifest["sources"]
    print(json.dumps(summary, indent=2))
    return manifest
