"""The training recipe: continual pretraining and SFT of a causal LM with Ray Train + DeepSpeed + LoRA.

Supports: base model by hub id or path in the hardware profile's precision (fp32 / bf16 / fp16 with dynamic
loss scaling), built partitioned under ZeRO-3; ``train_type`` lora (peft, modules_to_save embed_tokens +
lm_head) or full; DeepSpeed ZeRO 0-3; torch AdamW (fused on CUDA); 5 % linear warmup + cosine; gradient
clipping; gradient accumulation up to the global batch with a per-token loss over the whole step; optional
activation checkpointing; the attention kernel as a setting; data from materialized shards (a seeded shuffle,
different every epoch, that each worker reads itself: see chatmusician.train.data_order) or the live Ray Data
stream; a held-out validation split (capped by ``eval_max_batches``) evaluated every ``eval_every`` steps and at
the end plus an optional ``eval_hook``; metrics to metrics.jsonl and TensorBoard / MLflow / W&B (``report_to``)
and ``ray.train.report``; checkpoints of what trains (never a LoRA run's frozen base) every N steps and at the
end, uploaded in the background, keep-last-K; automatic restart from the last checkpoint on worker failure, and
resume when the same run name is launched again (refused with one line if the run's shape changed).

Rooms: this module is the driver (validate, plan, launch); :mod:`chatmusician.train.trainer` the worker;
:mod:`~chatmusician.train.placement` where workers go; :mod:`~chatmusician.train.inputs` the data plans;
:mod:`~chatmusician.train.checkpointing` what a checkpoint holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from chatmusician.train import checkpointing
from chatmusician.train.config import ATTENTION, TrainConfig, TrainConfigError
from chatmusician.train.deepspeed_config import gradient_accumulation_steps
from chatmusician.train.profiles import get_profile, resolve_zero_stage

TRAIN_TYPES = ("lora", "full")


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`TrainConfigError` (or the profile/batch errors, both ValueErrors) for a config that cannot run."""
    from chatmusician.train.logs import check_reporters

    if cfg.train_type not in TRAIN_TYPES:
        raise TrainConfigError(f"train_type must be one of {TRAIN_TYPES}, got {cfg.train_type!r}")
    profile = get_profile(cfg.profile)
    resolve_zero_stage(profile, cfg.zero_stage)
    gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, cfg.num_workers)
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise TrainConfigError(f"max_steps must be positive, got {cfg.max_steps}")
    if cfg.checkpoint_every <= 0 or cfg.keep_last <= 0:
        raise TrainConfigError("checkpoint_every and keep_last must be positive")
    if cfg.max_length <= 1:
        raise TrainConfigError(f"max_length must be at least 2, got {cfg.max_length}")
    if cfg.data.shuffle_window < 1:
        raise TrainConfigError(f"data.shuffle_window must be positive, got {cfg.data.shuffle_window}")
    if cfg.eval_every is not None and cfg.eval_every <= 0:
        raise TrainConfigError(
            f"eval_every must be positive (or null: at the end only), got {cfg.eval_every}"
        )
    if cfg.eval_max_batches is not None and cfg.eval_max_batches <= 0:
        raise TrainConfigError(
            f"eval_max_batches must be positive (or null: the whole split), got {cfg.eval_max_batches}"
        )
    if cfg.attn_implementation not in ATTENTION:
        raise TrainConfigError(
            f"attn_implementation must be one of {ATTENTION}, got {cfg.attn_implementation!r}"
        )
    check_reporters(cfg.report_to)


def total_steps_for(rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps of ``cfg.epochs`` passes over ``rows`` rows (each worker gets rows // workers, whole
    micro batches only; leftover micro batches carry over into the next epoch)."""
    micro_per_worker = rows // cfg.num_workers // cfg.micro_batch_size
    accumulation = gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, cfg.num_workers)
    steps = cfg.epochs * micro_per_worker // accumulation
    if steps == 0:
        raise TrainConfigError(
            f"{rows} rows give no optimizer step with global_batch_size {cfg.global_batch_size}; add data or epochs"
        )
    return steps


def check_fits_memory(cfg: TrainConfig) -> None:
    """The planner's memory check (``chatmusician plan``) before any worker starts: a run whose GPUs cannot hold
    it is one line now, not an out-of-memory error after the model loaded on every node. A model the planner
    cannot read (no config.json, not LLaMA-shaped) is said and skipped."""
    from chatmusician.train.memory import PlanError
    from chatmusician.train.plan import PlanRefused, preflight

    try:
        preflight(cfg)
    except PlanRefused as err:
        raise TrainConfigError(str(err)) from None
    except PlanError as err:
        print(f"[{cfg.run_name}] memory plan skipped: {err}", flush=True)


def check_resume(cfg: TrainConfig, storage: tuple[Any, str], shape: checkpointing.TrainState) -> None:
    """Refuse at once, on the driver, to resume a checkpoint of this run name written with another shape."""
    fs, root = storage
    latest = checkpointing.latest_train_state(fs, f"{root.rstrip('/')}/{cfg.run_name}")
    if latest is not None:
        name, saved = latest
        try:
            checkpointing.check_resumable(saved, shape, f"run {cfg.run_name!r} from {name}")
        except checkpointing.ResumeMismatchError as err:
            raise TrainConfigError(str(err)) from None


def trainer_for(
    cfg: TrainConfig,
    datasets: dict[str, Any] | None = None,
    storage_filesystem=None,
    callbacks=None,
    loop=None,
):
    """The ``TorchTrainer`` of run ``cfg.run_name`` (not started; Ray must be connected: see :func:`train`):
    what :func:`train` fits, and what a Tune trial builds for itself (``callbacks``: Ray Train user callbacks,
    e.g. Tune's report callback). ``loop``: the worker function (default: the recipe's Trainer; DPO passes its
    own). Everything that can fail is checked here, before a worker is asked for."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from chatmusician.train import inputs
    from chatmusician.train.evaluation import resolve_hook
    from chatmusician.train.placement import check_placement, scaling_config
    from chatmusician.train.trainer import train_loop_per_worker

    validate(cfg)
    profile = get_profile(cfg.profile)
    check_fits_memory(cfg)
    check_placement(cfg)  # an impossible placement is one line now, never a wait in Ray Train's retry loop
    if cfg.eval_hook:
        resolve_hook(cfg.eval_hook)  # a bad path is a config error now, not a worker crash later
    loop_config: dict[str, Any] = {"cfg": cfg}
    if datasets is None and cfg.data.shards:
        plan = inputs.shard_plan(cfg.data.shards, cfg)
        loop_config |= {"train_plan": plan, "data_plan": plan["fingerprint"]}
        total_steps = cfg.max_steps or total_steps_for(plan["rows"], cfg)
    else:
        if cfg.max_steps is None and datasets is None:
            raise TrainConfigError("the live data stream has no row count: set max_steps")
        if datasets is None:
            datasets = {"train": inputs.stream_dataset(cfg)}
            loop_config["data_plan"] = inputs.stream_fingerprint(cfg)
        total_steps = cfg.max_steps or total_steps_for(datasets["train"].count(), cfg)
    val_path = inputs.val_shards_path(cfg)
    if val_path:
        val_mode = getattr(cfg, "VAL_MODE", getattr(cfg, "MODE", None))
        loop_config["val_plan"] = inputs.shard_plan(val_path, cfg, "validation shards", mode=val_mode)
    loop_config["total_steps"] = total_steps

    storage = checkpointing.storage_location(cfg, storage_filesystem)
    loop_config["storage"] = storage
    accumulation = gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, cfg.num_workers)
    shape = checkpointing.TrainState(
        world_size=cfg.num_workers,
        micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation=accumulation,
        total_steps=total_steps,
        data_plan=loop_config.get("data_plan"),
    )
    check_resume(cfg, storage, shape)
    # The fault-test marker: on the storage when it is local, else beside the worker (testing only).
    run_dir = checkpointing.local_run_dir(cfg)
    loop_config["marker_dir"] = str(run_dir if run_dir else Path(tempfile.gettempdir()) / cfg.run_name)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the stream: deterministic row order, what makes skipping rows a resume
    fs, root = storage
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend=profile.backend),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
            callbacks=callbacks,
        ),
        datasets=datasets or {},
        # No locality hints: the stream's split must not follow where blocks were produced.
        dataset_config=DataConfig(execution_options=ingest, enable_shard_locality=False),
    )


def train(cfg: TrainConfig, datasets: dict[str, Any] | None = None, storage_filesystem=None):
    """Launch (or resume) the run ``cfg.run_name`` under ``cfg.storage_path``; returns the ``ray.train.Result``.
    Connects first (the caller's Ray, ``RAY_ADDRESS``, or a local one started and stopped here).

    ``datasets`` overrides ``cfg.data`` with ready Ray Datasets (``{"train": ...}``, rows per the shard contract).
    ``storage_filesystem``: a pyarrow filesystem that ``storage_path`` is a path in (instead of a URI's).
    """
    from contextlib import nullcontext

    from chatmusician.terminal import MetricsFollower
    from chatmusician.train.placement import connected

    cfg = absolute_paths(cfg, storage_is_local=storage_filesystem is None)
    # On a person's terminal with a local Ray and local storage, Ray's and the workers' raw lines stay off the
    # terminal and the driver prints the run's progress from its metrics.jsonl; in a job's log (or on a cluster,
    # where the workers' lines are the only channel) the workers print the same progress lines themselves.
    metrics = Path(cfg.storage_path) / cfg.run_name / "metrics.jsonl"
    interactive = sys.stdout.isatty() and not ray_running_or_addressed() and "://" not in cfg.storage_path
    follow = MetricsFollower(metrics, f"[{cfg.run_name}]", cfg.max_steps) if interactive else nullcontext()
    if interactive:
        import logging
        import warnings

        logging.getLogger("ray").setLevel(logging.ERROR)  # Ray's start-up and Train's status lines
        warnings.filterwarnings("ignore", module=r"ray\.")
    with connected(log_to_driver=not interactive), follow:
        return trainer_for(cfg, datasets, storage_filesystem).fit()


def absolute_paths(cfg: TrainConfig, storage_is_local: bool = True) -> TrainConfig:
    """``cfg`` with its local relative paths made absolute: the workers do not run in the driver's directory
    (``storage_is_local`` False: ``storage_path`` is a path in a given filesystem, left as it is)."""
    import dataclasses

    def local(path: str | None, must_exist: bool) -> str | None:
        if not path or "://" in path or Path(path).is_absolute() or (must_exist and not Path(path).exists()):
            return path  # a URI, an absolute path, or a hub id (a model that is no local folder)
        return str(Path(path).absolute())

    data = dataclasses.replace(
        cfg.data, shards=local(cfg.data.shards, False), val_shards=local(cfg.data.val_shards, False)
    )
    return dataclasses.replace(
        cfg,
        model=local(cfg.model, True),
        storage_path=local(cfg.storage_path, False) if storage_is_local else cfg.storage_path,
        data=data,
    )


def ray_running_or_addressed() -> bool:
    """Ray is already up in this process, or ``RAY_ADDRESS`` names a cluster to join."""
    import os

    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def run(cfg: TrainConfig):
    """CLI / ``ray job submit`` entry (``chatmusician pretrain | sft``, ``ray_jobs.pretrain | sft``): validate before
    Ray starts, train, print where the last checkpoint is. A config or placement error is one line, exit 2."""
    validate(cfg)
    result = train(cfg)
    print(
        json.dumps({"run": cfg.run_name, "checkpoint": result.checkpoint.path if result.checkpoint else None})
    )
    return result
