"""Batch generation for the evaluation: chat-templated prompts in, answer texts out.

Every generating evaluation (MusicTheoryBench generation mode, ABC quality) goes through :func:`generate`: one
batched ``model.generate`` whose last logits processor draws each row from its own seeded generator (the serving
engine's ``RowSampler``), so results do not depend on how Ray Data cuts batches. Constrained decoding is one
switch: ``constrained=True`` puts the ABC grammar's mask (``chatmusician.model.constrained``) before the draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from chatmusician.prompts import build_chat_prompt


def sampling_kwargs(
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.9,
    top_k: int = 40,
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """``generate`` keyword arguments: greedy when temperature is 0, else sampling with top-p/top-k."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "repetition_penalty": repetition_penalty,
    }
    if temperature > 0:
        kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    return kwargs


def chat_prompts(
    messages: Sequence[str], histories: Sequence[Sequence[tuple[str, str]]] | None = None
) -> list[str]:
    """The original's chat template around each user message (with earlier turns when given)."""
    histories = histories or [()] * len(messages)
    return [build_chat_prompt(m, h) for m, h in zip(messages, histories, strict=True)]


def generate_counted(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    constrained: bool = False,
    constraints: Sequence[Mapping[str, Any] | None] | None = None,
    seeds: Sequence[int] | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> list[tuple[str, int]]:
    """(answer text up to EOS, generated token count, EOS included) for already-templated ``prompts``;
    ``kwargs`` are :func:`sampling_kwargs`' arguments. Row i samples from its own generator seeded ``seeds[i]``
    (default: ``seed`` for every row), so an item's answer does not depend on which items share its batch (the
    serving engine's ``RowSampler``). ``constrained`` routes through the ABC grammar, row i also held to
    ``constraints[i]`` (``{key, meter, ...}``: what it asked for); its grammar mask runs before the draw, its
    meter checks the token drawn (:func:`chatmusician.model.constrained_decoding.generate_outputs`)."""
    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.model.constrained_decoding import generate_outputs
    from chatmusician.model.sampling import RowSampling

    seeds = list(seeds) if seeds is not None else [seed if seed is not None else 0] * len(prompts)
    sampling = RowSampling(
        temperature=kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0,
        top_p=kwargs.get("top_p", 1.0),
        top_k=kwargs.get("top_k", 0),
        repetition_penalty=kwargs.get("repetition_penalty", 1.0),
    )
    wanted = [None] * len(prompts)
    if constrained:
        wanted = [AbcConstraints.from_mapping(dict(c or {})) for c in constraints or [None] * len(prompts)]
    outs = generate_outputs(
        model,
        tokenizer,
        prompts,
        wanted,
        kwargs["max_new_tokens"],
        [replace(sampling, seed=int(s)) for s in seeds],
    )
    return [(o.text, len(o.ids) + (o.finish_reason == "stop")) for o in outs]


def generate(model, tokenizer, prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """Answer texts only (see :func:`generate_counted`)."""
    return [text for text, _ in generate_counted(model, tokenizer, prompts, **kwargs)]
