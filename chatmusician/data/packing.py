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


@dataclass
class FlatDocs:
    """Documents laid end to end: one int32 array per column plus each document's length (no per-document
    arrays, so a batch of thousands of documents costs a few numpy passes, not thousands of small objects)."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, docs: Sequence[Doc]) -> FlatDocs:
        if not docs:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64))
        return cls(
            np.concatenate([d[0] for d in docs]).astype(np.int32, copy=False),
            np.concatenate([d[1] for d in docs]).astype(np.int32, copy=False),
            np.fromiter((len(d[0]) for d in docs), dtype=np.int64, count=len(docs)),
        )

    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    def repeat(self, counts: np.ndarray) -> FlatDocs:
        """Document d ``counts[d]`` times in a row (0 drops it), as ``[doc] * count`` would."""
        counts = np.asarray(counts, dtype=np.int64)
        if (counts == 1).all():
            return self
        chosen = np.repeat(np.arange(len(self.lengths)), counts)
        lengths = self.lengths[chosen]
        new_starts = np.cumsum(lengths) - lengths
        index = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(
            self.starts()[chosen] - new_starts, lengths
        )
        return FlatDocs(self.input_ids[index], self.labels[index], lengths)


@dataclass
class FlatRows:
    """Training rows as flat columns cut by ``offsets`` (row r is ``[offsets[r], offsets[r + 1])``): the layout
    of an Arrow list column, so :func:`flat_rows_to_table` builds the table without copying row by row."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray | None
    offsets: np.ndarray
    num_docs: np.ndarray

    def to_rows(self) -> Rows:
        cut = self.offsets[1:-1]
        split = (lambda a: np.split(a, cut)) if len(self.offsets) > 1 else (lambda a: [])
        return Rows(
            input_ids=split(self.input_ids),
            labels=split(self.labels),
            position_ids=None if self.position_ids is None else split(self.position_ids),
            num_docs=[int(n) for n in self.num_docs],
        )


def split_long(ids: np.ndarray, labels: np.ndarray, max_len: int) -> list[Doc]:
    """Cut one document into consecutive pieces of at most ``max_len`` tokens (nothing is dropped)."""
    return [(ids[i : i + max_len], labels[i : i + max_len]) for i in range(0, max(len(ids), 1), max_len)]


def _pieces(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat twin of :func:`split_long` over all documents: (start, length, is_first) of every piece."""
    counts = np.maximum(-(-lengths // max_len), 1)
    first = np.cumsum(counts) - counts
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)  # piece index in its document
    doc_start = np.repeat(np.cumsum(lengths) - lengths, counts)
    piece_len = np.minimum(np.repeat(lengths, counts) - k * max_len, max_len).clip(min=0)
    return doc_start + k * max_len, piece_len, k == 0


def _offsets(row_starts: np.ndarray, total: int) -> np.ndarray:
    return np.append(row_starts, total).astype(np.int64)


def pack_none_flat(docs: FlatDocs, max_len: int) -> FlatRows:
    """Flat :func:`pack_none`."""
    starts, _, first = _pieces(docs.lengths, max_len)
    offsets = _offsets(starts, len(docs.input_ids))
    return FlatRows(docs.input_ids, docs.labels, None, offsets, first.astype(np.int64))


def pack_concat_flat(docs: FlatDocs, max_len: int) -> FlatRows:
    """Flat :func:`pack_concat`."""
    total = len(docs.input_ids)
    n_rows = -(-total // max_len)
    if not len(docs.lengths):
        empty = np.zeros(0, np.int32)
        return FlatRows(empty, empty, empty, np.zeros(1, np.int64), np.zeros(0, np.int64))
    starts = docs.starts()
    labels = docs.labels.copy()
    # a document's first token is never predicted from the previous one
    labels[starts[docs.lengths > 0]] = IGNORE_INDEX
    token = np.arange(total, dtype=np.int64)
    # positions restart at each document start and at each row start: the nearer of the two wins
    positions = np.minimum(token - np.repeat(starts, docs.lengths), token % max_len).astype(np.int32)
    offsets = _offsets(np.arange(0, total, max_len, dtype=np.int64), total)
    num_docs = np.bincount(starts // max_len, minlength=n_rows).astype(np.int64)
    return FlatRows(docs.input_ids, labels, positions, offsets, num_docs)


def pack_greedy_flat(docs: FlatDocs, max_len: int) -> FlatRows:
    """Flat :func:`pack_greedy`: next-fit over piece lengths (a loop over documents, never over tokens)."""
    starts, lengths, _ = _pieces(docs.lengths, max_len)
    row_first = []  # index of the first piece of each row
    used = 0
    for k, n in enumerate(lengths.tolist()):
        if not row_first or used + n > max_len:
            row_first.append(k)
            used = 0
        used += n
    total = len(docs.input_ids)
    labels = docs.labels.copy()
    labels[starts[lengths > 0]] = IGNORE_INDEX
    positions = (np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
    first = np.array(row_first, dtype=np.int64)
    offsets = _offsets(starts[first], total)
    num_docs = np.diff(np.append(first, len(lengths))).astype(np.int64)
    return FlatRows(docs.input_ids, labels, positions, offsets, num_docs)


def pack_flat(docs: FlatDocs, max_len: int, packing: str, mode: str) -> FlatRows:
    """Dispatch like :func:`pack`, on flat documents."""
    if packing == "none":
        return pack_none_flat(docs, max_len)
    if packing != "greedy":
        raise ValueError(f"unknown packing {packing!r}; choose none or greedy")
    return pack_concat_flat(docs, max_len) if mode == "pt" else pack_greedy_flat(docs, max_len)


def pack_none(docs: Sequence[Doc], max_len: int) -> Rows:
    """One document per row (the original); a document longer than ``max_len`` continues in the next rows."""
    return pack_none_flat(FlatDocs.of(docs), max_len).to_rows()


def pack_concat(docs: Sequence[Doc], max_len: int) -> Rows:
    """pt packing: concatenate the documents and cut every ``max_len`` tokens, so only the last row is short.
    Long documents run on into the next row; positions restart at each document and at each row start."""
    return pack_concat_flat(FlatDocs.of(docs), max_len).to_rows()


def pack_greedy(docs: Sequence[Doc], max_len: int) -> Rows:
    """sft packing: whole samples, in order, into rows of at most ``max_len`` (next-fit: a sample that does not
    fit starts a new row). Samples are never split, so a sample's target never loses its source."""
    return pack_greedy_flat(FlatDocs.of(docs), max_len).to_rows()


def pack(docs: Sequence[Doc], max_len: int, packing: str, mode: str) -> Rows:
    """Dispatch: ``none`` -> one per row; ``greedy`` -> :func:`pack_concat` (pt) or :func:`pack_greedy` (sft)."""
    return pack_flat(FlatDocs.of(docs), max_len, packing, mode).to_rows()


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


def flat_rows_to_table(rows: FlatRows) -> pa.Table:
    """Same table as ``rows_to_table(rows.to_rows())``, built from the flat columns directly (zero-copy values)."""
    offsets = pa.array(rows.offsets.astype(np.int32))

    def column(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(
            offsets, pa.array(values.astype(np.int32, copy=False), type=pa.int32())
        )

    columns = {"input_ids": column(rows.input_ids), "labels": column(rows.labels)}
    if rows.position_ids is not None:
        columns["position_ids"] = column(rows.position_ids)
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
