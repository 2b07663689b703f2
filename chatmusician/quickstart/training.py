"""Stages 4 and 6: Ray Train + DeepSpeed — full pretraining of the random tiny base on the raw tunes, then LoRA SFT
on the pretrained model with the sweep's winning values, merged into the final model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.console import Console, StepPrinter
from chatmusician.train.config import TrainConfig


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows a run wrote to its metrics.jsonl (none if it is missing)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_with_progress(console: Console, label: str, train_cfg: TrainConfig, out: Path) -> tuple[Path, Path]:
    """One Ray Train run, its steps on the terminal; its last checkpoint and its metrics file."""
    from chatmusician.train.recipe import train

    metrics = out / "runs" / train_cfg.run_name / "metrics.jsonl"
    with StepPrinter(console, label, lambda: [metrics], train_cfg.max_steps, train_cfg.log_every):
        result = train(train_cfg)
    return Path(result.checkpoint.path), metrics


def pretrain(cfg: QuickstartConfig, console: Console, base: str, out: Path) -> dict:
    """Train the tiny base on the raw tunes (full or LoRA, as configured) and save a loadable model."""
    from chatmusician.model.loading import load_tokenizer
    from chatmusician.model.merge import merge_adapter

    t = cfg.pretrain
    t.model, t.data.shards, t.storage_path = base, str(out / "shards" / "pt"), str(out / "runs")
    t.max_length = cfg.max_len
    checkpoint, metrics = train_with_progress(console, "pretrain", t, out)
    target = out / "models" / "pretrained"
    if t.train_type == "full":
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint / "model", target)
        load_tokenizer(base).save_pretrained(target)
    else:
        merge_adapter(checkpoint / "adapter", target, base_model=base)
    return {"model": str(target), "checkpoint": str(checkpoint), "metrics": str(metrics)}


def sft_base(cfg: QuickstartConfig, pretrained: str, out: Path) -> Path:
    """The SFT stage's config on the pretrained model as out/sweep/base.yaml: the base of the sweep and of SFT."""
    from chatmusician.tune.space import config_yaml

    sft = cfg.sft
    sft.model, sft.data.shards, sft.storage_path = pretrained, str(out / "shards" / "sft"), str(out / "runs")
    sft.max_length = cfg.max_len
    path = out / "sweep" / "base.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(sft, "The quickstart's SFT stage: the base of its sweep."))
    return path


def sft(cfg: QuickstartConfig, console: Console, pretrained: str, values: dict, out: Path) -> dict:
    """LoRA SFT with the sweep's winning values, then merge into the final model."""
    from chatmusician.model.merge import merge_adapter
    from chatmusician.tune.space import train_config

    tuned = train_config(str(sft_base(cfg, pretrained, out)), "sft", {}, values)
    console.detail(f"{json.dumps(values)} from the sweep, {tuned.max_steps} steps")
    checkpoint, metrics = train_with_progress(console, "sft", tuned, out)
    final = out / "models" / "chatmusician-tiny"
    merge_adapter(checkpoint / "adapter", final, base_model=pretrained)
    return {
        "model": str(final),
        "adapter": str(checkpoint / "adapter"),
        "metrics": str(metrics),
        "values": values,
    }
