"""Batch generation for the evaluation: chat-templated prompts in, answer texts out.

Every generating evaluation (MusicTheoryBench generation mode, ABC quality) goes through :func:`generate`, so
constrained decoding is one switch: ``constrained=True`` hands the same prompts and sampling arguments to
``chatmusician.model.constrained.generate`` (the ABC grammar) instead of plain ``model.generate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _plain_generate(model, tokenizer, prompts: Sequence[str], **kwargs: Any) -> list[tuple[str, int]]:
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # template has no BOS
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: decoder-only models continue from the right end
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    device = next(model.parameters()).device
    config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, **kwargs)
    if pad != eos:
        config.suppress_tokens = [pad]  # LLaMA pads with <unk>: never part of an answer
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
    answers = []
    for row in out[:, width:].tolist():
        n = len(row)
        if eos in row:
            row = row[: row.index(eos)]
            n = len(row) + 1  # EOS counts: it was generated
        elif pad != eos and pad in row:  # finished rows are padded on the right
            n = row.index(pad)
        answers.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
    return answers


def generate_counted(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    constrained: bool = False,
    constraints: Sequence[Mapping[str, Any] | None] | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> list[tuple[str, int]]:
    """(answer text up to EOS, generated token count, EOS included) for already-templated ``prompts``;
    ``kwargs`` are ``generate``'s sampling arguments (see :func:`sampling_kwargs`). ``constrained`` routes
    through the ABC grammar, row i also held to ``constraints[i]`` (``{key, meter, ...}``: what it asked for)."""
    import torch

    if not prompts:
        return []
    if seed is not None:
        torch.manual_seed(seed)
    if constrained:
        from chatmusician.abc.grammar import AbcConstraints
        from chatmusician.model import constrained as grammar

        wanted = [AbcConstraints.from_mapping(dict(c or {})) for c in constraints or [None] * len(prompts)]
        outs = grammar.generate_outputs(model, tokenizer, list(prompts), wanted, **kwargs)
        return [(g.text, len(g.ids) + (g.finish_reason == "stop")) for g in outs]
    return _plain_generate(model, tokenizer, prompts, **kwargs)


def generate(model, tokenizer, prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """Answer texts only (see :func:`generate_counted`)."""
    return [text for text, _ in generate_counted(model, tokenizer, prompts, **kwargs)]
