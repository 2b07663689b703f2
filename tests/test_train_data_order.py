"""The training data order without Ray: a seeded shuffle per epoch, disjoint equal rank shares, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from chatmusician.train.data_order import (
    Chunk,
    ShardRowReader,
    epoch_order,
    eval_pieces,
    plan_chunks,
)

CHUNKS = [Chunk(f, g, rows) for f in range(3) for g, rows in enumerate((10, 10, 7))]  # 81 rows


def _rows(order):
    return [(c.file, c.row_group, k) for c, k in order]


def test_each_epoch_is_a_different_seeded_order_and_the_same_for_the_same_seed():
    epochs = [_rows(epoch_order(CHUNKS, 42, e, 0, 2, 8)) for e in range(3)]
    assert epochs[0] == _rows(epoch_order(CHUNKS, 42, 0, 0, 2, 8))  # same seed, same order
    assert epochs[0] != epochs[1] != epochs[2]
    assert _rows(epoch_order(CHUNKS, 7, 0, 0, 2, 8)) != epochs[0]
    # The shuffle is real: not the written order, and rows of far-apart chunks mix within a window.
    unshuffled = _rows(epoch_order(CHUNKS, 42, 0, 0, 2, 8, shuffle=False))
    assert unshuffled == sorted(unshuffled) and epochs[0] != unshuffled
    wide = _rows(epoch_order(CHUNKS, 42, 0, 0, 2, 30))
    assert len({(f, g) for f, g, _ in wide[:8]}) > 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_equal_disjoint_shares_of_every_row(world):
    every = {(c.file, c.row_group, k) for c in CHUNKS for k in range(c.rows)}
    for epoch in range(2):
        shares = [_rows(epoch_order(CHUNKS, 1, epoch, r, world, 16)) for r in range(world)]
        assert all(len(s) == 81 // world for s in shares)
        union = set(itertools.chain.from_iterable(shares))
        assert len(union) == sum(map(len, shares)) and union <= every  # disjoint, real rows
        assert len(every - union) == 81 % world  # only the remainder sits out


def test_validation_parts_cover_every_row_once():
    for world in (1, 2, 4, 7):
        parts = [eval_pieces(CHUNKS, r, world) for r in range(world)]
        rows = [(p.chunk, p.start + k) for pieces, _ in parts for p in pieces for k in range(p.rows)]
        assert len(rows) == len(set(rows)) == 81
        assert {most for _, most in parts} == {-(-81 // world)}


@pytest.fixture
def shard_files(tmp_path):
    """Two parquet files of 3 + 2 row groups; row i holds ids [i, i, i]."""
    files, row = [], 0
    for name, groups in (("a", (7, 7, 5)), ("b", (6, 4))):
        path = tmp_path / f"{name}.parquet"
        with pq.ParquetWriter(
            path, pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
        ) as w:
            for n in groups:
                ids = [[i] * 3 for i in range(row, row + n)]
                w.write_table(pa.table({"input_ids": ids, "labels": ids}, schema=w.schema), row_group_size=n)
                row += n
        files.append(str(path))
    return files


def _reader(files, rank=0, world=2, **kw):
    fs = pafs.LocalFileSystem()
    opts = {"micro_batch_size": 2, "seed": 3, "window": 5, **kw}
    return ShardRowReader(files, fs, plan_chunks(files, fs), rank=rank, world=world, **opts)


def _ids(batches, n):
    return [[int(r[0]) for r in b["input_ids"]] for b in itertools.islice(batches, n)]


def test_reader_streams_the_planned_order_epoch_after_epoch(shard_files):
    reader = _reader(shard_files)
    assert [c.rows for c in reader.chunks] == [7, 7, 5, 6, 4]
    per_epoch = reader.micro_per_epoch
    assert per_epoch == (29 // 2) // 2  # 14 rows a rank -> 7 micro batches
    got = _ids(reader.batches(), 3 * per_epoch)
    row_of = {}
    start = 0
    for c in reader.chunks:
        for k in range(c.rows):
            row_of[(c, k)] = start + k
        start += c.rows
    for epoch in range(3):
        planned = [row_of[x] for x in epoch_order(reader.chunks, 3, epoch, 0, 2, 5)]
        flat = list(itertools.chain.from_iterable(got[epoch * per_epoch : (epoch + 1) * per_epoch]))
        assert flat == planned[: per_epoch * 2]
    assert got[:per_epoch] != got[per_epoch : 2 * per_epoch]
    assert "position_ids" not in next(reader.batches())  # only the columns the shards have


@pytest.mark.parametrize("skip", [0, 1, 3, 6, 7, 8, 15])
def test_resume_after_any_number_of_micro_batches_continues_exactly(shard_files, skip):
    uninterrupted = _ids(_reader(shard_files, rank=1).batches(), 24)
    assert _ids(_reader(shard_files, rank=1).batches(skip), 24 - skip) == uninterrupted[skip:]


def test_unshuffled_reader_reads_rank_ranges_in_written_order(shard_files):
    first = _ids(_reader(shard_files, rank=0, shuffle=False).batches(), 7)
    second = _ids(_reader(shard_files, rank=1, shuffle=False).batches(), 7)
    assert list(itertools.chain.from_iterable(first)) == list(range(14))
    assert list(itertools.chain.from_iterable(second)) == list(range(14, 28))


def test_a_share_without_one_micro_batch_is_a_clear_error(shard_files):
    with pytest.raises(RuntimeError, match="less than one micro batch"):
        _reader(shard_files[1:], world=8, micro_batch_size=2)


def test_window_shuffle_is_a_permutation_of_the_window(shard_files):
    rows = np.array(list(itertools.chain.from_iterable(_ids(_reader(shard_files, window=100).batches(), 7))))
    plain = np.array(list(itertools.chain.from_iterable(_ids(_reader(shard_files, window=1).batches(), 7))))
    # window 1 keeps each (shuffled) chunk's rows in order; a window over the whole share mixes them
    assert sorted(rows) == sorted(plain) and list(rows) != list(plain)


def _counting_filesystem():
    """The local filesystem's input files, counted while open (a stand-in for file descriptors)."""
    local = pafs.LocalFileSystem()
    state = {"open": 0, "most": 0, "opens": 0}

    class Tracked:
        def __init__(self, f):
            self.f = f
            state["open"] += 1
            state["opens"] += 1
            state["most"] = max(state["most"], state["open"])

        def close(self):
            if not self.f.closed:
                state["open"] -= 1
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    class FS:
        def open_input_file(self, path):
            return Tracked(local.open_input_file(path))

    return FS(), state


def test_the_reader_keeps_a_bounded_number_of_files_open_and_reads_the_same_rows(tmp_path):
    """Ten one-group files in a shuffled order: at most two open at once, each closed when evicted, and the
    rows exactly those of a reader that may keep every file open."""
    files = []
    for k in range(10):
        ids = [[k * 4 + i] for i in range(4)]
        pq.write_table(pa.table({"input_ids": ids, "labels": ids}), tmp_path / f"part-{k:05d}.parquet")
        files.append(str(tmp_path / f"part-{k:05d}.parquet"))
    chunks = plan_chunks(files, pafs.LocalFileSystem())
    fs, state = _counting_filesystem()
    opts = {"rank": 0, "world": 1, "micro_batch_size": 4, "seed": 5, "window": 12}
    bounded = ShardRowReader(files, fs, chunks, max_open_files=2, **opts)
    wide = ShardRowReader(files, pafs.LocalFileSystem(), chunks, max_open_files=100, **opts)
    assert _ids(bounded.batches(), 20) == _ids(wide.batches(), 20)  # two epochs
    assert state["most"] == 2 and len(bounded._open) == 2
    assert state["opens"] > 10  # files were closed and opened again rather than all kept open
    bounded.close()
    assert state["open"] == 0
