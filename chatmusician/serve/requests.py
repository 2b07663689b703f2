"""Request validation: parameters, prompts and constraints checked and turned into engine inputs (pure
functions over an engine's tokenizer-facing methods; no Ray, no engine import)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from chatmusician.abc.grammar import AbcConstraints, ConstraintError
from chatmusician.prompts import build_chat_prompt
from chatmusician.serve.config import EngineConfig, GenerationDefaults
from chatmusician.serve.types import (
    MAX_LOGPROBS,
    MAX_STOPS,
    PARAM_RANGES,
    ComposeError,
    GenerationParams,
    Prepared,
)


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
