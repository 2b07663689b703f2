"""LoRA setup with peft: the original's adapter (r=64, alpha=16, dropout 0.1 on every attention and MLP
projection) plus fully trained embeddings and lm_head (``modules_to_save``, the paper's choice)."""

from __future__ import annotations

from typing import Any


def peft_lora_config(lora: Any):
    """A ``peft.LoraConfig`` for causal LM from our typed :class:`chatmusician.train.config.LoraConfig`."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
    )


def apply_lora(model, lora: Any):
    """Wrap ``model`` in a ``PeftModel``: base weights frozen, adapters and modules_to_save trainable."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(lora))
