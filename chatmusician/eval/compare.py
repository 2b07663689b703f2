"""Several models side by side: one table of the headline numbers of several ``results.json`` (the runs of
``--models a,b`` or earlier results folders given with ``--compare``), as comparison.md and comparison.csv."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatmusician.eval.abc_quality import METRICS

_PERCENT = ("accuracy", "mean", "rate", "as_requested", "found", "ok", "success", "present", "has_", "memorised",
            "error", "share", "ratio", "consistency", "similarity", "distinct")  # fmt: skip


def rows(out: Mapping[str, Any]) -> dict[str, float | None]:
    """``{row label: value}`` of one run: MTB accuracies per mode and order, MMLU means, ABC quality over all."""
    values: dict[str, float | None] = {}
    for mode, r in (out.get("mtb") or {}).items():
        values[f"MTB {mode} original order"] = r["original"]["accuracy"]
        for subject, acc in r["original"]["subjects"].items():
            values[f"MTB {mode} original order: {subject}"] = acc
        if "shuffled" in r:
            values[f"MTB {mode} shuffles mean"] = r["shuffled"]["accuracy"]
    if "mmlu" in out:
        values["MMLU unweighted mean (OpenCompass PPL)"] = out["mmlu"]["unweighted"]
        values["MMLU weighted mean (OpenCompass PPL)"] = out["mmlu"]["weighted"]
    if "unweighted" in out.get("mmlu_lm_eval", {}):
        values["MMLU unweighted mean (lm-eval cross-check)"] = out["mmlu_lm_eval"]["unweighted"]
    for name in METRICS:
        value = ((out.get("abc_quality") or {}).get("all") or {}).get(name)
        if value is not None:
            values[f"ABC {name}"] = value
    return values


def load(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))


def _fmt(label: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    pct = label.startswith(("MTB", "MMLU")) or any(k in label for k in _PERCENT)
    pct = pct and not label.endswith(("pitch_class_entropy",))
    return f"{100 * value:.1f}" if pct else f"{value:.2f}"


def table(runs: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """(markdown, csv) with one row per number and one column per run (in the order given)."""
    per_run = {name: rows(out) for name, out in runs.items()}
    labels: list[str] = []
    for values in per_run.values():
        labels += [label for label in values if label not in labels]
    names = list(per_run)
    md = ["# Comparison", "", "Accuracies and shares in %; other metrics as measured.", "",
          "| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", *names])
    for label in labels:
        cells = [per_run[n].get(label) for n in names]
        md.append(f"| {label} | " + " | ".join(_fmt(label, c) for c in cells) + " |")
        writer.writerow([label, *["" if c is None else c for c in cells]])
    return "\n".join(md) + "\n", buf.getvalue()


def write(root: str | Path, runs: Mapping[str, Mapping[str, Any]]) -> Path:
    """comparison.md and comparison.csv in ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    md, text = table(runs)
    (root / "comparison.md").write_text(md, encoding="utf-8")
    (root / "comparison.csv").write_text(text, encoding="utf-8")
    return root / "comparison.md"
