"""Adapter -> full model: fold a trained LoRA adapter (and its modules_to_save) into the base weights and save
a plain Hugging Face model + tokenizer that loads without peft (``chatmusician merge``)."""

from __future__ import annotations

import json
from pathlib import Path

from chatmusician.model.loading import load_model, load_tokenizer


class MergeError(ValueError):
    """The adapter folder is missing or not a PEFT adapter, or no base model is known."""


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model id/path recorded in the adapter's ``adapter_config.json``."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise MergeError(f"{adapter_dir} holds no adapter_config.json (not a PEFT adapter folder)")
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{config_path} names no base model; pass base_model")
    return base


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None, precision: str = "fp32"
):
    """Load ``base_model`` (default: the adapter's), apply the adapter, merge it in, save to ``out_dir``.

    Returns ``out_dir``. The saved model's greedy generations equal those of base + adapter.
    """
    from peft import PeftModel

    base_model = base_model or adapter_base_model(adapter_dir)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir} holds no adapter_config.json (not a PEFT adapter folder)")
    model = PeftModel.from_pretrained(load_model(base_model, precision), str(adapter_dir))
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_model).save_pretrained(out_dir)
    return out_dir


def run(cfg) -> Path:
    """CLI entry (``chatmusician merge``)."""
    if not cfg.adapter:
        raise MergeError("adapter is required: the folder of a trained PEFT adapter")
    out = merge_adapter(cfg.adapter, cfg.out_dir, base_model=cfg.base_model, precision=cfg.precision)
    print(out)
    return out
