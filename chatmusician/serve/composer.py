"""The Composer: the Serve deployment around an engine (:mod:`chatmusician.serve.engines`), and nothing else.

It chooses the batching by the engine's capability (``@serve.batch`` for the transformers engine, each request
on arrival for a continuous-batching one), records metrics, answers Serve's health check and cancels a row whose
caller went away. Request types and validation: :mod:`chatmusician.serve.types`, :mod:`chatmusician.serve.requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from chatmusician.serve.config import ServeAppConfig
from chatmusician.serve.engines import load_engine
from chatmusician.serve.requests import model_generation_defaults, prepare_request
from chatmusician.serve.types import ComposeError, GenerationParams, Prepared

log = logging.getLogger("ray.serve")
GENERATION_FAILED = {
    "code": "generation_failed",
    "message": "generation failed",
    "param": None,
    "status": 500,
}

# Put and checked in one function: Serve may pickle the Composer by value, copying globals per function.
_END = object()


@dataclass
class _Failed:
    """An engine stream's exception on its way from the pump thread to the event loop."""

    error: BaseException


@serve.deployment(name="Composer")
class Composer:
    """Serve deployment around an engine. Methods return plain dicts: ``{"error": {...}}`` for a refused request.

    Metrics (``ray.serve.metrics``, exported by Ray's metrics agent, tagged ``model``):
    ``chatmusician_prompt_tokens`` and ``chatmusician_completion_tokens`` (counters),
    ``chatmusician_time_to_first_token_s`` and ``chatmusician_request_latency_s`` (histograms). Serve's health
    check (:meth:`check_health`) probes the model with one forward pass when the replica has been idle.
    """

    def __init__(self, config: ServeAppConfig):
        from ray.serve import metrics

        if config.engine != "echo":  # the echo engine has no model to read a generation_config.json from
            openai = model_generation_defaults(config.model, config.openai_generation)
            config = dataclasses.replace(config, openai_generation=openai)
        self.config = config
        self.engine = load_engine(config)
        self._generate_batch.set_max_batch_size(config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        # Ray Serve has no setter for this one; its batch queue reads it when the first request arrives.
        self._generate_batch.set_max_batch_size.__self__.max_concurrent_batches = config.concurrent_batches
        self.batch_sizes: list[int] = []  # sizes of the batches generated so far (stats)
        # Completion tokens of the requests whose caller went away (None: vLLM's final-only answers say nothing
        # before the end; its ``aborted`` count says they were stopped).
        self.cancelled: list[int | None] = []
        self.probes = 0
        self.in_flight = 0  # requests being generated (the health probe waits for none)
        rows = getattr(self.engine, "admission_rows", None)
        self.admission = asyncio.Semaphore(rows) if rows else contextlib.nullcontext()
        self.last_ok = time.monotonic()
        buckets = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
        tags = {"model": config.served_model_name}
        self.m_prompt = metrics.Counter(
            "chatmusician_prompt_tokens", "Prompt tokens read", tag_keys=("model",)
        )
        self.m_completion = metrics.Counter(
            "chatmusician_completion_tokens", "Tokens generated", tag_keys=("model",)
        )
        self.m_ttft = metrics.Histogram(
            "chatmusician_time_to_first_token_s", "Request arrival to first answer token", buckets, ("model",)
        )
        self.m_latency = metrics.Histogram(
            "chatmusician_request_latency_s", "Request arrival to answer complete", buckets, ("model",)
        )
        for metric in (self.m_prompt, self.m_completion, self.m_ttft, self.m_latency):
            metric.set_default_tags(dict(tags))  # Serve adds its own tags into the dict it is given
        self.observed = {"requests": 0, "completion_tokens": 0, "ttft_s": []}  # the same, readable by stats()

    def _observe(self, completion: dict[str, Any], arrived: float) -> None:
        now = time.perf_counter()
        # Ray's Counter.inc refuses 0 (an empty answer, a constrained one cut back to nothing).
        for counter, key in ((self.m_prompt, "prompt_tokens"), (self.m_completion, "completion_tokens")):
            if completion[key] > 0:
                counter.inc(completion[key])
        self.m_latency.observe(now - arrived)
        first = completion.get("first_token_at")
        if first is not None:
            self.m_ttft.observe(max(0.0, first - arrived))
            self.observed["ttft_s"] = [*self.observed["ttft_s"][-99:], max(0.0, first - arrived)]
        self.observed["requests"] += 1
        self.observed["completion_tokens"] += completion["completion_tokens"]
        self.last_ok = time.monotonic()

    def stats(self) -> dict[str, Any]:
        """How this replica went: batches and the largest one, cancelled requests, probes, metric values."""
        return {
            "batches": len(self.batch_sizes),
            "largest_batch": max(self.batch_sizes, default=0),
            "cancelled": list(self.cancelled),
            "engine_aborted": getattr(self.engine, "aborted", None),
            "engine_cut_backs": getattr(self.engine, "cut_backs", None),  # vllm: constrained answers cut back
            "probes": self.probes,
            **self.observed,
        }

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica idle for over ``health_probe_idle_s`` runs one forward
        pass (the model answers finitely); an exception marks the replica unhealthy and Serve replaces it. A
        replica with requests in flight is not probed: the probe would wait behind them (an adapter lease, a
        long answer) past Serve's timeout and get a busy, healthy replica restarted."""
        if self.in_flight or time.monotonic() - self.last_ok < self.config.health_probe_idle_s:
            return
        await asyncio.to_thread(self.engine.probe)
        self.probes += 1
        self.last_ok = time.monotonic()

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"prompt", "history": [[q, a], ...], "params": {...}}`` -> Completion dict or ``{"error"}``."""
        arrived = time.perf_counter()
        try:  # tokenizing and a first grammar compile (~1 s) must not stall the event loop's other requests
            prepared, params = await asyncio.to_thread(prepare_request, self.engine, self.config, request)
        except ComposeError as error:
            return {"error": error.to_dict()}
        prepared.cancel = threading.Event()
        self.in_flight += 1
        try:
            async with self.admission:  # a GPU's KV memory admits this many requests at once
                if getattr(self.engine, "continuous_batching", False):
                    result = await self._generate_one(prepared, params)
                else:
                    result = await self._batched_row(prepared, params)
        except asyncio.CancelledError:  # the caller went away: its row stops at its next token
            prepared.cancel.set()
            raise
        finally:
            self.in_flight -= 1
        if "error" not in result:
            self._observe(result, arrived)
            if request.get("raw"):  # a token-id prompt echoes as its decoded text, as vLLM's
                result = {**result, "prompt_text": prepared.prompt}
        return result

    async def _batched_row(self, prepared: Prepared, params: GenerationParams) -> dict[str, Any]:
        """A row of the next ``@serve.batch`` batch, answered as soon as the row finishes (not when the whole
        batch does: a short answer does not wait for the batch's long ones)."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future = loop.create_future()

        def done(completion) -> None:
            loop.call_soon_threadsafe(
                lambda: answered.done() or answered.set_result(dataclasses.asdict(completion))
            )

        prepared.on_done = done
        batch = asyncio.ensure_future(self._generate_batch((prepared, params)))
        await asyncio.wait({answered, batch}, return_when=asyncio.FIRST_COMPLETED)
        return answered.result() if answered.done() else batch.result()

    async def _generate_one(self, prepared: Prepared, params: GenerationParams) -> dict[str, Any]:
        """A continuous-batching engine takes each request on arrival: no batch to wait for or behind."""
        self.batch_sizes = [*self.batch_sizes[-999:], 1]

        def cancelled(tokens: int | None) -> None:
            self.cancelled = [*self.cancelled[-99:], tokens]

        try:
            return dataclasses.asdict(await self.engine.agenerate(prepared, params, cancelled))
        except asyncio.CancelledError:
            raise
        except Exception:  # one failing request must not take the replica down
            log.exception("generation failed")
            return {"error": GENERATION_FAILED}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, items: list[tuple[Prepared, GenerationParams]]) -> list[dict[str, Any]]:
        self.batch_sizes = [*self.batch_sizes[-999:], len(items)]
        try:
            completions = await asyncio.to_thread(self.engine.generate, items)
        except Exception:  # one failing batch must not take the replica down; details in the log only
            log.exception("generation failed")
            return [{"error": GENERATION_FAILED}] * len(items)
        for (prepared, _), completion in zip(items, completions, strict=True):
            if prepared.cancel is not None and prepared.cancel.is_set():
                self.cancelled = [*self.cancelled[-99:], completion.completion_tokens]
        return [dataclasses.asdict(c) for c in completions]

    async def stream(self, request: dict[str, Any]):
        """Events: ``{"error"}`` | ``{"start": {"prompt_tokens"}}``, then ``{"delta": text}``…, ``{"done": Completion}``."""
        arrived = time.perf_counter()
        try:
            prepared, params = await asyncio.to_thread(prepare_request, self.engine, self.config, request)
        except ComposeError as error:
            yield {"error": error.to_dict()}
            return
        yield {"start": {"prompt_tokens": len(prepared.ids)}}
        if not getattr(self.engine, "continuous_batching", False):
            async for event in self._stream_row(prepared, params, arrived):
                yield event
            return
        gate = self.admission if isinstance(self.admission, asyncio.Semaphore) else None
        if gate is not None:  # the GPU's KV memory admits this many requests at once; released by the pump
            await gate.acquire()
        self.in_flight += 1
        cancel = threading.Event()
        loop, items, ended = asyncio.get_running_loop(), asyncio.Queue(), asyncio.Event()

        def produce() -> None:  # the engine's blocking iterator, owned (and closed) by this thread
            pieces = self.engine.stream(prepared, params, cancel)
            try:
                for item in pieces:
                    loop.call_soon_threadsafe(items.put_nowait, item)
                    if cancel.is_set():
                        break
            except BaseException as error:  # noqa: BLE001 - raised to the caller below
                loop.call_soon_threadsafe(items.put_nowait, _Failed(error))
            finally:
                pieces.close()
                loop.call_soon_threadsafe(items.put_nowait, _END)
                loop.call_soon_threadsafe(ended.set)
                if gate is not None:  # the stream's generate has ended: its memory is free
                    loop.call_soon_threadsafe(gate.release)

        threading.Thread(target=produce, name="composer-stream-pump", daemon=True).start()
        try:
            async for event in self._events(items, ended, arrived):
                yield event
        finally:
            self.in_flight -= 1
            cancel.set()  # the pump stops the engine's stream and closes it

    async def _stream_row(self, prepared: Prepared, params: GenerationParams, arrived: float):
        """A stream as a row of the next ``@serve.batch`` batch (the transformers engine): its text comes from the
        batch's forward passes as they go, its end as soon as the row finishes."""
        loop, items, ended = asyncio.get_running_loop(), asyncio.Queue(), asyncio.Event()

        def put(item) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        def done(completion) -> None:
            put(completion)
            put(_END)
            loop.call_soon_threadsafe(ended.set)

        prepared.cancel, prepared.on_text, prepared.on_done = threading.Event(), put, done
        self.in_flight += 1
        try:
            async with self.admission:  # the GPU's KV memory admits this many requests at once
                batch = asyncio.ensure_future(self._generate_batch((prepared, params)))

                def failed(task: asyncio.Future) -> None:  # the batch ended without finishing this row
                    if not ended.is_set():
                        error = None if task.cancelled() or task.exception() else task.result().get("error")
                        items.put_nowait(_Failed(RuntimeError(f"the batch failed: {error}")))
                        items.put_nowait(_END)
                        ended.set()

                batch.add_done_callback(failed)
                async for event in self._events(items, ended, arrived):
                    yield event
        finally:
            self.in_flight -= 1
            if not ended.is_set():
                prepared.cancel.set()  # the caller left: its row stops at the next token

    async def _events(self, items: asyncio.Queue, ended: asyncio.Event, arrived: float):
        """Stream events from ``items`` (text pieces, the Completion, ``_END``, ``_Failed``): what was generated
        since the last event goes out as one delta, at most every ``stream_interval_s`` (the end at once)."""
        loop = asyncio.get_running_loop()
        interval, sent_at = self.config.stream_interval_s, -1e9
        while True:
            wait = sent_at + interval - loop.time()
            if interval > 0 and wait > 0 and not ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), wait)
            batch = [await items.get()]
            while not items.empty():
                batch.append(items.get_nowait())
            if text := "".join(item for item in batch if isinstance(item, str)):
                yield {"delta": text}
                sent_at = loop.time()
            for item in batch:
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                if not isinstance(item, str):
                    done = dataclasses.asdict(item)
                    self._observe(done, arrived)
                    yield {"done": done}
