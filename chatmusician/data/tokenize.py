"""Tokenize pt documents and sft samples into ``(input_ids, labels)``, and a whole read batch into packed
training rows plus its statistics. Pure functions over a Hugging Face (fast) tokenizer: no Ray, so the
trainer and the tests call them directly; the pipeline calls :func:`process_batch` inside actors.

Layouts (the original's data_preprocess.py, with its limits made configurable):
- pt: ``ids(text) + [EOS]``, labels = the same ids (HF shifts them inside the model).
- sft: ``ids(source)[:max_source_len] + ids(target)[:budget] + [EOS]``, labels -100 over the source;
  source and target are tokenized separately, as the original did; total <= ``max_len``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from chatmusician.data.packing import IGNORE_INDEX, Doc, pack, rows_to_table


def encode_batch(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text with no special tokens added (``</s>`` written as text still maps to EOS)."""
    if not texts:
        return []
    return [
        e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    ]


def tokenize_pt_batch(texts: Sequence[str], tokenizer, add_eos: bool = True) -> list[Doc]:
    """pt documents -> ``(input_ids, labels)`` with labels a copy of the ids."""
    eos = [tokenizer.eos_token_id] if add_eos else []
    docs = []
    for ids in encode_batch(texts, tokenizer):
        arr = np.array(ids + eos, dtype=np.int32)
        docs.append((arr, arr.copy()))
    return docs


def sft_layout(
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    eos_id: int,
    max_len: int = 2048,
    max_source_len: int = 1536,
    truncate: bool = True,
) -> tuple[Doc, bool] | None:
    """Token layout of one sft sample: ``(input_ids, labels), truncated``; None when it is over the limits
    and ``truncate`` is False. EOS is appended unless the target already ends with it (as the original)."""
    need_eos = not (len(target_ids) and target_ids[-1] == eos_id)
    source = list(source_ids[:max_source_len])
    budget = max(max_len - len(source) - int(need_eos), 0)
    target = list(target_ids[:budget])
    truncated = len(source) < len(source_ids) or len(target) < len(target_ids)
    if truncated and not truncate:
        return None
    ids = np.array(source + target + [eos_id] * need_eos, dtype=np.int32)
    labels = ids.copy()
    labels[: len(source)] = IGNORE_INDEX
    return (ids, labels), truncated


def tokenize_sft_example(
    source: str,
    target: str,
    tokenizer,
    max_len: int = 2048,
    max_source_len: int = 1536,
    truncate: bool = True,
) -> tuple[Doc, bool] | None:
    """One sft sample (source text from chatmusician.prompts.sft_source_target) -> :func:`sft_layout`."""
    return tokenize_sft_batch([source], [target], tokenizer, max_len, max_source_len, truncate)[0]


def tokenize_sft_batch(
    sources: Sequence[str],
    targets: Sequence[str],
    tokenizer,
    max_len: int = 2048,
    max_source_len: int = 1536,
    truncate: bool = True,
) -> list[tuple[Doc, bool] | None]:
    """Batch twin of :func:`tokenize_sft_example` (two batch-encode calls)."""
    return [
        sft_layout(s, t, tokenizer.eos_token_id, max_len, max_source_len, truncate)
        for s, t in zip(encode_batch(sources, tokenizer), encode_batch(targets, tokenizer), strict=True)
    ]


def empty_stats() -> dict[str, Any]:
    return {
        "read": 0,
        "accepted": 0,
        "sampled_out": 0,
        "truncated": 0,
        "documents": 0,
        "rejected": {},
        "samples": [],
    }


def process_batch(batch: Mapping[str, Sequence], tokenizer, cfg, with_stats: bool = False) -> pa.Table:
    """Read-stage columns (see sources.READ_COLUMNS) -> training rows (``input_ids``, ``labels``, and
    ``position_ids`` when packed). With ``with_stats`` one more row, with empty ids and a JSON ``stats``
    column, reports this batch's counts: rows read / accepted / sampled out / truncated / rejected by reason,
    and the first ``cfg.reject_samples`` rejected row ids."""
    stats = empty_stats()
    rejected: Counter[str] = Counter()
    keep = []
    for k, reason in enumerate(batch["reject"]):
        if reason:
            rejected[reason] += 1
            if len(stats["samples"]) < cfg.reject_samples:
                stats["samples"].append([batch["row_id"][k], reason])
        elif batch["repeats"][k] > 0:
            keep.append(k)
        else:
            stats["sampled_out"] += 1
    docs: list[Doc] = []
    if cfg.mode == "pt":
        encoded = tokenize_pt_batch([batch["text"][k] for k in keep], tokenizer, cfg.add_eos)
    else:
        encoded = tokenize_sft_batch(
            [batch["source"][k] for k in keep],
            [batch["target"][k] for k in keep],
            tokenizer,
            cfg.max_len,
            cfg.max_source_len,
            cfg.sft_truncate,
        )
    for k, result in zip(keep, encoded, strict=True):
        if result is None:  # sft over the limits with sft_truncate off
            rejected["too_long"] += 1
            if len(stats["samples"]) < cfg.reject_samples:
                stats["samples"].append([batch["row_id"][k], "too_long"])
            continue
        if cfg.mode == "sft":
            result, truncated = result
            stats["truncated"] += int(truncated)
        stats["accepted"] += 1
        docs += [result] * batch["repeats"][k]
    table = rows_to_table(pack(docs, cfg.max_len, cfg.packing, cfg.mode))
    if not with_stats:
        return table
    stats["read"] = len(batch["reject"])
    stats["documents"] = len(docs)
    stats["rejected"] = dict(sorted(rejected.items()))
    stats_row = {name: pa.array([[]], type=table.schema.field(name).type) for name in table.column_names}
    table = pa.concat_tables([table, pa.table(stats_row)])
    return table.append_column("stats", pa.array([""] * (table.num_rows - 1) + [json.dumps(stats)]))
