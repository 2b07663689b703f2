"""The paper's table layout (MusicTheoryBench knowledge / reasoning, zero- and few-shot, and MMLU) for this run,
with the paper's own figures beside it where a figures file gives them for the model evaluated.

Figures file (YAML): ``{model id: {source: str, <column>: percent or null}}`` with the columns of
:data:`COLUMNS`; a run's model matches an entry by its id or by its last path part (``./models/ChatMusician``
matches ``m-a-p/ChatMusician``). The shipped ``paper_figures.yaml`` (``EvalConfig.paper_figures``) leaves every figure empty (see its header):
fill it from the paper's tables to get the comparison row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLUMNS = {
    "mtb_knowledge_zero_shot": "MTB knowledge, zero-shot",
    "mtb_reasoning_zero_shot": "MTB reasoning, zero-shot",
    "mtb_knowledge_few_shot": "MTB knowledge, few-shot",
    "mtb_reasoning_few_shot": "MTB reasoning, few-shot",
    "mmlu": "MMLU (5-shot)",
}
"""Column key -> header, in the paper's order."""


def load_figures(path: str | Path | None) -> dict[str, dict[str, Any]]:
    if not path or not Path(path).exists():
        return {}
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def figures_for(model: str | None, figures: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The figures entry of ``model`` (by id, else by last path part), or None."""
    if not model:
        return None
    if model in figures:
        return figures[model]
    tail = model.rstrip("/").split("/")[-1]
    return next((v for k, v in figures.items() if k.split("/")[-1] == tail), None)


def run_values(out: Mapping[str, Any], order: str) -> dict[str, float | None]:
    """This run's values (fractions) per column for ``order`` (``original`` or ``shuffled``)."""
    values: dict[str, float | None] = {}
    for shots in ("zero_shot", "few_shot"):
        r = (out.get("mtb") or {}).get(f"ppl_{shots}", {}).get(order)
        for subject in ("knowledge", "reasoning"):
            values[f"mtb_{subject}_{shots}"] = r["subjects"].get(subject) if r else None
    values["mmlu"] = out["mmlu"]["unweighted"] if "mmlu" in out and order == "original" else None
    return values


def _cell(x: float | None, scale: float = 100.0) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.1f}"


def table(out: Mapping[str, Any], figures: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Markdown lines of the paper-layout table (accuracies in %)."""
    lines = ["| | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    rows = [
        ("this run, original option order (the released OpenCompass configs)", run_values(out, "original"))
    ]
    shuffled = [r.get("shuffled") for r in (out.get("mtb") or {}).values() if r.get("shuffled")]
    if shuffled:
        n = len(shuffled[0]["shuffle_accuracy"])
        rows.append(
            (f"this run, mean of {n} option shuffles (the paper's §4.3)", run_values(out, "shuffled"))
        )
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(values[c]) for c in COLUMNS) + " |")
    paper = figures_for(out.get("model"), figures or {})
    if paper and any(paper.get(c) is not None for c in COLUMNS):
        source = paper.get("source", "the paper")
        lines.append(f"| paper ({source}) | " + " | ".join(_cell(paper.get(c), 1.0) for c in COLUMNS) + " |")
    return lines
