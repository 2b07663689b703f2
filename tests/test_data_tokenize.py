"""Token/label layouts of pt and sft rows (hand-computed) and per-batch statistics; no Ray."""

import json

import numpy as np
import pytest

from chatmusician.config import load_config
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.packing import IGNORE_INDEX
from chatmusician.data.tokenize import (
    BackendTokenizer,
    encode_batch,
    encode_flat,
    process_batch,
    sft_layout,
    target_needs_eos,
    tokenize_pt_batch,
    tokenize_sft_batch,
    tokenize_sft_example,
)
from chatmusician.prompts import sft_source_target

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from chatmusician.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_path)


def test_sft_layout_masks_the_source_and_appends_eos():
    (ids, labels), truncated = sft_layout([5, 6, 7], [8, 9], EOS, max_len=10, max_source_len=8)
    assert ids.tolist() == [5, 6, 7, 8, 9, EOS]
    assert labels.tolist() == [-100, -100, -100, 8, 9, EOS]
    assert ids.dtype == labels.dtype == np.int32 and not truncated


def test_sft_layout_truncates_source_then_target_leaving_the_originals_three_tokens():
    (ids, labels), truncated = sft_layout(
        list(range(10, 20)), [30, 31, 32, 33, 34], EOS, max_len=10, max_source_len=4
    )
    # source kept to 4 tokens, target to 10 - 3 - 4 = 3 tokens, then EOS
    assert ids.tolist() == [10, 11, 12, 13, 30, 31, 32, EOS]
    assert labels.tolist() == [-100] * 4 + [30, 31, 32, EOS]
    assert truncated


def test_sft_layout_eos_follows_the_text_rule_and_can_reject_instead_of_truncating():
    (ids, _), _ = sft_layout([5], [8, EOS], EOS, max_len=10, max_source_len=5, add_eos=False)
    assert ids.tolist() == [5, 8, EOS]
    assert sft_layout(list(range(10, 20)), [30], EOS, max_len=8, max_source_len=4, truncate=False) is None
    assert target_needs_eos("Assistant: x") and not target_needs_eos("Assistant: x </s> \n")


def test_pt_documents_end_with_eos_and_labels_copy_ids(tokenizer):
    (ids, labels), (ids2, _) = tokenize_pt_batch(["X:1\nK:G\nabc|", "Some prose."], tokenizer)
    expected = encode_batch(["X:1\nK:G\nabc|"], tokenizer)[0] + [tokenizer.eos_token_id]
    assert ids.tolist() == expected and labels.tolist() == expected
    assert ids2[-1] == tokenizer.eos_token_id
    ((plain, _),) = tokenize_pt_batch(["X:1"], tokenizer, add_eos=False)
    assert (
        plain.tolist() == tokenizer("X:1", add_special_tokens=False).input_ids
    )  # the original's ids exactly


def original_sft(tok, row, max_len=2048, max_src_len=1536):
    """The original's data_preprocess.py tokenize_function_sft, re-written from its text: tokenize() the
    concatenated instruction + input and the output apart, truncate, EOS unless output.strip() ends in </s>."""
    src_tokens = tok.tokenize(row["instruction"] + row["input"])[:max_src_len]
    max_tgt_len = max_len - 3 - len(src_tokens)
    tgt_tokens = tok.tokenize(row["output"])[:max_tgt_len]
    tokens = src_tokens + tgt_tokens + ([] if row["output"].strip().endswith("</s>") else ["</s>"])
    input_ids = tok.convert_tokens_to_ids(tokens)
    return input_ids, [-100] * len(src_tokens) + input_ids[len(src_tokens) :]


def musicpile_rows():
    from tests.test_prompts import README_ROW

    tune = "X:1\nL:1/8\nM:6/8\nK:D\n|: A | dfa agf | e2d B2A :|"
    return [
        README_ROW,
        {"instruction": "Human: Write a jig. ", "input": " </s> ", "output": f"Assistant: {tune} </s> "},
        {"instruction": "Human: Name the key.\n", "input": f"{tune} </s> ", "output": "Assistant: D major"},
        {"instruction": "Human: ünïcode   spaces", "input": "\n\n </s> ", "output": "Assistant:  x </s>"},
        {"instruction": "Human: long " * 300, "input": " </s> ", "output": "Assistant: " + "abc| " * 900},
    ]


@pytest.mark.parametrize("limits", [(2048, 1536), (64, 40), (16, 8)])
def test_musicpile_sft_rows_tokenize_exactly_as_the_original(tokenizer, limits):
    max_len, max_src = limits
    rows = musicpile_rows()
    pairs = [sft_source_target(r) for r in rows]
    got = tokenize_sft_batch(
        [s for s, _ in pairs], [t for _, t in pairs], tokenizer, max_len=max_len, max_source_len=max_src
    )
    for row, ((ids, labels), _) in zip(rows, got, strict=True):
        want_ids, want_labels = original_sft(tokenizer, row, max_len, max_src)
        assert ids.tolist() == want_ids and labels.tolist() == want_labels
        assert len(ids) <= max_len
        # no second template, no added separator
        assert tokenizer.decode(ids).count("Assistant:") == 1


def test_raw_rows_train_on_what_inference_prompts_with(tokenizer):
    source, target = sft_source_target(
        {"instruction": "Write a jig.", "input": "", "output": "X:1\nK:D\nABA|"}
    )
    assert source == "Human: Write a jig. </s> "
    (ids, labels), truncated = tokenize_sft_example(source, target, tokenizer, max_len=64, max_source_len=32)
    n_source = len(encode_batch([source], tokenizer)[0])
    assert tokenizer.eos_token_id in ids[:n_source].tolist()  # "</s>" in the template is the EOS token
    assert (labels[:n_source] == IGNORE_INDEX).all()
    assert labels[n_source:].tolist() == ids[n_source:].tolist() == encode_batch([target], tokenizer)[0]
    # exactly one EOS after the answer: the template's "</s>" (no second one appended)
    assert ids[n_source:].tolist().count(tokenizer.eos_token_id) == 1
    assert not truncated


def _batch(rows):
    cols = ("row_id", "src", "reject", "repeats", "is_score", "text", "source", "target")
    return {c: [r.get(c, {"repeats": 1, "is_score": False}.get(c, "")) for r in rows] for c in cols}


def test_process_batch_counts_rejects_repeats_and_sampled_out_rows(tokenizer):
    cfg = load_config(TokenizeConfig, None, max_len=16, packing="none", reject_samples=2)
    batch = _batch(
        [
            {"row_id": "a:0", "text": "X:1\nK:G\nabc|"},
            {"row_id": "a:1", "reject": "empty"},
            {"row_id": "a:2", "text": "twice", "repeats": 2},
            {"row_id": "a:3", "text": "dropped", "repeats": 0},
            {"row_id": "a:4", "reject": "malformed_json"},
            {"row_id": "a:5", "reject": "empty"},
        ]
    )
    table = process_batch(batch, tokenizer, cfg, with_stats=True)
    stats = json.loads(table["stats"][-1].as_py())
    assert (
        stats["read"] == 6
        and stats["accepted"] == 2
        and stats["documents"] == 3
        and stats["sampled_out"] == 1
    )
    assert stats["rejected"] == {"empty": 2, "malformed_json": 1}
    assert stats["samples"] == [["a:1", "empty"], ["a:4", "malformed_json"]]  # the first reject_samples ids
    rows = table["input_ids"].to_pylist()[:-1]
    assert rows[1] == rows[2] == encode_batch(["twice"], tokenizer)[0] + [2]
    assert table.column_names == ["input_ids", "labels", "stats"]  # unpacked: no position_ids
    plain = process_batch(batch, tokenizer, cfg)
    assert plain.column_names == ["input_ids", "labels"] and plain.num_rows == 3


def test_process_batch_rejects_overlong_sft_when_truncation_is_off(tokenizer):
    cfg = load_config(TokenizeConfig, None, mode="sft", max_len=12, max_source_len=8, sft_truncate=False)
    batch = _batch([{"row_id": "s:0", "source": "Human: hi </s> Assistant: ", "target": "x " * 40}])
    stats = json.loads(process_batch(batch, tokenizer, cfg, with_stats=True)["stats"][-1].as_py())
    assert stats["rejected"] == {"too_long": 1} and stats["documents"] == 0


def test_actor_tokenizer_and_flat_encoding_give_the_hf_tokenizers_ids(tokenizer):
    """The actors load the serialized backend (no transformers) and write ids into one flat array."""
    texts = ["Human: Write a jig. </s> Assistant: X:1\nK:D\nABA|", " leading space", "prose, ünïcode"]
    actor_tok = BackendTokenizer.from_str(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)
    expected = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    assert encode_batch(texts, actor_tok) == expected
    ids, lengths = encode_flat(texts, actor_tok, suffix=[EOS])
    assert ids.dtype == np.int32 and lengths.tolist() == [len(e) + 1 for e in expected]
    assert ids.tolist() == [i for e in expected for i in [*e, EOS]]


def test_stats_rows_split_out_of_blocks_that_cut_through_a_batch(tokenizer):
    """The driver reads counts from each batch's stats row and keeps every training row, in order, even when
    a block ends before the stats row of its last batch."""
    import pyarrow as pa

    from chatmusician.data.pipeline import split_stats_rows

    cfg = load_config(TokenizeConfig, None, max_len=8, packing="greedy")
    outputs = [
        process_batch(
            _batch([{"row_id": f"{b}:{i}", "text": f"tune {b} {i} abc"} for i in range(3)]),
            tokenizer,
            cfg,
            True,
        )
        for b in range(2)
    ]
    joined = pa.concat_tables(outputs)
    cut = outputs[0].num_rows + 2  # the first block ends inside the second batch
    parts, stats = [], []
    for block in (joined.slice(0, cut), joined.slice(cut)):
        block_parts, block_stats = split_stats_rows(block)
        parts += block_parts
        stats += block_stats
    training = pa.concat_tables(parts)
    expected = pa.concat_tables([o.slice(0, o.num_rows - 1).drop_columns(["stats"]) for o in outputs])
    assert training.equals(expected) and "stats" not in training.column_names
    assert [s["read"] for s in stats] == [3, 3]
    assert sum(map(len, (s["lengths"] for s in stats))) == training.num_rows
    assert sum(s["tokens"] for s in stats) == sum(map(len, training["input_ids"].to_pylist()))
    assert sum(s["loss_tokens"] for s in stats) == sum(
        sum(1 for x in row if x != IGNORE_INDEX) for row in training["labels"].to_pylist()
    )


def test_tasks_take_several_items_only_when_every_slot_still_gets_several_tasks():
    from chatmusician.data.pipeline import items_per_task

    assert items_per_task(9, pool=2) == 1  # 9 items over 2 slots: one each, for balance
    assert items_per_task(35, pool=2) == 4  # >= 4 tasks per slot remain
    assert items_per_task(100_000, pool=64) == 16  # capped: long tasks would unbalance the end
    assert items_per_task(0, pool=2) == 1


def test_extra_tasks_queue_only_when_the_pool_takes_every_cpu():
    from chatmusician.data.pipeline import tasks_in_flight

    assert tasks_in_flight(2, task_cpus=1, cluster_cpus=2) == 4  # the extra two wait for a free CPU
    assert tasks_in_flight(3, task_cpus=1, cluster_cpus=3.5) == 6  # a half CPU left holds no task
    assert tasks_in_flight(1, task_cpus=1, cluster_cpus=2) == 1  # queued tasks would run beside it
    assert tasks_in_flight(4, task_cpus=0.5, cluster_cpus=8) == 4


def test_shards_stream_row_groups_cut_by_row_count_not_by_block(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatmusician.data.pipeline import ShardWriter

    rows = pa.table({"input_ids": pa.array([[k] * (k % 5 + 1) for k in range(23)], pa.list_(pa.int32()))})
    files = {}
    for name, cuts in (("one_block", [23]), ("ragged", [3, 5, 1, 9, 5])):
        writer = ShardWriter(str(tmp_path / name), shard_rows=10, row_group_rows=4)
        start = 0
        for n in cuts:
            writer.add(rows.slice(start, n))
            start += n
            assert sum(t.num_rows for t in writer.pending) < 4  # never more than one row group held
        shards = writer.close()
        assert [s["rows"] for s in shards] == [10, 10, 3]
        assert sum(s["tokens"] for s in shards) == sum(k % 5 + 1 for k in range(23))
        files[name] = [(tmp_path / name / s["file"]).read_bytes() for s in shards]
        metas = [pq.ParquetFile(tmp_path / name / s["file"]).metadata for s in shards]
        groups = [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in metas]
        assert groups == [[4, 4, 2], [4, 4, 2], [3]]
        assert pa.concat_tables(pq.read_table(tmp_path / name / s["file"]) for s in shards).equals(rows)
    assert files["one_block"] == files["ragged"]  # byte-identical however the stream was cut


def test_jsonl_of_musicpile_rows_through_read_and_process_batch_gives_the_originals_rows(tmp_path, tokenizer):
    """The data stage's whole Ray-free path (plan -> read -> validate -> tokenize -> rows), unpacked."""
    import pyarrow as pa

    from chatmusician.data.sources import plan, read_item_tables

    rows = musicpile_rows()
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        TokenizeConfig, None, sources=[{"path": str(path)}], mode="sft", max_len=128, max_source_len=64
    )
    read = pa.concat_tables(t for item in plan(cfg) for t in read_item_tables(item, cfg))
    out = process_batch(read, tokenizer, cfg)
    want = [original_sft(tokenizer, r, 128, 64) for r in rows]
    assert out["input_ids"].to_pylist() == [i for i, _ in want]
    assert out["labels"].to_pylist() == [lab for _, lab in want]
