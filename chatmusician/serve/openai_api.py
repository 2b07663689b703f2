"""Wire schemas of the HTTP API (OpenAI chat completions, compose, render) and pure helpers that map them.

The OpenAI part follows the Chat Completions API closely enough for the official ``openai`` client:
``/v1/chat/completions`` (plain or ``stream: true`` server-sent events) and ``/v1/models``. ChatMusician's
template has no system role: system messages are prepended to the first user message.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RENDER_FORMATS = ("midi", "wav", "mp3", "svg", "png")
Format = Literal["midi", "wav", "mp3", "svg", "png"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not silently ignored


class SamplingParams(StrictModel):
    """Sampling parameters; ``None`` = the server's default (the original's: 0.2 / 0.9 / 40 / 1.1 / 1536)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no limit.")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    max_new_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)


class AbcConstraintFields(BaseModel):
    """Grammar-constrained ABC (an extension of the OpenAI API: pass through ``extra_body``)."""

    constrained: bool | None = Field(
        None,
        description="Only a complete, syntactically valid ABC tune can be generated (grammar-constrained).",
    )
    key: str | None = Field(None, description="With constrained: the K: value the tune must have, e.g. 'G'.")
    meter: str | None = Field(None, description="With constrained: the M: value, e.g. '6/8'.")
    unit_length: str | None = Field(None, description="With constrained: the L: value, e.g. '1/8'.")
    max_bars: int | None = Field(None, description="With constrained: at most this many bar lines.")

    def constraint_request(self) -> dict[str, Any]:
        """The composer request's ``constrained`` and ``constraints`` entries."""
        fields = {
            "key": self.key,
            "meter": self.meter,
            "unit_length": self.unit_length,
            "max_bars": self.max_bars,
        }
        return {"constrained": self.constrained, "constraints": fields}


# ------------------------------------------------------------------------------------------------- OpenAI


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class LenientModel(BaseModel):
    """OpenAI request bodies: fields this server does not know are ignored with a warning (as vLLM does),
    since clients send parameters of other servers (``logit_bias``, ``parallel_tool_calls``, ...)."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class OpenAISampling(LenientModel):
    """Sampling fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(
        None, ge=-1, description="Not in OpenAI's API (extra_body); 0 or -1 (vLLM's): no limit."
    )
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description="Not in OpenAI's API (extra_body)."
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, description="Choices per prompt (at most the server's max_n).")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings; the answer ends before the first."
    )
    seed: int | None = Field(
        None, ge=0, description="Choice i samples with seed + i: the same text under any load."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self, max_new_tokens: int | None, logprobs: int | None, choice: int = 0) -> dict[str, Any]:
        """The composer's ``params`` for choice ``choice`` (fields left out: the server's OpenAI defaults)."""
        return {
            **SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
                max_new_tokens=max_new_tokens,
                seed=None if self.seed is None else self.seed + choice,
            ).model_dump(),
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "stop": self.stop,
            "logprobs": logprobs,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(AbcConstraintFields, OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(
        None, description="Return each answer token's logprob (in a stream: on each choice's last chunk)."
    )
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many alternatives.")

    def params(self, choice: int = 0) -> dict[str, Any]:
        top = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling(self.max_completion_tokens or self.max_tokens, top, choice)


class CompletionRequest(OpenAISampling):
    """``/v1/completions``: raw text continuation (no chat template), as lm-evaluation-harness sends it."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a batch of either (one choice per prompt and n)."
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="The prompt comes back in front of the answer (with its logprobs).")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Logprobs of each token and this many top ones."
    )

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def params(self, choice: int = 0) -> dict[str, Any]:
        return self.sampling(self.max_tokens, self.logprobs, choice)


def content_text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def messages_to_turns(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI messages -> (new user prompt, earlier (question, answer) turns). Consecutive messages of one role
    are joined with newlines; system/developer text goes before the first user message. ValueError when the
    conversation does not end with a user message or an answer comes before any question."""
    system = [content_text(m.content) for m in messages if m.role in ("system", "developer")]
    merged: list[list[str]] = []  # [role, text]
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        if merged and merged[-1][0] == message.role:
            merged[-1][1] += "\n" + content_text(message.content)
        else:
            merged.append([message.role, content_text(message.content)])
    if not merged or merged[-1][0] != "user":
        raise ValueError("the last message must come from the user")
    if merged[0][0] != "user":
        raise ValueError("an assistant message comes before any user message")
    if system:
        merged[0][1] = "\n".join(system + [merged[0][1]])
    history = [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]
    return merged[-1][1], history


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(completion: dict[str, Any]) -> dict[str, Any] | None:
    """Composer logprobs -> OpenAI chat ``logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if completion.get("logprobs") is None:
        return None
    entry = lambda token, lp: {"token": token, "logprob": lp, "bytes": list(token.encode())}  # noqa: E731
    return {
        "content": [
            {**entry(e["token"], e["logprob"]), "top_logprobs": [entry(t, lp) for t, lp in e["top"]]}
            for e in completion["logprobs"]
        ],
        "refusal": None,
    }


def chat_completion(model: str, completions: list[dict[str, Any]]) -> dict[str, Any]:
    """Composer Completion dicts (one per choice) -> OpenAI ``chat.completion`` object."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
                "logprobs": chat_logprobs(c),
            }
            for i, c in enumerate(completions)
        ],
        "usage": usage(completions[0]["prompt_tokens"], sum(c["completion_tokens"] for c in completions)),
    }


def completion_logprobs(
    completion: dict[str, Any], prompt_text: str | None, echo: bool
) -> dict[str, Any] | None:
    """Legacy completions ``logprobs: {tokens, token_logprobs, top_logprobs, text_offset}``; with echo the
    prompt's tokens come first (the first one's logprob is null, as OpenAI's and vLLM's)."""
    entries = [
        *(completion.get("prompt_logprobs") or [] if echo else []),
        *(completion.get("logprobs") or []),
    ]
    if completion.get("logprobs") is None and not (echo and completion.get("prompt_logprobs")):
        return None
    # Offsets index the choice's text: the echoed prompt, then the answer.
    base = len(prompt_text or "") if echo else 0
    prompt_entries = len(completion.get("prompt_logprobs") or []) if echo else 0
    offsets, at = [], 0
    for i, e in enumerate(entries):
        offset = e.get("offset")
        offsets.append(at if offset is None else offset + (base if i >= prompt_entries else 0))
        at = offsets[-1] + len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["logprob"] is None else dict((t, lp) for t, lp in e["top"]) for e in entries
        ],
        "text_offset": offsets,
    }


def text_completion(
    model: str, choices: list[tuple[str, dict[str, Any], bool]], n: int = 1
) -> dict[str, Any]:
    """[(prompt text, Completion dict, echo)], ``n`` choices per prompt in a row -> OpenAI ``text_completion``
    object (each prompt's tokens counted once in usage, as vLLM and OpenAI count them)."""
    prompt_tokens = sum(c["prompt_tokens"] for _, c, _ in choices[::n])
    completion_tokens = sum(c["completion_tokens"] for _, c, _ in choices)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": (prompt if echo else "") + c["text"],
                "finish_reason": c["finish_reason"],
                "logprobs": completion_logprobs(c, prompt, echo),
            }
            for i, (prompt, c, echo) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
    index: int = 0,
    logprobs: dict | None = None,
) -> str:
    """One server-sent event carrying a ``chat.completion.chunk`` (no choices when it only carries usage)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = (
        []
        if delta is None
        else [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
    )
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def text_chunk(
    cid: str, model: str, created: int, text: str | None = None, finish_reason: str | None = None,
    usage_: dict | None = None, index: int = 0, logprobs: dict | None = None,
) -> str:  # fmt: skip
    """One server-sent event carrying a ``text_completion`` chunk (no choices when it only carries usage)."""
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model}
    body["choices"] = (
        []
        if text is None
        else [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]
    )
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def error_event(code: str, message: str) -> str:
    """A failure after the stream started: an error event (then ``[DONE]``), as vLLM sends it."""
    return f"data: {json.dumps(error_body(code, message, 'server_error'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "chatmusician"}
    if parent is not None:
        card |= {"parent": parent, "root": parent}
    return card


def models_list(model: str, created: int, adapters: list[str] = ()) -> dict[str, Any]:
    """The served model, then each LoRA adapter as ``<model>:<adapter>`` (its parent: the model)."""
    cards = [model_card(model, created), *(model_card(f"{model}:{a}", created, model) for a in adapters)]
    return {"object": "list", "data": cards}


def resolve_model(requested: str, model: str, adapters: Any) -> tuple[bool, str | None]:
    """A request's model id -> (served?, adapter name or None): ``model``, ``model:adapter`` or ``adapter``."""
    if requested == model:
        return True, None
    name = requested.removeprefix(f"{model}:")
    return (name in adapters, name if name in adapters else None)


# ------------------------------------------------------------------------------------------ compose, render


class TaskSpec(StrictModel):
    family: str = Field(
        description="text_to_music | chords | form | motif_form | harmonize | style | analyze_form | analyze_motif"
    )
    fields: dict[str, Any] = Field(
        default_factory=dict, description="The family's fields, e.g. {'form': 'AABB'}."
    )


class ComposeRequest(AbcConstraintFields, StrictModel):
    """Either a free ``prompt`` or a ``task``; the answer's first ABC tune is validated and rendered."""

    prompt: str | None = None
    task: TaskSpec | None = None
    history: list[tuple[str, str]] = Field(
        default_factory=list, description="Earlier [question, answer] turns."
    )
    params: SamplingParams = Field(default_factory=SamplingParams)
    formats: list[Format] | None = Field(
        None, description="Renders wanted (default: the server's); [] = none."
    )


class RenderBody(StrictModel):
    abc: str = Field(min_length=1)
    formats: list[Format] = Field(default_factory=lambda: ["midi", "svg"])
    tune_index: int = Field(0, ge=0)


def error_body(code: str, message: str, type_: str = "invalid_request_error", **extra: Any) -> dict[str, Any]:
    """The one error shape of the API (OpenAI's): ``{"error": {"type", "code", "message", "param", ...}}``."""
    return {
        "error": {"type": type_, "code": code, "message": message, "param": extra.pop("param", None), **extra}
    }
