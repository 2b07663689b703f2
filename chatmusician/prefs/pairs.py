"""Preference pairs from scored samples (pure): per prompt, the top fraction by reward (valid tunes only) against
the bottom fraction, and the statistics the manifest reports."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any


def pair_prompt(samples: Sequence[Mapping[str, Any]], fraction: float) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs of one prompt's samples (``{reward, valid}`` each).

    ``k = max(1, round(fraction * n))``: the k best valid samples are chosen, the k worst samples (valid or not)
    rejected, best with worst, second best with second worst, ...; a pair whose chosen reward is not strictly
    above its rejected one is dropped (no preference to learn), and no sample is in two roles. Ties in reward
    keep the samples' order, so the pairs are a pure function of the scores. A sample with ``role`` "chosen" or
    "rejected" may only take that side (``chosen_constrained``: constrained answers chosen, free ones rejected)."""
    n = len(samples)
    if n < 2:
        return []
    k = max(1, round(fraction * n))
    order = sorted(range(n), key=lambda i: (-samples[i]["reward"], i))
    chosen = [i for i in order if samples[i]["valid"] and samples[i].get("role") != "rejected"][:k]
    rejected = [i for i in reversed(order) if i not in chosen and samples[i].get("role") != "chosen"][:k]
    return [
        (c, r) for c, r in zip(chosen, rejected, strict=False) if samples[c]["reward"] > samples[r]["reward"]
    ]


def make_pairs(rows: Sequence[Mapping[str, Any]], fraction: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Pairs over every prompt (rows carry ``name``, ``prompt``, ``text``, ``reward``, ``valid`` and scores) and
    the names of the prompts that gave none. Each pair row: ``prompt``, ``chosen``, ``rejected`` (TRL's and
    LLaMA-Factory's layout), ``name``, and every score of both sides as ``chosen_<score>`` / ``rejected_<score>``."""
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"pair_fraction must be in (0, 0.5], got {fraction}")
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["name"]].append(r)
    pairs, empty = [], []
    for name in sorted(groups):
        group = groups[name]
        found = pair_prompt(group, fraction)
        if not found:
            empty.append(name)
        for c, r in found:
            a, b = group[c], group[r]
            row = {"name": name, "prompt": a["prompt"], "chosen": a["text"], "rejected": b["text"]}
            for key in sorted(k for k in a if k == "reward" or k.startswith("reward_") or k in SCORES):
                row[f"chosen_{key}"], row[f"rejected_{key}"] = a.get(key), b.get(key)
            pairs.append(row)
    return pairs, empty


SCORES = ("valid", "syntax_ok", "midi_ok", "bar_alignment_error", "nearest_train_similarity", "sample")
"""Sample fields kept beside the rewards in each pair row."""


def stats(values: Sequence[float | None]) -> dict[str, float | int]:
    """count, mean, std (population), min, max of the non-missing values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"count": 0}
    return {"count": len(xs), "mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs),
            "max": max(xs)}  # fmt: skip
