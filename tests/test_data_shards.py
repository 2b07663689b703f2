"""Merging staged work-item files into shard_rows-row shards, without Ray: the plan, and byte-identical shards
however the rows were cut into items."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from chatmusician.data.shards import ShardWriter, Slice, merge_files, merge_plan, staged_name


def test_the_merge_plan_cuts_staged_row_groups_into_full_shards():
    staged = [
        {"file": "a", "row_groups": [4, 4, 2]},
        {"file": "b", "row_groups": [3]},
        {"file": "c", "row_groups": [6]},
    ]
    plan = merge_plan(staged, shard_rows=7)
    assert plan == [
        [Slice("a", 0, 0, 4), Slice("a", 1, 0, 3)],
        [Slice("a", 1, 3, 1), Slice("a", 2, 0, 2), Slice("b", 0, 0, 3), Slice("c", 0, 0, 1)],
        [Slice("c", 0, 1, 5)],
    ]
    assert [sum(s.rows for s in shard) for shard in plan] == [7, 7, 5]
    assert merge_plan([], 7) == [] and merge_plan([{"file": "a", "row_groups": [7]}], 7) == [
        [Slice("a", 0, 0, 7)]
    ]


def _stage(folder, rows: pa.Table, cuts: list[int]) -> list[dict]:
    """``rows`` staged as one file per item, items of ``cuts`` rows (as tokenize tasks would)."""
    staged, start = [], 0
    for item, n in enumerate(cuts):
        writer = ShardWriter(str(folder), 2**62, row_group_rows=3, name=lambda _, i=item: staged_name(i))
        writer.add(rows.slice(start, n))
        start += n
        for entry in writer.close():
            staged.append({**entry, "file": f"{folder}/{entry['file']}"})
    return staged


def test_merged_shards_are_byte_identical_however_the_items_were_cut(tmp_path):
    ids = [[k] * (k % 4 + 1) for k in range(41)]
    rows = pa.table(
        {"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": pa.array(ids, pa.list_(pa.int32()))}
    )
    outputs = {}
    for name, cuts in (("few", [41]), ("many", [5, 1, 9, 13, 2, 11])):
        staged = _stage(tmp_path / name / "_staging", rows, cuts)
        entries = [
            merge_files(k, slices, str(tmp_path / name), shard_rows=16)
            for k, slices in enumerate(merge_plan(staged, 16))
        ]
        assert [e["rows"] for e in entries] == [16, 16, 9]
        assert [e["row_groups"] for e in entries] == [[16], [16], [9]]  # cut by count, never by item
        assert sum(e["tokens"] for e in entries) == sum(map(len, ids))
        files = [tmp_path / name / e["file"] for e in entries]
        assert pa.concat_tables(pq.read_table(f) for f in files).equals(rows)
        outputs[name] = [f.read_bytes() for f in files]
    assert outputs["few"] == outputs["many"]
