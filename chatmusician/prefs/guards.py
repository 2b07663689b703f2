"""The guards of preference rounds (pure, plus the table and the plot): what each round's model scores on strict
validity, bar-alignment error, diversity, memorisation and validation perplexity, and the stop rule.

Strict validity of a tune: it parses, abc2midi plays it, no bar disagrees with its meter (bar-alignment error
0), and it has the key and meter the prompt asked for (where it asked).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chatmusician.prefs.config import GuardLimits

GUARDS = ("strict_validity", "bar_alignment_error", "diversity", "memorisation", "val_perplexity")
"""The guard columns, in table order."""


def strictly_valid(tune: Mapping[str, Any]) -> bool:
    return (
        bool(tune.get("parse_success"))
        and tune.get("midi_ok") is not False
        and (tune.get("bar_alignment_error") or 0.0) == 0.0
        and tune.get("key_as_requested") is not False
        and tune.get("meter_as_requested") is not False
    )


def guard_metrics(abc_quality: Mapping[str, Any], val_perplexity: float | None) -> dict[str, float | None]:
    """The guards of one evaluation (``abc_quality``: the evaluation's ABC-quality result with ``tunes_detail``)."""
    tunes = abc_quality.get("tunes_detail", [])
    summary = abc_quality.get("all", {})
    return {
        "strict_validity": sum(strictly_valid(t) for t in tunes) / len(tunes) if tunes else None,
        "bar_alignment_error": summary.get("bar_alignment_error"),
        "diversity": summary.get("distinct_n"),
        "memorisation": summary.get("memorised"),
        "val_perplexity": val_perplexity,
    }


def violations(baseline: Mapping[str, Any], current: Mapping[str, Any], limits: GuardLimits) -> list[str]:
    """The guards ``current`` worsens past ``limits`` against ``baseline`` (round 0), one sentence each; a guard
    missing on either side is not checked."""

    def both(key: str) -> tuple[float, float] | None:
        a, b = baseline.get(key), current.get(key)
        if (
            a is None
            or b is None
            or (isinstance(a, float) and math.isnan(a))
            or (isinstance(b, float) and math.isnan(b))
        ):
            return None
        return float(a), float(b)

    out = []
    if (v := both("strict_validity")) and v[0] - v[1] > limits.validity_drop + 1e-12:
        out.append(f"strict validity {v[0]:.3f} -> {v[1]:.3f} (may fall {limits.validity_drop:g} at most)")
    if (v := both("bar_alignment_error")) and v[1] - v[0] > limits.bar_alignment_rise + 1e-12:
        out.append(
            f"bar-alignment error {v[0]:.4f} -> {v[1]:.4f} (may rise {limits.bar_alignment_rise:g} at most)"
        )
    if (v := both("diversity")) and v[1] < v[0] * limits.diversity_ratio - 1e-12:
        out.append(f"diversity {v[0]:.3f} -> {v[1]:.3f} (must stay >= {limits.diversity_ratio:g}x round 0)")
    if (v := both("memorisation")) and v[1] - v[0] > limits.memorisation_rise + 1e-12:
        out.append(f"memorisation {v[0]:.3f} -> {v[1]:.3f} (may rise {limits.memorisation_rise:g} at most)")
    if (v := both("val_perplexity")) and v[1] > v[0] * limits.perplexity_ratio + 1e-12:
        out.append(
            f"validation perplexity {v[0]:.3f} -> {v[1]:.3f} (must stay <= {limits.perplexity_ratio:g}x round 0)"
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """rounds.md and rounds.csv: one row per round (round, the guards, pairs, reward mean, status)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["round", *GUARDS, "pairs", "reward_mean", "status"]
    with (out / "rounds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "rounds.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "rounds.md", out / "rounds.csv"


def plot(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """rounds.png: one panel per guard, its value over the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GUARDS), figsize=(3.2 * len(GUARDS), 2.8))
    for ax, guard in zip(axes, GUARDS, strict=True):
        pts = [(r["round"], r[guard]) for r in rows if r.get(guard) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(guard.replace("_", " "), fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks([r["round"] for r in rows])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
