"""The data stage's counts: the per-batch stats rows that tokenize tasks emit (see tokenize.process_batch),
summed on the driver into a manifest's rows / tokens / padding entries. Pure: no Ray, no I/O."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from chatmusician.data.tokenize import empty_stats


class PaddingMeter:
    """Streaming padding fraction of consecutive rows batched ``batch_size`` at a time: padded to the batch's
    longest row, and padded to ``max_len``."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.tokens = self.padded_longest = self.rows = 0
        self.open: list[int] = []

    def add(self, lengths) -> None:
        for n in lengths:
            self.open.append(n)
            if len(self.open) == self.batch_size:
                self._close()

    def _close(self):
        if self.open:
            self.tokens += sum(self.open)
            self.rows += len(self.open)
            self.padded_longest += len(self.open) * max(self.open)
            self.open = []

    def result(self) -> dict[str, float]:
        self._close()
        return {
            f"pad_to_longest_batch_{self.batch_size}": self._fraction(self.padded_longest),
            "pad_to_max_len": self._fraction(self.rows * self.max_len),
        }

    def _fraction(self, padded: int) -> float:
        return round(1 - self.tokens / padded, 6) if padded else 0.0


def split_stats_rows(block: pa.Table) -> tuple[list[pa.Table], list[dict[str, Any]]]:
    """A block of ``build_dataset(with_stats=True)`` -> (its training rows as zero-copy slices, in order, without
    the ``stats`` column; the parsed stats rows). A block may end with rows whose stats row is in the next one."""
    is_stats = pc.not_equal(block["stats"], "").to_numpy(zero_copy_only=False)
    rows, parts, stats, start = block.drop_columns(["stats"]), [], [], 0
    for end in [*is_stats.nonzero()[0].tolist(), block.num_rows]:
        if end > start:
            parts.append(rows.slice(start, end - start))
        if end < block.num_rows:
            stats.append(json.loads(block["stats"][end].as_py()))
        start = end + 1
    return parts, stats


class SplitTotals:
    """The sum of one split's stats rows, in stream order (the padding meter follows the rows' order)."""

    def __init__(self, train_batch_size: int, max_len: int, reject_samples: int):
        self.totals, self.rejected, self.samples = empty_stats(), Counter(), []
        self.padding = PaddingMeter(train_batch_size, max_len)
        self.reject_samples = reject_samples
        self.sequences = self.tokens = self.loss_tokens = 0

    def add(self, stats: dict[str, Any]) -> None:
        for key in ("read", "accepted", "sampled_out", "truncated", "documents"):
            self.totals[key] += stats[key]
        self.rejected.update(stats["rejected"])
        self.samples += stats["samples"][: max(self.reject_samples - len(self.samples), 0)]
        self.padding.add(stats["lengths"])
        self.sequences += len(stats["lengths"])
        self.tokens += stats["tokens"]
        self.loss_tokens += stats["loss_tokens"]

    def manifest(self) -> dict[str, Any]:
        t = self.totals
        return {
            "rows": {
                "read": t["read"],
                "written": t["documents"],
                "accepted": t["accepted"],
                "sampled_out": t["sampled_out"],
                "truncated": t["truncated"],
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(sorted(self.rejected.items())),
                "reject_samples": [{"row_id": r, "reason": why} for r, why in self.samples],
            },
            "sequences": self.sequences,
            "tokens": {"input": self.tokens, "loss": self.loss_tokens},
            "padding_fraction": self.padding.result(),
        }
