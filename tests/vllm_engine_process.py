"""Run by tests/test_serve_vllm_units.py in the vLLM environment: the same greedy requests on the vllm engine
with its engine core in this process and in its own process; prints one JSON line (answers, the engine core's
processes while it ran and after shutdown)."""

import asyncio
import contextlib
import json
import sys

import psutil

from chatmusician.serve.config import EngineConfig, VllmOptions
from chatmusician.serve.engines.vllm_engine import VllmEngine
from chatmusician.serve.types import GenerationParams


def answers(model: str, engine_process: bool) -> dict:
    config = EngineConfig(
        model=model,
        max_prompt_tokens=64,
        max_new_tokens_cap=64,
        vllm=VllmOptions(engine_process=engine_process),
    )
    engine = VllmEngine(config)
    params = GenerationParams(0.0, 1.0, 0, 1.0, 24, logprobs=1)
    prompts = [engine.prepare(p) for p in ("Compose a reel in G.", "A jig, please.")]
    final = asyncio.run(engine.agenerate(prompts[0], params))
    streamed = list(engine.stream(prompts[1], params))
    children = [p.pid for p in psutil.Process().children(recursive=True)]
    engine.shutdown()
    alive = []
    for pid in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            # multiprocessing's resource tracker stays until this process exits (Python's own helper)
            if process.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                process.cmdline()
            ):
                alive.append(" ".join(process.cmdline())[:120])
    return {
        "final": final.text,
        "final_logprobs": [e["logprob"] for e in final.logprobs],
        "stream": "".join(p for p in streamed if isinstance(p, str)),
        "stream_completion": streamed[-1].text,
        "children": len(children),
        "alive_after_shutdown": alive,
    }


if __name__ == "__main__":  # the engine core process is spawned: it re-imports this module
    model = sys.argv[1]
    print(json.dumps({"in_process": answers(model, False), "own_process": answers(model, True)}))
