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
    env_vars = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    if (source := source_root()) is not None:  # run this checkout's code, not the vLLM env's own install
        env_vars["PYTHONPATH"] = str(source)
    return {"py_executable": python, "env_vars": env_vars}


def source_root() -> Path | None:
    """The source tree this package runs from (a checkout), or None when it is installed in site-packages."""
    import chatmusician

    root = Path(chatmusician.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() else None
