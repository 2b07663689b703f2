"""The Composer: chat prompt -> model answer, as pure helpers, two engines and one Serve deployment.

Supports: a merged model or a base model plus LoRA adapters merged in order (hub ids or paths); transformers
``generate`` on CPU or GPU; the original's chat template with multi-turn history and its sampling defaults;
parameters validated against caps (``max_new_tokens``, prompt length) before any work; stop at EOS with the
pad token never sampled; dynamic batching of concurrent requests (``@serve.batch``, requests with equal
parameters share one ``generate``); token streaming (one ``generate`` per stream, cancelled when the client
goes away); grammar-constrained ABC (``constrained: true`` with optional key / meter / unit length / bar
bound): constrained and unconstrained requests share one batch, each row obeying its own grammar
(:mod:`chatmusician.model.constrained`). The ``echo`` engine answers with the user's message, a
deterministic stand-in for UI tests (it ignores constraints).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve

from chatmusician.abc.grammar import AbcConstraints, ConstraintError
from chatmusician.prompts import build_chat_prompt
from chatmusician.serve.config import EngineConfig, GenerationDefaults, ServeAppConfig

# --------------------------------------------------------------------------------------------- pure helpers


class ComposeError(ValueError):
    """A request the composer refuses, with a machine-readable code (becomes a 4xx structured error)."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.param, self.status = code, message, param, status

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "status": self.status}


@dataclass(frozen=True)
class GenerationParams:
    """Validated sampling parameters of one request (hashable: equal parameters share a batch)."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    seed: int | None = None


# name -> (type, lowest, highest, lowest allowed inclusive); max_new_tokens' upper bound is the config's cap.
PARAM_RANGES: dict[str, tuple[type, float, float, bool]] = {
    "temperature": (float, 0.0, 2.0, True),
    "top_p": (float, 0.0, 1.0, False),
    "top_k": (int, 0, 10_000, True),
    "repetition_penalty": (float, 0.0, 10.0, False),
    "max_new_tokens": (int, 1, float("inf"), True),
    "seed": (int, 0, 2**63 - 1, True),
}


def resolve_params(
    overrides: Mapping[str, Any] | None, defaults: GenerationDefaults, max_new_tokens_cap: int
) -> GenerationParams:
    """Request parameters (``None`` = default) checked for type and range -> GenerationParams, else ComposeError."""
    values: dict[str, Any] = {**dataclasses.asdict(defaults), "seed": None}
    for name, value in (overrides or {}).items():
        if name not in PARAM_RANGES:
            raise ComposeError("unknown_parameter", f"unknown generation parameter {name!r}", name)
        if value is None:
            continue
        kind, low, high, low_inclusive = PARAM_RANGES[name]
        if name == "max_new_tokens":
            high = max_new_tokens_cap
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and value != int(value))
        ):
            raise ComposeError("invalid_parameter", f"{name} must be {kind.__name__}, got {value!r}", name)
        if not (low < value or (low_inclusive and value == low)) or value > high:
            bound = "[" if low_inclusive else "("
            raise ComposeError("invalid_parameter", f"{name}={value} is outside {bound}{low}, {high}]", name)
        values[name] = kind(value)
    return GenerationParams(**values)


def encode_prompt(
    tokenizer, prompt: str, history: Sequence[Sequence[str]], max_prompt_tokens: int
) -> list[int]:
    """Chat-templated token ids (no BOS, ``</s>`` = EOS between turns); too long -> ComposeError."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ComposeError("empty_prompt", "the prompt is empty", "prompt")
    turns = [tuple(turn) for turn in history]
    if any(len(turn) != 2 or not all(isinstance(t, str) for t in turn) for turn in turns):
        raise ComposeError(
            "invalid_history", "history must be a list of [question, answer] string pairs", "history"
        )
    ids = tokenizer(build_chat_prompt(prompt, turns), add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:
        raise ComposeError(
            "prompt_too_long",
            f"the prompt has {len(ids)} tokens with its history; the limit is {max_prompt_tokens}",
            "prompt",
            status=413,
        )
    return ids


def generation_kwargs(params: GenerationParams, eos_id: int, pad_id: int) -> dict[str, Any]:
    """Arguments of ``GenerationConfig``: sampling unless temperature is 0; stop at EOS; pad never sampled."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "do_sample": params.temperature > 0,
    }
    if params.temperature > 0:
        kwargs |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    if pad_id != eos_id:
        kwargs["suppress_tokens"] = [pad_id]  # LLaMA pads with <unk>: it must never appear in an answer
    return kwargs


def split_at_eos(new_ids: Sequence[int], eos_id: int, max_new_tokens: int) -> tuple[list[int], str]:
    """Generated ids -> (answer ids before EOS, OpenAI finish_reason: stop | length)."""
    ids = list(new_ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id)], "stop"
    return ids, "length" if len(ids) >= max_new_tokens else "stop"


def group_by_params(params: Sequence[GenerationParams]) -> list[list[int]]:
    """Indices of requests that can share one ``generate`` call: equal parameters and no seed (a seeded
    request runs alone so that its answer does not depend on its batch neighbours)."""
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p if p.seed is None else ("seeded", i), []).append(i)
    return list(groups.values())


def _issue_dict(issue: Any) -> dict[str, Any]:
    return issue.to_dict() if hasattr(issue, "to_dict") else dict(issue)


def analyze_abc(text: str) -> dict[str, Any]:
    """The ABC in a model answer: every tune found, the first one (``abc``) and its validation report."""
    from chatmusician.abc import extract_tunes, validate_tune

    found = extract_tunes(text)
    tunes = list(found.tunes)
    return {
        "found": bool(found.found),
        "message": found.message,
        "tunes": tunes,
        "abc": tunes[0] if tunes else None,
        "issues": [_issue_dict(i) for i in found.issues],
        "validation": [_issue_dict(i) for i in validate_tune(tunes[0])] if tunes else [],
    }


# ------------------------------------------------------------------------------------------------ engines


@dataclass
class Prepared:
    """A request ready to generate: the user's message, the templated prompt's token ids, its ABC constraints."""

    prompt: str
    ids: list[int]
    constraints: AbcConstraints | None = None
    """None: unconstrained; AbcConstraints(): the tune grammar only."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TransformersEngine:
    """``model.generate`` on a merged model (base + adapters merged at load time)."""

    def __init__(self, config: EngineConfig):
        import torch

        from chatmusician.model.loading import load_model, load_tokenizer

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
        self.model = model.to(self.device).eval()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared:
        return Prepared(prompt, encode_prompt(self.tokenizer, prompt, history, self.config.max_prompt_tokens))

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

    def _completion(
        self, prepared: Prepared, new_ids: Sequence[int], params: GenerationParams, row=None
    ) -> Completion:
        if row is None:
            ids, reason = split_at_eos(new_ids, self.eos_id, params.max_new_tokens)
        else:  # constrained: cut back to the last complete line when the budget ran out
            ids, reason = row.finish(new_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text, reason, len(prepared.ids), len(ids) + (reason == "stop"))  # EOS counts

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        """Answer a batch: one ``generate`` per group of equal parameters (constrained or not)."""
        import torch

        from chatmusician.model.constrained import logits_processor

        results: list[Completion | None] = [None] * len(items)
        for group in group_by_params([p for _, p in items]):
            params = items[group[0]][1]
            ids, mask = self._inputs([items[i][0].ids for i in group])
            processor, rows = logits_processor(
                self.tokenizer, [items[i][0].constraints for i in group], params.max_new_tokens
            )
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=self._generation_config(params),
                    logits_processor=[processor] if processor is not None else None,
                )
            for row, i in enumerate(group):
                new_ids = out[row, ids.shape[1] :].tolist()
                results[i] = self._completion(items[i][0], new_ids, params, rows[row])
        return results  # type: ignore[return-value]

    def stream(
        self, prepared: Prepared, params: GenerationParams, cancel: threading.Event | None = None
    ) -> Iterator[str | Completion]:
        """Text pieces as they are generated, then the Completion. Closing the iterator stops generation."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        cancel = cancel or threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full(
                    (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
                )

        from chatmusician.model.constrained import logits_processor, streamer_class

        if prepared.constraints is None:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        else:  # emits text only up to the grammar's last accepting point (what the answer keeps)
            streamer = streamer_class()(self.tokenizer, prepared.constraints)
        processor, _ = logits_processor(self.tokenizer, [prepared.constraints], params.max_new_tokens)
        ids, mask = self._inputs([prepared.ids])
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=self._generation_config(params),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        logits_processor=[processor] if processor is not None else None,
                    )
            except BaseException as error:  # surfaced to the consumer below
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=work, name="composer-stream", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancel.set()  # no-op when finished; stops generate() when the consumer left early
            thread.join()
        if "error" in result:
            raise result["error"]
        row = getattr(streamer, "row", None)
        yield self._completion(prepared, result["out"][0, ids.shape[1] :].tolist(), params, row)


class EchoEngine:
    """Answers with the user's message (cut to max_new_tokens words): deterministic, for UI tests and demos."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def check_constraints(self, constraints: AbcConstraints) -> None:
        """Constraints are validated (a bad one is still a 400) but the echo answer ignores them."""

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ComposeError("empty_prompt", "the prompt is empty", "prompt")
        text = build_chat_prompt(prompt, [tuple(t) for t in history])
        if len(text.split()) > self.config.max_prompt_tokens:
            raise ComposeError("prompt_too_long", "the prompt is too long", "prompt", status=413)
        return Prepared(prompt, list(range(len(text.split()))))

    def _completion(self, prepared: Prepared, params: GenerationParams) -> tuple[list[str], Completion]:
        words = re.findall(r"\S+\s*|\s+", prepared.prompt)  # one "token" = a word and its trailing space
        pieces = words[: params.max_new_tokens]
        reason = "length" if len(words) > len(pieces) else "stop"
        return pieces, Completion("".join(pieces), reason, len(prepared.ids), len(pieces))

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        return [self._completion(prepared, params)[1] for prepared, params in items]

    def stream(
        self, prepared: Prepared, params: GenerationParams, cancel: threading.Event | None = None
    ) -> Iterator[str | Completion]:
        pieces, completion = self._completion(prepared, params)
        yield from pieces
        yield completion


ENGINES = {"transformers": TransformersEngine, "echo": EchoEngine}


def load_engine(config: EngineConfig) -> TransformersEngine | EchoEngine:
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[config.engine](config)


def prepare_request(
    engine, config: EngineConfig, request: Mapping[str, Any]
) -> tuple[Prepared, GenerationParams]:
    """A composer request ``{"prompt", "history", "params", "constrained", "constraints": {key, meter,
    unit_length, max_bars}}`` -> validated inputs, else ComposeError."""
    params = resolve_params(request.get("params"), config.generation, config.max_new_tokens_cap)
    constraints = resolve_constraints(engine, request.get("constrained"), request.get("constraints"))
    prepared = engine.prepare(request.get("prompt"), request.get("history") or ())
    return dataclasses.replace(prepared, constraints=constraints), params


def resolve_constraints(engine, constrained: Any, values: Mapping[str, Any] | None) -> AbcConstraints | None:
    """``constrained`` + constraint fields -> AbcConstraints (compiled once to check) | None, else ComposeError."""
    given = {k: v for k, v in (values or {}).items() if v is not None}
    if constrained is None or constrained is False:
        if given:
            name = sorted(given)[0]
            raise ComposeError("invalid_constraint", f"{name} needs constrained: true", name)
        return None
    if constrained is not True:
        raise ComposeError("invalid_constraint", "constrained must be true or false", "constrained")
    try:
        constraints = AbcConstraints.from_mapping(given)
        engine.check_constraints(constraints)
    except ConstraintError as error:
        raise ComposeError("invalid_constraint", error.message, error.param) from None
    return constraints


# ---------------------------------------------------------------------------------------------- deployment

_END = object()


@serve.deployment(name="Composer")
class Composer:
    """Serve deployment around an engine. Methods return plain dicts: ``{"error": {...}}`` for a refused request."""

    def __init__(self, config: ServeAppConfig):
        self.config = config
        self.engine = load_engine(config)
        self._generate_batch.set_max_batch_size(config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # sizes of the batches generated so far (stats)

    def stats(self) -> dict[str, Any]:
        """How dynamic batching went on this replica: batches run and the largest one."""
        return {"batches": len(self.batch_sizes), "largest_batch": max(self.batch_sizes, default=0)}

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"prompt", "history": [[q, a], ...], "params": {...}}`` -> Completion dict or ``{"error"}``."""
        try:
            item = prepare_request(self.engine, self.config, request)
        except ComposeError as error:
            return {"error": error.to_dict()}
        return await self._generate_batch(item)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, items: list[tuple[Prepared, GenerationParams]]) -> list[dict[str, Any]]:
        self.batch_sizes = [*self.batch_sizes[-999:], len(items)]
        try:
            completions = await asyncio.to_thread(self.engine.generate, items)
        except Exception as error:  # one failing batch must not take the replica down
            failure = {
                "error": {"code": "generation_failed", "message": repr(error), "param": None, "status": 500}
            }
            return [failure] * len(items)
        return [dataclasses.asdict(c) for c in completions]

    async def stream(self, request: dict[str, Any]):
        """Events: ``{"error"}`` | ``{"start": {"prompt_tokens"}}``, then ``{"delta": text}``…, ``{"done": Completion}``."""
        try:
            prepared, params = prepare_request(self.engine, self.config, request)
        except ComposeError as error:
            yield {"error": error.to_dict()}
            return
        yield {"start": {"prompt_tokens": len(prepared.ids)}}
        cancel = threading.Event()
        pieces = self.engine.stream(prepared, params, cancel)
        try:
            while (item := await asyncio.to_thread(next, pieces, _END)) is not _END:
                yield {"delta": item} if isinstance(item, str) else {"done": dataclasses.asdict(item)}
        finally:
            cancel.set()
            await asyncio.to_thread(pieces.close)
