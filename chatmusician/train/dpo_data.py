"""Preference pairs -> tokenized pair shards a DPO run reads like any shards (manifest, row groups, exact resume).

The pairs are parquet rows ``prompt``, ``chosen``, ``rejected`` (``chatmusician prefs``' layout, TRL's and
LLaMA-Factory's); ``prompt`` is the chat-templated prompt. Each side is laid out as an SFT row (the prompt
masked with -100, the answer + EOS trained, the original's truncation), so chosen and rejected share one
prompt. A micro batch of B pairs becomes one forward batch of 2B rows, chosen first (:func:`collate_pairs`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from chatmusician.train.batching import collate
from chatmusician.train.config import DPOConfig, TrainConfigError

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
"""Precomputed reference log-probs (full training: no adapter to disable), when the shards have them."""
ROW_GROUP_ROWS = 256


def pairs_file(path: str) -> str:
    """A prefs folder's pairs.parquet, or the parquet file itself."""
    return path if path.endswith(".parquet") else f"{path.rstrip('/')}/pairs.parquet"


def check_pairs(path: str) -> None:
    """The pairs file exists and has the columns (its schema only is read): one config error line otherwise."""
    import pyarrow.parquet as pq

    from chatmusician.data.manifest import resolve

    fs, file = resolve(pairs_file(path))
    if not fs.get_file_info(file).is_file:
        raise TrainConfigError(
            f"pairs: no {file} (run chatmusician prefs first, or point pairs at a parquet file)"
        )
    with fs.open_input_file(file) as f:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.names
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in names]
    if missing:
        raise TrainConfigError(
            f"pairs {file}: no {missing} column(s); the layout is prompt, chosen, rejected"
        )
    if meta.num_rows == 0:
        raise TrainConfigError(
            f"pairs {file}: no pairs (every prompt lacked a valid answer: see its manifest)"
        )


def read_pairs(path: str) -> dict[str, list[str]]:
    """``prompt``/``chosen``/``rejected`` columns of the pairs; a missing file or column is one config error."""
    import pyarrow.parquet as pq

    from chatmusician.data.manifest import resolve

    fs, file = resolve(pairs_file(path))
    if not fs.get_file_info(file).is_file:
        raise TrainConfigError(
            f"pairs: no {file} (run chatmusician prefs first, or point pairs at a parquet file)"
        )
    table = pq.read_table(file, filesystem=fs)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.column_names]
    if missing:
        raise TrainConfigError(
            f"pairs {file}: no {missing} column(s); the layout is prompt, chosen, rejected"
        )
    if table.num_rows == 0:
        raise TrainConfigError(
            f"pairs {file}: no pairs (every prompt lacked a valid answer: see its manifest)"
        )
    return {c: [str(v) for v in table[c].to_pylist()] for c in ("prompt", "chosen", "rejected")}


def tokenize_pairs(pairs: dict[str, list[str]], tokenizer, max_length: int, max_prompt_length: int):
    """The pair rows as a pyarrow table of :data:`PAIR_COLUMNS` (int32 lists)."""
    import pyarrow as pa

    from chatmusician.data.tokenize import tokenize_sft_batch

    out: dict[str, list[np.ndarray]] = {c: [] for c in PAIR_COLUMNS}
    for side in ("chosen", "rejected"):
        laid = tokenize_sft_batch(pairs["prompt"], pairs[side], tokenizer, max_length, max_prompt_length)
        for (ids, labels), _ in laid:
            out[f"{side}_input_ids"].append(ids)
            out[f"{side}_labels"].append(labels)
    return pa.table({c: pa.array([a.tolist() for a in v], type=pa.list_(pa.int32())) for c, v in out.items()})


def write_pair_shards(cfg: DPOConfig, out_dir: str) -> dict[str, Any]:
    """Tokenize ``cfg.pairs`` into ``out_dir`` (one parquet file + manifest.json in the shards' format, mode
    ``dpo``); kept as is when its manifest already records the same pairs, tokenizer and lengths (a resumed run
    reads the very rows it started with). Returns the manifest."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from chatmusician.data.manifest import (
        MANIFEST_FORMAT,
        join,
        read_manifest,
        resolve,
        tokenizer_fingerprint,
        write_manifest,
    )
    from chatmusician.model.loading import load_tokenizer

    pairs = read_pairs(cfg.pairs)
    precompute = cfg.train_type == "full"
    key = (pairs, cfg.max_length, cfg.max_prompt_length, cfg.model, precompute)
    source = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    fs, root = resolve(out_dir)
    if fs.get_file_info(join(root, "manifest.json")).is_file:
        old = read_manifest(root, fs)
        if old.get("source") == source:
            return old
    tokenizer = load_tokenizer(cfg.model)
    table = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    if precompute:
        chosen, rejected = reference_logps(cfg.model, table, cfg.max_length)
        table = table.append_column(REF_COLUMNS[0], chosen).append_column(REF_COLUMNS[1], rejected)
    fs.create_dir(root, recursive=True)
    pq.write_table(table, join(root, "part-00000.parquet"), filesystem=fs, row_group_size=ROW_GROUP_ROWS)
    groups = [min(ROW_GROUP_ROWS, table.num_rows - s) for s in range(0, table.num_rows, ROW_GROUP_ROWS)]
    tokens = sum(
        int(pc.sum(pc.list_value_length(table[f"{s}_input_ids"])).as_py()) for s in ("chosen", "rejected")
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "mode": "dpo",
        "max_len": cfg.max_length,
        "max_source_len": cfg.max_prompt_length,
        "tokenizer": tokenizer_fingerprint(cfg.model, tokenizer),
        "source": source,
        "reference": "precomputed (the starting model, fp32)"
        if precompute
        else "the model with its adapter disabled",
        "pairs": pairs_file(cfg.pairs),
        "sequences": table.num_rows,
        "tokens": {"input": tokens},  # both answers of every pair (what the planner reads)
        "rows": {"read": table.num_rows, "written": table.num_rows},
        "shards": [
            {"file": "part-00000.parquet", "rows": table.num_rows, "tokens": tokens, "row_groups": groups}
        ],
    }
    write_manifest(root, manifest, fs)
    return manifest


def reference_logps(model: str, table, max_length: int, pairs_per_batch: int = 8):
    """The starting model's summed answer log-probs of every pair (float64 arrays: chosen, rejected), in fp32 on
    this process's GPU when it has one (full training's reference: computed once, before any worker starts)."""
    import pyarrow as pa
    import torch

    from chatmusician.model.loading import load_model
    from chatmusician.train.dpo_loss import sequence_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = load_model(model, "fp32").to(device).eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, table.num_rows, pairs_per_batch):
            part = table.slice(start, pairs_per_batch)
            batch = collate_pairs(
                {c: part[c].to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS}, max_length
            )
            inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids")}
            logps, _ = sequence_logps(net(**inputs).logits, batch["labels"].to(device))
            chosen += logps[: part.num_rows].double().tolist()
            rejected += logps[part.num_rows :].double().tolist()
    return pa.array(chosen, pa.float64()), pa.array(rejected, pa.float64())


def collate_pairs(batch: dict[str, np.ndarray], max_length: int) -> dict[str, Any]:
    """B pair rows -> one model batch of 2B rows ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]`` (the
    recipe's collate: padding, position ids, ``num_tokens``), plus ``ref_logps`` [2B] when the rows carry
    precomputed reference log-probs."""
    import torch

    rows = {
        "input_ids": [*batch["chosen_input_ids"], *batch["rejected_input_ids"]],
        "labels": [*batch["chosen_labels"], *batch["rejected_labels"]],
    }
    out = collate(rows, max_length)
    if REF_COLUMNS[0] in batch:
        ref = np.concatenate([np.asarray(batch[c], dtype=np.float64) for c in REF_COLUMNS])
        out["ref_logps"] = torch.from_numpy(ref)
    return out


def pair_batches(plan: dict[str, Any], cfg: DPOConfig, rank: int, world: int, skip: int):
    """Endless micro batches of this rank's pairs (the shards' seeded order; ``skip`` micro batches resumed)."""
    from chatmusician.train.data_order import ShardRowReader

    reader = ShardRowReader(
        plan["files"], plan["filesystem"], plan["chunks"], rank=rank, world=world,
        micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, window=cfg.data.shuffle_window,
        shuffle=cfg.data.shuffle, columns=PAIR_COLUMNS + REF_COLUMNS,
    )  # fmt: skip
    for batch in reader.batches(skip):
        yield collate_pairs(batch, cfg.max_length)
