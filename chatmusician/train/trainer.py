"""One Ray Train worker of a run, as a class that reads top to bottom: setup -> resume -> train (step, evaluate,
save) -> close. :func:`train_loop_per_worker` is what ``TorchTrainer`` runs on every worker.

What a step does: read the step's micro batches first (their target tokens are counted and summed over the
ranks, so the loss is the mean over every target token of the step, however it is cut: see
chatmusician.train.batching), forward/backward each under DeepSpeed, one optimizer step at the boundary.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from chatmusician.terminal import progress_line
from chatmusician.train import checkpointing
from chatmusician.train.batching import (
    micro_batch_loss,
    shard_batches,
    step_seed,
    stream_batches,
    target_tokens,
)
from chatmusician.train.checkpointing import TrainState
from chatmusician.train.config import TrainConfig
from chatmusician.train.deepspeed_config import build_deepspeed_config
from chatmusician.train.evaluation import evaluate, is_eval_step, resolve_hook, run_eval_hook
from chatmusician.train.profiles import get_profile, mfu, peak_flops_for


def advance(state: TrainState, applied: bool) -> bool:
    """Count one optimizer step, or one skipped by DeepSpeed (fp16 overflow): only applied steps advance the
    step count that the schedule, checkpoints and the run's length are measured in."""
    if applied:
        state.step += 1
    else:
        state.skipped_steps += 1
    return applied


class Trainer:
    """The worker's run: ``Trainer(loop_config).fit()``."""

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        import torch

        self.loop_config = loop_config
        self.cfg: TrainConfig = loop_config["cfg"]
        self.total_steps: int = loop_config["total_steps"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.profile = get_profile(self.cfg.profile)
        self.ds_config = build_deepspeed_config(self.cfg, self.world, self.profile)
        self.accumulation: int = self.ds_config["gradient_accumulation_steps"]
        use_gpu = self.profile.use_gpu
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        """Model (partitioned at construction under ZeRO-3), optimizer, schedule, DeepSpeed engine, logs."""
        import deepspeed
        import deepspeed.ops
        import torch
        from torch.optim.lr_scheduler import LambdaLR

        from chatmusician.train.logs import RunLogs
        from chatmusician.train.modeling import build_model, build_optimizer
        from chatmusician.train.profiles import compute_parameters
        from chatmusician.train.schedule import lr_multiplier

        cfg, profile = self.cfg, self.profile
        if not profile.use_gpu:
            # DeepSpeed's shared-memory allreduce serves CPU inference only, and building it takes ~60 s on first
            # use; training's collectives go through gloo, so CPU runs skip it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        model = build_model(cfg, profile, self.ds_config)
        self.trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
        self.used_params = compute_parameters((n, _Sized(p)) for n, p in model.named_parameters())
        optimizer = build_optimizer(model, cfg, fused=profile.fused_optimizer and profile.use_gpu)
        scheduler = LambdaLR(optimizer, lr_multiplier(self.total_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.state = self.run_shape()
        self.logs = RunLogs(self.loop_config["storage"], cfg, self.rank) if self.rank == 0 else None
        self.peak = None  # MFU only where a GPU's peak is known
        if profile.use_gpu:
            self.peak = peak_flops_for(torch.cuda.get_device_name(), profile.precision) or profile.peak_flops
        self.val_plan = self.loop_config.get("val_plan")
        self.hook = resolve_hook(cfg.eval_hook) if cfg.eval_hook else None
        self.tokenizer = None
        if self.hook is not None and self.rank == 0:
            from chatmusician.model.loading import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.model)

    def run_shape(self, **progress: int) -> TrainState:
        """A train state with this run's shape (what a checkpoint it resumes from must match)."""
        return TrainState(
            **progress,
            world_size=self.world,
            micro_batch_size=self.cfg.micro_batch_size,
            gradient_accumulation=self.accumulation,
            total_steps=self.total_steps,
            data_plan=self.loop_config.get("data_plan"),
        )

    def resume(self) -> None:
        """The last checkpoint of this run (after a worker failure, or a relaunch of the same run name)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as ckpt_dir:
            saved = checkpointing.load(self.engine, ckpt_dir)
        checkpointing.check_resumable(saved, self.state, f"{self.cfg.run_name} from step {saved.step}")
        self.state = self.run_shape(
            step=saved.step, micro_batches=saved.micro_batches, skipped_steps=saved.skipped_steps
        )

    # ---------------------------------------------------------------- train

    def batches(self):
        plan = self.loop_config.get("train_plan")
        skip = self.state.micro_batches
        if plan is not None:
            return shard_batches(plan, self.cfg, self.rank, self.world, skip)
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        return stream_batches(shard, self.cfg.micro_batch_size, self.cfg.max_length, skip)

    def step(self, batches) -> dict[str, Any]:
        """One optimizer step over ``accumulation`` micro batches; its metrics."""
        import torch
        import torch.distributed as dist

        cfg, engine, state = self.cfg, self.engine, self.state
        torch.manual_seed(step_seed(cfg.seed, state.step + state.skipped_steps, self.rank))
        started = time.perf_counter()
        lr = engine.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        micro = [next(batches) for _ in range(self.accumulation)]
        # [target tokens of the step on this rank, real tokens] -> summed over ranks
        counts = torch.tensor(
            [sum(target_tokens(b["labels"]) for b in micro), sum(int(b.pop("num_tokens")) for b in micro)],
            dtype=torch.float64,
        ).to(self.device)
        dist.all_reduce(counts)
        step_targets, tokens = int(counts[0]), float(counts[1])
        loss_sum = torch.zeros((), dtype=torch.float64)
        fallback_norm = None
        for batch in micro:
            inputs = {k: v.to(self.device) for k, v in batch.items()}
            loss, token_losses = micro_batch_loss(engine, inputs, step_targets, self.world, self.accumulation)
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            if engine.is_gradient_accumulation_boundary():
                fallback_norm = _unreported_grad_norm(engine)
            engine.step()  # steps the optimizer + schedule only at the accumulation boundary
            loss_sum += token_losses.cpu()
            state.micro_batches += 1
        total = loss_sum.to(self.device)
        dist.all_reduce(total)  # every target token's loss of the step, over workers
        elapsed = time.perf_counter() - started
        # fp16: on a gradient overflow DeepSpeed skips the update and does not step the schedule; such a step
        # is not counted either, so the schedule still reaches min_lr on the last counted step.
        applied = advance(state, engine.was_step_applied())
        tokens_per_s = tokens / elapsed
        metrics = {
            "step": state.step,
            "loss": float(total) / max(step_targets, 1),  # the same basis as val_loss: mean token loss
            "lr": lr,
            "grad_norm": _as_float(engine.get_global_grad_norm()) or fallback_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(self.used_params, tokens_per_s, self.peak, self.world, self.trainable),
            "loss_scale": _loss_scale(engine),
            "skipped_steps": state.skipped_steps,
            "trainable_params": self.trainable,
        }
        if not applied:
            metrics["skipped"] = True
        return metrics

    def evaluate(self, metrics: dict[str, Any]) -> bool:
        """Validation and the eval hook at eval steps; whether validation ran."""
        step = self.state.step
        if metrics.get("skipped") or not is_eval_step(step, self.total_steps, self.cfg.eval_every):
            return False
        evaluated = self.val_plan is not None
        if evaluated:
            metrics |= evaluate(self.engine, self.val_plan, self.cfg, self.rank, self.world, self.device)
        if self.hook is not None:
            metrics |= run_eval_hook(
                self.hook, self.engine, self.tokenizer, self.cfg, step, self.rank, self.device
            )
        return evaluated

    def save(self, metrics: dict[str, Any]) -> None:
        """A checkpoint of what trains, uploaded by Ray Train in the background when ``async_checkpoint_upload``
        (it deletes the local copy once uploaded; at most one upload in flight: the previous one is committed
        first, so a failure loses at most one interval); a synchronous upload waits until Ray has committed it."""
        import ray.train
        from ray.train import CheckpointConsistencyMode, CheckpointUploadMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        if self.logs is not None:
            self.logs.sync()
        local = tempfile.mkdtemp(prefix=f"{self.cfg.run_name}-ckpt-")
        checkpointing.save(self.engine, local, self.state, self.cfg.train_type, self.rank)
        if self.logs is not None and self.state.step == self.total_steps:
            self.logs.log_export(f"{local}/{'adapter' if self.cfg.train_type == 'lora' else 'model'}")
        mode = CheckpointUploadMode.ASYNC if self.cfg.async_checkpoint_upload else CheckpointUploadMode.SYNC
        ray.train.report(
            {**metrics, "micro_batches": self.state.micro_batches},
            checkpoint=ray.train.Checkpoint.from_directory(local),
            checkpoint_dir_name=checkpointing.checkpoint_dir_name(self.state.step),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )
        if mode is CheckpointUploadMode.SYNC or self.state.step == self.total_steps:
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def fail_here_once(self) -> None:
        """Testing hook (``fail_at_step``): the last rank dies as that step starts, before any collective of it,
        once the last checkpoint is committed (so what a resume starts from is certain)."""
        import ray.train
        from ray.train import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        if self.rank == self.world - 1:
            checkpointing.fail_once(
                self.loop_config["marker_dir"] + f"/.failed_at_step_{self.cfg.fail_at_step}"
            )

    def train(self) -> None:
        import ray.train

        cfg, state = self.cfg, self.state
        batches = self.batches()
        self.engine.train()
        while state.step < self.total_steps:
            if cfg.fail_at_step is not None and state.step + 1 == cfg.fail_at_step:
                self.fail_here_once()
            metrics = self.step(batches)
            evaluated = self.evaluate(metrics)
            if self.logs is not None:
                self.logs.write(metrics)
            self.print_progress(metrics, evaluated)
            if metrics.get("skipped"):
                continue
            if state.step % cfg.checkpoint_every == 0 or state.step == self.total_steps:
                self.save(metrics)
            elif state.step % cfg.log_every == 0 or evaluated:
                ray.train.report(metrics)

    def print_progress(self, metrics: dict[str, Any], evaluated: bool) -> None:
        """Progress in the job's log (``ray job logs`` / the driver's console), rank 0 only."""
        step, cfg = self.state.step, self.cfg
        if self.rank or not (step % cfg.log_every == 0 or step in (1, self.total_steps) or evaluated):
            return
        val = f" val_loss {metrics['val_loss']:.4f}" if evaluated else ""
        status = (
            f"loss {metrics['loss']:.4f}{val} lr {metrics['lr']:.2e} tokens/s {metrics['tokens_per_s']:,.0f}"
            + (" (skipped: fp16 overflow)" if metrics.get("skipped") else "")
        )
        print(progress_line(f"[{cfg.run_name}]", step, self.total_steps, status), flush=True)

    def close(self) -> None:
        if self.logs is not None:
            self.logs.close()

    def fit(self) -> None:
        self.setup()
        self.resume()
        self.train()
        self.close()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    Trainer(loop_config).fit()


# ---------------------------------------------------------------- DeepSpeed introspection


class _Sized:
    """A parameter's full size, also when ZeRO-3 has partitioned it (``ds_numel``), for FLOP counts."""

    def __init__(self, param):
        self._n = _numel(param)

    def numel(self) -> int:
        return self._n


def _numel(param) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _unreported_grad_norm(engine) -> float | None:
    """Plain fp32 without ZeRO clips with a norm DeepSpeed does not keep: measure the (already all-reduced)
    gradients before the step instead. None where DeepSpeed reports the norm itself."""
    import torch

    if engine.zero_optimization_stage() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def _loss_scale(engine) -> float | None:
    """Current fp16 loss scale (None when not training in fp16)."""
    if not engine.fp16_enabled():
        return None
    return float(getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", 0.0)))
