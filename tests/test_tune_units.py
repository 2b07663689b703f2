"""Sweep logic without Ray: the YAML space, presets, trial configs, best.yaml round trip, concurrency, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmusician.config import load_config
from chatmusician.train.config import PretrainConfig, SFTConfig
from chatmusician.tune.config import SweepConfig
from chatmusician.tune.space import (
    SweepConfigError,
    check_space,
    config_yaml,
    max_concurrent,
    train_config,
    tune_domains,
)

ROOT = Path(__file__).resolve().parents[1]


def test_default_space_reflects_what_matters_for_lora():
    cfg = load_config(SweepConfig, ROOT / "configs" / "sweep_lora.yaml")
    check_space(cfg.space, cfg.search, SFTConfig)
    low, high = cfg.space["lr"]["loguniform"]
    assert low <= 1e-4 < 1e-3 <= high  # around the original's 1e-4, up to ~10x it (LoRA's best rate)
    assert cfg.space["lora.target_modules"]["choice"][0] == "attn_mlp"  # all linear layers first
    assert set(cfg.space["lora.modules_to_save"]["choice"]) == {"on", "off"}
    assert cfg.search == "optuna" and cfg.asha.enabled
    assert cfg.asha.grace_period % cfg.overrides["eval_every"] == 0  # a rung always has a validation report


def test_trial_values_make_a_complete_checked_train_config():
    values = {"lr": 3e-4, "lora.r": 16, "lora.target_modules": "attn", "lora.modules_to_save": "off"}
    cfg = train_config(str(ROOT / "configs" / "sft.yaml"), "sft", {"max_steps": 10}, values, run_name="t1")
    assert isinstance(cfg, SFTConfig)
    assert (cfg.lr, cfg.lora.r, cfg.max_steps, cfg.run_name) == (3e-4, 16, 10, "t1")
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.lora.modules_to_save == []
    assert cfg.lora.alpha == 16 and cfg.profile == "v100"  # everything else from the base


def test_best_yaml_parses_back_into_the_same_config(tmp_path):
    cfg = train_config(
        str(ROOT / "configs" / "sft.yaml"), "sft", {}, {"lora.target_modules": "attn_mlp", "lr": 7e-4}
    )
    path = tmp_path / "best.yaml"
    path.write_text(config_yaml(cfg, "winner\nline two"))
    assert path.read_text().startswith("# winner\n# line two\n")
    assert load_config(SFTConfig, path) == cfg


@pytest.mark.parametrize(
    ("space", "search", "message"),
    [
        ({}, "random", "empty"),
        ({"lr_max": {"choice": [1]}}, "random", "no field 'lr_max'"),
        ({"lora.rank": {"choice": [1]}}, "random", "no field 'rank'"),
        ({"lr": {"between": [1, 2]}}, "random", "exactly one of"),
        ({"lr": {"loguniform": [0, 1]}}, "random", "positive"),
        ({"lr": {"uniform": [2, 1]}}, "random", "low < high"),
        ({"lr": {"uniform": [1e-4, 1e-3]}}, "grid", "grid search needs"),
        ({"lr": {"grid": [1e-4]}}, "optuna", "use choice"),
        ({"lora.target_modules": {"choice": [["q_proj"]]}}, "optuna", "presets"),
        ({"lora.modules_to_save": {"choice": [True, False]}}, "random", "quote on/off"),
    ],
)
def test_bad_spaces_are_clear_errors(space, search, message):
    with pytest.raises(SweepConfigError, match=message):
        check_space(space, search, SFTConfig)


def test_grid_search_turns_choices_into_grids_and_random_keeps_domains():
    space = {
        "lr": {"choice": [1e-4, 1e-3]},
        "lora.r": {"grid": [4, 8]},
        "warmup_ratio": {"uniform": [0.0, 0.1]},
    }
    grid = tune_domains({k: v for k, v in space.items() if k != "warmup_ratio"}, "grid")
    assert grid["lr"] == {"grid_search": [1e-4, 1e-3]} and grid["lora.r"] == {"grid_search": [4, 8]}
    rand = tune_domains(space, "random")
    assert type(rand["lr"]).__name__ == "Categorical" and type(rand["warmup_ratio"]).__name__ == "Float"


def _node(cpus: float, gpus: float = 0, accelerator: str | None = None) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus, **({f"accelerator_type:{accelerator}": 1.0} if accelerator else {})}


# cluster.yaml's workers: two A800 nodes and one V100 node, 8 GPUs and 96 CPUs each, plus a CPU head.
MIXED = [_node(16), _node(96, 8, "A800"), _node(96, 8, "A800"), _node(96, 8, "V100")]


def test_concurrency_counts_whole_trials_on_nodes_of_their_accelerator_type():
    """16 A800 + 8 V100: cluster totals (24 GPUs / 8) said 3 SFT trials at once, but only the V100 node can
    hold an SFT trial's 8 workers: one fits. Pretraining trials fit twice, on the two A800 nodes."""
    sft = SFTConfig(profile="v100", num_workers=8)
    assert max_concurrent(sft, 0.01, MIXED) == 1
    assert max_concurrent(PretrainConfig(profile="a800", num_workers=8), 0.01, MIXED) == 2
    assert max_concurrent(PretrainConfig(profile="a800", num_workers=4), 0.01, MIXED) == 4
    assert max_concurrent(PretrainConfig(profile="a800", num_workers=4), 0.01, MIXED, requested=3) == 3
    # 12 workers per trial: spread over both A800 nodes (a worker fits on one node, a trial on several).
    assert max_concurrent(PretrainConfig(profile="a800", num_workers=12), 0.01, MIXED) == 1
    with pytest.raises(SweepConfigError, match="not even one trial fits.*accelerator_type:V100"):
        max_concurrent(SFTConfig(profile="v100", num_workers=16), 0.01, MIXED)
    # A worker bigger than any node (9 GPUs' worth of CPUs): none fits, whatever the totals say.
    with pytest.raises(SweepConfigError, match="no node has that much CPU"):
        max_concurrent(SFTConfig(profile="v100", num_workers=1, cpus_per_worker=97), 0.01, MIXED)


def test_cpu_trials_leave_room_for_their_drivers():
    cpu = SFTConfig(profile="cpu", num_workers=2, cpus_per_worker=0.5)
    assert max_concurrent(cpu, 0.01, [_node(4)]) == 3  # 4 trials' workers fit, but not their 4 drivers too
    assert max_concurrent(cpu, 0.01, [_node(4)], requested=2) == 2


def test_sweep_config_errors_come_before_ray_starts(tmp_path):
    from chatmusician.tune.sweep import check

    good = {"base": str(ROOT / "configs" / "sft.yaml"), "space": {"lr": {"choice": [1e-4]}}}
    with pytest.raises(SweepConfigError, match="does not exist"):
        check(SweepConfig(**{**good, "base": str(tmp_path / "missing.yaml")}))
    with pytest.raises(SweepConfigError, match="num_samples"):
        check(SweepConfig(**good, overrides={"max_steps": 4}, num_samples=0))
    # The shipped sft.yaml's shards are not there: no validation split, so no sweep (not 16 trials for nothing).
    with pytest.raises(SweepConfigError, match="no validation split"):
        check(SweepConfig(**good, overrides={"max_steps": 4, "eval_every": 2}))
    shards = tmp_path / "shards"
    (shards / "val").mkdir(parents=True)
    (shards / "val" / "manifest.json").write_text("{}")
    data = {"data.shards": str(shards)}
    with pytest.raises(SweepConfigError, match="eval_every"):
        check(SweepConfig(**good, overrides={**data, "max_steps": 4}))
    with pytest.raises(SweepConfigError, match="max_steps"):
        check(SweepConfig(**good, overrides={**data, "eval_every": 2}))
    check(SweepConfig(**good, overrides={**data, "max_steps": 4, "eval_every": 2}))
