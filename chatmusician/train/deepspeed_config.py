"""Pure builder of the DeepSpeed config dict from a TrainConfig, a hardware profile and the world size."""

from __future__ import annotations

from typing import Any

from chatmusician.train.config import TrainConfig
from chatmusician.train.profiles import Profile, get_profile, resolve_zero_stage


class BatchSizeError(ValueError):
    """The global batch cannot be split evenly into micro batches over the workers."""


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global = micro x world x accumulation, or a clear error saying which numbers do not divide."""
    per_step = micro_batch_size * world_size
    if global_batch_size <= 0 or micro_batch_size <= 0 or world_size <= 0:
        raise BatchSizeError("global_batch_size, micro_batch_size and world size must be positive")
    if global_batch_size % per_step:
        raise BatchSizeError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size {micro_batch_size}"
            f" x {world_size} workers = {per_step}"
        )
    return global_batch_size // per_step


def precision_section(precision: str) -> dict[str, Any]:
    """bf16 needs no loss scaling; fp16 gets DeepSpeed's dynamic loss scaling (loss_scale 0 = dynamic)."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if precision == "fp16":
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,  # 0 = dynamic: halve on overflow (the step is skipped), grow after a quiet window
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            },
            "bf16": {"enabled": False},
        }
    if precision == "fp32":
        return {"fp16": {"enabled": False}, "bf16": {"enabled": False}}
    raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")


def build_deepspeed_config(
    cfg: TrainConfig, world_size: int, profile: Profile | None = None
) -> dict[str, Any]:
    """The dict passed to ``deepspeed.initialize(config=...)``.

    The optimizer and scheduler are not in it: the recipe passes torch's AdamW (fused on CUDA where the profile
    says so; DeepSpeed's own CPU Adam needs a compiled op) and a ``LambdaLR`` of :mod:`chatmusician.train.schedule`.
    """
    profile = profile or get_profile(cfg.profile)
    stage = resolve_zero_stage(profile, cfg.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero |= {"overlap_comm": profile.use_gpu, "contiguous_gradients": True, "reduce_scatter": True}
    if stage == 3:
        # Gather the full weights once at save time so the rank-0 adapter/model export is a normal state dict.
        zero |= {"stage3_gather_16bit_weights_on_model_save": True}
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(
            cfg.global_batch_size, cfg.micro_batch_size, world_size
        ),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # A torch optimizer under ZeRO: do not swap in DeepSpeed's compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the recipe logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        **precision_section(profile.precision),
    }
