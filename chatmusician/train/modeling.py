"""The model and optimizer a worker trains: the base in the profile's precision (built partitioned under ZeRO-3),
LoRA on top, AdamW with the original's settings."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Any

from chatmusician.train.config import TrainConfig
from chatmusician.train.profiles import Profile


def resolve_attention(name: str, profile: Profile) -> str:
    """``auto`` -> flash_attention_2 on bf16 GPUs where flash-attn is installed (transformers then attends per
    packed document from ``position_ids``, varlen, with no dense mask), else sdpa (a block-diagonal mask built
    from ``position_ids``; V100s have no flash-attention 2)."""
    if name != "auto":
        return name
    if profile.use_gpu and profile.precision == "bf16" and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


@contextmanager
def _zero3_init(ds_config: dict[str, Any] | None):
    """While active, ``from_pretrained`` builds each layer already partitioned over the ranks (DeepSpeed's
    ``zero.Init`` through transformers' HfDeepSpeedConfig): no rank ever holds the whole model. Outside it (and
    for a plain copy, ``ds_config`` None) the global setting is cleared, so the copy is a normal model."""
    from transformers.integrations import deepspeed as hf_ds

    previous = hf_ds._hf_deepspeed_config_weak_ref
    keep = hf_ds.HfDeepSpeedConfig(ds_config) if ds_config else None
    if keep is None:
        hf_ds.unset_hf_deepspeed_config()
    try:
        yield keep
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous


def build_model(cfg: TrainConfig, profile: Profile, ds_config: dict[str, Any] | None = None):
    """The base model (``cfg.model``) in the profile's precision, gradient checkpointing if asked, LoRA on top.
    With a ZeRO-3 ``ds_config`` it is constructed partitioned (peft's ``modules_to_save`` copies gather their
    module while copying it, as peft does under ZeRO-3)."""
    import torch

    from chatmusician.model.loading import load_model
    from chatmusician.model.lora import apply_lora

    stage3 = ds_config if ds_config and ds_config["zero_optimization"]["stage"] == 3 else None
    if stage3:
        import deepspeed

        # zero.Init reads the world size from DeepSpeed's comm layer: wrap the process group Ray Train made.
        deepspeed.init_distributed(dist_backend=profile.backend, auto_mpi_discovery=False, verbose=False)
    with _zero3_init(stage3):
        model = load_model(
            cfg.model,
            profile.precision,
            attn_implementation=resolve_attention(cfg.attn_implementation, profile),
        )
        model.config.use_cache = False
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train_type == "lora":
            torch.manual_seed(cfg.seed)  # same adapter init on every rank
            model = apply_lora(model, cfg.lora)
    return model


def build_optimizer(model, cfg: TrainConfig, fused: bool):
    """AdamW with the original's betas/decay; no decay on norms and biases (1-D tensors). A parameter that
    zero.Init has already partitioned is an empty 1-D placeholder: its real shape is ``ds_shape``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [
        {"params": [p for p, m in zip(params, matrix, strict=True) if m], "weight_decay": cfg.weight_decay},
        {"params": [p for p, m in zip(params, matrix, strict=True) if not m], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
