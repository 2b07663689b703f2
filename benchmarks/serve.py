"""Serving benchmark: throughput and p50/p99 latency of /v1/chat/completions with the tiny model, batched vs
unbatched Composer in the same run, then an overload run (200 requests at concurrency 32 against small queues)
that must give only 200 or 503, never another 5xx.

    .venv/bin/python benchmarks/serve.py [--requests_per_level 48] [--max_tokens 32] [--json out.json]

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


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """Closed loop: ``concurrency`` workers send ``requests`` in all; latency per request, status counts."""
    import httpx

    body = {
        "model": "chatmusician",
        "messages": [{"role": "user", "content": "Compose a reel in D."}],
        "max_tokens": max_tokens,
    }
    latencies, statuses, tokens = [], {}, 0
    remaining = iter(range(requests))

    async def worker(client):
        nonlocal tokens
        for _ in remaining:
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]

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
        "statuses": statuses,
    }


def deploy(model: str, max_batch_size: int, ongoing: int, queued: int) -> None:
    from ray import serve

    from chatmusician.serve.app import app_config, build_app

    config = app_config(
        {
            "model": model,
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
    results: dict = {"batched": [], "unbatched": [], "overload": None, "config": vars(cfg)}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, batch, levels in (
            ("unbatched", 1, cfg.unbatched_concurrency),
            ("batched", cfg.max_batch_size, cfg.concurrency),
        ):
            deploy(model, batch, ongoing=max(levels) * 2, queued=-1)
            asyncio.run(load(url, 2, 4, cfg.max_tokens))  # warm-up
            for c in levels:
                row = asyncio.run(load(url, c, max(cfg.requests_per_level, 2 * c), cfg.max_tokens))
                results[mode].append(row)
                print(f"{mode:9s} c={c:3d} {row['req_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                      f"p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s statuses {row['statuses']}", flush=True)  # fmt: skip
        deploy(model, cfg.max_batch_size, ongoing=cfg.overload_queue, queued=cfg.overload_queue)
        over = asyncio.run(load(url, cfg.overload_concurrency, cfg.overload_requests, cfg.max_tokens))
        results["overload"] = over
        print(
            f"overload  c={cfg.overload_concurrency} {cfg.overload_requests} requests: statuses {over['statuses']}"
        )
    finally:
        serve.shutdown()
        ray.shutdown()

    base = {r["concurrency"]: r["req_per_s"] for r in results["unbatched"]}
    for row in results["batched"]:
        if row["concurrency"] in base:
            row["speedup_vs_unbatched"] = round(row["req_per_s"] / base[row["concurrency"]], 2)
            print(f"batched / unbatched throughput at c={row['concurrency']}: {row['speedup_vs_unbatched']}x")
    other_5xx = {s: n for s, n in results["overload"]["statuses"].items() if s >= 500 and s != 503}
    results["overload_ok"] = not other_5xx and 503 in results["overload"]["statuses"]
    print(f"overload: no 5xx but 503 -> {'OK' if results['overload_ok'] else 'FAILED ' + str(other_5xx)}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["overload_ok"] else 1)
