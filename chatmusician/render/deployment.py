"""The Renderer Serve deployment: the render pipeline on a pool of CPU replicas.

Composed by the serving app through a ``DeploymentHandle`` (``await handle.render.remote({abc, formats,
tune_index})`` -> the JSON form of :class:`~chatmusician.render.pipeline.RenderResult`), and usable alone over
HTTP: ``POST {route_prefix}/`` with that JSON (200 when every format rendered, 422 when one failed, 400 for a
malformed request), ``GET {route_prefix}/healthz``.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on the routes.
import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from chatmusician.render.config import RenderConfig, SandboxConfig, ServeRenderConfig
from chatmusician.render.pipeline import issue, render_dict

app = FastAPI(title="ChatMusician renderer", description="ABC -> MIDI, WAV, MP3, SVG, PNG in a sandbox.")


def as_render_config(config: RenderConfig | dict | None) -> RenderConfig:
    """A RenderConfig from itself, None (defaults) or a nested dict (``serve deploy`` YAML args)."""
    if config is None or isinstance(config, RenderConfig):
        return config or RenderConfig()
    nested = {"sandbox": SandboxConfig, "serve": ServeRenderConfig}
    return RenderConfig(**{k: nested[k](**v) if k in nested else v for k, v in config.items()})


@serve.deployment
@serve.ingress(app)
class Renderer:
    """Renders in a worker thread per request: the tools are subprocesses, so the event loop stays free."""

    def __init__(self, config: RenderConfig | dict | None = None):
        self.config = as_render_config(config)

    async def render(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{abc, formats, tune_index}`` -> ``RenderResult.to_json_dict()``; bad input gives ``ok: false``."""
        return await asyncio.to_thread(render_dict, request, self.config)

    @app.post("/")
    async def http_render(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except Exception as exc:  # not JSON at all
            error = issue(
                "bad_request", f"the body must be JSON {{abc, formats, tune_index}}: {exc}", "request"
            )
            return JSONResponse(
                {"ok": False, "outputs": {}, "errors": [error], "warnings": []}, status_code=400
            )
        result = await self.render(body)
        if result["ok"]:
            return JSONResponse(result)
        bad_request = any(e["code"] == "bad_request" for e in result["errors"])
        return JSONResponse(result, status_code=400 if bad_request else 422)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def deployment_options(config: RenderConfig) -> dict[str, Any]:
    """CPU replicas with the autoscaling bounds of ``config.serve``."""
    s = config.serve
    return {
        "ray_actor_options": {"num_cpus": s.num_cpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
    }


def build_renderer(config: RenderConfig | None = None) -> Application:
    """The bound Renderer application (``serve.run(build_renderer(cfg), route_prefix=cfg.serve.route_prefix)``,
    or ``.bind`` it into another app's deployment)."""
    config = config or RenderConfig()
    return Renderer.options(**deployment_options(config)).bind(config)
