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

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatmusician.abc.analysis import analyze_abc
from chatmusician.prompts import Task, build_task_prompt
from chatmusician.serve import openai_api as api
from chatmusician.serve.backend import Backend, HandleBackend, Overloaded, coalesce_deltas
from chatmusician.serve.config import ServeAppConfig
from chatmusician.serve.middleware import ApiKeyAuth, BodySizeLimit, error_response

log = logging.getLogger("ray.serve")


def composer_error(error: dict[str, Any]) -> JSONResponse:
    return error_response(error.get("status", 400), error["code"], error["message"], param=error.get("param"))


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
    if key := config.api_key or os.environ.get("CHATMUSICIAN_API_KEY"):
        app.add_middleware(ApiKeyAuth, key=key, ui_path=config.ui_path)
    if config.cors_origins:  # added last = outermost: a preflight is answered before the key is asked for
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
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
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)  # details stay in the log
        return error_response(500, "internal_error", "the server failed to answer this request")

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
        """Liveness: the Ingress answers (no auth; the Composer's own health is Serve's probe)."""
        return {"status": "ok", "model": name, "uptime_s": int(time.time()) - started}

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """The served model and its LoRA adapters (ids `chatmusician:<name>`), as OpenAI lists models."""
        return api.models_list(name, started, list(config.lora_adapters))

    @app.get("/v1/models/{model_id:path}", tags=["openai"], response_model=None)
    async def model_card(model_id: str) -> JSONResponse | dict:
        """One model's card; 404 `model_not_found` for an unknown id."""
        served, adapter = api.resolve_model(model_id, name, config.lora_adapters)
        if not served:
            return error_response(404, "model_not_found", f"model {model_id!r} is not served", param="model")
        return api.model_card(f"{name}:{adapter}" if adapter else name, started, name if adapter else None)

    def check_request(body: api.OpenAISampling, route: str) -> tuple[JSONResponse | None, str | None]:
        """A refusal (unknown model, n over max_n) or None, and the adapter the model id names."""
        if unknown := body.unknown_fields():
            log.warning("%s: ignoring unknown fields %s", route, ", ".join(unknown))
        served, adapter = api.resolve_model(body.model, name, config.lora_adapters)
        if not served:
            choices = [name, *(f"{name}:{a}" for a in config.lora_adapters)]
            message = f"model {body.model!r} is not served; use one of {choices}"
            return error_response(404, "model_not_found", message, param="model"), None
        if body.n > config.max_n:
            message = f"n={body.n} is over this server's limit of {config.max_n}"
            return error_response(400, "invalid_parameter", message, param="n"), None
        return None, adapter

    async def generate_all(
        requests: list[dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], JSONResponse | None]:
        """Every request at once (so that they batch); the first refusal wins."""
        results = await asyncio.gather(*(backend.generate(r) for r in requests))
        for result in results:
            if "error" in result:
                return [], composer_error(result["error"])
        return list(results), None

    async def open_streams(requests: list[dict[str, Any]]):
        """One composer stream per request, each past its first event (a refusal -> a JSON error instead)."""
        streams = [backend.stream(r).__aiter__() for r in requests]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))
        for first in firsts:
            if "error" in first:
                for s in streams:
                    await s.aclose()
                return None, [], composer_error(first["error"])
        return streams, [f.get("start", {}).get("prompt_tokens", 0) for f in firsts], None

    async def merged(streams) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(choice index, event) from all streams as they come."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for event in stream:
                    await queue.put((i, event))
                await queue.put((i, None))
            except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_ = len(tasks)
            while open_:
                batch = [await queue.get()]
                while not queue.empty():  # what queued up meanwhile: a choice's deltas in a row become one
                    batch.append(queue.get_nowait())
                for i, event in coalesce_deltas(batch):
                    if isinstance(event, Exception):
                        raise event
                    if event is None:
                        open_ -= 1
                        continue
                    yield i, event
        finally:
            for task in tasks:
                task.cancel()

    def event_stream(
        streams, piece, include_usage: bool, prompt_tokens: int, first_chunks=()
    ) -> StreamingResponse:
        """SSE of ``piece(index, text | None, finish_reason | None, usage | None[, done])`` chunks, then [DONE]; an error
        after the stream started becomes an error event and [DONE]."""

        async def sse() -> AsyncIterator[str]:
            completion_tokens = 0
            try:
                for chunk_ in first_chunks:
                    yield chunk_
                async for index, event in merged(streams):
                    if "delta" in event:
                        yield piece(index, event["delta"], None, None)
                    elif "done" in event:  # the choice's logprobs (if asked) ride on its last chunk
                        completion_tokens += event["done"]["completion_tokens"]
                        yield piece(index, "", event["done"]["finish_reason"], None, event["done"])
                if include_usage:
                    yield piece(0, None, None, api.usage(prompt_tokens, completion_tokens))
            except Exception as exc:  # noqa: BLE001 - the status line is gone: say it in the stream
                log.warning("stream failed", exc_info=exc)  # details in the log, not to the client
                yield api.error_event("stream_failed", "generation failed mid-stream")
            yield api.SSE_DONE

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions", tags=["openai"], response_model=None)
    async def chat_completions(body: api.ChatCompletionRequest) -> JSONResponse | StreamingResponse | dict:
        """OpenAI chat completions (SSE with `stream: true`); `constrained` and its fields make the answer one valid ABC tune."""
        refusal, adapter = check_request(body, "/v1/chat/completions")
        if refusal:
            return refusal
        try:
            prompt, history = api.messages_to_turns(body.messages)
        except ValueError as exc:
            return error_response(400, "invalid_messages", str(exc), param="messages")
        if error := too_long(prompt + "".join(q + a for q, a in history), "the conversation"):
            return error
        requests = [
            {
                "prompt": prompt,
                "history": history,
                "params": body.params(i),
                "defaults": "openai",
                "adapter": adapter,
                **body.constraint_request(),
            }
            for i in range(body.n)
        ]
        if not body.stream:
            results, refusal = await generate_all(requests)
            return refusal or api.chat_completion(body.model, results)

        streams, prompt_tokens, refusal = await open_streams(requests)
        if refusal:
            return refusal
        cid, created = api.completion_id(), int(time.time())

        def piece(index, text, finish, usage_, done=None):
            if usage_ is not None:
                return api.chunk(cid, body.model, created, usage_=usage_)
            logprobs = api.chat_logprobs(done) if done else None
            delta = {"content": text} if text else {}
            return api.chunk(cid, body.model, created, delta, finish, index=index, logprobs=logprobs)

        role = {"role": "assistant", "content": ""}
        starts = [api.chunk(cid, body.model, created, role, index=i) for i in range(body.n)]
        return event_stream(streams, piece, body.include_usage, prompt_tokens[0], starts)

    @app.post("/v1/completions", tags=["openai"], response_model=None)
    async def completions(body: api.CompletionRequest) -> JSONResponse | StreamingResponse | dict:
        """OpenAI completions: text, token ids or a batch of either; `echo` + `logprobs` give prompt log-likelihoods as lm-eval reads them."""
        refusal, adapter = check_request(body, "/v1/completions")
        if refusal:
            return refusal
        prompts = body.prompts()
        if not prompts:
            return error_response(400, "empty_prompt", "the prompt is empty", param="prompt")
        if error := too_long("".join(p for p in prompts if isinstance(p, str)), "the prompt"):
            return error
        echo_top = body.logprobs if body.echo and body.logprobs is not None and not body.stream else None
        requests = [
            {
                "prompt": p,
                "raw": True,
                "params": body.params(i),
                "defaults": "openai",
                "adapter": adapter,
                "prompt_logprobs": echo_top,
            }
            for p in prompts
            for i in range(body.n)
        ]
        texts = [p if isinstance(p, str) else None for p in prompts for _ in range(body.n)]
        if not body.stream:
            results, refusal = await generate_all(requests)
            if refusal:
                return refusal
            choices = []
            for text, result in zip(texts, results, strict=True):
                if text is None and body.echo:  # token-id prompts echo as their decoded text
                    text = result.get("prompt_text", "")
                choices.append((text or "", result, body.echo))
            return api.text_completion(body.model, choices, body.n)

        streams, prompt_tokens, refusal = await open_streams(requests)
        if refusal:
            return refusal
        cid, created = f"cmpl-{api.completion_id()[9:]}", int(time.time())

        def piece(index, text, finish, usage_, done=None):
            if usage_ is not None:
                return api.text_chunk(cid, body.model, created, usage_=usage_)
            logprobs = api.completion_logprobs(done, "", False) if done else None
            return api.text_chunk(cid, body.model, created, text, finish, index=index, logprobs=logprobs)

        firsts = [piece(i, t, None, None) for i, t in enumerate(texts) if body.echo and t]
        return event_stream(streams, piece, body.include_usage, sum(prompt_tokens[:: body.n]), firsts)

    @app.post("/v1/compose", tags=["music"])
    async def compose(body: api.ComposeRequest) -> Any:
        """A prompt or a task (the original's task families) → text, the extracted ABC, its validation and renders; the demo's sampling defaults."""
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
        abc = await asyncio.to_thread(analyze_abc, result["text"])  # the validator: off the event loop
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
        """Render ABC without the model in the sandboxed Renderer (`formats`: midi, wav, mp3, svg, png); 422 when it fails."""
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
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def replica_header(request: Request, call_next):  # which replica answered (ops, tests)
            response = await call_next(request)
            response.headers["X-Replica"] = replica
            return response

        if self.config.web_ui:
            from chatmusician.serve.webui import mount_ui

            mount_ui(app, self.backend, self.config)  # a static page over this API: no session state
        return app
