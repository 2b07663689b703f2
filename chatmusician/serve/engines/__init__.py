"""Engines behind the Composer, by name (imported on use: the vllm one runs in its own environment only)."""

from __future__ import annotations

import importlib

from chatmusician.serve.config import EngineConfig

ENGINES = {
    "transformers": "chatmusician.serve.engines.hf:TransformersEngine",
    "vllm": "chatmusician.serve.engines.vllm_engine:VllmEngine",
    "echo": "chatmusician.serve.engines.echo:EchoEngine",
}


def load_engine(config: EngineConfig):
    """The engine ``config.engine`` names, started on ``config``."""
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose one of {sorted(ENGINES)}")
    module, name = ENGINES[config.engine].split(":")
    return getattr(importlib.import_module(module), name)(config)
