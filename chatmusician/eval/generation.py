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


class _Suppress:
    """Logits processor that rules one token out (LLaMA pads with ``<unk>``: never part of an answer)."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores[:, self.token_id] = float("-inf")
        return scores


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
    ``constraints[i]`` (``{key, meter, ...}``: what it asked for); its mask runs before the draw."""
    import torch
    from transformers import GenerationConfig

    from chatmusician.model.constrained_decoding import finish, logits_processor
    from chatmusician.model.sampling import RowSampler, RowSampling

    if not prompts:
        return []
    seeds = list(seeds) if seeds is not None else [seed if seed is not None else 0] * len(prompts)
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
    budget = kwargs["max_new_tokens"]
    sampling = RowSampling(
        temperature=kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0,
        top_p=kwargs.get("top_p", 1.0),
        top_k=kwargs.get("top_k", 0),
        repetition_penalty=kwargs.get("repetition_penalty", 1.0),
    )
    states: list = [None] * len(prompts)
    chain: list = [_Suppress(pad)] if pad != eos else []
    if constrained:
        from chatmusician.abc.grammar import AbcConstraints

        wanted = [AbcConstraints.from_mapping(dict(c or {})) for c in constraints or [None] * len(prompts)]
        processor, states = logits_processor(tokenizer, wanted, budget)
        chain += [processor] if processor is not None else []
    chain.append(RowSampler([replace(sampling, seed=int(s)) for s in seeds], device))
    # transformers fills every setting a passed config leaves unset from model.generation_config (a checkpoint's
    # repetition penalty, beams, banned n-grams...): set aside while the sampler applies every setting itself
    saved, model.generation_config = model.generation_config, GenerationConfig()
    config = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config, logits_processor=chain)  # fmt: skip
    finally:
        model.generation_config = saved
    answers = []
    for state, row in zip(states, out[:, width:].tolist(), strict=True):
        answer, reason = finish(state, row, eos)
        answers.append((tokenizer.decode(answer, skip_special_tokens=True), len(answer) + (reason == "stop")))
    return answers


def generate(model, tokenizer, prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """Answer texts only (see :func:`generate_counted`)."""
    return [text for text, _ in generate_counted(model, tokenizer, prompts, **kwargs)]
