"""The runtime_env of a ``vllm`` Composer replica (importable without vLLM: the app builder runs in .venv)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def runtime_env(python: str, kv_cache_gib: int) -> dict[str, Any]:
    """Ray runtime_env: the vLLM environment's interpreter and vLLM's in-process engine settings."""
    if not Path(python).exists():
        raise FileNotFoundError(
            f"the vllm engine needs its environment at {python}: run `make setup` (scripts/setup.sh builds it)"
        )
    return {
        "py_executable": python,
        "env_vars": {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_LOGGING_LEVEL": "WARNING",
        },
    }
