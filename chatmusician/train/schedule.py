"""Learning-rate schedule: linear warmup over the first ``warmup_ratio`` of the steps, then cosine decay.

The original's config did not give the 5 % warmup + cosine that the paper describes; here one pure, tested
function is the curve, and the recipe hands it to DeepSpeed as a ``LambdaLR`` (DeepSpeed steps it once per
optimizer step and saves it with the checkpoint).
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Number of warmup steps: ``ceil(ratio * total)``, at least 1 when the ratio is positive."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def lr_at(
    step: int, total_steps: int, peak_lr: float, warmup_ratio: float = 0.05, min_lr: float = 0.0
) -> float:
    """Learning rate used for optimizer step ``step`` (0-based).

    Warmup: ``peak * (step + 1) / warmup`` so the first step already moves (step warmup-1 reaches the peak);
    then cosine from ``peak`` (at step ``warmup``) down to ``min_lr`` (at the last step, ``total - 1``).
    """
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return peak_lr * (step + 1) / warm
    decay_steps = max(1, total_steps - 1 - warm)
    progress = min(1.0, (step - warm) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(total_steps: int, peak_lr: float, warmup_ratio: float = 0.05, min_lr: float = 0.0):
    """``step -> lr / peak`` for ``torch.optim.lr_scheduler.LambdaLR`` (whose base lr is the peak)."""

    def multiplier(step: int) -> float:
        return lr_at(step, total_steps, peak_lr, warmup_ratio, min_lr) / peak_lr

    return multiplier
