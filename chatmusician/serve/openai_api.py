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
    top_k: int | None = Field(None, ge=0)
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


class ChatCompletionRequest(AbcConstraintFields, StrictModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Not in OpenAI's API; pass through extra_body.")
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description="Not in OpenAI's API (extra_body)."
    )
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: Literal[1] = 1
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self) -> dict[str, Any]:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            seed=self.seed,
        ).model_dump()


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def messages_to_turns(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI messages -> (new user prompt, earlier (question, answer) turns). Consecutive messages of one role
    are joined with newlines; system/developer text goes before the first user message. ValueError when the
    conversation does not end with a user message or an answer comes before any question."""
    system = [_text(m.content) for m in messages if m.role in ("system", "developer")]
    merged: list[list[str]] = []  # [role, text]
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        if merged and merged[-1][0] == message.role:
            merged[-1][1] += "\n" + _text(message.content)
        else:
            merged.append([message.role, _text(message.content)])
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


def chat_completion(model: str, completion: dict[str, Any]) -> dict[str, Any]:
    """A composer Completion dict -> OpenAI ``chat.completion`` object."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion["text"]},
                "finish_reason": completion["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": usage(completion["prompt_tokens"], completion["completion_tokens"]),
    }


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
) -> str:
    """One server-sent event carrying a ``chat.completion.chunk`` (no choices when it only carries usage)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_list(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "chatmusician"}],
    }


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
