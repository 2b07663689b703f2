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
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve

from chatmusician.abc.analysis import analyze_abc  # noqa: F401 - re-exported (moved to chatmusician.abc)
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    """The answer ends before the first of these strings (not included)."""
    logprobs: int | None = None
    """Record each answer token's log-probability and this many most likely alternatives (None = none)."""

    def sampling(self):
        from chatmusician.model.sampling import RowSampling

        return RowSampling(
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            self.seed,
        )


MAX_STOPS, MAX_LOGPROBS = 4, 20
# name -> (type, lowest, highest, lowest allowed inclusive); max_new_tokens' upper bound is the config's cap.
PARAM_RANGES: dict[str, tuple[type, float, float, bool]] = {
    "temperature": (float, 0.0, 2.0, True),
    "top_p": (float, 0.0, 1.0, False),
    "top_k": (int, -1, 10_000, True),  # -1 (vLLM's "off") is read as 0
    "repetition_penalty": (float, 0.0, 10.0, False),
    "max_new_tokens": (int, 1, float("inf"), True),
    "seed": (int, 0, 2**63 - 1, True),
    "presence_penalty": (float, -2.0, 2.0, True),
    "frequency_penalty": (float, -2.0, 2.0, True),
    "logprobs": (int, 0, MAX_LOGPROBS, True),
}


def resolve_stop(value: Any) -> tuple[str, ...]:
    """OpenAI's ``stop``: null, a string or up to 4 non-empty strings -> tuple, else ComposeError."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, (list, tuple))
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ComposeError(
            "invalid_parameter", f"stop must be a non-empty string or up to {MAX_STOPS} of them", "stop"
        )
    return tuple(stops)


def resolve_params(
    overrides: Mapping[str, Any] | None, defaults: GenerationDefaults, max_new_tokens_cap: int
) -> GenerationParams:
    """Request parameters (``None`` = default) checked for type and range -> GenerationParams, else ComposeError."""
    values: dict[str, Any] = {**dataclasses.asdict(defaults), "seed": None}
    for name, value in (overrides or {}).items():
        if name == "stop":
            values["stop"] = resolve_stop(value)
            continue
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
        values[name] = max(0, int(value)) if name == "top_k" else kind(value)
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
    check_prompt_length(len(ids), max_prompt_tokens, " with its history")
    return ids


def check_prompt_length(n: int, limit: int, what: str = "") -> None:
    """Over ``limit`` tokens -> 400 ``context_length_exceeded`` (OpenAI's and vLLM's answer, not a 413)."""
    if n > limit:
        raise ComposeError(
            "context_length_exceeded", f"the prompt has {n} tokens{what}; the limit is {limit}", "prompt"
        )


def model_generation_defaults(model: str, base: GenerationDefaults) -> GenerationDefaults:
    """``base`` with the sampling fields the model's generation_config.json sets (vLLM's ``generation_config:
    auto``); a model without one keeps ``base``."""
    try:
        from transformers import GenerationConfig

        given = GenerationConfig.from_pretrained(model).to_diff_dict()
    except (OSError, ValueError):
        return base
    names = ("temperature", "top_p", "top_k", "repetition_penalty")
    return dataclasses.replace(base, **{k: given[k] for k in names if given.get(k) is not None})


def generation_kwargs(params: GenerationParams, eos_id: int, pad_id: int) -> dict[str, Any]:
    """Arguments of ``GenerationConfig``: greedy argmax over the scores of
    :class:`~chatmusician.model.sampling.RowSampler` (which does the sampling, per row, with the request's own
    generator); stop at EOS; the pad token never sampled."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "do_sample": False,
    }
    if pad_id != eos_id:
        kwargs["suppress_tokens"] = [pad_id]  # LLaMA pads with <unk>: it must never appear in an answer
    return kwargs


def split_at_eos(new_ids: Sequence[int], eos_id: int, max_new_tokens: int) -> tuple[list[int], str]:
    """Generated ids -> (answer ids before EOS, OpenAI finish_reason: stop | length)."""
    ids = list(new_ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id)], "stop"
    return ids, "length" if len(ids) >= max_new_tokens else "stop"


def logprob_ids(ids: Sequence[int], new_ids: Sequence[int], eos_id: int, stopped: bool) -> list[int]:
    """The tokens that get logprob entries: the answer's and, when EOS ended it, that EOS too (as vLLM returns
    it: lm-eval's ``local-completions`` reads the last entry as the generated token and scores the rest)."""
    n = len(ids)
    if not stopped and n < len(new_ids) and new_ids[n] == eos_id and list(new_ids[:n]) == list(ids):
        return [*ids, eos_id]
    return list(ids)


def add_offsets(tokenizer, ids: Sequence[int], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each entry's ``offset``: where its token starts in ``decode(ids)`` (OpenAI's ``text_offset``), from the
    decoded prefixes, not the pieces' lengths (SentencePiece's leading word marker has no character)."""
    for i, entry in enumerate(entries):
        entry["offset"] = len(tokenizer.decode(list(ids[:i]), skip_special_tokens=True)) if i else 0
    return entries


def group_by_params(
    params: Sequence[GenerationParams], adapters: Sequence[str | None] | None = None
) -> list[list[int]]:
    """Indices of requests that can share one ``generate`` call: the same adapter and token budget (every other
    parameter is per row). A seeded sampling request runs alone, so that its answer cannot depend on its batch
    neighbours even through padding's rounding; a greedy one needs no seed and batches freely."""
    adapters = adapters or [None] * len(params)
    groups: dict[Any, list[int]] = {}
    for i, (p, adapter) in enumerate(zip(params, adapters, strict=True)):
        alone = p.seed is not None and p.temperature > 0
        groups.setdefault(("seeded", i) if alone else (adapter, p.max_new_tokens), []).append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------ engines


@dataclass
class Prepared:
    """A request ready to generate: the user's message, the templated prompt's token ids, its ABC constraints."""

    prompt: str
    ids: list[int]
    constraints: AbcConstraints | None = None
    """None: unconstrained; AbcConstraints(): the tune grammar only."""
    adapter: str | None = None
    """The LoRA adapter (a configured name) generating this answer; None = the model itself."""
    prompt_logprobs: int | None = None
    """Also score the prompt (OpenAI ``echo`` + ``logprobs``): each prompt token's logprob and this many top ones."""
    cancel: threading.Event | None = dataclasses.field(default=None, compare=False, repr=False)
    """Set when the caller went away: the row stops at its next token."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    """The answer's token ids (EOS excluded; up to the token that completed a stop string)."""
    logprobs: list[dict[str, Any]] | None = None
    """Per answer token ``{"id", "token", "logprob", "top": [[token, logprob], ...]}`` when asked for."""
    prompt_logprobs: list[dict[str, Any]] | None = None
    """Per prompt token, the same (the first token's logprob is None: nothing comes before it)."""
    first_token_at: float | None = dataclasses.field(default=None, compare=False)
    """``time.perf_counter()`` when the first answer token was there (time-to-first-token metric)."""


def _token_text(tokenizer, token_id: int) -> str:
    """A token as text for logprobs: SentencePiece's word marker as a space, byte tokens decoded."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None or (piece.startswith("<0x") and piece.endswith(">")):
        return tokenizer.decode([int(token_id)])
    return piece.replace("\u2581", " ")


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
        from chatmusician.model.sampling import cut_at_stop

        if row is None:
            ids, reason = split_at_eos(new_ids, self.eos_id, params.max_new_tokens)
        else:  # constrained: cut back to the last complete line when the budget ran out
            ids, reason = row.finish(new_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        if stopped:
            reason = "stop"
            while (
                len(ids) > 1
                and cut_at_stop(self.tokenizer.decode(ids[:-1], skip_special_tokens=True), params.stop)[1]
            ):
                ids = ids[:-1]  # keep the tokens up to the one that completed the stop string
        scored = logprob_ids(ids, new_ids, self.eos_id, stopped)  # EOS counts, and has its logprob entry
        logprobs = None
        if recorded is not None:
            logprobs = [self._entry(t, lp, top) for t, (lp, top) in zip(scored, recorded, strict=False)]
            add_offsets(self.tokenizer, ids, logprobs)
        return Completion(text, reason, len(prepared.ids), len(scored), list(ids), logprobs)

    def _processors(self, constraints, params: GenerationParams, samplings, tops):
        from chatmusician.model.constrained import logits_processor
        from chatmusician.model.sampling import LogprobRecorder, RowSampler

        recorder = LogprobRecorder(tops)
        processor, rows = logits_processor(self.tokenizer, constraints, params.max_new_tokens)
        chain = [
            recorder,
            *([processor] if processor is not None else []),
            RowSampler(samplings, self.device),
        ]
        return chain, recorder, rows

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        """Answer a batch: one ``generate`` per group of one adapter and token budget (constrained or not)."""
        import torch
        from transformers import StoppingCriteriaList

        from chatmusician.model.sampling import RowStops

        results: list[Completion | None] = [None] * len(items)
        for group in group_by_params([p for _, p in items], [pr.adapter for pr, _ in items]):
            params = items[group[0]][1]
            ids, mask = self._inputs([items[i][0].ids for i in group])
            chain, recorder, rows = self._processors(
                [items[i][0].constraints for i in group],
                params,
                [items[i][1].sampling() for i in group],
                [items[i][1].logprobs for i in group],
            )
            stops = RowStops(
                self.tokenizer,
                [items[i][1].max_new_tokens for i in group],
                [items[i][1].stop for i in group],
                [items[i][0].cancel for i in group],
            )
            with self.adapters.use(items[group[0]][0].adapter) as model:
                scored = {
                    i: self.score_prompt(model, items[i][0].ids, items[i][0].prompt_logprobs)
                    for i in group
                    if items[i][0].prompt_logprobs is not None
                }
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=self._generation_config(params),
                        logits_processor=chain,
                        stopping_criteria=StoppingCriteriaList([stops]),
                    )
            for row, i in enumerate(group):
                new_ids = out[row, ids.shape[1] :].tolist()
                recorded = recorder.row_logprobs(row, new_ids) if items[i][1].logprobs is not None else None
                completion = self._completion(items[i][0], new_ids, items[i][1], rows[row], recorded)
                completion.prompt_logprobs = scored.get(i)
                completion.first_token_at = stops.first_token_at
                results[i] = completion
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
        """Text pieces as they are generated, then the Completion. Closing the iterator stops generation."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        from chatmusician.model.constrained import streamer_class
        from chatmusician.model.sampling import RowStops, StopScanner

        cancel = cancel or threading.Event()
        if prepared.constraints is None:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        else:  # emits text only up to the grammar's last accepting point (what the answer keeps)
            streamer = streamer_class()(self.tokenizer, prepared.constraints)
        chain, _, _ = self._processors([prepared.constraints], params, [params.sampling()], [None])
        stops = RowStops(self.tokenizer, [params.max_new_tokens], [params.stop], [cancel])
        ids, mask = self._inputs([prepared.ids])
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                with self.adapters.use(prepared.adapter) as model, torch.inference_mode():
                    result["out"] = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=self._generation_config(params),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([stops]),
                        logits_processor=chain,
                    )
            except BaseException as error:  # surfaced to the consumer below
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=work, name="composer-stream", daemon=True)
        thread.start()
        scanner = StopScanner(params.stop)
        try:
            for piece in streamer:
                if piece and (text := scanner.feed(piece)):
                    yield text
        finally:
            cancel.set()  # no-op when finished; stops generate() when the consumer left early
            thread.join()
        if "error" in result:
            raise result["error"]
        if text := scanner.flush():
            yield text
        row = getattr(streamer, "row", None)
        completion = self._completion(prepared, result["out"][0, ids.shape[1] :].tolist(), params, row)
        completion.first_token_at = stops.first_token_at
        yield completion


class EchoEngine:
    """Answers with the user's message (cut to max_new_tokens words): deterministic, for UI tests and demos."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def check_constraints(self, constraints: AbcConstraints) -> None:
        """Constraints are validated (a bad one is still a 400) but the echo answer ignores them."""

    def shortest_tune(self, constraints: AbcConstraints) -> int:
        return 0

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ComposeError("empty_prompt", "the prompt is empty", "prompt")
        text = build_chat_prompt(prompt, [tuple(t) for t in history])
        check_prompt_length(len(text.split()), self.config.max_prompt_tokens)
        return Prepared(prompt, list(range(len(text.split()))))

    def prepare_raw(self, prompt: str | Sequence[int]) -> Prepared:
        """A completions prompt; token ids are echoed as their numbers."""
        text = prompt if isinstance(prompt, str) else " ".join(str(i) for i in prompt)
        return self.prepare(text)

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.config.lora_adapters:
            raise ComposeError("model_not_found", f"no adapter named {adapter!r}", "model", status=404)

    def probe(self) -> None:
        """Health check: nothing to probe."""

    def _completion(self, prepared: Prepared, params: GenerationParams) -> tuple[list[str], Completion]:
        from chatmusician.model.sampling import cut_at_stop

        words = re.findall(r"\S+\s*|\s+", prepared.prompt)  # one "token" = a word and its trailing space
        pieces = words[: params.max_new_tokens]
        reason = "length" if len(words) > len(pieces) else "stop"
        text, stopped = cut_at_stop("".join(pieces), params.stop)
        if stopped:
            reason, pieces = "stop", re.findall(r"\S+\s*|\s+", text)
        logprobs = None
        if params.logprobs is not None:  # certainty: each word has probability 1
            starts = [len("".join(pieces[:i])) for i in range(len(pieces))]
            logprobs = [
                {"id": i, "token": p, "logprob": 0.0, "top": [[p, 0.0]][: params.logprobs], "offset": at}
                for i, (p, at) in enumerate(zip(pieces, starts, strict=True))
            ]
        completion = Completion(
            text, reason, len(prepared.ids), len(pieces), list(range(len(pieces))), logprobs
        )
        if prepared.prompt_logprobs is not None:
            completion.prompt_logprobs = [
                {"id": i, "token": w, "logprob": None if i == 0 else 0.0, "top": []}
                for i, w in enumerate(prepared.prompt.split())
            ]
        return pieces, completion

    continuous_batching = True
    """Nothing to batch: the Composer hands it each request alone (so that it runs without a Serve replica)."""

    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]:
        return [self._completion(prepared, params)[1] for prepared, params in items]

    async def agenerate(self, prepared: Prepared, params: GenerationParams, on_cancel=None) -> Completion:
        return self._completion(prepared, params)[1]

    def stream(
        self, prepared: Prepared, params: GenerationParams, cancel: threading.Event | None = None
    ) -> Iterator[str | Completion]:
        pieces, completion = self._completion(prepared, params)
        yield from pieces
        yield completion


ENGINES = {"transformers": TransformersEngine, "echo": EchoEngine}


def load_engine(config: EngineConfig) -> TransformersEngine | EchoEngine:
    if config.engine == "vllm":  # imported here: it runs in the vLLM environment only
        from chatmusician.serve.vllm_engine import VllmEngine

        return VllmEngine(config)
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose one of {sorted([*ENGINES, 'vllm'])}")
    return ENGINES[config.engine](config)


def prepare_request(
    engine, config: EngineConfig, request: Mapping[str, Any]
) -> tuple[Prepared, GenerationParams]:
    """A composer request ``{"prompt", "history", "params", "constrained", "constraints": {key, meter,
    unit_length, max_bars}, "adapter", "raw", "prompt_logprobs"}`` -> validated inputs, else ComposeError.
    ``raw``: the prompt (text or token ids) goes to the model as it is, without the chat template."""
    defaults = config.openai_generation if request.get("defaults") == "openai" else config.generation
    params = resolve_params(request.get("params"), defaults, config.max_new_tokens_cap)
    constraints = resolve_constraints(engine, request.get("constrained"), request.get("constraints"))
    adapter = request.get("adapter")
    engine.check_adapter(adapter)
    if request.get("raw"):
        prepared = engine.prepare_raw(request.get("prompt"))
    else:
        prepared = engine.prepare(request.get("prompt"), request.get("history") or ())
    if constraints is not None:
        check_constrained_budget(engine, constraints, params)
    top = request.get("prompt_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS
    ):
        raise ComposeError(
            "invalid_parameter", f"logprobs must be an integer in [0, {MAX_LOGPROBS}]", "logprobs"
        )
    return dataclasses.replace(
        prepared, constraints=constraints, adapter=adapter, prompt_logprobs=top
    ), params


def check_constrained_budget(engine, constraints: AbcConstraints, params: GenerationParams) -> None:
    """A constrained answer is a whole tune: ``stop`` could cut it in half and a budget under the shortest tune
    could only give an empty answer, so both are refused before any work (400)."""
    if params.stop:
        raise ComposeError(
            "invalid_parameter",
            "stop cannot be combined with constrained (it could cut a tune in half)",
            "stop",
        )
    shortest = engine.shortest_tune(constraints)
    if params.max_new_tokens < shortest:
        raise ComposeError(
            "invalid_parameter",
            f"max_tokens={params.max_new_tokens} is below the {shortest} tokens of the shortest complete tune "
            "these constraints allow",
            "max_tokens",
        )


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
        self.batch_sizes: list[int] = []  # sizes of the batches generated so far (stats)
        self.cancelled: list[int] = []  # completion tokens of requests whose caller went away (stats)
        self.probes = 0
        self.in_flight = 0  # requests being generated (the health probe waits for none)
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
            if getattr(self.engine, "continuous_batching", False):
                result = await self._generate_one(prepared, params)
            else:
                result = await self._generate_batch((prepared, params))
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

    async def _generate_one(self, prepared: Prepared, params: GenerationParams) -> dict[str, Any]:
        """A continuous-batching engine takes each request on arrival: no batch to wait for or behind."""
        self.batch_sizes = [*self.batch_sizes[-999:], 1]

        def cancelled(tokens: int) -> None:
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

        threading.Thread(target=produce, name="composer-stream-pump", daemon=True).start()
        interval, sent_at = self.config.stream_interval_s, -1e9
        try:
            while True:
                # What was generated since the last event goes out as one delta, at most every interval (the
                # end of the answer at once).
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
        finally:
            self.in_flight -= 1
            cancel.set()  # the pump stops the engine's stream and closes it
