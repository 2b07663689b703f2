"""``chatmusician plan``: what a training run will cost before it starts, and a refusal when it cannot fit.

Per profile: per-GPU memory (:mod:`chatmusician.train.memory`), parameters, tokens and steps per epoch from
the shards' manifest, checkpoint size, and wall time at a stated MFU. :func:`preflight` is what ``train`` runs
first; :func:`check_fits` raises :class:`PlanRefused` (a ValueError: one line on the command line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chatmusician.train.config import TrainConfig
from chatmusician.train.memory import (
    GIB,
    REDUCE_BUCKET_SIZE,
    Architecture,
    ModelStates,
    ParamCount,
    PlanError,
    activation_bytes,
    checkpoint_bytes,
    count_parameters,
    model_state_bytes,
)
from chatmusician.train.profiles import Profile, get_profile, resolve_zero_stage, train_flops_per_token


class PlanRefused(ValueError):
    """The run does not fit its GPUs: the message says by how much and what single change would fit."""


def read_model_config(model: str, model_config: str | None = None) -> dict[str, Any]:
    """``config.json`` of a model: ``model_config`` (a file or a folder) when given, else the model's folder,
    else the hub (``hf_hub_download`` fetches that one small file, or finds it in the cache offline)."""
    source = model_config or model
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if model_config or source.startswith((".", "/", "~")):
            raise PlanError(f"{source}: no config.json there (pass --model_config FILE)")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo_id=source, filename="config.json"))
        except Exception as err:  # offline and not cached, no such repo, gated repo...
            raise PlanError(
                f"cannot read config.json of {source!r} ({type(err).__name__}); pass --model_config FILE"
            ) from None
    return json.loads(path.read_text())


# ---------------------------------------------------------------- data and time


@dataclass(frozen=True)
class DataPlan:
    """What the shards' manifest says a run will read."""

    rows: int | None
    """Training rows in the shards (sequences, or preference pairs); None without a manifest."""
    tokens_per_row: float
    """Mean tokens per row (a sequence cut at max_length, a pair's two); the longest when there is no manifest."""
    steps_per_epoch: int | None
    """Optimizer steps of one pass over the rows."""
    total_steps: int | None
    """Optimizer steps of the run (max_steps, else epochs x steps_per_epoch)."""
    source: str
    """Where the numbers come from: the manifest's path, or why there is none."""


def sequences_per_row(cfg: TrainConfig) -> int:
    """Sequences one row puts through the model at once: a pair's chosen and rejected share a forward pass."""
    return 2 if getattr(cfg, "PREFERENCE", False) else 1


def flops_per_token(cfg: TrainConfig, params: ParamCount) -> float:
    """Training FLOPs per token; a LoRA preference run adds its reference's forward pass (the same model with
    the adapter off, 2·N; full training reads reference log-probs computed before the run)."""
    flops = train_flops_per_token(params.compute, params.trainable)
    return flops + 2 * params.compute if sequences_per_row(cfg) == 2 and cfg.train_type == "lora" else flops


def data_plan(cfg: TrainConfig, manifest: dict[str, Any] | None, source: str) -> DataPlan:
    """Rows and steps from a ``chatmusician tokenize`` (or pairs) manifest (or only max_steps without one)."""
    longest = cfg.max_length * sequences_per_row(cfg)
    if manifest is None:
        return DataPlan(None, float(longest), None, cfg.max_steps, source)
    shards = manifest.get("shards") or []
    rows = sum(s["rows"] for s in shards) if shards and "rows" in shards[0] else manifest["sequences"]
    tokens = manifest["tokens"]["input"]
    per_row = min(tokens / rows, longest) if rows else 0.0
    # The trainer's own step count (whole micro batches per worker, rest carried to the next epoch).
    from chatmusician.train.recipe import total_steps_for

    per_epoch = total_steps_for(rows, replace(cfg, epochs=1))
    return DataPlan(rows, per_row, per_epoch, cfg.max_steps or total_steps_for(rows, cfg), source)


def read_shards_manifest(shards: str | None) -> tuple[dict[str, Any] | None, str]:
    """(manifest, where it came from) of ``data.shards``, or (None, why not)."""
    if not shards:
        return None, "no data.shards (a live stream has no row count)"
    from chatmusician.data.pipeline import MANIFEST, output_filesystem, read_manifest

    fs, root = output_filesystem(shards)
    if not fs.get_file_info(f"{root}/{MANIFEST}").is_file:
        return None, f"no {MANIFEST} in {shards} yet"
    return read_manifest(shards), f"{shards}/{MANIFEST}"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What one run costs on one hardware profile; bytes are per GPU unless named otherwise."""

    model: str
    """The model whose config.json was read."""
    profile: str
    """Hardware profile (a800, v100, cpu)."""
    precision: str
    """Working precision of the weights (fp32, bf16, fp16)."""
    zero_stage: int
    """DeepSpeed ZeRO stage."""
    world_size: int
    """GPUs (Ray Train workers)."""
    train_type: str
    """lora or full."""
    micro_batch_size: int
    """Rows per GPU per forward pass (a preference row: two sequences)."""
    global_batch_size: int
    """Rows per optimizer step over all GPUs."""
    sequences_per_row: int
    """1; 2 for preference pairs (chosen and rejected in one forward pass)."""
    max_length: int
    """Tokens per sequence the memory model assumes (the longest a row may be)."""
    activation_checkpointing: bool
    """Whether the run recomputes activations."""
    params: ParamCount
    """Parameter counts."""
    states: ModelStates
    """Model states per GPU."""
    activations_recomputed: int
    """Activation bytes of one micro batch with activation checkpointing."""
    activations_kept: int
    """Activation bytes of one micro batch without it."""
    gpu_memory: int | None
    """Bytes of one GPU (None: the cpu profile)."""
    margin: float
    """Fraction of the GPU left free for the CUDA context, NCCL and allocator fragmentation."""
    checkpoint_bytes: int
    """One checkpoint on storage (all ranks together)."""
    data: DataPlan
    """Rows and steps."""
    flops_per_token: float
    """Model FLOPs per trained token, as the trainer's MFU metric counts them."""
    mfu: float
    """Model FLOPs utilisation the wall times assume."""
    peak_flops: float | None
    """Dense peak FLOP/s of one GPU in this precision."""
    remedies: tuple[str, ...] = ()
    """Changes that would make a run that does not fit fit."""

    @property
    def activations(self) -> int:
        return self.activations_recomputed if self.activation_checkpointing else self.activations_kept

    @property
    def per_gpu(self) -> int:
        return self.states.total + self.activations

    @property
    def usable(self) -> int | None:
        return None if self.gpu_memory is None else int(self.gpu_memory * (1 - self.margin))

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.per_gpu <= self.usable

    @property
    def tokens_per_step(self) -> float:
        return self.data.tokens_per_row * self.global_batch_size

    @property
    def seconds_per_step(self) -> float | None:
        """Wall time of one optimizer step: its tokens x FLOPs/token at ``mfu`` of the GPUs' peak. Like the
        trainer's MFU metric it counts model FLOPs (no recompute, no attention scores): a run that recomputes
        activations reaches a lower MFU at the same speed, so state the MFU of a comparable run."""
        if not self.peak_flops:
            return None
        return self.tokens_per_step * self.flops_per_token / (self.mfu * self.peak_flops * self.world_size)

    def seconds(self, steps: int | None) -> float | None:
        per_step = self.seconds_per_step
        return None if per_step is None or steps is None else steps * per_step


def build_plan(
    cfg: TrainConfig,
    config_json: dict[str, Any],
    manifest: dict[str, Any] | None = None,
    manifest_source: str = "no manifest",
    mfu: float = 0.40,
    margin: float = 0.10,
    remedies: bool = True,
) -> Plan:
    """The plan of ``cfg`` on its profile from a model's ``config.json`` and the shards' manifest (pure);
    ``remedies``: when it does not fit, also try the single changes that would make it fit."""
    from chatmusician.train.deepspeed_config import build_deepspeed_config

    profile = get_profile(cfg.profile)
    stage = resolve_zero_stage(profile, cfg.zero_stage)
    if not 0 < mfu <= 1 or not 0 <= margin < 1:
        raise PlanError(f"mfu must be in (0, 1] and margin in [0, 1), got {mfu} and {margin}")
    arch = Architecture.from_config(config_json)
    params = count_parameters(arch, cfg.train_type, cfg.lora)
    zero = build_deepspeed_config(cfg, cfg.num_workers, profile)["zero_optimization"]
    # DeepSpeed's defaults: contiguous_gradients on, overlap_comm on only at stage 3.
    buffers = (1 + bool(zero.get("overlap_comm"))) if zero.get("contiguous_gradients", True) else 0
    bucket = int(zero.get("reduce_bucket_size", REDUCE_BUCKET_SIZE))
    if not profile.use_gpu:  # CPU memory of an untouched torch.empty is virtual: only the used part counts
        bucket = min(bucket, params.trainable)
    states = model_state_bytes(params, stage, cfg.num_workers, profile.precision, buffers, bucket)
    acts = {
        ckpt: activation_bytes(
            arch,
            profile.precision,
            cfg.train_type,
            cfg.lora,
            cfg.micro_batch_size * sequences_per_row(cfg),
            cfg.max_length,
            ckpt,
            profile.use_gpu,
        )
        for ckpt in (True, False)
    }
    plan = Plan(
        model=cfg.model,
        profile=profile.name,
        precision=profile.precision,
        zero_stage=stage,
        world_size=cfg.num_workers,
        train_type=cfg.train_type,
        micro_batch_size=cfg.micro_batch_size,
        sequences_per_row=sequences_per_row(cfg),
        global_batch_size=cfg.global_batch_size,
        max_length=cfg.max_length,
        activation_checkpointing=cfg.activation_checkpointing,
        params=params,
        states=states,
        activations_recomputed=acts[True],
        activations_kept=acts[False],
        gpu_memory=int(profile.gpu_memory_gb * GIB) if profile.gpu_memory_gb else None,
        margin=margin,
        checkpoint_bytes=checkpoint_bytes(params, profile.precision, stage),
        data=data_plan(cfg, manifest, manifest_source),
        flops_per_token=flops_per_token(cfg, params),
        mfu=mfu,
        peak_flops=profile.peak_flops,
    )
    if plan.fits is False and remedies:
        plan = replace(plan, remedies=tuple(_remedies(cfg, profile, config_json, mfu, margin)))
    return plan


def _remedies(cfg: TrainConfig, profile: Profile, config_json: dict[str, Any], mfu: float, margin: float):
    """Single changes to ``cfg`` that make it fit, cheapest first (each one replanned)."""
    changes: list[tuple[str, TrainConfig]] = []
    if not cfg.activation_checkpointing:
        changes.append(("activation_checkpointing: true", replace(cfg, activation_checkpointing=True)))
    if cfg.micro_batch_size > 1:
        changes.append(("micro_batch_size: 1", replace(cfg, micro_batch_size=1)))
    for stage in profile.zero_stages:
        if stage > resolve_zero_stage(profile, cfg.zero_stage):
            changes.append((f"zero_stage: {stage}", replace(cfg, zero_stage=stage)))
    if cfg.train_type == "full":
        changes.append(("train_type: lora", replace(cfg, train_type="lora")))
    found = []
    for text, changed in changes:
        try:
            if build_plan(changed, config_json, None, "", mfu, margin, remedies=False).fits:
                found.append(text)
        except ValueError:  # e.g. a batch that no longer divides
            continue
    return found


def check_fits(plan: Plan) -> Plan:
    """``plan`` when it fits its GPUs (or has none to fit: cpu); else :class:`PlanRefused` in one line."""
    if plan.fits is not False:
        return plan
    s = plan.states
    terms = {"weights": s.weights, "gradients": s.gradients, "optimizer": s.optimizer, "buckets": s.buckets}
    parts = ", ".join(f"{name} {_gib(b)}" for name, b in (terms | {"activations": plan.activations}).items())
    what = (
        "full fine-tuning"
        if plan.train_type == "full"
        else f"LoRA ({plan.params.trainable / 1e6:,.0f} M trainable)"
    )
    fix = (
        f"; fits with {' or '.join(plan.remedies)}"
        if plan.remedies
        else "; no single change fits: add GPUs or shorten max_length"
    )
    raise PlanRefused(
        f"{what} of {plan.params.base / 1e9:.2f} B parameters with ZeRO-{plan.zero_stage} on {plan.world_size} x "
        f"{plan.profile} needs {_gib(plan.per_gpu)} per GPU ({parts}), but a {_gib(plan.gpu_memory)} GPU leaves "
        f"{_gib(plan.usable)} after a {plan.margin:.0%} margin{fix}"
    )


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f} GiB"


def plan_for(
    cfg: TrainConfig, model_config: str | None = None, mfu: float = 0.40, margin: float = 0.10
) -> Plan:
    """:func:`build_plan` with its inputs read: the model's config.json (local, cached or one small hub
    download) and the shards' manifest when ``data.shards`` has one."""
    manifest, source = read_shards_manifest(cfg.data.shards)
    return build_plan(cfg, read_model_config(cfg.model, model_config), manifest, source, mfu, margin)


def preflight(cfg: TrainConfig, model_config: str | None = None, margin: float = 0.10) -> Plan:
    """What ``train`` runs before any worker starts: the plan, and :class:`PlanRefused` when a GPU profile's
    run cannot fit (the cpu profile has no GPU memory to check, but is still planned)."""
    plan = plan_for(cfg, model_config, margin=margin)
    return plan if not get_profile(cfg.profile).use_gpu else check_fits(plan)
