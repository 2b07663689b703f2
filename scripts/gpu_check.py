"""GPU check of the training recipe's building blocks: DeepSpeed + LoRA steps on one CUDA GPU in the a800 profile
(bf16, fused AdamW) and the v100 profile (fp16, dynamic loss scaling), single process (world size 1, nccl).

Uses the recipe's own pieces (model + LoRA setup, AdamW, warmup+cosine, DeepSpeed config, collate, checkpoint
save/load) without Ray, so it runs on a bare GPU machine with torch, transformers, peft and deepspeed.

    python scripts/gpu_check.py --model PATH_TO_TINY --rows rows.json --out $OUT/gpu_check.json
    python scripts/gpu_check.py --prepare DIR   # here: copy the tiny model + tokenized ABC rows into DIR

Without CUDA it runs the cpu profile (fp32, gloo) so that the script itself can be tested anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script


def prepare(out_dir: Path, rows: int = 64, max_len: int = 256) -> None:
    """Copy the tiny model and tokenized Nottingham tunes into ``out_dir`` (the GPU machine has no music21)."""
    from chatmusician import corpora
    from chatmusician.model.loading import load_tokenizer
    from chatmusician.model.tiny import ensure_tiny

    model = ensure_tiny("nano")
    shutil.copytree(model, out_dir / "model", dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(model))
    tunes = corpora.nottingham_tunes()[:rows]
    ids = [tokenizer(t)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id] for t in tunes]
    (out_dir / "rows.json").write_text(json.dumps(ids))
    print(out_dir)


def _init_single_process(backend: str) -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    deepspeed.init_distributed(dist_backend=backend)


def run_profile(
    profile_name: str, zero_stage: int, model_path: str, rows: list[list[int]], steps: int
) -> dict:
    """Train ``steps`` optimizer steps; return losses, dtypes, loss scale, timings; check a save/load round trip."""
    import deepspeed
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from chatmusician.model.loading import count_parameters
    from chatmusician.train import checkpointing
    from chatmusician.train.batching import collate
    from chatmusician.train.checkpointing import TrainState
    from chatmusician.train.config import LoraConfig, TrainConfig
    from chatmusician.train.deepspeed_config import build_deepspeed_config
    from chatmusician.train.modeling import build_model, build_optimizer
    from chatmusician.train.profiles import get_profile, mfu, peak_flops_for
    from chatmusician.train.schedule import lr_multiplier
    from chatmusician.train.trainer import _loss_scale

    profile = get_profile(profile_name)
    cfg = TrainConfig(
        model=model_path,
        profile=profile_name,
        zero_stage=zero_stage,
        num_workers=1,
        global_batch_size=8,
        micro_batch_size=4,
        max_length=256,
        max_steps=steps,
        lr=2e-3,
        lora=LoraConfig(r=8, alpha=16),
    )
    ds_config = build_deepspeed_config(cfg, 1, profile)
    accumulation = ds_config["gradient_accumulation_steps"]
    device = torch.device("cuda", 0) if profile.use_gpu else torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg, profile)
    trainable, total = count_parameters(model)
    fused = profile.fused_optimizer and profile.use_gpu
    optimizer = build_optimizer(model, cfg, fused=fused)
    scheduler = LambdaLR(optimizer, lr_multiplier(steps, cfg.lr, cfg.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    micro = [
        collate({"input_ids": rows[i : i + 4], "labels": rows[i : i + 4]}, cfg.max_length)
        for i in range(0, len(rows) - 3, 4)
    ]
    losses, step_times, loss_scales, grad_norms, tokens = [], [], [], [], []
    k = 0
    for _ in range(steps):
        if profile.use_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for _ in range(accumulation):
            batch = dict(micro[k % len(micro)])
            k += 1
            step_tokens += int(batch.pop("num_tokens"))
            loss = engine(**{name: t.to(device) for name, t in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accumulation
        if profile.use_gpu:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - started)
        tokens.append(step_tokens)
        losses.append(step_loss)
        norm = engine.get_global_grad_norm()
        grad_norms.append(None if norm is None else float(norm))
        loss_scales.append(_loss_scale(engine))

    # Round trip: save (DeepSpeed state + rank-0 adapter), load into the same engine, same eval loss.
    eval_batch = {name: t.to(device) for name, t in micro[0].items() if name != "num_tokens"}
    engine.eval()  # no dropout: the two evaluations must see the same function
    with torch.no_grad():
        before = float(engine(**eval_batch).loss)
    with tempfile.TemporaryDirectory() as tmp:
        checkpointing.save(engine, tmp, TrainState(step=steps, micro_batches=k), "lora", rank=0)
        adapter_files = sorted(p.name for p in (Path(tmp) / "adapter").iterdir())
        state = checkpointing.load(engine, tmp)
    with torch.no_grad():
        after = float(engine(**eval_batch).loss)

    timed = step_times[2:] or step_times  # the first steps include kernel selection / allocator warm-up
    tokens_per_s = statistics.mean(tokens[2:] or tokens) / statistics.median(timed)
    device_name = torch.cuda.get_device_name(0) if profile.use_gpu else "cpu"
    peak = peak_flops_for(device_name, profile.precision) if profile.use_gpu else None
    param_dtypes = sorted({str(p.dtype) for p in engine.module.parameters()})
    result = {
        "profile": profile_name,
        "precision": profile.precision,
        "zero_stage": zero_stage,
        "device": device_name,
        "param_dtypes": param_dtypes,
        "fused_adamw": fused,
        "trainable_params": trainable,
        "total_params": total,
        "losses": [round(v, 4) for v in losses],
        "loss_fell": losses[-1] < losses[0] - 0.5,
        "all_finite": all(math.isfinite(v) for v in losses),
        "grad_norms": [None if v is None else round(v, 4) for v in grad_norms],
        "loss_scales": loss_scales,
        "skipped_steps": int(engine.skipped_steps),
        "median_step_s": round(statistics.median(timed), 5),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": mfu(total, tokens_per_s, peak, 1),
        "checkpoint": {
            "adapter_files": adapter_files,
            "resumed_step": state.step,
            "eval_loss_before_save": before,
            "eval_loss_after_load": after,
        },
        "max_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if profile.use_gpu else None,
    }
    print(json.dumps(result), flush=True)
    engine.destroy()
    del engine, model, optimizer
    if profile.use_gpu:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepare", type=Path, help="write the tiny model + rows.json into this folder and exit"
    )
    parser.add_argument("--model", default=None, help="tiny model folder (default: <data>/model)")
    parser.add_argument("--data", type=Path, default=Path("outputs/gpu_check_data"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = json.loads((args.data / "rows.json").read_text())
    model = args.model or str(args.data / "model")
    cuda = torch.cuda.is_available()
    _init_single_process("nccl" if cuda else "gloo")
    runs = [("a800", 2), ("a800", 3), ("v100", 2)] if cuda else [("cpu", 2)]
    results, errors = [], []
    for profile_name, stage in runs:
        try:
            results.append(run_profile(profile_name, stage, model, rows, args.steps))
        except Exception as exc:  # report every profile, even when one fails
            errors.append(
                {"profile": profile_name, "zero_stage": stage, "error": f"{type(exc).__name__}: {exc}"}
            )
            print(json.dumps(errors[-1]), flush=True)
    summary = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": __import__("deepspeed").__version__,
        "runs": results,
        "errors": errors,
        "ok": not errors and all(r["loss_fell"] and r["all_finite"] for r in results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print("SUMMARY", json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
