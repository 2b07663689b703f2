"""One Ray Train worker of a preference run: the recipe's :class:`~chatmusician.train.trainer.Trainer` (setup,
resume, checkpoints, validation, logs, fault tolerance) with a preference step.

A step: ``accumulation`` micro batches of ``micro_batch_size`` pairs; each is one forward pass of the policy over
its 2B rows (chosen then rejected, prompts masked) and one of the reference under ``no_grad``: for LoRA the same
model with its adapter disabled (peft's ``disable_adapter``: no second copy in memory); full training reads the
reference log-probs precomputed with the starting model (:func:`chatmusician.train.dpo_data.reference_logps`). Each micro batch's loss
is its pairs' mean; DeepSpeed averages micro batches and ranks, so the step's gradient is that of the mean over
every pair of the step. Logged per step: loss, reward margin and accuracy, chosen / rejected log-probs, the KL
estimate (:func:`chatmusician.train.dpo_loss.pair_stats`), tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

from chatmusician.train.batching import step_seed
from chatmusician.train.dpo_data import pair_batches
from chatmusician.train.dpo_loss import STAT_NAMES, chosen_nll, pair_losses, pair_stats, sequence_logps
from chatmusician.train.trainer import Trainer, _as_float, _loss_scale, _unreported_grad_norm, advance


def reference_mode(engine):
    """Context in which the model is its reference: the adapter disabled (LoRA)."""
    module = engine.module if hasattr(engine, "module") else engine
    if hasattr(module, "disable_adapter"):
        return module.disable_adapter()
    raise ValueError(
        "this model has no adapter to disable: full training reads precomputed reference log-probs"
    )


def micro_batch_pair_loss(engine, batch: dict[str, Any], cfg):
    """(loss to backward: the micro batch's mean pair loss, plus sft_weight x the chosen answers' NLL per token;
    float64 sums of the logged stats [7])."""
    import torch

    labels = batch["labels"]
    model_inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    logps, counts = sequence_logps(engine(**model_inputs).logits, labels)  # [2B]
    ref = batch.get("ref_logps")  # full training: precomputed with the starting model
    if ref is None:
        with torch.no_grad(), reference_mode(engine):
            ref, _ = sequence_logps(engine(**model_inputs).logits, labels)
    ref = ref.to(logps.dtype)
    b = logps.shape[0] // 2
    losses = pair_losses(logps[:b], logps[b:], ref[:b], ref[b:], cfg.loss, cfg.beta, cfg.dpop_lambda,
                         counts[:b], counts[b:])  # fmt: skip
    loss = losses.mean()
    if cfg.sft_weight:
        loss = loss + cfg.sft_weight * chosen_nll(logps[:b], counts[:b])
    return loss, pair_stats(losses, logps[:b], logps[b:], ref[:b], ref[b:], cfg.beta)


class DPOTrainer(Trainer):
    """The worker's preference run: ``DPOTrainer(loop_config).fit()``."""

    def batches(self):
        return pair_batches(
            self.loop_config["train_plan"], self.cfg, self.rank, self.world, self.state.micro_batches
        )

    def step(self, batches) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        cfg, engine, state = self.cfg, self.engine, self.state
        torch.manual_seed(step_seed(cfg.seed, state.step + state.skipped_steps, self.rank))
        started = time.perf_counter()
        lr = engine.lr_scheduler.get_last_lr()[0]
        micro = [next(batches) for _ in range(self.accumulation)]
        sums = torch.zeros(len(STAT_NAMES) + 2, dtype=torch.float64)  # stats, pairs, tokens
        sums[-1] = float(sum(int(b.pop("num_tokens")) for b in micro))
        fallback_norm = None
        for batch in micro:
            inputs = {k: v.to(self.device) for k, v in batch.items()}
            loss, stats = micro_batch_pair_loss(engine, inputs, cfg)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                fallback_norm = _unreported_grad_norm(engine)
            engine.step()
            sums[:-1] += stats.cpu()
            state.micro_batches += 1
        total = sums.to(self.device)
        dist.all_reduce(total)
        total = total.cpu()
        elapsed = time.perf_counter() - started
        applied = advance(state, engine.was_step_applied())
        pairs = max(float(total[-2]), 1.0)
        metrics = {"step": state.step, **{k: float(total[i]) / pairs for i, k in enumerate(STAT_NAMES)}}
        metrics |= {
            "lr": lr,
            "grad_norm": _as_float(engine.get_global_grad_norm()) or fallback_norm,
            "tokens_per_s": float(total[-1]) / elapsed,
            "pairs": int(pairs),
            "loss_scale": _loss_scale(engine),
            "skipped_steps": state.skipped_steps,
            "trainable_params": self.trainable,
        }
        if not applied:
            metrics["skipped"] = True
        return metrics

    def print_progress(self, metrics: dict[str, Any], evaluated: bool) -> None:
        step, cfg = self.state.step, self.cfg
        if self.rank or not (step % cfg.log_every == 0 or step in (1, self.total_steps) or evaluated):
            return
        val = f" val_loss {metrics['val_loss']:.4f}" if evaluated else ""
        print(
            f"[{cfg.run_name}] step {step}/{self.total_steps} loss {metrics['loss']:.4f} "
            f"margin {metrics['reward_margin']:.4f} accuracy {metrics['reward_accuracy']:.2f} "
            f"kl {metrics['kl_estimate']:.4f}{val} tokens/s {metrics['tokens_per_s']:,.0f}",
            flush=True,
        )


def dpo_loop_per_worker(loop_config: dict[str, Any]) -> None:
    DPOTrainer(loop_config).fit()
