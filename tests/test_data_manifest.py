"""The data stage's contract with the trainer, without Ray: one path resolver, the manifest's plan (no footer
read), and the checks that refuse shards which do not fit a run."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from chatmusician.data.manifest import (
    MANIFEST_FORMAT,
    Chunk,
    ShardMismatch,
    ShardsNotFinished,
    check_shards,
    read_manifest,
    resolve,
    shard_plan,
    write_manifest,
)

FINGERPRINT = {"name": "m-a-p/ChatMusician-Base", "sha256": "a" * 64, "vocab_size": 32000}


def manifest(**kw):
    base = {
        "format": MANIFEST_FORMAT,
        "mode": "sft",
        "packing": "none",
        "max_len": 2048,
        "tokenizer": dict(FINGERPRINT),
        "shards": [
            {"file": "part-00000.parquet", "rows": 600, "tokens": 9, "row_groups": [256, 256, 88]},
            {"file": "part-00001.parquet", "rows": 10, "tokens": 1, "row_groups": [10]},
        ],
    }
    return {**base, **kw}


def test_matching_shards_pass():
    check_shards(manifest(), tokenizer_fingerprint=FINGERPRINT, max_length=2048, mode="sft", packing="none")
    check_shards(manifest(max_len=512), tokenizer_fingerprint=FINGERPRINT, max_length=2048)


@pytest.mark.parametrize(
    "change, run, names",
    [
        (
            {"tokenizer": {**FINGERPRINT, "sha256": "b" * 64, "name": "other"}},
            {},
            ["bbbbbbbbbbbb (other)", "aaaa"],
        ),
        ({"tokenizer": {**FINGERPRINT, "vocab_size": 32001}}, {}, ["vocab_size 32001 vs 32000"]),
        ({"mode": "pt"}, {"mode": "sft"}, ["mode pt vs sft"]),
        ({"packing": "greedy"}, {"packing": "none"}, ["packing greedy vs none"]),
        ({"max_len": 4096}, {}, ["max_len 4096", "max_length 2048"]),
        (
            {"format": "chatmusician.tokenized/1"},
            {},
            ["format chatmusician.tokenized/1 vs " + MANIFEST_FORMAT],
        ),
    ],
)
def test_a_mismatch_is_one_line_naming_both_sides(change, run, names):
    with pytest.raises(ShardMismatch) as caught:
        check_shards(manifest(**change), tokenizer_fingerprint=FINGERPRINT, max_length=2048, **run)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert all(name in message for name in names), message


def test_every_mismatch_is_named_at_once():
    bad = manifest(mode="pt", max_len=4096, tokenizer={**FINGERPRINT, "vocab_size": 7})
    with pytest.raises(ShardMismatch, match="vocab_size 7 vs 32000; mode pt vs sft; rows up to max_len 4096"):
        check_shards(bad, tokenizer_fingerprint=FINGERPRINT, max_length=2048, mode="sft")


def test_the_plan_comes_from_the_manifest_alone(tmp_path):
    """No shard file exists: a plan that opened footers would fail; this one lists every row group."""
    write_manifest(str(tmp_path), manifest())
    plan = shard_plan(str(tmp_path))
    assert plan["files"] == [f"{tmp_path}/part-00000.parquet", f"{tmp_path}/part-00001.parquet"]
    assert plan["chunks"] == [Chunk(0, 0, 256), Chunk(0, 1, 256), Chunk(0, 2, 88), Chunk(1, 0, 10)]
    assert plan["rows"] == 610 and plan["manifest"]["mode"] == "sft"
    assert isinstance(plan["filesystem"], pafs.LocalFileSystem)
    # The same through a filesystem handed in (how tests stand in for s3): paths inside it.
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert shard_plan("", sub)["files"][0] == "/part-00000.parquet"


def test_plans_refuse_unfinished_and_old_folders(tmp_path):
    with pytest.raises(ShardsNotFinished, match="did not finish"):
        shard_plan(str(tmp_path))
    old = manifest(format="chatmusician.tokenized/1")
    for shard in old["shards"]:
        del shard["row_groups"]
    write_manifest(str(tmp_path), old)
    with pytest.raises(ShardMismatch, match="lists no row groups"):
        shard_plan(str(tmp_path))
    assert read_manifest(str(tmp_path))["format"] == "chatmusician.tokenized/1"


def test_one_resolver_for_local_paths_file_uris_and_remote_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("shards/pt")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/shards/pt"
    assert resolve(f"file://{tmp_path}/x")[1] == f"{tmp_path}/x"
    fs, path = resolve(f"file://{tmp_path}/*.parquet")
    assert path == f"{tmp_path}/*.parquet"
    mock = pafs.FileSystem.from_uri("mock:///")[0]
    assert resolve("bucket/k", mock) == (mock, "bucket/k")
    fs, path = resolve("mock:///data/a*/b.parquet")
    assert type(fs).__name__ == "_MockFileSystem" and path == "data/a*/b.parquet"


def test_a_checked_plan_refuses_shards_of_another_tokenizer_before_any_worker(tmp_path, tiny_model_path):
    from chatmusician.data.manifest import checked_plan, tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tiny_model_path)
    write_manifest(str(tmp_path), manifest(tokenizer=fingerprint, max_len=128))
    plan = checked_plan(str(tmp_path), model=tiny_model_path, max_length=128, mode="sft")
    assert plan["rows"] == 610
    write_manifest(str(tmp_path), manifest(max_len=128))  # FINGERPRINT: another tokenizer
    with pytest.raises(ShardMismatch, match=f"shards {tmp_path} do not fit this run"):
        checked_plan(str(tmp_path), model=tiny_model_path, max_length=128)
