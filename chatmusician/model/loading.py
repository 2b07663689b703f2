"""Load a base model and tokenizer by hub id or path, the one code path for real models and the tiny ones."""

from __future__ import annotations

from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """Fast tokenizer with LLaMA's conventions made explicit: no BOS added, pad = <unk> when the model has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def torch_dtype(precision: str):
    import torch

    return getattr(torch, DTYPES[precision])


def load_model(name_or_path: str, precision: str = "fp32", **kwargs: Any):
    """``AutoModelForCausalLM`` in the precision of a hardware profile (``fp32`` | ``bf16`` | ``fp16``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(precision), **kwargs)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
