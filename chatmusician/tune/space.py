"""Search spaces of train configs, Ray-free where it can be: YAML specs -> Tune domains, trial values -> a
complete :class:`~chatmusician.train.config.TrainConfig`, and how many trials fit the cluster at once.

Any field of the train config can be swept by its dotted name (``lr``, ``lora.r``, ``data.shuffle_window``).
Optuna's sampler takes only primitive categorical values, so module lists are swept by preset names.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from chatmusician.train.config import PretrainConfig, SFTConfig, TrainConfig

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, dict[str, list[str]]] = {
    "lora.target_modules": {"attn": ATTN, "attn_mlp": ATTN + MLP},
    "lora.modules_to_save": {"on": ["embed_tokens", "lm_head"], "off": []},
}
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
CONFIGS = {"sft": SFTConfig, "pretrain": PretrainConfig}


class SweepConfigError(ValueError):
    """A sweep config that cannot run, found before Ray starts."""


def field_type(cls: type, dotted: str) -> Any:
    """The dataclass field a dotted name points to (its ``dataclasses.Field``), or a clear error."""
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        raise SweepConfigError(f"{dotted!r}: {cls.__name__} has no field {head!r} (fields: {sorted(fields)})")
    found = fields[head]
    if not rest:
        return found
    default = found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default
    if not dataclasses.is_dataclass(default):
        raise SweepConfigError(f"{dotted!r}: {head!r} has no sub-fields")
    return field_type(type(default), rest)


def check_space(space: dict[str, dict[str, Any]], search: str, cls: type = TrainConfig) -> None:
    """Every key names a train config field and every spec is one known kind with usable values."""
    if not space:
        raise SweepConfigError("the search space is empty: give `space` at least one field to sweep")
    for name, spec in space.items():
        field_type(cls, name)
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise SweepConfigError(
                f"space.{name}: give exactly one of {KINDS}, e.g. {{choice: [8, 16]}}, got {spec!r}"
            )
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise SweepConfigError(f"space.{name}.{kind}: needs a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if (
                len(values) != 2
                or not all(isinstance(v, (int, float)) for v in values)
                or values[0] >= values[1]
            ):
                raise SweepConfigError(
                    f"space.{name}.{kind}: needs [low, high] with low < high, got {values}"
                )
            if kind == "loguniform" and values[0] <= 0:
                raise SweepConfigError(f"space.{name}.loguniform: bounds must be positive, got {values}")
            if search == "grid":
                raise SweepConfigError(f"space.{name}: grid search needs choice/grid values, not {kind}")
        if kind == "grid" and search == "optuna":
            raise SweepConfigError(f"space.{name}: Optuna samples; use choice instead of grid")
        if search == "optuna" and kind in ("choice", "grid"):
            bad = [v for v in values if not isinstance(v, (str, int, float, bool)) and v is not None]
            if bad:
                raise SweepConfigError(
                    f"space.{name}: Optuna takes only primitive choices, got {bad}"
                    + (f"; use the presets {sorted(PRESETS[name])}" if name in PRESETS else "")
                )
        if name in PRESETS and kind in ("choice", "grid"):
            unknown = [v for v in values if not isinstance(v, list) and v not in PRESETS[name]]
            if unknown:
                raise SweepConfigError(
                    f"space.{name}: unknown presets {unknown}; known: {sorted(PRESETS[name])} (quote on/off in YAML)"
                )


def tune_domains(space: dict[str, dict[str, Any]], search: str) -> dict[str, Any]:
    """Tune's ``param_space`` for the specs (grid search turns choices into grids)."""
    from ray import tune

    out = {}
    for name, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid" or (kind == "choice" and search == "grid"):
            out[name] = tune.grid_search(values)
        elif kind == "choice":
            out[name] = tune.choice(values)
        elif kind == "uniform":
            out[name] = tune.uniform(*values)
        elif kind == "loguniform":
            out[name] = tune.loguniform(*values)
        else:
            out[name] = tune.randint(*values)
    return out


def expand(name: str, value: Any) -> Any:
    """A preset name -> its module list; anything else unchanged."""
    if name in PRESETS and isinstance(value, str):
        return list(PRESETS[name][value])
    return value


def train_config(
    base: str, command: str, overrides: dict[str, Any], values: dict[str, Any], **fixed: Any
) -> TrainConfig:
    """The complete train config of one trial: the base YAML, then the sweep's fixed overrides, then the
    trial's values (presets expanded), then ``fixed`` (run name, storage), all checked by the config parser."""
    from chatmusician.config import load_config

    changes = {**overrides, **{k: expand(k, v) for k, v in values.items()}, **fixed}
    return load_config(CONFIGS[command], base, **_plain(changes))


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python scalars, so YAML and the parser take them."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def config_yaml(cfg: TrainConfig, header: str = "") -> str:
    """A complete train config as YAML that ``chatmusician sft|pretrain --config`` parses back unchanged."""
    import yaml

    body = yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def max_concurrent(
    cfg: TrainConfig, trial_cpus: float, nodes: list[dict[str, float]], requested: int | None = None
) -> int:
    """Trials that fit the cluster's nodes at once (chatmusician.train.placement.trials_that_fit: a whole trial,
    its workers on nodes of the right accelerator type): each holds its resources for its whole run, so more
    would wait on each other's (with ASHA's pauses, possibly forever). ``requested`` is capped to that, a clear
    error when even one trial does not fit."""
    from chatmusician.train.placement import placement_error, trials_that_fit

    fits = trials_that_fit(cfg, trial_cpus, nodes)
    if fits < 1:
        why = placement_error(cfg, nodes) or f"no CPU is left for a trial's driver ({trial_cpus} CPU)"
        raise SweepConfigError(f"not even one trial fits: {why}")
    return min(fits, requested) if requested else fits
