"""Which shard rows each training worker reads, in which order: a seeded shuffle that is a pure function of
(seed, epoch, rank, world size) and the shards' row counts, never of where Ray ran anything. A resumed run, on
the same nodes or on others, therefore reads exactly the rows an uninterrupted run does.

Order of epoch ``e`` (the original sampled with a seeded ``DistributedSampler``; this is its streaming twin):

1. the shards' parquet row groups ("chunks") are permuted by a generator seeded with ``(seed, e)``;
2. the permuted rows are cut into ``world`` equal contiguous ranges of ``rows // world`` rows (the remainder
   sits out this epoch, like ``DistributedSampler(drop_last=True)``); rank ``r`` reads range ``r`` only, so
   each worker reads its share of the data and no more;
3. each rank's range is shuffled in windows of ``window`` rows (seeded with ``(seed, e, r, window)``), so rows
   of several far-apart chunks mix while a worker holds at most one window in memory.

Micro batches are consecutive rows of that sequence; a partial micro batch at an epoch's end is dropped. The
data position saved in a checkpoint is the number of micro batches consumed: resume skips whole windows
without reading them. Pure numpy + pyarrow: no Ray here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from chatmusician.data.manifest import Chunk

__all__ = ["Chunk", "Piece", "ShardRowReader", "epoch_order", "eval_pieces", "plan_chunks"]


class Piece(NamedTuple):
    """Rows ``[start, start + rows)`` of one chunk."""

    chunk: Chunk
    start: int
    rows: int


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def epoch_chunks(chunks: list[Chunk], seed: int, epoch: int, shuffle: bool = True) -> list[Chunk]:
    """The chunks in epoch ``epoch``'s order: a seeded permutation (a different one each epoch), or as written."""
    if not shuffle:
        return list(chunks)
    order = _rng(seed, epoch).permutation(len(chunks))
    return [chunks[i] for i in order]


def rows_per_rank(total_rows: int, world: int) -> int:
    return total_rows // world


def rank_pieces(chunks: list[Chunk], rank: int, world: int) -> list[Piece]:
    """Rank ``rank``'s contiguous range of the (already ordered) chunks' rows, as pieces of chunks."""
    n = rows_per_rank(sum(c.rows for c in chunks), world)
    begin, end = rank * n, (rank + 1) * n
    pieces, offset = [], 0
    for chunk in chunks:
        lo, hi = max(begin, offset), min(end, offset + chunk.rows)
        if lo < hi:
            pieces.append(Piece(chunk, lo - offset, hi - lo))
        offset += chunk.rows
        if offset >= end:
            break
    return pieces


def eval_pieces(chunks: list[Chunk], rank: int, world: int) -> tuple[list[Piece], int]:
    """Rank ``rank``'s contiguous part of every row (validation: nothing left out, no shuffle) and the most rows
    any rank gets (``ceil(rows / world)``), so that every rank can run the same number of batches."""
    total = sum(c.rows for c in chunks)
    begin, end = rank * total // world, (rank + 1) * total // world
    pieces, offset = [], 0
    for chunk in chunks:
        lo, hi = max(begin, offset), min(end, offset + chunk.rows)
        if lo < hi:
            pieces.append(Piece(chunk, lo - offset, hi - lo))
        offset += chunk.rows
    return pieces, -(-total // world)


def window_permutation(rows: int, seed: int, epoch: int, rank: int, window: int, shuffle: bool) -> np.ndarray:
    """Order of the ``rows`` rows of one window (identity when not shuffling)."""
    return _rng(seed, epoch, rank, window).permutation(rows) if shuffle else np.arange(rows)


def epoch_order(
    chunks: list[Chunk], seed: int, epoch: int, rank: int, world: int, window: int, shuffle: bool = True
) -> list[tuple[Chunk, int]]:
    """Every row rank ``rank`` reads in epoch ``epoch``, in order, as (chunk, row within the chunk). For tests
    and inspection; training streams the same order window by window (:class:`ShardRowReader`)."""
    rows = [
        (piece.chunk, piece.start + k)
        for piece in rank_pieces(epoch_chunks(chunks, seed, epoch, shuffle), rank, world)
        for k in range(piece.rows)
    ]
    out = []
    for w, begin in enumerate(range(0, len(rows), window)):
        block = rows[begin : begin + window]
        out += [block[i] for i in window_permutation(len(block), seed, epoch, rank, w, shuffle)]
    return out


def split_pieces(pieces: list[Piece], size: int) -> Iterator[list[Piece]]:
    """Consecutive windows of ``size`` rows over a list of pieces (a piece may be cut between two windows)."""
    window, have = [], 0
    for piece in pieces:
        start, left = piece.start, piece.rows
        while left:
            take = min(left, size - have)
            window.append(Piece(piece.chunk, start, take))
            start, left, have = start + take, left - take, have + take
            if have == size:
                yield window
                window, have = [], 0
    if window:
        yield window


def plan_chunks(files: list[str], filesystem) -> list[Chunk]:
    """The row groups of ``files`` read from their parquet footers, one file after another. For shards without
    a manifest only: a trainer plans from the manifest (chatmusician.data.manifest.shard_plan), which lists
    them without opening a file."""
    import pyarrow.parquet as pq

    chunks = []
    for i, path in enumerate(files):
        meta = pq.ParquetFile(path, filesystem=filesystem).metadata
        chunks += [Chunk(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return chunks


class ShardRowReader:
    """Micro batches of one rank's rows, epoch after epoch, in the order this module defines.

    ``batches(skip)`` starts after ``skip`` micro batches (the checkpointed data position) and yields dicts of
    numpy object arrays (``input_ids``, ``labels``, ``position_ids`` when the shards have them), the shape
    ``recipe.collate`` takes."""

    def __init__(
        self,
        files: list[str],
        filesystem,
        chunks: list[Chunk],
        *,
        rank: int,
        world: int,
        micro_batch_size: int,
        seed: int,
        window: int,
        shuffle: bool = True,
        columns: tuple[str, ...] = ("input_ids", "labels", "position_ids"),
        check_rows: bool = True,
        max_open_files: int = 4,
    ):
        self.files, self.fs, self.chunks = files, filesystem, chunks
        self.rank, self.world, self.micro = rank, world, micro_batch_size
        self.seed, self.window, self.shuffle = seed, window, shuffle
        # A few open files, least recently used closed first: an epoch touches most shard files, and one handle
        # per file ever touched ran out of descriptors (NFS, ulimit -n) or held thousands of S3 connections.
        self.max_open_files = max(1, max_open_files)
        self._open: OrderedDict[int, tuple[Any, Any]] = OrderedDict()  # file index -> (handle, ParquetFile)
        available = self._file(0).schema_arrow.names if files else []
        self.columns = [c for c in columns if c in available]
        self.micro_per_epoch = rows_per_rank(sum(c.rows for c in chunks), world) // micro_batch_size
        if check_rows and self.micro_per_epoch == 0:
            raise RuntimeError("this worker's share of the shards holds less than one micro batch")

    def _file(self, index: int):
        import pyarrow.parquet as pq

        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index][1]
        while len(self._open) >= self.max_open_files:
            self._open.popitem(last=False)[1][0].close()
        handle = self.fs.open_input_file(self.files[index])
        self._open[index] = (handle, pq.ParquetFile(handle))
        return self._open[index][1]

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()

    def read(self, pieces: list[Piece]):
        """The rows of ``pieces`` as one pyarrow table, in piece order; read file by file, so that a window of
        pieces from many files opens each of them once."""
        import pyarrow as pa

        parts: list[Any] = [None] * len(pieces)
        for k in sorted(range(len(pieces)), key=lambda k: pieces[k].chunk.file):
            p = pieces[k]
            group = self._file(p.chunk.file).read_row_group(p.chunk.row_group, columns=self.columns)
            parts[k] = group.slice(p.start, p.rows)
        return pa.concat_tables(parts)

    def epoch_rows(self, epoch: int, skip_rows: int = 0):
        """Pyarrow tables of this rank's rows of ``epoch`` in order, one per window, after ``skip_rows`` rows."""
        pieces = rank_pieces(epoch_chunks(self.chunks, self.seed, epoch, self.shuffle), self.rank, self.world)
        begin = 0
        for w, window in enumerate(split_pieces(pieces, self.window)):
            rows = sum(p.rows for p in window)
            if begin + rows > skip_rows:  # whole windows before the resume point are never read
                order = window_permutation(rows, self.seed, epoch, self.rank, w, self.shuffle)
                table = self.read(window).take(order)
                yield table.slice(max(0, skip_rows - begin))
            begin += rows

    def batches(self, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        epoch, in_epoch = divmod(skip, self.micro_per_epoch)
        while True:
            buffered, emitted = [], in_epoch
            for table in self.epoch_rows(epoch, in_epoch * self.micro):
                buffered.append(table)
                have = sum(t.num_rows for t in buffered)
                while have >= self.micro and emitted < self.micro_per_epoch:
                    import pyarrow as pa

                    joined = pa.concat_tables(buffered)
                    yield _as_batch(joined.slice(0, self.micro), self.columns)
                    buffered, have, emitted = [joined.slice(self.micro)], have - self.micro, emitted + 1
            epoch, in_epoch = epoch + 1, 0  # the partial micro batch at the epoch's end is dropped


def _as_batch(table, columns: list[str]) -> dict[str, np.ndarray]:
    return {c: table[c].to_numpy(zero_copy_only=False) for c in columns}
