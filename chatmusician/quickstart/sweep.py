"""Stage 5: Ray Tune sweeps the SFT stage from the pretrained model (trials ranked on the validation loss); the
winning values go on to SFT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.console import Console, StepPrinter
from chatmusician.quickstart.training import sft_base
from chatmusician.tune.config import SweepConfig


def trials(s: SweepConfig) -> int:
    """How many trials the sweep runs (a grid's size times num_samples, else num_samples)."""
    if s.search != "grid":
        return s.num_samples
    n = 1
    for spec in s.space.values():
        n *= len(next(iter(spec.values())))
    return n * s.num_samples


def best_values(best: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The swept fields' winning values from the sweep's best row."""
    return {k: best[k] for k in space if k in best}


def sweep(cfg: QuickstartConfig, console: Console, pretrained: str, out: Path) -> dict:
    """A Ray Tune sweep of the SFT stage from the pretrained model; returns the winning values."""
    from chatmusician.tune import sweep as tune_sweep

    s = cfg.sweep
    s.base, s.storage_path = str(sft_base(cfg, pretrained, out)), str(out)
    root = tune_sweep.sweep_dir(s)
    steps = int(s.overrides.get("max_steps", cfg.sft.max_steps))
    every = int(s.overrides.get("log_every", cfg.sft.log_every))
    points = ", ".join(f"{k}: {v}" for k, v in s.space.items())
    console.detail(f"{points}; {steps} steps per trial, ranked on the validation loss")
    trial_files = lambda: sorted(root.glob("trials/*/metrics.jsonl"))  # noqa: E731
    with StepPrinter(console, "trial", trial_files, steps, every, numbered=True):
        result = tune_sweep.run(s)
    best = result["best"]
    values = best_values(best, s.space)
    console.detail(f"best: {json.dumps(values)} (val_loss {best['best_val_loss']:.3f}); {root}/results.csv")
    return {"dir": result["dir"], "values": values, "best_val_loss": best["best_val_loss"]}
