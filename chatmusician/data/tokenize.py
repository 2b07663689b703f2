"""Tokenize pt documents and sft samples into ``(input_ids, labels)``, and a whole read batch into packed
training rows plus its statistics. Pure functions over a Hugging Face (fast) tokenizer: no Ray, so the
trainer and the tests call them directly; the pipeline calls :func:`process_batch` inside tasks.

Which ids (``TokenizeConfig.encoder``): the original's data_preprocess.py ran LLaMA's slow tokenizer, which with
``legacy`` (LLaMA-2's behaviour before transformers 4.35, and what its config meant then) encodes each text
between special tokens on its own, so sentencepiece's dummy prefix adds a space token after every ``</s>`` and
before a leading space. The fast tokenizer adds that prefix only where the text does not start with a space,
so its ids differ exactly there: :class:`LegacySentencePiece` gives the slow ids instead. No BOS is ever added
(the original called ``tokenizer(..., add_special_tokens=False)`` and ``tokenize``).

Layouts (the original's data_preprocess.py, with its limits made configurable):
- pt: ``ids(text) + [EOS]``, labels = the same ids (HF shifts them inside the model).
- sft: ``ids(source)[:max_source_len] + ids(target)[:max_len - 3 - len(source)]``, then EOS unless the target
  text already ends with ``</s>``; labels -100 over the source; source and target are tokenized separately, as
  the original did. Which text is source and target (MusicPile-sft rows verbatim, raw rows templated):
  chatmusician.prompts.sft_source_target.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from chatmusician.data.packing import IGNORE_INDEX, Doc, FlatDocs, flat_rows_to_table, pack_flat
from chatmusician.data.schema import READ_SCHEMA


class LegacySentencePiece:
    """LLaMA's slow tokenizer with ``legacy=True`` as ``tokenize`` + ``convert_tokens_to_ids`` run it: the text
    split at its special tokens (``<unk>``, ``<s>``, ``</s>``: their ids), every other part encoded by
    sentencepiece on its own (with its dummy-prefix space). The sentencepiece library, not a re-implementation."""

    def __init__(self, model_proto: bytes, special: dict[str, int], threads: int = 1):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.special, self.threads = special, threads
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        layouts, parts = [], []  # per text: special ids (int) or the index of a part to encode (str marker)
        for text in texts:
            layout = []
            for k, piece in enumerate(self.split.split(text)):
                if k % 2:
                    layout.append(self.special[piece])
                elif piece:
                    layout.append(str(len(parts)))
                    parts.append(piece)
            layouts.append(layout)
        encoded = self.sp.encode(parts, num_threads=self.threads) if parts else []
        return [
            list(chain.from_iterable([x] if isinstance(x, int) else encoded[int(x)] for x in layout))
            for layout in layouts
        ]


@dataclass
class BackendTokenizer:
    """What the data stage uses of a Hugging Face fast tokenizer: its Rust ``tokenizers`` backend, the EOS id,
    and, for the original's legacy ids, sentencepiece. Built from a :func:`tokenizer_spec`, it loads in a
    fraction of a second without transformers."""

    backend_tokenizer: Any
    eos_token_id: int
    sentencepiece: LegacySentencePiece | None = None

    @classmethod
    def from_str(cls, serialized: str, eos_token_id: int) -> BackendTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(serialized), eos_token_id)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], threads: int = 1) -> BackendTokenizer:
        tok = cls.from_str(spec["json"], spec["eos_token_id"])
        if spec["sentencepiece"] is not None:
            tok.sentencepiece = LegacySentencePiece(spec["sentencepiece"], spec["special"], threads)
        return tok


def tokenizer_spec(tokenizer, cfg) -> dict[str, Any]:
    """What tasks need to rebuild the data stage's encoder from a loaded HF tokenizer and ``cfg``
    (``encoder``, ``legacy``), and ``describe``: what the manifest says about the ids it gives."""
    legacy = cfg.legacy if cfg.legacy is not None else bool(getattr(tokenizer, "legacy", False))
    model_file = getattr(tokenizer, "vocab_file", None)
    has_model = bool(model_file) and Path(model_file).is_file()
    use_sp = cfg.encoder == "original" and legacy and has_model
    if use_sp:
        ids = "original: the slow legacy tokenizer's (sentencepiece per text between special tokens)"
    elif not legacy:
        ids = "fast: the tokenizer is not legacy (the original's LLaMA-2 run was), so its fast ids are used as they are"
    else:
        why = "encoder: fast" if cfg.encoder == "fast" else "no tokenizer.model to run sentencepiece on"
        ids = f"fast ({why}): one space token fewer than the original's after each special token and at a leading space"
    return {
        "json": tokenizer.backend_tokenizer.to_str(),
        "eos_token_id": tokenizer.eos_token_id,
        "sentencepiece": Path(model_file).read_bytes() if use_sp else None,
        "special": dict(tokenizer.added_tokens_encoder),
        "describe": {
            "encoder": "sentencepiece" if use_sp else "fast",
            "ids": ids,
            "ids_legacy": legacy,
            "bos": "never added (as the original: add_special_tokens=False and tokenize)",
            "eos": "pt: one after each document when add_eos; sft: after the target unless it ends with </s>",
        },
    }


def _ids(texts: Sequence[str], tokenizer) -> list[Sequence[int]]:
    if not len(texts):
        return []
    sp = getattr(tokenizer, "sentencepiece", None)
    if sp is not None:
        return sp.encode(list(texts))
    return [
        e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    ]


def encode_batch(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text with no special tokens added (``</s>`` written as text still maps to EOS)."""
    return [list(ids) for ids in _ids(texts, tokenizer)]


def encode_flat(texts: Sequence[str], tokenizer, suffix: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_batch` laid end to end: (int32 ids of every text, each followed by ``suffix``; lengths).
    One pass from the tokenizer's lists into one array, no per-text arrays."""
    ids = _ids(texts, tokenizer)
    suffix = list(suffix)
    lengths = np.fromiter((len(i) for i in ids), np.int64, len(ids)) + len(suffix)
    pieces = chain.from_iterable((i, suffix) for i in ids)
    return np.fromiter(chain.from_iterable(pieces), np.int32, int(lengths.sum())), lengths


def tokenize_pt_flat(texts: Sequence[str], tokenizer, add_eos: bool = True) -> FlatDocs:
    """pt documents laid end to end (see :func:`tokenize_pt_batch`)."""
    ids, lengths = encode_flat(texts, tokenizer, [tokenizer.eos_token_id] if add_eos else [])
    return FlatDocs(ids, ids.copy(), lengths)


def tokenize_pt_batch(texts: Sequence[str], tokenizer, add_eos: bool = True) -> list[Doc]:
    """pt documents -> ``(input_ids, labels)`` with labels a copy of the ids."""
    docs = tokenize_pt_flat(texts, tokenizer, add_eos)
    if not len(docs.lengths):
        return []
    cut = docs.starts()[1:]
    return list(zip(np.split(docs.input_ids, cut), np.split(docs.labels, cut), strict=True))


SFT_RESERVED = 3
"""Tokens the original keeps free beside the source: the target gets ``max_len - 3 - len(source)`` at most."""


def target_needs_eos(target: str) -> bool:
    """The original's rule: EOS is appended unless ``output.strip()`` already ends with ``</s>``."""
    return not target.strip().endswith("</s>")


def sft_layout(
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    eos_id: int,
    max_len: int = 2048,
    max_source_len: int = 1536,
    truncate: bool = True,
    add_eos: bool = True,
) -> tuple[Doc, bool] | None:
    """Token layout of one sft sample, the original's data_preprocess.py: ``ids(source)[:max_source_len] +
    ids(target)[:max_len - 3 - len(source)] (+ [EOS] when add_eos)``, labels -100 over the source.
    Returns ``(input_ids, labels), truncated``; None when it is over the limits and ``truncate`` is False."""
    source = list(source_ids[:max_source_len])
    budget = max(max_len - SFT_RESERVED - len(source), 0)
    target = list(target_ids[:budget])
    truncated = len(source) < len(source_ids) or len(target) < len(target_ids)
    if truncated and not truncate:
        return None
    ids = np.array(source + target + [eos_id] * add_eos, dtype=np.int32)
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
    """One sft sample (source, target from chatmusician.prompts.sft_source_target) -> :func:`sft_layout`."""
    return tokenize_sft_batch([source], [target], tokenizer, max_len, max_source_len, truncate)[0]


def tokenize_sft_batch(
    sources: Sequence[str],
    targets: Sequence[str],
    tokenizer,
    max_len: int = 2048,
    max_source_len: int = 1536,
    truncate: bool = True,
) -> list[tuple[Doc, bool] | None]:
    """Batch twin of :func:`tokenize_sft_example` (two batch-encode calls: source and target are tokenized
    apart, as the original did)."""
    return [
        sft_layout(s, t, tokenizer.eos_token_id, max_len, max_source_len, truncate, target_needs_eos(text))
        for s, t, text in zip(
            encode_batch(sources, tokenizer), encode_batch(targets, tokenizer), targets, strict=True
        )
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


def _as_table(batch: pa.Table | Mapping[str, Sequence]) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    fields = [f for f in READ_SCHEMA if f.name in batch]
    return pa.Table.from_pydict({f.name: list(batch[f.name]) for f in fields}, schema=pa.schema(fields))


def process_batch(
    batch: pa.Table | Mapping[str, Sequence], tokenizer, cfg, with_stats: bool = False
) -> pa.Table:
    """Read-stage columns (see sources.READ_COLUMNS; a table or a dict of lists) -> training rows (``input_ids``,
    ``labels``, and ``position_ids`` when packed). With ``with_stats`` one more row, with empty ids and a JSON
    ``stats`` column, reports this batch's counts: rows read / accepted / sampled out / truncated / rejected by
    reason, the first ``cfg.reject_samples`` rejected row ids (read rejects first, then too_long ones), and the
    training rows' lengths and input and loss tokens.

    Columnar: rows are selected with pyarrow compute, token ids go from the tokenizer's lists straight into
    one flat array (sft: through a per-sample layout step), and packing and the output columns are
    numpy/Arrow operations on whole batches."""
    table = _as_table(batch)
    stats = empty_stats()
    is_rejected = pc.not_equal(table["reject"], "").to_numpy(zero_copy_only=False)
    repeats = table["repeats"].to_numpy().astype(np.int64)
    keep = ~is_rejected & (repeats > 0)
    stats["sampled_out"] = int((~is_rejected & (repeats <= 0)).sum())
    rejects = table.select(["row_id", "reject"]).filter(pa.array(is_rejected))
    rejected: Counter[str] = Counter(rejects["reject"].to_pylist())
    stats["samples"] = [list(r.values()) for r in rejects.slice(0, cfg.reject_samples).to_pylist()]
    kept = table.filter(pa.array(keep))
    if cfg.mode == "pt":
        docs = tokenize_pt_flat(kept["text"].to_pylist(), tokenizer, cfg.add_eos)
        stats["accepted"] = kept.num_rows
        docs = docs.repeat(repeats[keep])
    else:
        encoded = tokenize_sft_batch(
            kept["source"].to_pylist(),
            kept["target"].to_pylist(),
            tokenizer,
            cfg.max_len,
            cfg.max_source_len,
            cfg.sft_truncate,
        )
        sft_docs: list[Doc] = []
        for row_id, n, result in zip(
            kept["row_id"].to_pylist(), repeats[keep].tolist(), encoded, strict=True
        ):
            if result is None:  # over the limits with sft_truncate off
                rejected["too_long"] += 1
                if len(stats["samples"]) < cfg.reject_samples:
                    stats["samples"].append([row_id, "too_long"])
                continue
            doc, truncated = result
            stats["truncated"] += int(truncated)
            stats["accepted"] += 1
            sft_docs += [doc] * n
        docs = FlatDocs.of(sft_docs)
    rows = pack_flat(docs, cfg.max_len, cfg.packing, cfg.mode)
    table = flat_rows_to_table(rows)
    if not with_stats:
        return table
    # The training rows' lengths, in order: the driver's padding meter reads them.
    stats["lengths"] = np.diff(rows.offsets).tolist()
    stats["tokens"] = len(rows.input_ids)
    stats["loss_tokens"] = int((rows.labels != IGNORE_INDEX).sum())
    stats["read"] = len(is_rejected)
    stats["documents"] = len(docs.lengths)
    stats["rejected"] = dict(sorted(rejected.items()))
    stats_row = {name: pa.array([[]], type=table.schema.field(name).type) for name in table.column_names}
    table = pa.concat_tables([table, pa.table(stats_row)])
    return table.append_column("stats", pa.array([""] * (table.num_rows - 1) + [json.dumps(stats)]))
