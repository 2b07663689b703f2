"""Validation inside a run: the held-out split's mean token loss on every rank, and the optional eval hook."""

from __future__ import annotations

import math
from typing import Any

from chatmusician.train.batching import as_numpy, collate, token_loss_sum
from chatmusician.train.config import TrainConfig, TrainConfigError


def is_eval_step(step: int, total_steps: int, eval_every: int | None) -> bool:
    return step == total_steps or bool(eval_every and step % eval_every == 0)


def resolve_hook(dotted: str):
    """``package.module:function`` -> the function (imported by name, so train/ imports no upper layer)."""
    import importlib

    module, _, attr = dotted.partition(":")
    if not module or not attr:
        raise TrainConfigError(f"eval_hook must look like 'package.module:function', got {dotted!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise TrainConfigError(f"eval_hook {dotted!r} cannot be imported: {err}") from None


def capped(plan: dict[str, Any], max_rows: int | None) -> dict[str, Any]:
    """The plan's first ``max_rows`` rows (in written order: the same rows for any world size), or all of it."""
    if max_rows is None or plan["rows"] <= max_rows:
        return plan
    chunks, left = [], max_rows
    for chunk in plan["chunks"]:
        if left <= 0:
            break
        chunks.append(chunk._replace(rows=min(chunk.rows, left)))
        left -= chunks[-1].rows
    return {**plan, "chunks": chunks, "rows": max_rows}


def evaluate(
    engine, plan: dict[str, Any], cfg: TrainConfig, rank: int, world: int, device
) -> dict[str, float]:
    """Mean token loss (and perplexity) of the validation split (its first ``eval_max_batches`` x micro batch
    rows when capped), every rank a contiguous part of it. Every rank runs the same number of forward passes
    (ZeRO-3 gathers weights collectively): a rank whose part is shorter runs its last batch again with no
    target tokens."""
    import torch
    import torch.distributed as dist

    from chatmusician.train.data_order import ShardRowReader, eval_pieces

    rows_cap = cfg.eval_max_batches * cfg.micro_batch_size if cfg.eval_max_batches else None
    plan = capped(plan, rows_cap)
    reader = ShardRowReader(
        plan["files"],
        plan["filesystem"],
        plan["chunks"],
        rank=0,
        world=1,
        micro_batch_size=1,
        seed=0,
        window=1,
        shuffle=False,
        check_rows=False,
    )
    batch_rows = cfg.micro_batch_size
    mine, most = eval_pieces(plan["chunks"], rank, world)
    table = reader.read(mine) if mine else None
    sums = torch.zeros(2, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    last = None
    with torch.no_grad():
        for begin in range(0, most, batch_rows):
            rows = table.slice(begin, batch_rows) if table is not None and begin < table.num_rows else None
            if rows is not None and rows.num_rows:
                batch, real = collate(as_numpy(rows), cfg.max_length), True
                last = batch
            else:
                batch, real = last, False
                if batch is None:  # this rank holds no row at all: the split's first row, no targets
                    first = reader.read(eval_pieces(plan["chunks"], 0, 1)[0][:1]).slice(0, 1)
                    batch = last = collate(as_numpy(first), cfg.max_length)
            batch = dict(batch)
            batch.pop("num_tokens")
            labels = batch.pop("labels")
            logits = engine(**{k: v.to(device) for k, v in batch.items()}).logits
            if real:
                loss_sum, tokens = token_loss_sum(logits.cpu(), labels)
                sums += torch.tensor([loss_sum, tokens], dtype=torch.float64)
    if was_training:
        engine.train()
    sums = sums.to(device)
    dist.all_reduce(sums)
    loss = float(sums[0] / sums[1]) if float(sums[1]) else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1])}


def run_eval_hook(hook, engine, tokenizer, cfg: TrainConfig, step: int, rank: int, device) -> dict[str, Any]:
    """Call ``hook(model, tokenizer, step)`` on rank 0.

    Under ZeRO-3 no rank gathers the whole model into its GPU: the weights are consolidated layer by layer
    into rank 0's host memory (a collective every rank joins), and rank 0 runs the hook on a copy of its own,
    freed afterwards. The other ranks wait at a barrier (keep hooks well under the collective timeout)."""
    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {}
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0 only; None elsewhere
        if rank == 0:
            from chatmusician.train.modeling import build_model
            from chatmusician.train.profiles import get_profile

            model = build_model(cfg, get_profile(cfg.profile))  # a plain copy: not partitioned
            model.load_state_dict(state, strict=False)
            model.to(device).eval()
            with torch.no_grad():
                out = dict(hook(model, tokenizer, step) or {})
            del model, state
    elif rank == 0:
        was_training = engine.training
        engine.eval()
        with torch.no_grad():
            out = dict(hook(engine.module, tokenizer, step) or {})
        if was_training:
            engine.train()
    dist.barrier()
    return out
