"""Stage 7: evaluation of the final model — MusicTheoryBench fixtures (the original's PPL protocol) and ABC
quality over every task family, by Ray Data batch inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.console import Console


def evaluate(cfg: QuickstartConfig, console: Console, model: str, out: Path) -> dict:
    """The headline numbers of the evaluation (its full report: out/eval/results.md)."""
    from chatmusician.eval.runner import evaluate as run_eval

    e = cfg.eval
    e.model, e.output_dir = model, str(out / "eval")
    result = run_eval(e)
    summary: dict[str, Any] = {"dir": e.output_dir}
    for mode, r in (result.get("mtb") or {}).items():
        summary[f"mtb_{mode}"] = r["original"].get("accuracy")  # the original order: OpenCompass's number
    abc = (result.get("abc_quality") or {}).get("all", {})
    summary["abc_parse_success"] = abc.get("parse_success")
    summary["abc_tunes"] = abc.get("tunes")
    mtb = ", ".join(
        f"{k[4:]} {100 * v:.0f} %" for k, v in summary.items() if k.startswith("mtb_") and v is not None
    )
    console.detail(f"MusicTheoryBench fixtures: {mtb} (4 options: chance 25 %)")
    if abc:
        console.detail(
            f"ABC quality: {abc.get('tunes')} tunes over every task family, parse success "
            f"{100 * (abc.get('parse_success') or 0):.0f} %; {e.output_dir}/results.md"
        )
    return summary
