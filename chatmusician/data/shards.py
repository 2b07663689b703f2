"""Parquet shard I/O of the data stage: the streaming writer, the merge plan that turns per-work-item staged
files into ``shard_rows``-row shards, and the folder's housekeeping. No Ray here: the pipeline runs
:func:`merge_files` in Ray tasks.

Two steps, both in tasks (the driver moves no token ids, only counts and names):
1. each tokenize task streams each work item's rows into a staged file ``_staging/<split>/item-IIIII.parquet``;
2. once every item's row count is known, each merge task writes one final shard ``part-NNNNN.parquet`` of
   ``shard_rows`` rows (the last may be shorter), reading its rows' slices of the staged files.
A corpus read as thousands of source row groups thus becomes ``rows / shard_rows`` files, and each file's row
groups (counts in the manifest) are cut by row count only, so the same rows give byte-identical shards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chatmusician.data.manifest import MANIFEST, join, resolve

STAGING = "_staging"
ROW_GROUP_ROWS = 256
_SHARD = re.compile(r"^part-\d{5}(-\d{4})?\.parquet$")  # this layout's names and the earlier per-item ones


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def staged_name(item: int) -> str:
    return f"item-{item:05d}.parquet"


class ShardWriter:
    """Writes rows in order into parquet files of exactly ``shard_rows`` rows (the last may be shorter), streamed
    as row groups of ``row_group_rows`` rows: only the last row group is left to write when the stream ends,
    and the writer holds at most one row group. A file is written under a temporary name and renamed when
    complete. Row groups are cut by row count, never by how the stream arrived in blocks, so the same rows
    give byte-identical files. ``name(k)``: the k-th file's name (default ``part-KKKKK.parquet``).

    It touches no other file: the caller prepares the folder (:func:`prepare_folder`) and removes stale files."""

    def __init__(
        self,
        output_dir: str,
        shard_rows: int,
        row_group_rows: int = ROW_GROUP_ROWS,
        name: Callable[[int], str] = shard_name,
        filesystem: pafs.FileSystem | None = None,
    ):
        self.fs, self.root = resolve(output_dir, filesystem)
        self.name = name
        self.shard_rows = shard_rows
        self.row_group_rows = min(row_group_rows, shard_rows)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[dict[str, Any]] = []
        self._open: pq.ParquetWriter | None = None  # the file being written
        self._open_rows = self._open_tokens = 0
        self._groups: list[int] = []
        self.fs.create_dir(self.root, recursive=True)  # may be new to this node (shared storage)

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows and self.pending_rows >= self._next_cut():
            self._write_group(self._next_cut())

    def _next_cut(self) -> int:
        """Rows of the next row group: a full one, or what the current file still lacks."""
        return min(self.row_group_rows, self.shard_rows - self._open_rows)

    def _write_group(self, n_rows: int) -> None:
        table = pa.concat_tables(self.pending)
        group, rest = table.slice(0, n_rows), table.slice(n_rows)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._open is None:
            # No dictionary encoding: token ids barely gain from it, and writing and reading are 2-3x faster without.
            self._open = pq.ParquetWriter(
                join(self.root, f".{self.name(len(self.shards))}.tmp"),
                group.schema,
                filesystem=self.fs,
                compression="zstd",
                use_dictionary=False,
            )
        self._open.write_table(group.combine_chunks(), row_group_size=max(n_rows, 1))
        self._open_rows += group.num_rows
        self._open_tokens += token_count(group)
        self._groups.append(group.num_rows)
        if self._open_rows == self.shard_rows:
            self._finish()

    def _finish(self) -> None:
        self._open.close()
        name = self.name(len(self.shards))
        self.fs.move(join(self.root, f".{name}.tmp"), join(self.root, name))
        self.shards.append(
            {"file": name, "rows": self._open_rows, "tokens": self._open_tokens, "row_groups": self._groups}
        )
        self._open, self._open_rows, self._open_tokens, self._groups = None, 0, 0, []

    def close(self) -> list[dict[str, Any]]:
        """Write what is left; the files written: ``{file, rows, tokens, row_groups}`` each."""
        if self.pending_rows:
            self._write_group(self.pending_rows)
        if self._open is not None:
            self._finish()
        return self.shards


def token_count(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)


# --- merging staged files into shards ---------------------------------------------------------------------------


class Slice(NamedTuple):
    """Rows ``[start, start + rows)`` of row group ``row_group`` of staged file ``file``."""

    file: str
    row_group: int
    start: int
    rows: int


def merge_plan(staged: list[dict[str, Any]], shard_rows: int) -> list[list[Slice]]:
    """Staged files in order (``{file, row_groups}``) -> for each output shard, the slices of staged row groups
    that make its ``shard_rows`` rows (the last shard takes what is left). Pure."""
    shards: list[list[Slice]] = []
    current, have = [], 0
    for entry in staged:
        for group, rows in enumerate(entry["row_groups"]):
            start = 0
            while start < rows:
                take = min(rows - start, shard_rows - have)
                current.append(Slice(entry["file"], group, start, take))
                start, have = start + take, have + take
                if have == shard_rows:
                    shards.append(current)
                    current, have = [], 0
    if current:
        shards.append(current)
    return shards


def read_slices(slices: list[Slice], filesystem: pafs.FileSystem) -> Iterator[pa.Table]:
    """The rows of ``slices`` in order, one row group at a time (one staged file open at a time)."""
    path, handle, reader = None, None, None
    try:
        for s in slices:
            if s.file != path:
                if handle is not None:
                    handle.close()
                path, handle = s.file, filesystem.open_input_file(s.file)
                reader = pq.ParquetFile(handle)
            yield reader.read_row_group(s.row_group).slice(s.start, s.rows)
    finally:
        if handle is not None:
            handle.close()


def merge_files(index: int, slices: list[Slice], output_dir: str, shard_rows: int) -> dict[str, Any]:
    """Write shard ``index`` of a merge plan into ``output_dir``; its manifest entry."""
    writer = ShardWriter(output_dir, shard_rows, name=lambda _: shard_name(index))
    for table in read_slices(slices, writer.fs):
        writer.add(table)
    (entry,) = writer.close()
    return entry


# --- the folder -------------------------------------------------------------------------------------------------


def prepare_folder(path: str) -> None:
    """Create the folder and remove its manifest (a run in progress never looks complete) and staging."""
    fs, root = resolve(path)
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(join(root, MANIFEST)).is_file:
        fs.delete_file(join(root, MANIFEST))
    remove_staging(path)


def remove_staging(path: str) -> None:
    fs, root = resolve(path)
    if fs.get_file_info(join(root, STAGING)).type == pafs.FileType.Directory:
        fs.delete_dir(join(root, STAGING))


def remove_stale(path: str, written: set[str]) -> None:
    """Delete shards not in ``written`` and unfinished temp files: what an earlier, longer or crashed run left
    behind (never duplicates)."""
    fs, root = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    for info in infos:
        name = info.base_name
        if info.is_file and ((_SHARD.match(name) and name not in written) or name.endswith(".parquet.tmp")):
            fs.delete_file(info.path)


def remove_folder(path: str) -> None:
    fs, root = resolve(path)
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        fs.delete_dir(root)
