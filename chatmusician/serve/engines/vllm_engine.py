"""The ``vllm`` Composer engine: vLLM's engine in-process (continuous batching of every request, streamed or not).

It runs in the Composer replica only, inside its own environment (``.venv-vllm``, see docs/serving/engines.md:
vLLM pins its own torch and transformers), chosen by :func:`chatmusician.serve.app.composer_options` through
Ray's ``runtime_env`` ``py_executable``. One thread steps the engine; the Composer's synchronous
``generate`` / ``stream`` calls hand requests to it and read their outputs from queues. Mapping of the Composer's features:

- sampling (temperature, top_p, top_k, repetition/presence/frequency penalty, per-request ``seed``: vLLM's own
  per-request generator), ``stop`` strings, ``logprobs`` and ``echo`` prompt logprobs: vLLM's SamplingParams;
- the pad token never sampled: a logit bias of -100;
- multi-LoRA: ``LoRARequest`` per request (vLLM keeps ``max_loras`` on the device and an LRU cache of them);
- constrained ABC: vLLM structured outputs with the guidance backend over the repo's Lark grammar, and the meter
  masked while sampling by a vLLM logits processor (:mod:`chatmusician.serve.engines.vllm_meter`, after the
  grammar's bitmask; ``vllm.meter_mask``); a row that runs out of tokens ends with its shortest completion in
  tokens kept back for it (the transformers engine's budget-aware finish), else it is cut back to the grammar's
  last accepting point (:class:`chatmusician.model.constrained.RowState` replayed over the ids, ``cut_backs``);
- a cancelled non-streaming row and a closed stream abort the vLLM request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.serve.config import EngineConfig
from chatmusician.serve.engines.base import add_offsets, finish
from chatmusician.serve.engines.hf import TransformersEngine
from chatmusician.serve.engines.vllm_support import (
    VLLM_ENV,
    LoopSink,
    check_adapter_ranks,
    eager_default,
    engine_process_default,
    finish_tune,
    guidance_grammar,
    patch_prompt_logprobs_with_lora,
    reserve_tokens,
    sampling_kwargs,
)
from chatmusician.serve.requests import encode_prompt
from chatmusician.serve.types import Completion, GenerationParams, Prepared


class VllmEngine:
    """The Composer engine on vLLM's ``LLMEngine`` (same interface as :class:`TransformersEngine`).

    One thread owns the engine: it adds and aborts requests handed to it and calls ``step()`` while any
    request runs, so every request, streamed or not, joins vLLM's continuous batch; each request's outputs go
    to its caller's queue (streams get deltas, other requests their final output only). With
    ``vllm.engine_process`` (the default on CUDA) the engine core runs in its own process, as in `vllm serve`
    and ``AsyncLLM``, and ``step()`` only collects its outputs; on CPU it runs in this thread (a second process
    there takes several times longer to start than the model).
    """

    continuous_batching = True
    """Every request joins the running batch on arrival: the Composer hands each one over alone (no
    ``@serve.batch``, whose batches would wait for their slowest row)."""
    cut_backs = 0
    """Constrained answers cut back to their last accepting point (no completion fitted where vLLM stopped)."""

    prepare_raw = TransformersEngine.prepare_raw
    check_adapter = TransformersEngine.check_adapter
    shortest_tune = TransformersEngine.shortest_tune
    _entry = TransformersEngine._entry

    def __init__(self, config: EngineConfig):
        for name, value in VLLM_ENV.items():
            os.environ.setdefault(name, value)
        if config.adapters:
            raise ValueError(
                "the vllm engine cannot merge adapters at load: merge them first (chatmusician merge) "
                "or serve them as lora_adapters"
            )
        from chatmusician.model.loading import load_tokenizer

        check_adapter_ranks(config.lora_adapters, config.vllm.max_lora_rank)
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.lora_ids = {name: i + 1 for i, name in enumerate(config.lora_adapters)}
        self._ids = itertools.count()
        self.llm = self._start()
        self._commands: deque = deque()
        self._sinks: dict[str, queue.Queue] = {}
        self._wake = threading.Event()
        self._closed = False
        self.failed_steps = 0
        self.aborted = 0  # requests stopped while running (their caller went away)
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    def _start(self):
        if self.config.lora_adapters:
            patch_prompt_logprobs_with_lora(self.config.lora_adapters)
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        c = self.config
        meter = []
        if c.vllm.meter_mask:  # built by vLLM where the model runs: here, or the engine core's process
            from chatmusician.serve.engines.vllm_meter import PROCESSOR, share_tokenizer

            share_tokenizer(c.tokenizer or c.model, self.tokenizer)
            meter = [PROCESSOR]
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[c.precision]
        args = EngineArgs(
            model=c.model,
            tokenizer=c.tokenizer or c.model,
            dtype=dtype,
            max_model_len=c.max_prompt_tokens + c.max_new_tokens_cap,
            max_num_seqs=c.vllm.max_num_seqs,
            enforce_eager=eager_default(c.vllm.enforce_eager),
            gpu_memory_utilization=c.vllm.gpu_memory_utilization,
            enable_lora=bool(c.lora_adapters),
            max_loras=max(1, c.max_loras),
            max_lora_rank=c.vllm.max_lora_rank,
            structured_outputs_config={"backend": "guidance"},
            logits_processors=meter,
            enable_prefix_caching=False,
            disable_log_stats=True,
            seed=0,
        )
        self.engine_process = engine_process_default(c.vllm.engine_process)
        return LLMEngine.from_engine_args(args, enable_multiprocessing=self.engine_process)

    def _loop(self) -> None:
        """The engine thread: run handed-over commands, then one scheduler step while requests run."""
        while not self._closed:
            while self._commands:
                self._commands.popleft()()
            if not self.llm.has_unfinished_requests():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except BaseException as error:  # every running request fails and is aborted; the engine goes on
                self.failed_steps += 1
                failed = list(self._sinks.items())
                self._sinks.clear()
                with contextlib.suppress(Exception):  # else the same request fails every step from now on
                    self.llm.abort_request([request_id for request_id, _ in failed])
                for request_id, sink in failed:
                    sink.put(("error", request_id, error))
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink.put(("out", out.request_id, out))
                    if out.finished:
                        self._sinks.pop(out.request_id, None)

    def _call(self, command) -> None:
        self._commands.append(command)
        self._wake.set()

    def _submit(self, prepared: Prepared, params: GenerationParams, kind: str, sink: queue.Queue) -> str:
        """Hand one request to the engine thread; its outputs (vLLM's ``RequestOutputKind`` ``kind``: DELTA,
        CUMULATIVE or FINAL_ONLY) and a failure to add it arrive in ``sink``."""
        from vllm.inputs import TokensPrompt

        request_id = f"cm-{next(self._ids)}"
        sampling = self._sampling(prepared, params, kind)
        lora = self._lora(prepared.adapter)

        def add() -> None:
            try:
                self._sinks[request_id] = sink
                self.llm.add_request(
                    request_id, TokensPrompt(prompt_token_ids=list(prepared.ids)), sampling, lora_request=lora
                )
            except BaseException as error:
                self._sinks.pop(request_id, None)
                sink.put(("error", request_id, error))

        self._call(add)
        return request_id

    def _abort(self, request_id: str) -> None:
        def abort() -> None:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:  # still running: stopped here, before its budget
                self.aborted += 1
                self.llm.abort_request([request_id])
                sink.put(("aborted", request_id, None))

        self._call(abort)

    # ------------------------------------------------------------------------------------------ requests

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared:
        return Prepared(prompt, encode_prompt(self.tokenizer, prompt, history, self.config.max_prompt_tokens))

    def check_constraints(self, constraints: AbcConstraints) -> None:
        from chatmusician.model.constrained import check_constraints

        check_constraints(self.tokenizer, constraints)

    def _sampling(self, prepared: Prepared, params: GenerationParams, kind: str):
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        kwargs = sampling_kwargs(params, self.pad_id, self.eos_id)
        if prepared.constraints is not None:
            from chatmusician.abc.grammar import tune_grammar

            grammar = guidance_grammar(tune_grammar(prepared.constraints))
            kwargs["structured_outputs"] = StructuredOutputsParams(grammar=grammar)
            kwargs["max_tokens"] = params.max_new_tokens - reserve_tokens(params.max_new_tokens)
            kwargs["extra_args"] = {"chatmusician_meter": self.config.vllm.meter_mask}  # vllm_meter.METER_KEY
        if prepared.prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = prepared.prompt_logprobs
        return SamplingParams(**kwargs, output_kind=RequestOutputKind[kind])

    def _row(self, constraints: AbcConstraints):
        """A constrained row's grammar state, replayed over vLLM's ids: where the answer may be cut back to (an
        accepting point whose tune the validator passes too, as in the transformers engine)."""
        from chatmusician.model.constrained import RowState, ll_tokenizer, new_matcher

        matcher = new_matcher(self.tokenizer, constraints)
        return RowState(matcher, self.eos_id, constraints, ll_tokenizer(self.tokenizer))

    def _finish_tune(
        self, constraints: AbcConstraints, new_ids: list[int], budget: int
    ) -> tuple[list[int], str]:
        """A constrained row's answer (:func:`~chatmusician.serve.engines.vllm_support.finish_tune`); counts
        the answers cut back (``cut_backs``: the budget ran out where no completion fits, or a wrong bar)."""
        ids, reason = finish_tune(lambda: self._row(constraints), self.eos_id, new_ids, budget)
        self.cut_backs += reason == "cut"
        return ids, "length" if reason == "cut" else reason

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter, self.lora_ids[adapter], self.config.lora_adapters[adapter])

    def _logprob_entries(self, ids: Sequence[int], steps, top: int) -> list[dict[str, Any]]:
        """vLLM's per-position ``{token_id: Logprob}`` -> the Composer's entries (top ``top`` by rank)."""
        entries = []
        for token, step in zip(ids, steps, strict=False):
            if step is None:
                entries.append(self._entry(token, None, []))
                continue
            ranked = sorted(
                ((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank), key=lambda r: r[0]
            )
            alternatives = [(t, lp) for _, t, lp in ranked[:top]]
            entries.append(self._entry(token, float(step[token].logprob), alternatives))
        return entries

    def _completion(
        self, prepared: Prepared, params: GenerationParams, out, first: float | None
    ) -> Completion:

        if out is None:  # aborted before its first token
            return Completion("", "stop", len(prepared.ids), 0, first_token_at=first)
        seq = out.outputs[0]
        new_ids = list(seq.token_ids)
        ended_eos = bool(new_ids) and new_ids[-1] == self.eos_id
        ids = new_ids[:-1] if ended_eos else new_ids
        reason = "length" if seq.finish_reason == "length" else "stop"
        if prepared.constraints is not None and seq.stop_reason is None:
            ids, reason = self._finish_tune(prepared.constraints, new_ids, params.max_new_tokens)
        # Decoded here, not vLLM's incremental text: that one keeps the first token's word-marker space.
        stopped = seq.stop_reason is not None
        ids, text, scored, _ = finish(self.tokenizer, ids, new_ids, self.eos_id, params.stop, stopped)
        logprobs = None
        if params.logprobs is not None and seq.logprobs is not None:
            logprobs = add_offsets(
                self.tokenizer, ids, self._logprob_entries(scored, seq.logprobs, params.logprobs)
            )
        completion = Completion(text, reason, len(prepared.ids), len(scored), list(ids), logprobs)
        if prepared.prompt_logprobs is not None and out.prompt_logprobs is not None:
            completion.prompt_logprobs = add_offsets(
                self.tokenizer,
                prepared.ids,
                self._logprob_entries(prepared.ids, out.prompt_logprobs, prepared.prompt_logprobs),
            )
        completion.first_token_at = first
        return completion

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        """All rows go to vLLM at once, joining its batch of every other running request; a row whose
        ``cancel`` is set is aborted (its answer so far is returned)."""
        sink: queue.Queue = queue.Queue()
        rows = {self._submit(p, q, "CUMULATIVE", sink): i for i, (p, q) in enumerate(items)}
        last: dict[int, Any] = {}
        first: dict[int, float] = {}
        open_rows, aborted = set(rows.values()), set()
        while open_rows:
            try:
                kind, request_id, value = sink.get(timeout=0.05)
            except queue.Empty:
                kind = None
            if kind == "error":  # one row could not be added (or the step failed): the others stop too
                for other, i in rows.items():
                    if i in open_rows and other != request_id:
                        self._abort(other)
                raise value
            if kind is not None:
                i = rows[request_id]
                if kind == "out":
                    last[i] = value
                    if i not in first and value.outputs and value.outputs[0].token_ids:
                        first[i] = time.perf_counter()
                    if value.finished:
                        open_rows.discard(i)
                else:  # aborted
                    open_rows.discard(i)
            for request_id, i in rows.items():
                cancel = items[i][0].cancel
                if i in open_rows and i not in aborted and cancel is not None and cancel.is_set():
                    aborted.add(i)
                    self._abort(request_id)
        return [self._completion(p, q, last.get(i), first.get(i)) for i, (p, q) in enumerate(items)]

    async def agenerate(
        self,
        prepared: Prepared,
        params: GenerationParams,
        on_cancel: Callable[[int | None], None] | None = None,
    ) -> Completion:
        """One request, awaited on the caller's event loop (no thread per request): it enters vLLM's batch at
        once and leaves it when it is done. vLLM sends its answer once (final output only: no per-token
        traffic into this process, so no first-token time either). Cancelling the await aborts it
        (``on_cancel`` gets None: how far it got is vLLM's to know)."""
        sink = LoopSink(asyncio.get_running_loop())
        request_id = self._submit(prepared, params, "FINAL_ONLY", sink)
        last, finished = None, False
        try:
            while not finished:
                kind, _, value = await sink.queue.get()
                if kind == "error":
                    finished = True
                    raise value
                if kind == "aborted":
                    break
                last, finished = value, value.finished
        except asyncio.CancelledError:
            if on_cancel is not None:
                on_cancel(None)
            raise
        finally:
            if not finished:
                self._abort(request_id)
        return self._completion(prepared, params, last, None)

    def probe(self) -> None:
        """Health check: one greedy token with its logprob; a non-finite one raises RuntimeError."""
        params = GenerationParams(0.0, 1.0, 0, 1.0, 1, logprobs=0)
        completion = self.generate([(Prepared("", [self.eos_id]), params)])[0]
        values = [e["logprob"] for e in completion.logprobs or []]
        if not values or not all(v == v and abs(v) != float("inf") for v in values):
            raise RuntimeError(f"the model's logprobs are not finite: {values}")

    def stream(
        self, prepared: Prepared, params: GenerationParams, cancel: threading.Event | None = None
    ) -> Iterator[str | Completion]:
        """Text pieces as vLLM produces them, then the Completion (with logprobs when asked). Closing the iterator (or ``cancel``) aborts
        the request. A constrained stream sends text only up to the grammar's last accepting point (a complete
        tune so far), what the answer keeps when the budget runs out, as the transformers engine's stream."""
        from chatmusician.model.sampling import StopScanner

        cancel = cancel or threading.Event()
        sink: queue.Queue = queue.Queue()
        request_id = self._submit(prepared, params, "DELTA", sink)
        scanner = StopScanner(params.stop)
        ids: list[int] = []
        steps: list = []
        first, last, finished = None, None, False
        decoded, sent = "", ""
        row = None
        if prepared.constraints is not None:
            row = self._row(prepared.constraints)
        try:
            while not finished:
                try:
                    kind, _, value = sink.get(timeout=0.05)
                except queue.Empty:
                    if cancel.is_set():
                        break
                    continue
                if kind == "error":
                    finished = True
                    raise value
                if kind == "aborted":
                    break
                ids.extend(value.outputs[0].token_ids)
                steps.extend(value.outputs[0].logprobs or [])
                last, finished = value, value.finished
                if first is None and ids:
                    first = time.perf_counter()
                if row is not None:  # constrained: only text up to the grammar's last accepting point
                    for token in ids[row.consumed :]:
                        row.consume(token)
                    kept = self.tokenizer.decode(ids[: row.last_accept], skip_special_tokens=True)
                    if kept.startswith(sent) and len(kept) > len(sent):
                        piece, sent = kept[len(sent) :], kept
                        yield piece
                    continue
                full = self.tokenizer.decode(ids, skip_special_tokens=True)
                if full.endswith("\ufffd") and not finished:
                    continue  # a character still split across byte tokens
                piece = full[len(decoded) :] if full.startswith(decoded) else ""
                decoded = full
                piece = scanner.feed(piece) if piece else ""
                if finished:
                    piece += scanner.flush()
                if piece:
                    sent += piece
                    yield piece
        finally:
            if not finished:
                self._abort(request_id)
        if last is None:
            yield Completion("", "stop", len(prepared.ids), 0, first_token_at=first)
            return
        seq = last.outputs[0]
        seq.token_ids, seq.logprobs = ids, (steps if params.logprobs is not None else None)
        completion = self._completion(prepared, params, last, first)
        if completion.text.startswith(sent) and (rest := completion.text[len(sent) :]):
            yield rest
        yield completion

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self.engine_process:  # the engine core's process (and its workers) go with the replica
            self.llm.engine_core.shutdown()
