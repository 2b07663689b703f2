"""One typed HTTP client for the Serve app (REST + OpenAI-compatible routes), shared by the quickstart, the
benchmarks and the tests.

    with AppClient("http://127.0.0.1:8000") as app:
        app.wait_healthy(deadline_s=300)
        tune = app.compose("Compose a reel in D.", params={"max_new_tokens": 256}, formats=[])
        rendered = app.render(tune.abc, ["midi", "svg"])

A refusal of the API (any status but the route's success) raises :class:`ApiError` carrying the status and the
API's error body (``{"error": {"code", "message", ...}}``); ``/v1/render`` answers 422 with a result whose
``errors`` say what failed, and that is returned as a :class:`Rendered` with ``ok`` false, not raised. For the
OpenAI routes the official ``openai`` package is the typed client; :meth:`AppClient.chat` and
:meth:`AppClient.complete` are here for callers without it (a plain dict of the wire format back).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


class ApiError(RuntimeError):
    """The app refused a request: HTTP ``status``, the error's ``code`` and ``message``, the whole ``body``."""

    def __init__(self, status: int, body: dict[str, Any], route: str = ""):
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        if not error and body.get("errors"):  # the Renderer's shape: {"ok": false, "errors": [...]}
            error = body["errors"][0]
        self.status, self.body, self.route = status, body, route
        self.code: str = error.get("code") or "http_error"
        self.message: str = error.get("message") or str(body.get("text", ""))[:300]
        super().__init__(f"{route} answered HTTP {status} {self.code}: {self.message}".strip())


@dataclass
class Composition:
    """The answer of ``/v1/compose``: the model's text, the first ABC tune in it (None if none) and its checks."""

    text: str
    abc: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    found: bool
    """Whether the answer holds an ABC tune."""
    render: Rendered | None
    """The renders asked for (None when none were asked for or no tune was found)."""
    body: dict[str, Any] = field(repr=False)
    """The whole JSON answer (validation, tunes, extraction issues)."""


@dataclass
class Rendered:
    """The answer of ``/v1/render``: the bytes per format and, when ``ok`` is false, what failed."""

    ok: bool
    outputs: dict[str, bytes]
    errors: list[dict[str, Any]]
    warnings: list[dict[str, Any]]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Rendered:
        outputs = {fmt: base64.b64decode(data) for fmt, data in (body.get("outputs") or {}).items()}
        return cls(bool(body.get("ok")), outputs, body.get("errors") or [], body.get("warnings") or [])


class AppClient:
    """Synchronous client of one running app at ``base_url`` (``api_key`` when the app asks for one)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        """The underlying httpx client, for a raw request (streaming, a deliberately malformed body)."""

    def __enter__(self) -> AppClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ plumbing

    def request(self, method: str, route: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> dict[str, Any]:
        """The JSON answer of one request; any status outside ``ok`` raises :class:`ApiError`."""
        response = self.http.request(method, route, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = {"text": response.text}
        if response.status_code not in ok:
            raise ApiError(response.status_code, body if isinstance(body, dict) else {"text": body}, route)
        return body

    def wait_healthy(
        self,
        deadline_s: float = 300.0,
        route: str = "/healthz",
        alive: Callable[[], bool] | None = None,
        interval_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll ``route`` until it answers 200 (returns its JSON) or ``deadline_s`` passes (``TimeoutError``).
        ``alive``, when given, is asked before each poll: the server's process has not exited (else
        ``RuntimeError`` at once instead of waiting out the deadline)."""
        end = time.monotonic() + deadline_s
        last = "no answer"
        while True:
            if alive is not None and not alive():
                raise RuntimeError(f"the server for {self.base_url} exited before {route} answered")
            try:
                return self.request("GET", route, timeout=min(5.0, max(0.1, deadline_s)))
            except ApiError as err:
                last = f"HTTP {err.status}"
            except httpx.TransportError as err:
                last = type(err).__name__
            if time.monotonic() + interval_s > end:
                raise TimeoutError(
                    f"{self.base_url}{route} did not answer 200 within {deadline_s:g} s ({last})"
                )
            time.sleep(interval_s)

    # ------------------------------------------------------------------ routes

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "model", "uptime_s"}``."""
        return self.request("GET", "/healthz")

    def models(self) -> list[str]:
        """The ids ``GET /v1/models`` lists (the served model, then ``model:adapter`` per LoRA adapter)."""
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]

    def compose(
        self,
        prompt: str | None = None,
        *,
        task: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        formats: list[str] | None = None,
        constrained: bool | None = None,
        history: list[tuple[str, str]] | None = None,
        **constraints: Any,
    ) -> Composition:
        """``POST /v1/compose``: a free ``prompt`` or a ``task`` ({"family", "fields"}); ``formats`` None = the
        server's default renders, [] = none; ``constraints``: key, meter, unit_length, max_bars."""
        body: dict[str, Any] = {"prompt": prompt, "task": task, "params": params or {}, "formats": formats,
                                "constrained": constrained, "history": history or [], **constraints}  # fmt: skip
        answer = self.request("POST", "/v1/compose", json={k: v for k, v in body.items() if v is not None})
        usage = answer.get("usage") or {}
        return Composition(
            text=answer.get("text") or "",
            abc=answer.get("abc"),
            finish_reason=answer.get("finish_reason") or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            found=bool((answer.get("extraction") or {}).get("found")),
            render=Rendered.from_json(answer["render"]) if answer.get("render") else None,
            body=answer,
        )

    def render(self, abc: str, formats: list[str], tune_index: int = 0) -> Rendered:
        """``POST /v1/render``: the tune in each format; a tune the tools could not render comes back with
        ``ok`` false and its ``errors`` (HTTP 422), a malformed request raises :class:`ApiError` (400)."""
        body = {"abc": abc, "formats": formats, "tune_index": tune_index}
        return Rendered.from_json(self.request("POST", "/v1/render", ok=(200, 422), json=body))

    def chat(
        self, messages: list[dict[str, str]], model: str = "chatmusician", **fields: Any
    ) -> dict[str, Any]:
        """``POST /v1/chat/completions`` (non-streaming): OpenAI's wire format in and out."""
        return self.request(
            "POST", "/v1/chat/completions", json={"model": model, "messages": messages, **fields}
        )

    def complete(self, prompt: str, model: str = "chatmusician", **fields: Any) -> dict[str, Any]:
        """``POST /v1/completions`` (non-streaming): OpenAI's wire format in and out."""
        return self.request("POST", "/v1/completions", json={"model": model, "prompt": prompt, **fields})
