"""The Ray Data pipeline on the session's local Ray: manifest counts, shards that read back as the stream,
byte-identical re-runs, no duplicate shards after a crash, the verbal:score ratio, and clear config errors."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatmusician.config import load_config
from chatmusician.corpora import nottingham_tunes
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.packing import IGNORE_INDEX

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small MusicPile-like mixture: ABC-chat rows in parquet (3 row groups), prose + bad rows in jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    tunes = nottingham_tunes()[:60]
    chat = [f"Human: Write a tune. </s> Assistant: {t} </s>" for t in tunes]
    pq.write_table(
        pa.table({"text": chat, "src": ["abc"] * len(chat)}), root / "abc.parquet", row_group_size=25
    )
    prose = [json.dumps({"text": "A reel is a dance in 4/4. " * (5 + k), "src": "prose"}) for k in range(30)]
    bad = ["{broken", json.dumps({"text": ""}), json.dumps({"other": 1}), json.dumps({"text": 7})]
    (root / "prose.jsonl").write_text("\n".join(prose[:15] + bad + prose[15:]) + "\n")
    sft = [json.dumps({"instruction": "Compose.", "input": "", "output": t}) for t in tunes[:40]]
    sft += [
        json.dumps({"instruction": f"What is a jig? ({k})", "input": "", "output": "A dance in 6/8."})
        for k in range(40)
    ]
    (root / "sft.jsonl").write_text("\n".join(sft) + "\n")
    return root


def pt_config(corpus, tiny_model_path, out, **kw):
    base = dict(
        sources=[{"path": str(corpus / "abc.parquet")}, {"path": str(corpus / "prose.jsonl")}],
        tokenizer=tiny_model_path,
        max_len=128,
        packing="greedy",
        output_dir=str(out),
        shard_rows=40,
        batch_size=32,
        read_rows=16,
        num_tokenizers=2,
        tokenizer_cpus=1,
        progress=False,
    )
    return load_config(TokenizeConfig, None, **{**base, **kw})


def _text(line: str) -> str | None:
    """The text of a jsonl row that the reader accepts (a non-empty string), else None."""
    try:
        value = json.loads(line).get("text")
    except ValueError:
        return None
    return value if isinstance(value, str) and value.strip() else None


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


def test_pt_shards_manifest_determinism_and_crash_rerun(ray_cluster, corpus, tiny_model_path, tmp_path):
    from chatmusician.data.pipeline import build_dataset, read_shards, write_shards

    cfg = pt_config(corpus, tiny_model_path, tmp_path / "a")
    manifest = write_shards(cfg)
    rows = manifest["rows"]
    assert rows["read"] == 94 and rows["rejected"] == 4 and rows["written"] == 90
    assert rows["rejected_by_reason"] == {
        "empty": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "not_string": 1,
    }
    assert [s["reason"] for s in rows["reject_samples"]] == [
        "malformed_json",
        "empty",
        "missing_field",
        "not_string",
    ]
    assert rows["reject_samples"][0]["row_id"].endswith("prose.jsonl:15")
    assert manifest["tokenizer"]["name"] == tiny_model_path and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["columns"] == ["input_ids", "labels", "position_ids"]

    shards = [{k: np.asarray(v) for k, v in r.items()} for r in read_shards(str(tmp_path / "a")).take_all()]
    assert len(shards) == manifest["sequences"] == sum(s["rows"] for s in manifest["shards"])
    # The items' rows (4 work items) merged into files of shard_rows rows, numbered in order, all full but the
    # last; the manifest lists each file's row groups as its footer does, so a trainer plans without reading them.
    files = [s["file"] for s in manifest["shards"]]
    assert files == [f"part-{k:05d}.parquet" for k in range(len(files))] and len(files) == -(
        -len(shards) // 40
    )
    assert [s["rows"] for s in manifest["shards"][:-1]] == [40] * (len(files) - 1)
    from chatmusician.data.manifest import shard_plan
    from chatmusician.train.data_order import plan_chunks

    plan = shard_plan(str(tmp_path / "a"))
    assert plan["chunks"] == plan_chunks(plan["files"], plan["filesystem"]) and plan["rows"] == len(shards)
    assert not (tmp_path / "a" / "_staging").exists()
    tokens = sum(len(r["input_ids"]) for r in shards)
    assert tokens == manifest["tokens"]["input"] == sum(s["tokens"] for s in manifest["shards"])
    assert manifest["tokens"]["loss"] == sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in shards)
    assert (
        all(len(r["input_ids"]) == 128 for r in shards[:-1])
        or manifest["padding_fraction"]["pad_to_max_len"] < 0.1
    )
    schema = pq.read_schema(tmp_path / "a" / manifest["shards"][0]["file"])
    assert schema.field("input_ids").type == pa.list_(pa.int32()) and schema.field("labels").type == pa.list_(
        pa.int32()
    )
    # every document gets exactly one EOS appended: the shards hold the EOS already in the texts (the chat
    # rows' "</s>") plus one per written document; never a BOS
    from chatmusician.model.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    texts = pq.read_table(corpus / "abc.parquet")["text"].to_pylist()
    texts += [t for line in (corpus / "prose.jsonl").read_text().splitlines() if (t := _text(line))]
    assert len(texts) == rows["written"]
    in_texts = sum(tok(t, add_special_tokens=False).input_ids.count(tok.eos_token_id) for t in texts)
    assert in_texts == 2 * 60  # the control: the texts alone already hold EOS tokens
    assert sum(int((r["input_ids"] == tok.eos_token_id).sum()) for r in shards) == in_texts + rows["written"]
    assert not any(int((r["input_ids"] == tok.bos_token_id).sum()) for r in shards)
    assert manifest["tokenizer"]["bos"].startswith("never") and manifest["read_retries"] == 0

    # The stream handed to training equals the shards, in order.
    streamed = build_dataset(cfg).take_all()
    assert [list(r["input_ids"]) for r in streamed] == [r["input_ids"].tolist() for r in shards]

    # Same input + config -> byte-identical shards and manifest (one task this time: same files, same names).
    again = write_shards(pt_config(corpus, tiny_model_path, tmp_path / "b", num_tokenizers=1))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    strip = lambda m: {k: v for k, v in m.items() if k != "config"}  # noqa: E731
    assert strip(again) == strip(manifest)

    # The driver receives counts and staged file names only, never the token ids.
    from chatmusician.data.pipeline import plan_items, stage_dataset
    from chatmusician.data.tokenize import tokenizer_spec

    spec = tokenizer_spec(tok, cfg)
    meta = stage_dataset(cfg, plan_items(cfg), (1.0, 1.0), spec, str(tmp_path / "c")).take_all()
    assert {k for row in meta for k in row} == {"split", "stats", "staged", "retries"}
    assert len([r for r in meta if r["staged"]]) == 4  # one staged file per work item (3 row groups, 1 file)

    # A crashed run left no manifest, a stale shard and a temp file: a re-run leaves exactly its own shards,
    # and the same manifest, byte for byte.
    first_manifest = (tmp_path / "a" / "manifest.json").read_bytes()
    (tmp_path / "a" / "manifest.json").unlink()
    (tmp_path / "a" / "part-00099.parquet").write_bytes(b"stale")
    (tmp_path / "a" / "part-00003-0001.parquet").write_bytes(b"stale, the earlier per-item layout")
    (tmp_path / "a" / ".part-00007.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "a" / "_staging" / "train").mkdir(parents=True)
    (tmp_path / "a" / "_staging" / "train" / "item-00000.parquet").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_shards(str(tmp_path / "a"))
    write_shards(cfg)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == first_manifest
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [*digests(tmp_path / "b"), "manifest.json"]
    )


def test_sft_unpacked_rows_and_verbal_score_ratio(ray_cluster, corpus, tiny_model_path, tmp_path):
    from chatmusician.data.pipeline import read_shards, write_shards

    cfg = load_config(
        TokenizeConfig,
        None,
        sources=[{"path": str(corpus / "sft.jsonl")}],
        mode="sft",
        tokenizer=tiny_model_path,
        max_len=256,
        max_source_len=64,
        verbal_score_ratio=[2, 1],
        output_dir=str(tmp_path / "sft"),
        num_tokenizers=1,
        progress=False,
    )
    manifest = write_shards(cfg)
    assert manifest["class_weights"] == {"verbal": 1.0, "score": 0.5}  # 40 verbal : 20 score expected
    assert (
        manifest["rows"]["read"] == 80 and manifest["rows"]["sampled_out"] + manifest["rows"]["written"] == 80
    )
    rows = [{k: np.asarray(v) for k, v in r.items()} for r in read_shards(str(tmp_path / "sft")).take_all()]
    assert "position_ids" not in rows[0] and len(rows) == manifest["rows"]["written"]
    # A tune target is ~200 tokens; "Assistant: A dance in 6/8. </s> " (the chat form raw rows get) ~15.
    n_score = sum(1 for r in rows if (r["labels"][r["labels"] != IGNORE_INDEX] != 2).sum() > 50)
    assert 10 <= n_score <= 30 and len(rows) - n_score == 40
    for r in rows:
        assert len(r["input_ids"]) <= 256 and r["labels"][0] == IGNORE_INDEX
        # A whole target ends with " </s> " as MusicPile-sft's do: EOS, then the trailing space's token. A target
        # cut at the budget (max_len - 3 - source) has no EOS, as in the original's data_preprocess.py.
        assert 2 in r["input_ids"][-2:] or len(r["input_ids"]) >= 256 - 3


def test_a_pool_that_would_starve_reads_is_a_clear_error(ray_cluster, corpus, tiny_model_path, tmp_path):
    from chatmusician.data.pipeline import build_dataset

    with pytest.raises(ValueError, match="CPUs"):
        build_dataset(pt_config(corpus, tiny_model_path, tmp_path, num_tokenizers=64))


def test_hub_source_pinned_and_both_splits_from_one_read(ray_cluster, corpus, tiny_model_path, tmp_path):
    """A hub stand-in source with a validation fraction: one read writes both splits, each equal to its stream,
    the manifest records the commit read, and the shards pass the trainer's check only for a fitting run."""
    import shutil

    from chatmusician.data.hub import standin_commit
    from chatmusician.data.manifest import ShardMismatch, check_shards, read_manifest, tokenizer_fingerprint
    from chatmusician.data.pipeline import build_dataset, read_shards, write_shards

    repo = tmp_path / "hub" / "datasets" / "m-a-p" / "MusicPile" / "data"
    repo.mkdir(parents=True)
    shutil.copy(corpus / "abc.parquet", repo / "train-00000-of-00001.parquet")
    cfg = pt_config(
        corpus, tiny_model_path, tmp_path / "out", sources=[{"path": "m-a-p/MusicPile"}],
        hub_root=str(tmp_path / "hub"), val_fraction=0.25, shard_rows=8,
    )  # fmt: skip
    manifest = write_shards(cfg)
    commit = standin_commit(str(tmp_path / "hub"), "m-a-p/MusicPile")
    assert manifest["sources"] == [
        {"path": "m-a-p/MusicPile", "format": "hub", "revision": None, "commit": commit}
    ]
    val = read_manifest(str(tmp_path / "out" / "val"))
    assert manifest["val"]["sequences"] == val["sequences"] > 0 and val["split"] == "val"
    for split, folder in (("train", tmp_path / "out"), ("val", tmp_path / "out" / "val")):
        shards = [list(r["input_ids"]) for r in read_shards(str(folder)).take_all()]
        assert shards == [list(r["input_ids"]) for r in build_dataset(cfg, split=split).take_all()]
    fingerprint = tokenizer_fingerprint(tiny_model_path)
    check_shards(manifest, tokenizer_fingerprint=fingerprint, max_length=128, mode="pt", packing="greedy")
    with pytest.raises(ShardMismatch, match="max_len 128 tokens vs max_length 64"):
        check_shards(manifest, tokenizer_fingerprint=fingerprint, max_length=64)
