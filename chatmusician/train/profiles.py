"""Hardware profiles: what precision, ZeRO stage, collective backend and node type a run gets by default.

``a800`` is where the original pretrained (bf16), ``v100`` where it fine-tuned (fp16 only: V100s have no bf16,
so DeepSpeed's dynamic loss scaling keeps fp16 gradients from underflowing), ``cpu`` runs anywhere (fp32, gloo).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    precision: str
    """fp32 | bf16 | fp16: the dtype the model is loaded and trained in."""
    zero_stages: tuple[int, ...]
    """ZeRO stages this hardware is meant to run; the first is the default."""
    backend: str
    """torch.distributed backend."""
    use_gpu: bool
    accelerator_type: str | None
    """Ray resource ``accelerator_type:<X>`` the workers ask for, so the run lands on those nodes."""
    cpus_per_worker: float
    fused_optimizer: bool
    """Use torch's fused AdamW kernel (CUDA only)."""
    peak_flops: float | None
    """Dense peak FLOP/s of one device in this precision, for the MFU estimate."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GiB, what the vendor's "80 GB" means (``chatmusician plan`` checks runs against it)."""


PROFILES: dict[str, Profile] = {
    "a800": Profile("a800", "bf16", (2, 3), "nccl", True, "A800", 8.0, True, 312e12, 80),
    # This project's V100 nodes carry the 32 GB model.
    "v100": Profile("v100", "fp16", (2, 3), "nccl", True, "V100", 8.0, False, 125e12, 32),
    # 0.5 CPU: Ray Data tasks must still get CPUs on a small machine (docs/TOOLS.md).
    "cpu": Profile("cpu", "fp32", (0, 1, 2, 3), "gloo", False, None, 0.5, False, None),
}

# Dense peak FLOP/s by device name fragment and precision, for MFU where the actual GPU is known.
PEAK_FLOPS = {
    ("A800", "bf16"): 312e12,
    ("A100", "bf16"): 312e12,
    ("H100", "bf16"): 989e12,
    ("H200", "bf16"): 989e12,
    ("V100", "fp16"): 125e12,
    ("A100", "fp16"): 312e12,
    ("A800", "fp16"): 312e12,
    ("H100", "fp16"): 989e12,
    ("H200", "fp16"): 989e12,
}


class ProfileError(ValueError):
    """A train config that its hardware profile cannot run (unknown profile, bf16 on V100, ...)."""


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown hardware profile {name!r}; choose one of {sorted(PROFILES)}") from None


def resolve_zero_stage(profile: Profile, zero_stage: int | None) -> int:
    """The configured stage, checked against the profile, or the profile's default."""
    if zero_stage is None:
        return profile.zero_stages[0]
    if zero_stage not in profile.zero_stages:
        raise ProfileError(
            f"profile {profile.name!r} runs ZeRO stages {profile.zero_stages}, not {zero_stage}"
        )
    return zero_stage


def peak_flops_for(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU by its name (``torch.cuda.get_device_name``), None when unknown."""
    for (fragment, prec), flops in PEAK_FLOPS.items():
        if fragment in device_name.upper() and prec == precision:
            return flops
    return None


def train_flops_per_token(params: int, trainable_params: int | None = None) -> float:
    """FLOPs per token of one training step, counting what is computed (attention scores ignored):
    forward 2·N, backward through the activations 2·N, weight gradients 2·N_trainable. Full training gives
    PaLM's 6·N; LoRA, whose frozen weights get no weight gradients, ~4·N + 2·N_trainable. ``params`` = the
    weights the forward pass uses (a peft ``modules_to_save`` copy once: see :func:`compute_parameters`)."""
    trainable = params if trainable_params is None else trainable_params
    return 4 * params + 2 * trainable


def compute_parameters(named_parameters) -> int:
    """Parameters the forward pass multiplies by: peft's frozen ``original_module`` behind a
    ``modules_to_save`` copy is not used, so it is not counted (it would count embeddings/lm_head twice)."""
    return sum(p.numel() for name, p in named_parameters if ".original_module." not in name)


def mfu(
    params: int,
    tokens_per_s: float,
    peak_flops_per_device: float | None,
    n_devices: int,
    trainable_params: int | None = None,
) -> float | None:
    """Model FLOPs utilisation: :func:`train_flops_per_token` x tokens/s over the devices' dense peak."""
    if not peak_flops_per_device:
        return None
    return (
        train_flops_per_token(params, trainable_params) * tokens_per_s / (peak_flops_per_device * n_devices)
    )
