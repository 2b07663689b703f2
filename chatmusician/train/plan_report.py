"""``chatmusician plan``: the plans of a train config, per hardware profile, as a table or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from chatmusician.train.config import DPOConfig, PlanConfig, TrainConfig
from chatmusician.train.memory import GIB
from chatmusician.train.plan import Plan, build_plan, check_fits, read_model_config, read_shards_manifest
from chatmusician.train.profiles import PROFILES, get_profile


def profiles_to_plan(cfg: PlanConfig) -> list[TrainConfig]:
    """The configured run first, then (``compare``) the same run on every other GPU profile, at the same
    ZeRO stage where that profile runs it, else at its default."""
    kind = DPOConfig if cfg.preference else TrainConfig  # a preference run: rows are pairs
    base = kind(**{k: v for k, v in vars(cfg).items() if k in TrainConfig.__dataclass_fields__})
    configs = [base]
    for name, profile in PROFILES.items() if cfg.compare else ():
        if name != cfg.profile and profile.use_gpu:
            stage = cfg.zero_stage if cfg.zero_stage in profile.zero_stages else None
            configs.append(replace(base, profile=name, zero_stage=stage))
    return configs


def plan_dict(plan: Plan) -> dict[str, Any]:
    """Everything in a plan plus what follows from it (bytes, seconds; None where unknown)."""
    data = plan.data
    return {
        **asdict(plan),
        "model_states": plan.states.total,
        "activations": plan.activations,
        "per_gpu": plan.per_gpu,
        "usable": plan.usable,
        "fits": plan.fits,
        "tokens_per_step": plan.tokens_per_step,
        "tokens_per_epoch": None
        if data.steps_per_epoch is None
        else data.steps_per_epoch * plan.tokens_per_step,
        "seconds_per_step": plan.seconds_per_step,
        "seconds_per_epoch": plan.seconds(data.steps_per_epoch),
        "seconds_total": plan.seconds(data.total_steps),
    }


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _count(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.2f} s"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _run_time(plan: Plan, d: dict[str, Any]) -> str:
    steps = plan.data.total_steps
    return "-" if steps is None else f"{_duration(d['seconds_total'])} ({steps:,} steps)"


def table_rows(plans: list[Plan]) -> list[tuple[str, list[str]]]:
    """(label, one cell per plan) rows of the table."""
    dicts = [plan_dict(p) for p in plans]

    def row(label: str, cell) -> tuple[str, list[str]]:
        return label, [cell(p, d) for p, d in zip(plans, dicts, strict=True)]

    def verdict(p: Plan, d) -> str:
        if p.fits is None:
            return "not checked (no GPU)"
        return "fits" if p.fits else f"REFUSED: over by {_gib(p.per_gpu - p.usable)}"

    return [
        row(
            "run",
            lambda p, d: f"{p.train_type}, ZeRO-{p.zero_stage}, {p.world_size} x {p.profile} ({p.precision})",
        ),
        row("parameters (trainable)", lambda p, d: f"{_count(p.params.base)} ({_count(p.params.trainable)})"),
        row(
            "micro batch x length",
            lambda p, d: (
                f"{p.micro_batch_size}{' pairs' if p.sequences_per_row == 2 else ''} x {p.max_length}"
            ),
        ),
        row("weights", lambda p, d: _gib(p.states.weights)),
        row("gradients", lambda p, d: _gib(p.states.gradients)),
        row("optimizer states", lambda p, d: _gib(p.states.optimizer)),
        row("DeepSpeed buckets", lambda p, d: _gib(p.states.buckets)),
        row("activations, recomputed", lambda p, d: _gib(p.activations_recomputed)),
        row("activations, kept", lambda p, d: _gib(p.activations_kept)),
        row(
            "per worker (as configured)",
            lambda p, d: f"{_gib(p.per_gpu)} ({'recomputed' if p.activation_checkpointing else 'kept'})",
        ),
        row(
            "usable of GPU", lambda p, d: f"{_gib(p.usable)} of {_gib(p.gpu_memory)}" if p.gpu_memory else "-"
        ),
        row("verdict", verdict),
        row("checkpoint size", lambda p, d: _gib(p.checkpoint_bytes)),
        row(
            "rows / steps per epoch", lambda p, d: f"{_count(p.data.rows)} / {_count(p.data.steps_per_epoch)}"
        ),
        row("tokens per epoch", lambda p, d: _count(d["tokens_per_epoch"])),
        row("FLOPs per token", lambda p, d: _count(p.flops_per_token)),
        row(f"step time at MFU {plans[0].mfu:.0%}", lambda p, d: _duration(d["seconds_per_step"])),
        row("epoch time", lambda p, d: _duration(d["seconds_per_epoch"])),
        row("run time", lambda p, d: _run_time(p, d)),
    ]


def print_table(plans: list[Plan], config_source: str | None = None) -> None:
    """The plans side by side, the configured one first; ``config_source``: where config.json came from."""
    from chatmusician import terminal

    table = terminal.table(None, "")
    for i, plan in enumerate(plans):
        table.add_column(plan.profile + (" (configured)" if i == 0 else ""), justify="right")
    for label, cells in table_rows(plans):
        table.add_row(label, *cells)
    console = terminal.console(min_width=100)  # 100: three columns never wrap
    source = f" (config.json: {config_source})" if config_source else ""
    console.print(f"model: {plans[0].model}{source}", markup=False)
    terminal.print_whole(console, table)
    data = plans[0].data
    assumed = f"; step times assume full {plans[0].max_length}-token rows" if data.rows is None else ""
    console.print(f"data: {data.source}{assumed}", markup=False)


def run(cfg: PlanConfig) -> list[Plan]:
    """CLI entry: plan each profile, print, and raise :class:`~chatmusician.train.plan.PlanRefused` (exit
    status 2) when the configured profile's run cannot fit its GPUs."""
    config_json = read_model_config(cfg.model, cfg.model_config)
    manifest, source = read_shards_manifest(cfg.data.shards)
    plans = [build_plan(c, config_json, manifest, source, cfg.mfu, cfg.margin) for c in profiles_to_plan(cfg)]
    if cfg.json:
        print(json.dumps([plan_dict(p) for p in plans], indent=2))
    else:
        print_table(plans, cfg.model_config)
    if get_profile(cfg.profile).use_gpu:
        check_fits(plans[0])
    return plans
