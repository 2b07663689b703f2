"""Sources without Ray: every bad-row reason, formats, globs/directories, the hub-id code path (a local
folder laid out like the hub behind the same filesystem interface), mixture weights and the verbal:score ratio."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatmusician.config import load_config
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.sources import (
    SourceError,
    is_hub_id,
    is_score,
    list_files,
    plan,
    ratio_multipliers,
    read_item,
    read_item_tables,
    read_parquet_pt,
    repeats,
    validate,
)

TUNE = "X:1\nT:Test\nM:6/8\nK:G\nGAB c2d|"


def cfg_for(*paths, **kw):
    return load_config(TokenizeConfig, None, sources=[{"path": str(p)} for p in paths], **kw)


def read_all(cfg, class_weights=(1.0, 1.0)):
    rows = []
    for item in plan(cfg):
        for batch in read_item(item, cfg, class_weights):
            rows += [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
    return rows


def test_every_bad_row_reason_is_counted_and_good_rows_pass(tmp_path):
    jsonl = tmp_path / "pt.jsonl"
    lines = [
        json.dumps({"text": "good prose", "src": "wiki"}).encode(),
        b"{not json",
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff bytes"}',
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "x" * 101}).encode(),
        b"[1, 2]",
    ]
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    rows = read_all(cfg_for(jsonl, max_row_chars=100))
    reasons = [r["reject"] for r in rows]
    assert reasons == [
        "",
        "malformed_json",
        "missing_field",
        "not_string",
        "empty",
        "invalid_utf8",
        "invalid_utf8",
        "too_long",
        "malformed_json",
    ]
    assert rows[0]["text"] == "good prose" and rows[0]["src"] == "wiki" and rows[0]["repeats"] == 1
    assert rows[1]["row_id"] == f"{jsonl}:1"


def test_parquet_invalid_utf8_and_sft_fields(tmp_path):
    path = tmp_path / "sft.parquet"
    table = pa.table(
        {
            "instruction": pa.array([b"Write a jig.", b"Bad \xfe", None, b"Q"], pa.binary()),
            "input": ["", "", None, ""],
            "output": [TUNE, "ok", "orphan", None],
        }
    )
    pq.write_table(table, path)
    rows = read_all(cfg_for(path, mode="sft"))
    assert [r["reject"] for r in rows] == ["", "invalid_utf8", "missing_field", "missing_field"]
    assert (
        rows[0]["source"] == "Human: Write a jig. </s> " and rows[0]["target"] == f"Assistant: {TUNE} </s> "
    )
    assert rows[0]["is_score"]


def test_validate_sft_requires_an_output_and_some_prompt():
    assert validate({"instruction": "", "input": " ", "output": "x"}, "sft", "text", 100) == "empty"
    assert validate({"instruction": "a", "output": ""}, "sft", "text", 100) == "empty"
    assert validate({"instruction": "a", "output": 3}, "sft", "text", 100) == "not_string"
    assert validate({"input": "only input", "output": "y"}, "sft", "text", 100)["source"].startswith(
        "Human: only"
    )


def test_abc_files_give_one_row_per_tune_and_directories_and_globs_resolve(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tunes.abc").write_text("% header\n" + TUNE + "\n\nX:2\nK:D\nDEF|\n")
    (tmp_path / "a" / ".hidden.abc").write_text(TUNE)
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    rows = read_all(cfg_for(tmp_path / "a"))
    assert [r["text"] for r in rows] == [TUNE, "X:2\nK:D\nDEF|"]
    assert list_files(pa.fs.LocalFileSystem(), f"{tmp_path}/a/*.abc") == [
        f"{tmp_path}/a/.hidden.abc",
        f"{tmp_path}/a/tunes.abc",
    ]
    with pytest.raises(SourceError, match="no files"):
        plan(cfg_for(tmp_path / "missing"))


def test_hub_id_streams_the_split_through_the_hub_filesystem(tmp_path):
    repo = tmp_path / "hub" / "datasets" / "m-a-p" / "MusicPile" / "data"
    repo.mkdir(parents=True)
    pq.write_table(
        pa.table({"text": ["a", "b", "c"], "src": ["x", "y", "x"]}),
        repo / "train-00000-of-00001.parquet",
        row_group_size=2,
    )
    pq.write_table(pa.table({"text": ["held out"]}), repo / "test-00000-of-00001.parquet")
    (repo.parent / "README.md").write_text("card")
    assert is_hub_id("m-a-p/MusicPile") and not is_hub_id(str(repo)) and not is_hub_id("s3://b/k")
    cfg = cfg_for("m-a-p/MusicPile", hub_root=str(tmp_path / "hub"))
    items = plan(cfg)
    assert [(i.path, i.row_group, i.first_row) for i in items] == [
        ("datasets/m-a-p/MusicPile/data/train-00000-of-00001.parquet", 0, 0),
        ("datasets/m-a-p/MusicPile/data/train-00000-of-00001.parquet", 1, 2),
    ]
    rows = read_all(cfg)
    assert [r["text"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["row_id"] == "datasets/m-a-p/MusicPile/data/train-00000-of-00001.parquet:2"


def test_mixture_items_interleave_sources(tmp_path):
    for name in ("a", "b"):
        for k in range(2):
            (tmp_path / f"{name}{k}.jsonl").write_text(json.dumps({"text": name}) + "\n")
    items = plan(cfg_for(tmp_path / "a*.jsonl", tmp_path / "b*.jsonl"))
    assert [(i.source, i.path.rsplit("/", 1)[1]) for i in items] == [
        (0, "a0.jsonl"),
        (1, "b0.jsonl"),
        (0, "a1.jsonl"),
        (1, "b1.jsonl"),
    ]


def test_weights_are_deterministic_per_row_and_hit_their_rate():
    keys = [f"f:{k}" for k in range(4000)]
    assert [repeats(k, 2.0, 0) for k in keys[:5]] == [2] * 5
    half = [repeats(k, 0.5, 0) for k in keys]
    assert half == [repeats(k, 0.5, 0) for k in keys]  # same input, same decision
    assert 0.45 < sum(half) / len(keys) < 0.55
    assert half != [repeats(k, 0.5, 1) for k in keys]  # the seed changes the draw
    assert 1.2 < sum(repeats(k, 1.25, 0) for k in keys) / len(keys) < 1.3


def test_src_weights_and_source_weight_multiply(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"t{k}", "src": "arxiv" if k % 2 else "abc"}) + "\n" for k in range(400))
    )
    cfg = load_config(
        TokenizeConfig, None, sources=[{"path": str(path), "weight": 2.0, "src_weights": {"arxiv": 0.25}}]
    )
    rows = read_all(cfg)
    by_src = {s: sum(r["repeats"] for r in rows if r["src"] == s) for s in ("abc", "arxiv")}
    assert by_src["abc"] == 400  # 200 rows x 2
    assert 70 < by_src["arxiv"] < 130  # 200 rows x 0.5


def test_verbal_score_ratio_multipliers_and_classifier():
    assert ratio_multipliers(100, 400, (2, 1)) == (1.0, 0.125)  # 100 verbal : 50 score = 2 : 1
    assert ratio_multipliers(900, 100, (2, 1)) == (pytest.approx(200 / 900), 1.0)
    assert ratio_multipliers(0, 10, (2, 1)) == (1.0, 1.0)
    assert is_score(TUNE) and not is_score("A jig is a dance in 6/8 time.") and not is_score("K: no bars")


def read_tables(cfg, class_weights=(1.0, 1.0)):
    return [t for item in plan(cfg) for t in read_item_tables(item, cfg, class_weights)]


def test_parquet_pt_rows_from_arrow_kernels_equal_the_per_row_path(tmp_path):
    from chatmusician.data.sources import _WHITESPACE

    assert set(_WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}
    texts = [
        TUNE,
        None,
        "  ",
        "\x1c\u3000\n",
        "",
        "A jig | no key line",
        "K:D\n|a|",
        "x" * 50,
        "prose",
        "\u2003ok",
    ]
    srcs = ["abc", None, "a", "b", "c", "d", "prose", "abc", "abc", None]
    path = tmp_path / "pt.parquet"
    pq.write_table(pa.table({"text": texts, "src": srcs}), path, row_group_size=4)
    for weight, src_weights, class_weights in ((1.0, {}, (1.0, 1.0)), (0.5, {"abc": 3.0}, (1.0, 0.3))):
        cfg = load_config(
            TokenizeConfig,
            None,
            sources=[{"path": str(path), "weight": weight, "src_weights": src_weights}],
            max_row_chars=40,
            read_rows=3,
        )
        assert all(read_parquet_pt(item, cfg, class_weights) is not None for item in plan(cfg))
        tables = read_tables(cfg, class_weights)
        assert [t.num_rows for t in tables] == [3, 1, 3, 1, 2]  # read_rows blocks within each row group
        fast = pa.concat_tables(tables)  # == the per-row path's rows, field by field
        assert fast.to_pylist() == read_all(cfg, class_weights)
    assert fast.column("reject").to_pylist() == [
        "", "missing_field", "empty", "empty", "empty", "", "", "too_long", "", "",
    ]  # fmt: skip


def test_parquet_text_that_is_not_valid_utf8_text_takes_the_per_row_path(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", b"bad \xff"], pa.binary())}), path)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    for file, reasons in ((path, ["", "invalid_utf8"]), (numbers, ["not_string", "not_string"])):
        cfg = cfg_for(file)
        assert [read_parquet_pt(item, cfg) for item in plan(cfg)] == [None]
        assert pa.concat_tables(read_tables(cfg)).column("reject").to_pylist() == reasons
