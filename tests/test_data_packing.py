"""Packing layouts (hand-computed), invariants (no cross-document loss, position resets, fill), padding
figures, and that a packed row really keeps documents apart inside the tiny LLaMA."""

import numpy as np
import pytest

from chatmusician.data.packing import (
    IGNORE_INDEX,
    pack,
    pack_concat,
    pack_greedy,
    pack_none,
    padding_fraction,
    rows_to_table,
)


def doc(*ids, masked=0):
    ids = np.array(ids, dtype=np.int32)
    labels = ids.copy()
    labels[:masked] = IGNORE_INDEX
    return ids, labels


def test_concat_packing_hand_computed():
    rows = pack_concat([doc(1, 2, 3), doc(4, 5, 6, 7), doc(8, 9)], max_len=4)
    assert [r.tolist() for r in rows.input_ids] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [r.tolist() for r in rows.position_ids] == [[0, 1, 2, 0], [0, 1, 2, 0], [0]]
    assert [r.tolist() for r in rows.labels] == [[-100, 2, 3, -100], [5, 6, 7, -100], [9]]
    assert rows.num_docs == [2, 1, 0]


def test_greedy_packing_hand_computed():
    rows = pack_greedy(
        [doc(1, 2, 3, masked=1), doc(4, 5, masked=1), doc(6, 7, 8, masked=2), doc(9)], max_len=5
    )
    assert [r.tolist() for r in rows.input_ids] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert [r.tolist() for r in rows.position_ids] == [[0, 1, 2, 0, 1], [0, 1, 2, 0]]
    assert [r.tolist() for r in rows.labels] == [[-100, 2, 3, -100, 5], [-100, -100, 8, -100]]


def test_none_packing_splits_long_documents_instead_of_truncating():
    rows = pack_none([doc(1, 2, 3, 4, 5), doc(6)], max_len=2)
    assert [r.tolist() for r in rows.input_ids] == [[1, 2], [3, 4], [5], [6]]
    assert rows.position_ids is None and rows.num_docs == [1, 0, 0, 1]
    assert rows_to_table(rows).column_names == ["input_ids", "labels"]


def random_docs(rng, n, lo, hi, masked=0):
    return [doc(*rng.integers(3, 1000, size=rng.integers(lo, hi)), masked=masked) for _ in range(n)]


@pytest.mark.parametrize("mode", ["pt", "sft"])
def test_packing_invariants(mode):
    rng = np.random.default_rng(0)
    max_len = 64
    docs = random_docs(rng, 200, 1, 150 if mode == "pt" else 60, masked=2 if mode == "sft" else 0)
    rows = pack(docs, max_len, "greedy", mode)
    flat_ids = np.concatenate(rows.input_ids)
    assert flat_ids.tolist() == np.concatenate([d[0] for d in docs]).tolist()  # nothing lost, order kept
    assert all(len(r) <= max_len for r in rows.input_ids) and sum(rows.num_docs) == len(docs)
    for ids, labels, pos in zip(rows.input_ids, rows.labels, rows.position_ids, strict=True):
        assert len(ids) == len(labels) == len(pos)
        starts = np.flatnonzero(pos == 0)
        assert starts[0] == 0 and (np.diff(pos)[np.diff(pos) != 1] <= 0).all()  # positions only ever restart
        assert (labels[starts[1:]] == IGNORE_INDEX).all()  # no loss across a boundary
    lengths = [len(r) for r in rows.input_ids]
    if mode == "pt":
        assert all(n == max_len for n in lengths[:-1])  # every row but the last is full
    else:  # next-fit: a row closes only when the next whole sample does not fit
        firsts = [int(np.flatnonzero(p == 0)[1]) if (p == 0).sum() > 1 else len(p) for p in rows.position_ids]
        assert all(lengths[i] + firsts[i + 1] > max_len for i in range(len(lengths) - 1))
    unpacked = [len(r) for r in pack(docs, max_len, "none", mode).input_ids]
    assert padding_fraction(lengths, 8, max_len) < padding_fraction(unpacked, 8, max_len)


def test_padding_fraction_hand_computed():
    assert padding_fraction([4, 2, 3, 3], batch_size=2) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([4, 2, 3, 3], batch_size=2, pad_to=4) == pytest.approx(1 - 12 / 16)


def test_packed_row_keeps_documents_apart_in_the_model(tiny_model_path):
    """position_ids + no attention mask -> transformers builds a block-diagonal causal mask: document B's
    logits inside the packed row equal B's logits alone, so no sample sees (or learns from) another."""
    import torch

    from chatmusician.model.loading import load_model

    model = load_model(tiny_model_path).eval()
    rng = np.random.default_rng(1)
    a, b = (doc(*rng.integers(3, 3000, size=n)) for n in (7, 5))
    rows = pack_greedy([a, b], max_len=16)
    ids = torch.tensor(rows.input_ids[0][None].astype(np.int64))
    pos = torch.tensor(rows.position_ids[0][None].astype(np.int64))
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor(b[0][None].astype(np.int64)), use_cache=False).logits[0]
        leaky = model(input_ids=ids, use_cache=False).logits[0]  # no position_ids: plain causal attention
    torch.testing.assert_close(packed[7:], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(leaky[7:], alone, atol=1e-3)  # the check can fail: without them B sees A
