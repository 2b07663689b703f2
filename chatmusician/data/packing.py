"""Turn tokenized documents into training rows: one per document (``none``) or packed into ``max_len`` rows.

Pure numpy; no tokenizer, no Ray. A document is ``(input_ids, labels)`` of equal length (int32, -100 = no loss).

How packed rows keep documents apart (read this before training on them):
- ``position_ids`` restart at 0 at every document start (and at the start of every row, where a long pt
  document continues).
- The label of each document's first token is -100: HF shifts labels inside the model, so that label is
  what the previous document's last token would be trained to predict. No loss crosses a boundary.
- Attention: transformers (>= 4.54, here 5.x) builds a block-diagonal causal mask from ``position_ids`` when
  the model gets ``attention_mask=None`` and no cache (``masking_utils.find_packed_sequence_indices``), so
  with sdpa/eager (and flash-attn varlen) a token attends only within its own document. Train packed rows
  with ``position_ids`` and WITHOUT an attention mask; pad a batch with labels -100 and position_ids 0, 1, ...
  (the padding becomes a segment of its own). tests/test_data_packing.py checks this on the tiny LLaMA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

IGNORE_INDEX = -100
Doc = tuple[np.ndarray, np.ndarray]  # (input_ids, labels)


@dataclass
class Rows:
    """Training rows as parallel lists; ``position_ids`` is None for unpacked rows (positions are 0..n-1)."""

    input_ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    position_ids: list[np.ndarray] | None = None
    num_docs: list[int] = field(default_factory=list)
    """Documents that start in each row (sums to the number of documents)."""


def split_long(ids: np.ndarray, labels: np.ndarray, max_len: int) -> list[Doc]:
    """Cut one document into consecutive pieces of at most ``max_len`` tokens (nothing is dropped)."""
    return [(ids[i : i + max_len], labels[i : i + max_len]) for i in range(0, max(len(ids), 1), max_len)]


def pack_none(docs: Sequence[Doc], max_len: int) -> Rows:
    """One document per row (the original); a document longer than ``max_len`` continues in the next rows."""
    rows = Rows()
    for ids, labels in docs:
        for k, (a, b) in enumerate(split_long(ids, labels, max_len)):
            rows.input_ids.append(a)
            rows.labels.append(b)
            rows.num_docs.append(int(k == 0))
    return rows


def pack_concat(docs: Sequence[Doc], max_len: int) -> Rows:
    """pt packing: concatenate the documents and cut every ``max_len`` tokens, so only the last row is short.
    Long documents run on into the next row; positions restart at each document and at each row start."""
    rows = Rows(position_ids=[])
    if not docs:
        return rows
    lengths = np.array([len(ids) for ids, _ in docs], dtype=np.int64)
    ids = np.concatenate([d[0] for d in docs]).astype(np.int32, copy=False)
    labels = np.concatenate([d[1] for d in docs]).astype(np.int32, copy=True)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    labels[starts] = IGNORE_INDEX  # a document's first token is never predicted from the previous one
    token = np.arange(len(ids))
    segment_start = np.maximum(np.repeat(starts, lengths), token - token % max_len)
    positions = (token - segment_start).astype(np.int32)
    n_rows = -(-len(ids) // max_len)
    docs_per_row = np.bincount(starts // max_len, minlength=n_rows)
    for r in range(n_rows):
        window = slice(r * max_len, (r + 1) * max_len)
        rows.input_ids.append(ids[window])
        rows.labels.append(labels[window])
        rows.position_ids.append(positions[window])
        rows.num_docs.append(int(docs_per_row[r]))
    return rows


def pack_greedy(docs: Sequence[Doc], max_len: int) -> Rows:
    """sft packing: whole samples, in order, into rows of at most ``max_len`` (next-fit: a sample that does not
    fit starts a new row). Samples are never split, so a sample's target never loses its source."""
    rows = Rows(position_ids=[])
    pending: list[Doc] = []

    def flush():
        if pending:
            labels = [lab.copy() for _, lab in pending]
            for lab in labels:
                lab[0] = IGNORE_INDEX
            rows.input_ids.append(np.concatenate([i for i, _ in pending]).astype(np.int32, copy=False))
            rows.labels.append(np.concatenate(labels).astype(np.int32, copy=False))
            rows.position_ids.append(np.concatenate([np.arange(len(i), dtype=np.int32) for i, _ in pending]))
            rows.num_docs.append(len(pending))
            pending.clear()

    used = 0
    for ids, labels in docs:
        if len(ids) > max_len:  # cannot happen for truncated sft samples; split rather than drop
            pieces = split_long(ids, labels, max_len)
        else:
            pieces = [(ids, labels)]
        for piece in pieces:
            if used + len(piece[0]) > max_len:
                flush()
                used = 0
            pending.append(piece)
            used += len(piece[0])
    flush()
    return rows


def pack(docs: Sequence[Doc], max_len: int, packing: str, mode: str) -> Rows:
    """Dispatch: ``none`` -> one per row; ``greedy`` -> :func:`pack_concat` (pt) or :func:`pack_greedy` (sft)."""
    if packing == "none":
        return pack_none(docs, max_len)
    if packing != "greedy":
        raise ValueError(f"unknown packing {packing!r}; choose none or greedy")
    return pack_concat(docs, max_len) if mode == "pt" else pack_greedy(docs, max_len)


def list_array(arrays: Sequence[np.ndarray]) -> pa.ListArray:
    """list<int32> column from int32 arrays without going through Python ints."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    values = np.concatenate(arrays).astype(np.int32, copy=False) if len(arrays) else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def rows_to_table(rows: Rows) -> pa.Table:
    columns = {"input_ids": list_array(rows.input_ids), "labels": list_array(rows.labels)}
    if rows.position_ids is not None:
        columns["position_ids"] = list_array(rows.position_ids)
    return pa.table(columns)


def padding_fraction(lengths: Sequence[int], batch_size: int, pad_to: int | None = None) -> float:
    """Share of padding tokens when consecutive rows form batches of ``batch_size``, each padded to its
    longest row (``pad_to=None``, dynamic padding) or to ``pad_to`` tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 0.0
    padded = 0
    for i in range(0, lengths.size, batch_size):
        chunk = lengths[i : i + batch_size]
        padded += len(chunk) * (pad_to if pad_to is not None else int(chunk.max()))
    return 1.0 - float(lengths.sum()) / padded
