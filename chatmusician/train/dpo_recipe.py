"""The preference-training recipe (``chatmusician dpo``, ``ray_jobs.dpo``): the pretrain/SFT recipe's driver and
worker (profiles, ZeRO stages, LoRA, checkpoints, exact resume, fault tolerance, metrics, validation) with a
preference step (:mod:`chatmusician.train.dpo_trainer`) over tokenized pairs.

Supports: losses sigmoid (DPO), dpop (DPO-Positive, NotaGen's) and ipo with ``beta`` / ``dpop_lambda``; LoRA
runs whose reference is the same model with its adapter disabled, and full runs whose reference log-probs are
computed once on the driver with the starting model (fp32, its GPU if it has one) and stored in the pair shards; validation perplexity on an SFT validation
split (``data.val_shards``: the guard a preference round watches). The pairs (``pairs``: a ``chatmusician
prefs`` folder or a parquet file) are tokenized on the driver into ``data.shards`` (default
``<storage_path>/<run_name>/pairs_tokenized``) before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from chatmusician.train import recipe
from chatmusician.train.config import DPO_LOSSES, DPOConfig, TrainConfigError


def validate(cfg: DPOConfig) -> None:
    """The recipe's checks plus the preference settings (one TrainConfigError line)."""
    from chatmusician.train.dpo_data import check_pairs

    recipe.validate(cfg)
    if cfg.loss not in DPO_LOSSES:
        raise TrainConfigError(f"loss must be one of {DPO_LOSSES}, got {cfg.loss!r}")
    if cfg.beta <= 0 or cfg.dpop_lambda < 0 or cfg.sft_weight < 0:
        raise TrainConfigError(
            f"beta must be > 0, dpop_lambda and sft_weight >= 0, got beta {cfg.beta}, lambda {cfg.dpop_lambda}, "
            f"sft_weight {cfg.sft_weight}"
        )
    if not 0 < cfg.max_prompt_length <= cfg.max_length - 3:
        raise TrainConfigError(f"max_prompt_length must be in 1..max_length - 3, got {cfg.max_prompt_length}")
    check_pairs(cfg.pairs)


def pair_shards_dir(cfg: DPOConfig) -> str:
    return cfg.data.shards or f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/pairs_tokenized"


def prepared(cfg: DPOConfig) -> DPOConfig:
    """``cfg`` with ``data.shards`` pointing at the tokenized pairs (written now unless already there)."""
    from chatmusician.train.dpo_data import write_pair_shards

    out = pair_shards_dir(cfg)
    write_pair_shards(cfg, out)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=out))


def trainer_for(cfg: DPOConfig, storage_filesystem=None, callbacks=None):
    """The ``TorchTrainer`` of the preference run (not started; Ray connected)."""
    from chatmusician.train.dpo_trainer import dpo_loop_per_worker

    validate(cfg)
    return recipe.trainer_for(prepared(cfg), None, storage_filesystem, callbacks, loop=dpo_loop_per_worker)


def train(cfg: DPOConfig, storage_filesystem=None):
    """Launch (or resume) the preference run; returns the ``ray.train.Result``."""
    from chatmusician.train.placement import connected

    with connected():
        return trainer_for(cfg, storage_filesystem).fit()


def run(cfg: DPOConfig) -> Any:
    """CLI / ``ray job submit`` entry: validate before Ray starts, train, print where the last checkpoint is."""
    validate(cfg)
    result = train(cfg)
    print(
        json.dumps({"run": cfg.run_name, "checkpoint": result.checkpoint.path if result.checkpoint else None})
    )
    return result
