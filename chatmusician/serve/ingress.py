"""The HTTP face of the app: a FastAPI app over a backend (Composer + Renderer), served through ``@serve.ingress``.

Routes: ``POST /v1/compose`` (prompt or task -> answer, extracted ABC, validation report, renders),
``POST /v1/render`` (ABC -> renders), OpenAI-compatible ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events) and ``GET /v1/models``, ``GET /healthz``, OpenAPI docs at ``/docs``, the web UI at
``ui_path`` (``webui.py``). Every error has one JSON shape (:func:`~chatmusician.serve.openai_api.error_body`); bodies over
``max_body_bytes`` get 413; an overloaded Composer gives 503 with ``Retry-After`` instead of queueing without bound.

The FastAPI app is built inside the replica (``__serve_build_asgi_app__``) over the replica's handles;
:func:`build_api` takes any backend, so the routes are tested without Ray too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatmusician.prompts import Task, build_task_prompt
from chatmusician.serve import openai_api as api
from chatmusician.serve.composer import analyze_abc
from chatmusician.serve.config import ServeAppConfig


class Overloaded(Exception):
    """The composer's queue is full: the client should retry later (503 + Retry-After)."""


class Backend(Protocol):
    """What the routes need from the deployments (a fake in unit tests, handles in Serve)."""

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def render(self, request: dict[str, Any]) -> dict[str, Any]: ...


class HandleBackend:
    """The backend over Serve deployment handles; Serve's BackPressureError becomes :class:`Overloaded`."""

    def __init__(self, composer: DeploymentHandle, renderer: DeploymentHandle):
        self.composer, self.renderer = composer, renderer

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.composer.generate.remote(request)
        except BackPressureError as error:
            raise Overloaded(str(error)) from None

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from ray.serve.exceptions import BackPressureError

        events = self.composer.options(stream=True).stream.remote(request)
        try:
            first = await events.__anext__()
        except BackPressureError as error:
            raise Overloaded(str(error)) from None
        yield first
        async for event in events:
            yield event

    async def render(self, request: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.renderer.render.remote(request)
        except BackPressureError as error:
            raise Overloaded(str(error)) from None


def error_response(
    status: int, code: str, message: str, headers: dict | None = None, **extra: Any
) -> JSONResponse:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(api.error_body(code, message, type_, **extra), status_code=status, headers=headers)


def composer_error(error: dict[str, Any]) -> JSONResponse:
    return error_response(error.get("status", 400), error["code"], error["message"], param=error.get("param"))


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or counted when chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        return error_response(413, "request_too_large", f"the request body is over {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read up to the limit, then replay what was read.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]


def build_api(backend: Backend, config: ServeAppConfig) -> FastAPI:
    """The FastAPI app of every route above over ``backend`` (the web UI is mounted by the caller)."""
    # FastAPIOffline: FastAPI with the Swagger UI and ReDoc assets served from the package, not a CDN
    app = FastAPIOffline(
        title="ChatMusician",
        version="0.1.0",
        description="Compose music in ABC notation, render it to score and audio; OpenAI-compatible chat API.",
    )
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    name, started = config.served_model_name, int(time.time())
    retry = {"Retry-After": str(config.retry_after_s)}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        details = _validation_details(exc)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(str(p) for p in first['loc'][1:]) or 'body'}: {first['msg']}"
        return error_response(400, "invalid_request", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return error_response(503, "overloaded", "the server is at capacity; retry later", headers=retry)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error_response(500, "internal_error", f"{type(exc).__name__}: {str(exc)[:500]}")

    def too_long(text: str, what: str) -> JSONResponse | None:
        if len(text) > config.max_prompt_chars:
            return error_response(
                413, "input_too_long", f"{what} is over {config.max_prompt_chars} characters"
            )
        return None

    async def render(abc: str, formats: list[str], tune_index: int = 0) -> dict[str, Any]:
        try:
            return await backend.render({"abc": abc, "formats": list(formats), "tune_index": tune_index})
        except Overloaded:
            raise
        except Exception as exc:  # the answer is still worth returning without its renders
            error = {
                "code": "renderer_failed",
                "message": f"{type(exc).__name__}: {str(exc)[:300]}",
                "stage": "serve",
            }
            return {"ok": False, "outputs": {}, "errors": [error], "warnings": []}

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": name, "uptime_s": int(time.time()) - started}

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        return api.models_list(name, started)

    @app.post("/v1/chat/completions", tags=["openai"], response_model=None)
    async def chat_completions(body: api.ChatCompletionRequest) -> JSONResponse | StreamingResponse | dict:
        if body.model != name:
            return error_response(
                404, "model_not_found", f"model {body.model!r} is not served; use {name!r}", param="model"
            )
        try:
            prompt, history = api.messages_to_turns(body.messages)
        except ValueError as exc:
            return error_response(400, "invalid_messages", str(exc), param="messages")
        if error := too_long(prompt + "".join(q + a for q, a in history), "the conversation"):
            return error
        request = {
            "prompt": prompt,
            "history": history,
            "params": body.sampling(),
            **body.constraint_request(),
        }
        if not body.stream:
            result = await backend.generate(request)
            return composer_error(result["error"]) if "error" in result else api.chat_completion(name, result)

        events = backend.stream(request).__aiter__()
        first = await events.__anext__()  # refusals become a plain JSON error before the stream starts
        if "error" in first:
            return composer_error(first["error"])
        cid, created = api.completion_id(), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            yield api.chunk(cid, name, created, {"role": "assistant", "content": ""})
            async for event in events:
                if "delta" in event:
                    yield api.chunk(cid, name, created, {"content": event["delta"]})
                elif "done" in event:
                    done = event["done"]
                    yield api.chunk(cid, name, created, {}, done["finish_reason"])
                    if include_usage:
                        yield api.chunk(
                            cid,
                            name,
                            created,
                            usage_=api.usage(done["prompt_tokens"], done["completion_tokens"]),
                        )
            yield api.SSE_DONE

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/compose", tags=["music"])
    async def compose(body: api.ComposeRequest) -> Any:
        if (body.prompt is None) == (body.task is None):
            return error_response(
                400, "invalid_request", "give exactly one of prompt and task", param="prompt"
            )
        prompt = body.prompt
        if body.task is not None:
            try:
                prompt = build_task_prompt(Task(body.task.family, body.task.fields))
            except ValueError as exc:
                field = getattr(exc, "field", None)  # prompts.TaskError names the field at fault
                return error_response(
                    400, "invalid_task", str(exc), param=f"task.fields.{field}" if field else "task"
                )
        if error := too_long(prompt + "".join(q + a for q, a in body.history), "the prompt"):
            return error
        params = body.params.model_dump()
        request = {"prompt": prompt, "history": body.history, "params": params, **body.constraint_request()}
        result = await backend.generate(request)
        if "error" in result:
            return composer_error(result["error"])
        abc = analyze_abc(result["text"])
        formats = config.default_formats if body.formats is None else body.formats
        renders = await render(abc["abc"], formats) if formats and abc["abc"] else None
        return {
            "model": name,
            "prompt": prompt,
            "text": result["text"],
            "finish_reason": result["finish_reason"],
            "usage": api.usage(result["prompt_tokens"], result["completion_tokens"]),
            "abc": abc["abc"],
            "tunes": abc["tunes"],
            "extraction": {"found": abc["found"], "message": abc["message"], "issues": abc["issues"]},
            "validation": abc["validation"],
            "render": renders,
        }

    @app.post("/v1/render", tags=["music"])
    async def render_abc(body: api.RenderBody) -> Any:
        if error := too_long(body.abc, "the ABC"):
            return error
        result = await render(body.abc, body.formats, body.tune_index)
        return JSONResponse(result, status_code=200 if result.get("ok") else 422)

    return app


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP ingress: builds the FastAPI app (+ web UI) inside the replica over handles to Composer and Renderer."""

    def __init__(self, composer: DeploymentHandle, renderer: DeploymentHandle, config: ServeAppConfig):
        self.backend = HandleBackend(composer, renderer)
        self.config = config

    def __serve_build_asgi_app__(self):
        app = build_api(self.backend, self.config)
        if self.config.web_ui:
            from chatmusician.serve.webui import mount_ui

            mount_ui(app, self.backend, self.config)  # a static page over this API: no session state
        return app
