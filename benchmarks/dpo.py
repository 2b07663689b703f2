"""Preference-training throughput, as ratios against baselines measured in the same run (not a test).

1. A DPO step vs an SFT step on the same rows: micro batches of pairs from real Nottingham tunes (chosen) and
   scrambled ones (rejected), one forward + backward of the 2B rows for SFT, and for DPO the same plus a
   no-grad reference pass with the LoRA adapter disabled (chatmusician.train.dpo_trainer). Same model, LoRA,
   optimizer and thread count; SFT and DPO steps taken in turns (load drift hits both alike); median tokens/s
   over the rows of each step (first steps dropped). Goal: DPO >= 0.45x SFT.
2. Samples and pairs per minute of the prefs job (sampling + rewards with abc2midi + pairing, wall clock with the
   engine's start), the vLLM engine (one actor in .venv-vllm) vs the transformers pool (one process), both
   unconstrained on the same prompts and seeds; vLLM is skipped, and said so, where its environment is missing.

    .venv/bin/python -m benchmarks.dpo [--size micro] [--steps 12] [--skip-prefs]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chatmusician.train.config import DPOConfig, LoraConfig  # noqa: E402


def pair_batches(model: str, pairs: int, micro: int, max_length: int) -> list[dict]:
    """Collated micro batches of ``micro`` pairs each (chosen rows then rejected rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatmusician import corpora
    from chatmusician.model.loading import load_tokenizer
    from chatmusician.prompts import build_chat_prompt
    from chatmusician.train.dpo_data import collate_pairs, read_pairs, tokenize_pairs

    tunes = corpora.nottingham_tunes()[:pairs]
    prompt = build_chat_prompt("Compose a tune in ABC notation.")
    rows = [{"prompt": prompt, "chosen": t, "rejected": "|".join(reversed(t.split("|")))} for t in tunes]
    path = Path(tempfile.mkdtemp(prefix="bench_dpo_")) / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    table = tokenize_pairs(read_pairs(str(path)), load_tokenizer(model), max_length, 64)
    out = []
    for start in range(0, table.num_rows - micro + 1, micro):
        part = table.slice(start, micro)
        out.append(
            collate_pairs({c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names}, max_length)
        )
    return out


def step_rates(cfg: DPOConfig, batches: list[dict], steps: int, warmup: int) -> tuple[float, float]:
    """Median tokens/s of SFT and DPO optimizer steps (one micro batch each), taken in turns on one model (load
    drift on a shared machine hits both alike); the first ``warmup`` of each are dropped."""
    import torch

    from chatmusician.train.dpo_trainer import micro_batch_pair_loss
    from chatmusician.train.modeling import build_model, build_optimizer
    from chatmusician.train.profiles import get_profile

    torch.manual_seed(0)
    model = build_model(cfg, get_profile("cpu"))
    model.train()
    optimizer = build_optimizer(model, cfg, fused=False)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps):
        for dpo in (False, True):
            batch = dict(batches[i % len(batches)])
            tokens = int(batch.pop("num_tokens"))
            started = time.perf_counter()
            loss = micro_batch_pair_loss(model, batch, cfg)[0] if dpo else model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                rates[dpo].append(tokens / (time.perf_counter() - started))
    return statistics.median(rates[False]), statistics.median(rates[True])


def prefs_rate(model: str, n_per_prompt: int, max_new_tokens: int, engine: str) -> dict:
    """Samples and pairs per minute of the prefs job (sampling + rewards with abc2midi + pairing), wall clock
    including the engine's start; unconstrained sampling, one replica, batch 8."""
    from chatmusician.eval.config import PoolConfig
    from chatmusician.prefs.config import PrefsConfig
    from chatmusician.prefs.job import build

    cfg = PrefsConfig(model=model, device="cpu", n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens,
                      engine=engine, check_midi=True, output_dir=tempfile.mkdtemp(prefix="bench_prefs_"),
                      pool=PoolConfig(use_ray=engine == "vllm", batch_size=8, num_cpus=1))  # fmt: skip
    started = time.perf_counter()
    meta = build(cfg)
    minutes = (time.perf_counter() - started) / 60
    return {f"{engine}_samples": meta["samples"], f"{engine}_pairs": meta["pairs"],
            f"{engine}_samples_per_min": round(meta["samples"] / minutes, 1),
            f"{engine}_pairs_per_min": round(meta["pairs"] / minutes, 2)}  # fmt: skip


def vllm_usable() -> str | None:
    """Why the vLLM environment cannot run here (None: it can)."""
    import subprocess

    from chatmusician.serve.app import vllm_python

    python = vllm_python(".venv-vllm/bin/python")
    if not Path(python).exists():
        return f"no vLLM environment at {python}"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return (
        None if probe.returncode == 0 else f"vllm does not import: {probe.stderr.strip().splitlines()[-1:]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DPO vs SFT step throughput; prefs pairs per minute.")
    parser.add_argument("--size", default="micro", help="tiny model size: nano | micro | small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--micro", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--n-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-prefs", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from chatmusician.model.tiny import ensure_tiny

    torch.set_num_threads(1)
    model = str(ensure_tiny(args.size))
    cfg = DPOConfig(model=model, lora=LoraConfig(r=8, alpha=16), profile="cpu", loss="dpop", lr=1e-4,
                    max_length=args.max_length, max_prompt_length=64)  # fmt: skip
    batches = pair_batches(model, args.micro * 4, args.micro, args.max_length)
    sft, dpo = step_rates(cfg, batches, args.steps, args.warmup)
    results: dict[str, object] = {
        "model": args.size, "pairs_per_step": args.micro, "steps": args.steps,
        "sft_tokens_per_s": round(sft, 1), "dpo_tokens_per_s": round(dpo, 1), "dpo_vs_sft": round(dpo / sft, 3),
        "goal": ">= 0.45",
    }  # fmt: skip
    print(json.dumps(results), flush=True)
    if not args.skip_prefs:
        nano = str(ensure_tiny("nano"))
        results |= {"prefs_model": "nano", "prefs_n_per_prompt": args.n_per_prompt}
        results |= prefs_rate(nano, args.n_per_prompt, args.max_new_tokens, "transformers")
        why_not = vllm_usable()
        if why_not:
            results["vllm"] = f"not measured: {why_not}"
        else:
            import ray

            ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            try:
                results |= prefs_rate(nano, args.n_per_prompt, args.max_new_tokens, "vllm")
            finally:
                ray.shutdown()
            results["vllm_vs_transformers_samples_per_min"] = round(
                results["vllm_samples_per_min"] / results["transformers_samples_per_min"], 3
            )
        print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
