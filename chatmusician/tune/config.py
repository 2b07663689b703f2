"""Config of ``chatmusician sweep``: a base train config, a search space over its fields, ASHA, faults, output.

Dataclasses only (no ray/torch imports) so that ``--help`` stays fast; ``configs/sweep_lora.yaml`` is the
default LoRA space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class AshaConfig:
    """ASHA early stopping on the validation loss, in the recipe's optimizer steps."""

    enabled: bool = True
    """Stop trials whose validation loss is in the worst part of their rung."""
    grace_period: int = 2
    """Steps every trial runs before it can be stopped (at least one eval step: set eval_every to divide it)."""
    reduction_factor: int = 2
    """Keep the best 1 / reduction_factor of the trials at each rung."""


@dataclass
class SweepConfig:
    """Ray Tune sweep of a LoRA train config (pretrain or SFT): one Ray Train run per trial, ASHA on val_loss."""

    base: str = "configs/sft.yaml"
    """The train config the trials start from (a pretrain or SFT YAML); the winning values are written back into it."""
    command: Literal["sft", "pretrain"] = "sft"
    """Which train config the base is (the command best.yaml runs with)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed changes to the base for every trial, by dotted field name (e.g. {max_steps: 200, eval_every: 20})."""
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Search space by dotted field name: {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}; lora.target_modules and lora.modules_to_save also take presets (attn, attn_mlp, all_linear / on, off)."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random: seeded random sampling | grid: every combination of the grid values (choices too) | optuna: TPE (Optuna), seeded."""
    num_samples: int = 4
    """Trials to run (grid: repeats of the whole grid)."""
    seed: int = 0
    """Seed of the search (random sampling / TPE)."""
    metric: str = "val_loss"
    """The metric minimized: the recipe's validation loss."""
    asha: AshaConfig = field(default_factory=AshaConfig)
    """Early stopping."""
    max_concurrent_trials: int | None = None
    """Trials at once; default: as many as the cluster's CPUs/GPUs hold with each trial's workers (never more, so no trial waits on another's resources)."""
    trial_cpus: float = 0.01
    """CPUs the trial's own driver function reserves (Tune refuses 0); its Train workers reserve theirs on top."""
    max_failures: int = 1
    """Times a failed trial is retried (it resumes from its own last checkpoint)."""
    name: str = "sweep"
    """Sweep name: the folder under storage_path; re-running the same command resumes it."""
    storage_path: str = "./sweeps"
    """Where the sweep's folder goes (shared storage on a cluster)."""
    fail_trial_once: int | None = None
    """Testing hook: the trial with this index (0-based, in creation order) raises once after its first report."""
