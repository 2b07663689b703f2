"""Evaluation benchmark: one-pass vs four-pass PPL scoring on the same model and questions (goal >= 3x), and
Ray Data batch inference over a replica pool vs the single-process loop on the same cores.

    .venv/bin/python -m benchmarks.eval [--size micro] [--repeat 3] [--replicas 2] [--json out.json]

The questions are the shipped MusicTheoryBench fixture, tiled to ``--questions`` (ids made unique), zero- and
few-shot. Both scorers run in the same process, interleaved round by round; the ratio is of medians. The pool
run starts its own local Ray (loopback) and counts everything a user waits for (actor start and model load
included), as the single-process loop counts its model load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiled_questions(n: int):
    from chatmusician.eval import mtb
    from chatmusician.eval.config import MTB_FIXTURE

    dev, test = mtb.load_questions(MTB_FIXTURE)
    return dev, [{**test[i % len(test)], "id": f"{test[i % len(test)]['id']}-{i}"} for i in range(n)]


def scoring_rounds(model, tokenizer, candidates, repeat: int, batch_size: int) -> dict[str, float]:
    from chatmusician.eval import scoring

    times: dict[str, list[float]] = {"four_pass": [], "one_pass": []}
    for _ in range(repeat):
        for name, fn in (("four_pass", scoring.four_pass), ("one_pass", scoring.one_pass)):
            start = time.perf_counter()
            fn(model, tokenizer, candidates, 2048, batch_size)
            times[name].append(time.perf_counter() - start)
    four, one = statistics.median(times["four_pass"]), statistics.median(times["one_pass"])
    return {"four_pass_s": four, "one_pass_s": one, "speedup": four / one, "rounds": times}


def pool_vs_loop(model_path: str, questions: int, replicas: int, batch_size: int) -> dict[str, float]:
    import ray

    from chatmusician.eval import runner
    from chatmusician.eval.config import EvalConfig
    from chatmusician.ray_local import free_port, init_local

    dev, test = tiled_questions(questions)
    items = runner.mtb_items(dev, test, ["ppl_zero_shot", "ppl_few_shot"], 0, 0)
    cpus = os.cpu_count() or 2
    cfg = EvalConfig(model=model_path, device="cpu")
    cfg.pool.batch_size, cfg.pool.use_ray, cfg.pool.torch_threads = batch_size, False, cpus
    start = time.perf_counter()
    local = runner.run_local(cfg, items)
    loop_s = time.perf_counter() - start
    cfg.pool.use_ray, cfg.pool.replicas = True, replicas
    cfg.pool.num_cpus = cpus / replicas
    cfg.pool.torch_threads = max(1, cpus // replicas)
    init_local(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port())
    try:
        start = time.perf_counter()
        pooled = runner.run_ray(cfg, items)
        pool_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    same = {r["key"]: json.loads(r["result"])["pred"] for r in local} == {
        r["key"]: json.loads(r["result"])["pred"] for r in pooled
    }
    return {
        "items": len(items),
        "loop_s": loop_s,
        "pool_s": pool_s,
        "ratio": loop_s / pool_s,
        "same_preds": same,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="micro", help="tiny model size (nano, micro, small)")
    parser.add_argument("--questions", type=int, default=24, help="questions scored per round")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds per scorer")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the pool run (0: skip it)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from chatmusician.eval import mtb
    from chatmusician.model.loading import load_model, load_tokenizer
    from chatmusician.model.tiny import ensure_tiny

    path = str(ensure_tiny(args.size))
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    torch.set_num_threads(os.cpu_count() or 2)
    dev, test = tiled_questions(args.questions)

    def token_len(text):
        return len(tokenizer(text)["input_ids"])

    out: dict = {"model": f"tiny-{args.size}", "questions": args.questions}
    for mode, shots in (("zero_shot", []), ("few_shot", dev)):
        candidates = [mtb.candidate_texts(q, shots, token_len, 2048) for q in test]
        out[mode] = scoring_rounds(model, tokenizer, candidates, args.repeat, args.batch_size)
        r = out[mode]
        print(
            f"{mode}: four-pass {r['four_pass_s']:.2f} s, one-pass {r['one_pass_s']:.2f} s -> {r['speedup']:.2f}x"
        )
    if args.replicas:
        out["pool"] = pool_vs_loop(path, args.questions, args.replicas, args.batch_size)
        p = out["pool"]
        print(
            f"pool ({args.replicas} replicas) vs single-process loop, {p['items']} items: loop {p['loop_s']:.1f} s, "
            f"pool {p['pool_s']:.1f} s -> {p['ratio']:.2f}x (same predictions: {p['same_preds']})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
