"""Serving benchmark: throughput and p50/p99 latency of /v1/chat/completions with the tiny model, batched vs
unbatched Composer in the same run; the vllm engine vs the transformers engine with streaming on (as the web UI
sends) at concurrency 1, 8 and 32, with time to first token; then an overload run (200 requests at concurrency
32 against small queues, on the vllm engine) that must give only 200 or 503, never another 5xx.

    .venv/bin/python -m benchmarks.serve [--sections [batching,engines,overload]] [--requests_per_level 48]
        [--max_tokens 32] [--engine_max_tokens 256] [--json out.json]

Starts its own local Ray (loopback, free port) and shuts it down at the end. Numbers are ratios against the
unbatched baseline measured in the same run; absolute figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ServeBenchConfig:
    """Load levels and app settings of the serving benchmark."""

    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Closed-loop client concurrency levels for the batched Composer."""
    unbatched_concurrency: list[int] = field(default_factory=lambda: [1, 8])
    """Levels also run with batching off (max_batch_size 1), the baseline."""
    requests_per_level: int = 48
    """Requests sent at each level (at least 2x the concurrency is used)."""
    max_tokens: int = 32
    """Tokens generated per request."""
    max_batch_size: int = 16
    """Batched Composer's max_batch_size."""
    overload_requests: int = 200
    """Requests of the overload run."""
    overload_concurrency: int = 32
    """Concurrency of the overload run."""
    overload_queue: int = 8
    """Composer max_ongoing_requests and max_queued_requests during the overload run."""
    overload_engine: str = "vllm"
    """Engine of the overload run."""
    sections: list[str] = field(default_factory=lambda: ["batching", "engines", "overload"])
    """What to run: batching (batched vs unbatched, transformers), engines (vllm vs transformers, streaming),
    overload."""
    engines: list[str] = field(default_factory=lambda: ["transformers", "vllm"])
    """Engines compared in the engines section (the first is the baseline of the ratio)."""
    engine_concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Concurrency levels of the engines section (streaming requests)."""
    engine_max_tokens: int = 256
    """Tokens per streamed answer in the engines section: a tune, as the web UI asks (Nottingham's median is ~280
    tokens; 32-token answers measure per-request overhead more than the engine)."""
    engine_requests_per_level: int = 48
    """Requests measured at each engines level (at least 4x the concurrency), after one unmeasured round of
    ``concurrency`` requests at that level (48 short answers at c=8 took ~1.5 s: ramp-up and tail dominated)."""
    size: str = "nano"
    """Tiny model size."""
    json: str | None = None
    """Also write the results to this JSON file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def load(url: str, concurrency: int, requests: int, max_tokens: int, stream: bool = False) -> dict:
    """Closed loop: ``concurrency`` workers send ``requests`` in all; latency per request, status counts; with
    ``stream``, server-sent events with a usage chunk and the time to the first content chunk (TTFT)."""
    import httpx

    body = {
        "model": "chatmusician",
        "messages": [{"role": "user", "content": "Compose a reel in D."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    latencies, ttfts, statuses, tokens = [], [], {}, 0
    remaining = iter(range(requests))

    async def streamed(client, start: float) -> int:
        nonlocal tokens
        first = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(
                    (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []
                ):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
            if first is not None:
                ttfts.append(first)
            return r.status_code

    async def worker(client):
        nonlocal tokens
        for _ in remaining:
            start = time.perf_counter()
            if stream:
                status = await streamed(client, start)
            else:
                r = await client.post("/v1/chat/completions", json=body)
                status = r.status_code
                if status == 200:
                    tokens += r.json()["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": round(wall, 2),
        "req_per_s": round(requests / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        **(
            {"ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p99_s": round(percentile(ttfts, 99), 3)}
            if ttfts
            else {}
        ),
        "statuses": statuses,
    }


def deploy(model: str, max_batch_size: int, ongoing: int, queued: int, engine: str = "transformers") -> None:
    from ray import serve

    from chatmusician.serve.app import app_config, build_app

    config = app_config(
        {
            "model": model,
            "engine": engine,
            "torch_threads": 1,
            "web_ui": False,
            "max_batch_size": max_batch_size,
            "composer": {"num_cpus": 1, "max_ongoing_requests": ongoing, "max_queued_requests": queued},
            "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 512, "max_queued_requests": 512},
            "render": {"serve": {"num_cpus": 0.25, "max_replicas": 1}},
        }
    )
    serve.run(build_app(config), name="bench", route_prefix="/")


def main(argv: list[str] | None = None) -> dict:
    import ray
    from ray import serve

    from chatmusician.config import parse_config
    from chatmusician.model.tiny import ensure_tiny

    cfg = parse_config(ServeBenchConfig, argv, prog="benchmarks/serve.py")
    model = str(ensure_tiny(cfg.size))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    results: dict = {"batched": [], "unbatched": [], "engines": {}, "overload": None, "config": vars(cfg)}
    runs = (
        [("unbatched", 1, cfg.unbatched_concurrency), ("batched", cfg.max_batch_size, cfg.concurrency)]
        if "batching" in cfg.sections
        else []
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, batch, levels in runs:
            deploy(model, batch, ongoing=max(levels) * 2, queued=-1)
            asyncio.run(load(url, 2, 4, cfg.max_tokens))  # warm-up
            for c in levels:
                row = asyncio.run(load(url, c, max(cfg.requests_per_level, 2 * c), cfg.max_tokens))
                results[mode].append(row)
                print(f"{mode:9s} c={c:3d} {row['req_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                      f"p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s statuses {row['statuses']}", flush=True)  # fmt: skip
        for engine in cfg.engines if "engines" in cfg.sections else []:
            levels = cfg.engine_concurrency
            deploy(model, cfg.max_batch_size, ongoing=max(levels) * 2, queued=-1, engine=engine)
            results["engines"][engine] = []
            for c in levels:
                asyncio.run(load(url, c, c, cfg.engine_max_tokens, stream=True))  # warm at this level
                requests = max(cfg.engine_requests_per_level, 4 * c)
                row = asyncio.run(load(url, c, requests, cfg.engine_max_tokens, stream=True))
                results["engines"][engine].append(row)
                print(f"{engine:12s} stream c={c:3d} {row['req_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                      f"p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s TTFT p50 {row.get('ttft_p50_s', 0):.3f}s "
                      f"p99 {row.get('ttft_p99_s', 0):.3f}s statuses {row['statuses']}", flush=True)  # fmt: skip
        if "overload" in cfg.sections:
            deploy(
                model,
                cfg.max_batch_size,
                ongoing=cfg.overload_queue,
                queued=cfg.overload_queue,
                engine=cfg.overload_engine,
            )
            over = asyncio.run(load(url, cfg.overload_concurrency, cfg.overload_requests, cfg.max_tokens))
            results["overload"] = over
            print(
                f"overload  {cfg.overload_engine} c={cfg.overload_concurrency} {cfg.overload_requests} requests: "
                f"statuses {over['statuses']}"
            )
    finally:
        serve.shutdown()
        ray.shutdown()

    base = {r["concurrency"]: r["req_per_s"] for r in results["unbatched"]}
    for row in results["batched"]:
        if row["concurrency"] in base:
            row["speedup_vs_unbatched"] = round(row["req_per_s"] / base[row["concurrency"]], 2)
            print(f"batched / unbatched throughput at c={row['concurrency']}: {row['speedup_vs_unbatched']}x")
    if len(results["engines"]) >= 2:
        (base_name, base_rows), *others = results["engines"].items()
        for name, rows in others:
            for row, ref in zip(rows, base_rows, strict=True):
                row[f"throughput_vs_{base_name}"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 2)
                print(f"{name} / {base_name} streaming throughput (tok/s) at c={row['concurrency']}: "
                      f"{row[f'throughput_vs_{base_name}']}x")  # fmt: skip
    results["overload_ok"] = True
    if results["overload"] is not None:
        other_5xx = {s: n for s, n in results["overload"]["statuses"].items() if s >= 500 and s != 503}
        results["overload_ok"] = not other_5xx and 503 in results["overload"]["statuses"]
        print(f"overload: no 5xx but 503 -> {'OK' if results['overload_ok'] else 'FAILED ' + str(other_5xx)}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["overload_ok"] else 1)
