"""The transformers engine: ``model.generate`` batches with per-row sampling, stops and constraints."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.serve.config import EngineConfig
from chatmusician.serve.engines.base import (
    _token_text,
    add_offsets,
    finish,
    generation_kwargs,
    split_at_eos,
)
from chatmusician.serve.requests import check_prompt_length, encode_prompt
from chatmusician.serve.types import Completion, ComposeError, GenerationParams, Prepared


def group_by_adapter(adapters: Sequence[str | None]) -> list[list[int]]:
    """Indices of requests that can share one ``generate`` call: the same adapter. Every other parameter is per
    row: sampling and seeds (RowSampler: each row draws from its own generator, so only left padding's float
    rounding could differ from a run alone, tested equal on the tiny model), token budgets and stops (RowStops),
    constraints and their wrap-up budgets (AbcLogitsProcessor)."""
    groups: dict[str | None, list[int]] = {}
    for i, adapter in enumerate(adapters):
        groups.setdefault(adapter, []).append(i)
    return list(groups.values())


def kv_cache_rows(model_config, tokens: int, dtype_bytes: int, free_bytes: int, share: float = 0.8) -> int:
    """Sequences of ``tokens`` (prompt cap + answer cap) whose KV cache fits in ``share`` of ``free_bytes``: the
    transformers engine's admission limit on a GPU (one more would risk running out of memory mid-answer)."""
    layers = model_config.num_hidden_layers
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    per_row = 2 * layers * heads * head_dim * dtype_bytes * tokens  # keys and values
    return max(1, int(free_bytes * share // per_row))


class TransformersEngine:
    """``model.generate`` on the model (base + ``adapters`` merged at load time), with ``lora_adapters``
    switched per request (:class:`~chatmusician.model.multi_lora.AdapterSet`) and per-row sampling
    (:mod:`chatmusician.model.sampling`)."""

    def __init__(self, config: EngineConfig):
        import torch

        from chatmusician.model.loading import load_model, load_tokenizer
        from chatmusician.model.multi_lora import AdapterSet

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config = config
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        model = load_model(config.model, precision=config.precision)
        for adapter in config.adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.adapters = AdapterSet(model.to(self.device).eval(), config.lora_adapters, config.max_loras)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.admission_rows: int | None = None
        """On a GPU: requests generating at once whose worst-case KV cache fits the free memory (the Composer
        queues the rest instead of answering 500 out of memory); None on CPU."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            tokens = config.max_prompt_tokens + config.max_new_tokens_cap
            dtype_bytes = torch.finfo(next(self.model.parameters()).dtype).bits // 8
            self.admission_rows = kv_cache_rows(self.model.config, tokens, dtype_bytes, free)

    @property
    def model(self):
        return self.adapters.model

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared:
        return Prepared(prompt, encode_prompt(self.tokenizer, prompt, history, self.config.max_prompt_tokens))

    def prepare_raw(self, prompt: str | Sequence[int]) -> Prepared:
        """A completions prompt: text (tokenized without special tokens, no template) or token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise ComposeError("empty_prompt", "the prompt is empty", "prompt")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
            if any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.tokenizer) for i in ids
            ):
                raise ComposeError(
                    "invalid_prompt", f"token ids must be integers in [0, {len(self.tokenizer)})", "prompt"
                )
        if not ids:
            raise ComposeError("empty_prompt", "the prompt is empty", "prompt")
        check_prompt_length(len(ids), self.config.max_prompt_tokens)
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        return Prepared(text, ids)

    def _generation_config(self, params: GenerationParams):
        from transformers import GenerationConfig

        # A fresh config: the checkpoint's own generation_config.json must not change the documented defaults.
        return GenerationConfig(**generation_kwargs(params, self.eos_id, self.pad_id))

    def _inputs(self, rows: Sequence[list[int]]):
        """Left-padded batch (decoder-only models continue from the right end)."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def check_constraints(self, constraints: AbcConstraints) -> None:
        from chatmusician.model.constrained import check_constraints

        check_constraints(self.tokenizer, constraints)

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.config.lora_adapters:
            raise ComposeError("model_not_found", f"no adapter named {adapter!r}", "model", status=404)

    def shortest_tune(self, constraints: AbcConstraints) -> int:
        from chatmusician.model.constrained import shortest_tune_tokens

        return shortest_tune_tokens(self.tokenizer, constraints)

    def _entry(self, token: int, logprob: float | None, top: Sequence[tuple[int, float]]) -> dict[str, Any]:
        return {
            "id": int(token),
            "token": _token_text(self.tokenizer, token),
            "logprob": logprob,
            "top": [[_token_text(self.tokenizer, t), float(lp)] for t, lp in top],
        }

    def score_prompt(self, model, ids: Sequence[int], top: int) -> list[dict[str, Any]]:
        """One forward pass: each prompt token's logprob given the tokens before it, and its ``top`` alternatives."""
        import torch

        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([list(ids)], device=self.device)).logits[0].float()
        lp = torch.log_softmax(logits[:-1], dim=-1)  # [T-1, V]: position t predicts token t+1
        chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0].tolist()
        tops = lp.topk(max(top, 1), dim=-1) if len(ids) > 1 else None
        entries = [self._entry(ids[0], None, [])]
        for t in range(1, len(ids)):
            pairs = zip(tops.indices[t - 1, :top].tolist(), tops.values[t - 1, :top].tolist(), strict=True)
            entries.append(self._entry(ids[t], chosen[t - 1], list(pairs)))
        return add_offsets(self.tokenizer, ids, entries)

    def _completion(
        self, prepared: Prepared, new_ids: Sequence[int], params: GenerationParams, row=None, recorded=None
    ) -> Completion:
        """A finished row's answer from its generated ids (EOS included, nothing after it)."""
        if row is None:
            ids, reason = split_at_eos(new_ids, self.eos_id, params.max_new_tokens)
        else:  # constrained: cut back to the last complete line when the budget ran out
            ids, reason = row.finish(new_ids)
        ids, text, scored, stopped = finish(self.tokenizer, ids, new_ids, self.eos_id, params.stop, False)
        reason = "stop" if stopped else reason
        logprobs = None
        if recorded is not None:
            logprobs = [self._entry(t, lp, top) for t, (lp, top) in zip(scored, recorded, strict=False)]
            add_offsets(self.tokenizer, ids, logprobs)
        return Completion(text, reason, len(prepared.ids), len(scored), list(ids), logprobs)

    def _processors(self, constraints, budgets: Sequence[int], samplings, tops):
        from chatmusician.model.constrained_decoding import logits_processor
        from chatmusician.model.sampling import LogprobRecorder, RowSampler

        recorder = LogprobRecorder(tops)
        processor, rows = logits_processor(self.tokenizer, constraints, budgets, meter_in_sampler=True)
        chain = [
            recorder,
            *([processor] if processor is not None else []),
            RowSampler(samplings, self.device, verifier=processor),
        ]
        return chain, recorder, rows

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        """Answer a batch: one ``generate`` per adapter, streamed and non-streamed rows alike (one forward pass
        serves all). A row's answer is handed to its ``on_done`` as soon as the row finishes, and a streamed
        row's text to its ``on_text`` as it is generated; the list of every answer is returned at the end."""
        results: list[Completion | None] = [None] * len(items)
        for group in group_by_adapter([prepared.adapter for prepared, _ in items]):
            for i, completion in zip(group, self._generate_rows([items[i] for i in group]), strict=True):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _generate_rows(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        """One ``model.generate`` over requests of one adapter; every row finishes through RowStops."""
        import dataclasses

        import torch
        from transformers import StoppingCriteriaList

        from chatmusician.model.sampling import RowStops
        from chatmusician.model.streaming import BatchStreamer

        budgets = [params.max_new_tokens for _, params in items]
        ids, mask = self._inputs([prepared.ids for prepared, _ in items])
        chain, recorder, rows = self._processors(
            [prepared.constraints for prepared, _ in items],
            budgets,
            [params.sampling() for _, params in items],
            [params.logprobs for _, params in items],
        )
        streamer = None
        if any(prepared.on_text for prepared, _ in items):
            streamer = BatchStreamer(
                self.tokenizer,
                [prepared.on_text for prepared, _ in items],
                [params.stop for _, params in items],
                [prepared.constraints for prepared, _ in items],
            )
        scored: dict[int, Any] = {}
        results: list[Completion | None] = [None] * len(items)

        def row_done(row: int, new_ids: list[int]) -> None:
            prepared, params = items[row]
            recorded = recorder.row_logprobs(row, new_ids) if params.logprobs is not None else None
            completion = self._completion(prepared, new_ids, params, rows[row], recorded)
            completion.prompt_logprobs = scored.get(row)
            completion.first_token_at = stops.first_token_at
            results[row] = completion
            if streamer is not None:
                streamer.close_row(row, completion.text)
            if prepared.on_done is not None:
                prepared.on_done(completion)

        stops = RowStops(
            self.tokenizer,
            budgets,
            [params.stop for _, params in items],
            [prepared.cancel for prepared, _ in items],
            on_done=row_done,
        )
        longest = dataclasses.replace(items[0][1], max_new_tokens=max(budgets))
        with self.adapters.use(items[0][0].adapter) as model:
            for row, (prepared, _) in enumerate(items):
                if prepared.prompt_logprobs is not None:
                    scored[row] = self.score_prompt(model, prepared.ids, prepared.prompt_logprobs)
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=self._generation_config(longest),
                    logits_processor=chain,
                    stopping_criteria=StoppingCriteriaList([stops]),
                    streamer=streamer,
                )
        return results  # type: ignore[return-value]

    def probe(self) -> None:
        """Health check: one forward pass of one token gives finite logits (else RuntimeError)."""
        import torch

        with self.adapters.use(None) as model, torch.inference_mode():
            logits = model(input_ids=torch.tensor([[self.eos_id]], device=self.device)).logits
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the model's logits are not finite")

    def stream(
        self, prepared: Prepared, params: GenerationParams, cancel: threading.Event | None = None
    ) -> Iterator[str | Completion]:
        """One request's text pieces as they are generated, then its Completion (``chatmusician chat``; the
        Composer streams rows of its batches instead). Closing the iterator stops generation."""
        import dataclasses
        import queue

        pieces: queue.Queue = queue.Queue()
        cancel = cancel or threading.Event()
        request = dataclasses.replace(prepared, cancel=cancel, on_text=pieces.put, on_done=pieces.put)

        def work() -> None:
            try:
                self.generate([(request, params)])
            except BaseException as error:  # surfaced to the consumer below
                pieces.put(error)

        thread = threading.Thread(target=work, name="engine-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = pieces.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            cancel.set()  # no-op when finished; stops generate() when the consumer left early
            thread.join()
