"""The Renderer Serve deployment: the render pipeline on a pool of CPU replicas.

Composed by the serving app through a ``DeploymentHandle`` (``await handle.render.remote({abc, formats,
tune_index})`` -> the JSON form of :class:`~chatmusician.render.pipeline.RenderResult`), and usable alone over
HTTP when it is an application's ingress: ``POST {route_prefix}`` with that JSON (200 when every format
rendered, 422 when one failed, 400 for a malformed request), ``GET {route_prefix}/healthz``.

HTTP is served by ``__call__`` rather than a FastAPI ``@serve.ingress``: Serve allows one FastAPI ingress per
application, and the serving app's Ingress is that one, so this deployment must compose without one.
"""

import asyncio
import json
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from chatmusician.render.config import RenderConfig, SandboxConfig, ServeRenderConfig
from chatmusician.render.pipeline import issue, render_dict


def as_render_config(config: RenderConfig | dict | None) -> RenderConfig:
    """A RenderConfig from itself, None (defaults) or a nested dict (``serve deploy`` YAML args)."""
    if config is None or isinstance(config, RenderConfig):
        return config or RenderConfig()
    from chatmusician.abc.config import AbcLimits

    nested = {"sandbox": SandboxConfig, "serve": ServeRenderConfig, "limits": AbcLimits}
    return RenderConfig(**{k: nested[k](**v) if k in nested else v for k, v in config.items()})


def _bad_request(message: str) -> JSONResponse:
    error = issue("bad_request", message, "request")
    return JSONResponse({"ok": False, "outputs": {}, "errors": [error], "warnings": []}, status_code=400)


@serve.deployment
class Renderer:
    """Renders in a worker thread per request: the tools are subprocesses, so the event loop stays free."""

    def __init__(self, config: RenderConfig | dict | None = None):
        self.config = as_render_config(config)

    async def render(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{abc, formats, tune_index}`` -> ``RenderResult.to_json_dict()``; bad input gives ``ok: false``."""
        return await asyncio.to_thread(render_dict, request, self.config)

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP: ``GET …/healthz``; ``POST`` a JSON render request."""
        if request.method == "GET" and request.url.path.rstrip("/").endswith("/healthz"):
            return JSONResponse({"status": "ok"})
        if request.method != "POST":
            return _bad_request("POST a JSON object {abc, formats, tune_index}; GET only serves /healthz")
        try:
            body = json.loads(await request.body())
        except ValueError as exc:  # not JSON at all (bad UTF-8 included)
            return _bad_request(f"the body must be JSON {{abc, formats, tune_index}}: {exc}")
        result = await self.render(body)
        if result["ok"]:
            return JSONResponse(result)
        bad_request = any(e["code"] == "bad_request" for e in result["errors"])
        return JSONResponse(result, status_code=400 if bad_request else 422)


def deployment_options(config: RenderConfig) -> dict[str, Any]:
    """CPU replicas with the autoscaling bounds and the queue limit of ``config.serve``."""
    s = config.serve
    return {
        "ray_actor_options": {
            "num_cpus": s.num_cpus,
            **({"resources": dict(s.resources)} if s.resources else {}),
        },
        "max_ongoing_requests": s.max_ongoing_requests,
        # a bounded queue like the Composer's: callers get BackPressureError (the Ingress answers 503)
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
    }


def build_renderer(config: RenderConfig | None = None) -> Application:
    """The bound Renderer: ``serve.run(build_renderer(cfg), route_prefix=cfg.serve.route_prefix)`` to serve it
    alone, or pass it to another deployment's ``.bind`` to compose it."""
    config = config or RenderConfig()
    return Renderer.options(**deployment_options(config)).bind(config)
