"""Training throughput, as ratios against baselines measured in the same run (not a test).

1. Ray Train + DeepSpeed (the recipe, 1 worker, reading tokenized shards itself: the data path of a real run)
   vs a plain single-process PyTorch loop over the same shard rows in the same order: same model, LoRA, micro
   batch and accumulation; steady-state tokens/s (first steps dropped). Goal >= 0.9x.
2. Packed vs unpacked rows on a MusicPile-like length mix (many short ABC tunes, a tail of long documents):
   useful (non-pad) tokens/s through forward + backward with the recipe's collate. Goal >= 2x.
   Unpacked is the original's layout: one document per row, documents in random order, batches of 8 rows
   (its batch size) each padded to its longest row (its DataCollator). The mix keeps MusicPile's mean document
   length relative to the row length (4.16 B tokens / 5.17 M samples ~ 805 tokens, 0.39 of 2048), see
   musicpile_like_docs. The model is the ``small`` tiny one by default: at 512-token rows attention is ~17 %
   of its FLOPs (L / 6d), nearer LLaMA-2-7B at 2048 (8 %) than ``micro`` (33 %); long packed rows pay for
   attention over the whole row on CPU, where GPU kernels (flash-attention varlen) attend per document.

    .venv/bin/python -m benchmarks.train [--steps 30] [--size nano] [--pack-size small] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chatmusician.data.packing import pack  # noqa: E402
from chatmusician.train.batching import collate  # noqa: E402
from chatmusician.train.config import LoraConfig, TrainConfig  # noqa: E402
from chatmusician.train.modeling import build_model, build_optimizer  # noqa: E402
from chatmusician.train.profiles import get_profile  # noqa: E402
from chatmusician.train.schedule import lr_multiplier  # noqa: E402


def abc_rows(model_path: str, n: int, max_len: int) -> list[list[int]]:
    """``n`` real ABC tunes (Nottingham), tokenized, cut to ``max_len`` (the packing comparison's pool)."""
    from chatmusician import corpora
    from chatmusician.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    tunes = corpora.nottingham_tunes()
    return [
        tokenizer(tunes[i % len(tunes)])["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
        for i in range(n)
    ]


def write_abc_shards(model_path: str, max_len: int, out: str) -> list[dict]:
    """The Nottingham tunes through the data stage (pt, unpacked, one tune a row) into ``out``; the rows in
    written order (the order a run with ``data.shuffle: false`` reads them). Needs Ray (the stage is Ray Data)."""
    import pyarrow.parquet as pq

    from chatmusician import corpora
    from chatmusician.data.config import SourceConfig, TokenizeConfig
    from chatmusician.data.pipeline import write_shards

    tokenize = TokenizeConfig(
        sources=[SourceConfig(path=str(corpora.NOTTINGHAM_DIR / "*.abc"), format="abc")],
        mode="pt",
        tokenizer=model_path,
        max_len=max_len,
        packing="none",
        output_dir=out,
        progress=False,
    )
    manifest = write_shards(tokenize)
    return [row for s in manifest["shards"] for row in pq.read_table(f"{out}/{s['file']}").to_pylist()]


def plain_loop(cfg: TrainConfig, rows: list[dict], steps: int, warmup: int) -> float:
    """The baseline: one process, torch AdamW + LambdaLR + clipping + accumulation, no Ray, no DeepSpeed."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    torch.manual_seed(0)
    model = build_model(cfg, get_profile("cpu"))
    model.train()
    optimizer = build_optimizer(model, cfg, fused=False)
    scheduler = LambdaLR(optimizer, lr_multiplier(steps, cfg.lr, cfg.warmup_ratio))
    accumulation = cfg.global_batch_size // cfg.micro_batch_size
    micro = cfg.micro_batch_size
    k, rates = 0, []
    for _ in range(steps):
        started, tokens = time.perf_counter(), 0
        for _ in range(accumulation):
            chunk = rows[k * micro : (k + 1) * micro]
            k += 1
            batch = collate({k: [r[k] for r in chunk] for k in ("input_ids", "labels")}, cfg.max_length)
            tokens += int(batch.pop("num_tokens"))
            (model(**batch).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates[warmup:])


def ray_path(cfg: TrainConfig, shards: str, warmup: int) -> float:
    """The recipe through TorchTrainer with one worker reading ``shards`` in written order (the same rows as the
    plain loop); tokens/s from its metrics.jsonl (startup excluded)."""
    from dataclasses import replace

    from chatmusician.train.config import DataConfig
    from chatmusician.train.recipe import train

    train(replace(cfg, data=DataConfig(shards=shards, shuffle=False)))
    logged = [json.loads(line) for line in (Path(cfg.storage_path) / cfg.run_name / "metrics.jsonl").open()]
    return statistics.median(m["tokens_per_s"] for m in logged[warmup:])


def musicpile_like_docs(
    model_path: str, n: int, max_len: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` documents in random order with MusicPile's shape, scaled to ``max_len``: 80 % short ABC tunes and
    chat rows (lognormal, median 7 % of max_len: ~150 tokens at 2048) and 20 % long prose (median 1.4 x
    max_len), which puts the mean at ~0.39 x max_len as in MusicPile (4.16 B tokens / 5.17 M samples ~ 805
    tokens at 2048). Both layouts split documents longer than max_len into max_len pieces. Token ids are
    slices of real tokenized ABC (their values do not change the cost)."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([np.asarray(r, dtype=np.int32) for r in abc_rows(model_path, 300, 100_000)])
    short = rng.lognormal(mean=np.log(0.07 * max_len), sigma=0.6, size=n)
    long = rng.lognormal(mean=np.log(1.4 * max_len), sigma=0.5, size=n)
    lengths = np.where(rng.random(n) < 0.8, short, long).clip(16, len(pool) // 2).astype(int)
    docs, start = [], 0
    for length in lengths:
        start = (start + 997) % (len(pool) - length)
        ids = pool[start : start + length]
        docs.append((ids, ids.copy()))
    return docs


def layout_throughput(cfg: TrainConfig, docs, packing: str, batch_size: int) -> tuple[float, int, float]:
    """Useful tokens/s of forward + backward over all ``docs`` laid out as ``packing`` rows; (rate, rows, pad %)."""
    import torch

    rows = pack(docs, cfg.max_length, packing, "pt")
    torch.manual_seed(0)
    model = build_model(cfg, get_profile("cpu"))
    model.train()
    useful = padded = 0
    started = time.perf_counter()
    for i in range(0, len(rows.input_ids), batch_size):
        batch = {"input_ids": rows.input_ids[i : i + batch_size], "labels": rows.labels[i : i + batch_size]}
        if rows.position_ids is not None:
            batch["position_ids"] = rows.position_ids[i : i + batch_size]
        inputs = collate(batch, cfg.max_length)
        useful += int(inputs.pop("num_tokens"))
        padded += inputs["input_ids"].numel()
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    return useful / (time.perf_counter() - started), len(rows.input_ids), 1 - useful / padded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training throughput ratios (same run, same machine).")
    parser.add_argument("--size", default="nano", help="tiny model size: nano | micro | small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    parser.add_argument("--docs", type=int, default=120, help="documents in the packing comparison")
    parser.add_argument("--pack-length", type=int, default=512, help="row length in the packing comparison")
    parser.add_argument("--pack-batch", type=int, default=8, help="rows per batch in the packing comparison")
    parser.add_argument("--pack-size", default="small", help="tiny model size of the packing comparison")
    parser.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage of the Ray + DeepSpeed run")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from chatmusician.model.tiny import ensure_tiny

    torch.set_num_threads(1)  # the Ray worker gets one CPU too: compare like with like
    model = str(ensure_tiny(args.size))
    storage = tempfile.mkdtemp(prefix="bench_train_")
    cfg = TrainConfig(
        run_name="bench",
        storage_path=storage,
        model=model,
        lora=LoraConfig(r=8, alpha=16),
        profile="cpu",
        zero_stage=args.zero_stage,
        num_workers=1,
        cpus_per_worker=1,
        global_batch_size=8,
        micro_batch_size=4,
        max_length=256,
        max_steps=args.steps,
        checkpoint_every=10**6,  # one checkpoint, at the end, after the measured steps
        log_every=10**6,
        lr=1e-3,
    )
    results: dict[str, object] = {"model": args.size, "steps": args.steps, "zero_stage": args.zero_stage}

    if not args.skip_ray:
        import ray

        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            shards = f"{storage}/shards"
            rows = write_abc_shards(model, cfg.max_length, shards)
            plain_before = plain_loop(cfg, rows, args.steps, args.warmup)
            ray_rate = ray_path(cfg, shards, args.warmup)
            plain_after = plain_loop(
                cfg, rows, args.steps, args.warmup
            )  # bracket the Ray run against load drift
        finally:
            ray.shutdown()
        plain = (plain_before + plain_after) / 2
        results |= {
            "data_path": "shards read by the worker (data.shards, written order)",
            "plain_tokens_per_s": round(plain, 1),
            "ray_deepspeed_tokens_per_s": round(ray_rate, 1),
            "ray_vs_plain": round(ray_rate / plain, 3),
        }
        print(json.dumps(results), flush=True)

    pack_model = str(ensure_tiny(args.pack_size))
    long_cfg = TrainConfig(**{**cfg.__dict__, "model": pack_model, "max_length": args.pack_length})
    docs = musicpile_like_docs(pack_model, args.docs, long_cfg.max_length)
    unpacked, n_unpacked, pad_unpacked = layout_throughput(long_cfg, docs, "none", args.pack_batch)
    packed, n_packed, pad_packed = layout_throughput(long_cfg, docs, "greedy", args.pack_batch)
    results |= {
        "pack_model": args.pack_size,
        "pack_batch": args.pack_batch,
        "docs": len(docs),
        "doc_tokens_median": int(np.median([len(d[0]) for d in docs])),
        "doc_tokens_mean_over_row_length": round(
            float(np.mean([len(d[0]) for d in docs])) / args.pack_length, 3
        ),
        "rows_unpacked": n_unpacked,
        "rows_packed": n_packed,
        "padding_unpacked": round(pad_unpacked, 3),
        "padding_packed": round(pad_packed, 3),
        "unpacked_tokens_per_s": round(unpacked, 1),
        "packed_tokens_per_s": round(packed, 1),
        "packed_vs_unpacked": round(packed / unpacked, 3),
    }
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
