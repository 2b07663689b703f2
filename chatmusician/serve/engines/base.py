"""What every engine shares: how an answer ends (EOS and its logprob entry, stop strings), logprob entries and
their text offsets, the capabilities the Composer reads (``continuous_batching``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.serve.types import Completion, GenerationParams, Prepared


class Engine(Protocol):
    """The Composer's view of an engine. ``continuous_batching`` engines also have ``async agenerate(prepared,
    params, on_cancel)``: the Composer hands them each request on arrival instead of ``@serve.batch``."""

    continuous_batching: bool

    def prepare(self, prompt: str, history: Sequence[Sequence[str]] = ()) -> Prepared: ...
    def prepare_raw(self, prompt: str | Sequence[int]) -> Prepared: ...
    def check_adapter(self, adapter: str | None) -> None: ...
    def check_constraints(self, constraints: AbcConstraints) -> None: ...
    def shortest_tune(self, constraints: AbcConstraints) -> int: ...
    def generate(self, items: Sequence[tuple[Prepared, GenerationParams]]) -> list[Completion]: ...
    def stream(self, prepared: Prepared, params: GenerationParams, cancel=None): ...
    def probe(self) -> None: ...


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


def finish(
    tokenizer,
    ids: Sequence[int],
    new_ids: Sequence[int],
    eos_id: int,
    stop: Sequence[str],
    engine_stopped: bool,
) -> tuple[list[int], str, list[int], bool]:
    """How every answer ends, on every engine: ``ids`` (the answer's tokens, EOS and anything after it left out)
    decoded and cut at the first ``stop`` string, the ids trimmed to the token that completed it; and the ids that
    get logprob entries (the EOS that ended the answer included, as vLLM returns it). ``engine_stopped``: the
    engine itself stopped at a stop string (vLLM). Returns (ids, text, scored ids, stopped by a stop string)."""
    from chatmusician.model.sampling import cut_at_stop

    ids = list(ids)
    text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
    if stopped:
        while len(ids) > 1 and cut_at_stop(tokenizer.decode(ids[:-1], skip_special_tokens=True), stop)[1]:
            ids = ids[:-1]  # keep the tokens up to the one that completed the stop string
    return ids, text, logprob_ids(ids, new_ids, eos_id, stopped or engine_stopped), stopped


def add_offsets(tokenizer, ids: Sequence[int], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each entry's ``offset``: where its token starts in ``decode(ids)`` (OpenAI's ``text_offset``), from the
    decoded prefixes, not the pieces' lengths (SentencePiece's leading word marker has no character)."""
    for i, entry in enumerate(entries):
        entry["offset"] = len(tokenizer.decode(list(ids[:i]), skip_special_tokens=True)) if i else 0
    return entries


def _token_text(tokenizer, token_id: int) -> str:
    """A token as text for logprobs: SentencePiece's word marker as a space, byte tokens decoded."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None or (piece.startswith("<0x") and piece.endswith(">")):
        return tokenizer.decode([int(token_id)])
    return piece.replace("\u2581", " ")
