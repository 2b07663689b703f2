"""The held-out validation split of the data stage, without Ray: deterministic, disjoint, by row id."""

from __future__ import annotations

import pyarrow as pa

from chatmusician.data.config import TokenizeConfig
from chatmusician.data.pipeline import _split_rows, is_val_row


def test_val_rows_are_a_deterministic_fraction_chosen_by_row_id():
    ids = [f"file.abc:{i}" for i in range(4000)]
    first = is_val_row(ids, 0.1, seed=0)
    assert (first == is_val_row(ids, 0.1, seed=0)).all()  # same ids, same split
    assert 0.08 < first.mean() < 0.12
    assert (is_val_row(list(reversed(ids)), 0.1, seed=0) == first[::-1]).all()  # order does not matter
    assert (is_val_row(ids, 0.1, seed=1) != first).any()  # the seed picks another split
    assert not is_val_row(ids, 0.0, seed=0).any()


def test_train_and_val_splits_are_disjoint_and_cover_every_row():
    cfg = TokenizeConfig(val_fraction=0.25)
    table = pa.table({"row_id": [f"r{i}" for i in range(400)], "text": [str(i) for i in range(400)]})
    train = pa.concat_tables(_split_rows([table.slice(0, 150), table.slice(150)], cfg, "train"))
    val = pa.concat_tables(_split_rows([table.slice(0, 150), table.slice(150)], cfg, "val"))
    train_ids, val_ids = set(train["row_id"].to_pylist()), set(val["row_id"].to_pylist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == 400 and 60 < len(val_ids) < 140
    unsplit = pa.concat_tables(_split_rows([table], TokenizeConfig(), "train"))
    assert unsplit.num_rows == 400  # no fraction: training keeps every row
