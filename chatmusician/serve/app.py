"""App builder: ``import_path: chatmusician.serve.app:build_app`` in serve_config.yaml, ``chatmusician serve``.

``args`` (the YAML's ``args:``) are the fields of :class:`~chatmusician.serve.config.ServeAppConfig`, checked by
jsonargparse exactly like the CLI's flags. Resources set here are defaults: serve_config.yaml's
``deployments:`` entries (Composer, Renderer, Ingress) override them, as Serve does for any app; replica counts
and autoscaling live there only.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from chatmusician.config import make_parser, namespace_to_config
from chatmusician.serve.config import DeploymentOptions, ServeAppConfig


def app_config(args: dict[str, Any] | ServeAppConfig | None = None) -> ServeAppConfig:
    """A typed config from ``serve deploy`` args (nested dicts allowed); unknown or ill-typed keys -> error."""
    if isinstance(args, ServeAppConfig):
        return args
    parser = make_parser(ServeAppConfig)
    config = namespace_to_config(ServeAppConfig, parser.parse_object(args or {}), parser)
    for name in ("max_batch_size", "concurrent_batches"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    return config


def _options(o: DeploymentOptions, retry_after_s: int) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": o.num_cpus, "num_gpus": o.num_gpus},
        "max_ongoing_requests": o.max_ongoing_requests,
        "max_queued_requests": o.max_queued_requests,
        # Serve's own 503 (queue at the proxy full) carries Retry-After too.
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
    }


def composer_capacity(config: ServeAppConfig) -> int:
    """The Composer's ``max_ongoing_requests``: as configured, or (0) sized from the engine's own capacity."""
    if config.composer.max_ongoing_requests:
        return config.composer.max_ongoing_requests
    if config.engine == "vllm":  # vLLM schedules max_num_seqs; the rest wait inside it, not at Serve
        return 2 * config.vllm.max_num_seqs
    return (
        config.concurrent_batches + 1
    ) * config.max_batch_size  # the batches generating, the next assembling


def vllm_python(setting: str) -> str:
    """The vLLM environment's interpreter: env CHATMUSICIAN_VLLM_PYTHON, else the setting (relative to the
    working directory; '' = this interpreter); FileNotFoundError names the setting when it is missing."""
    import os
    import sys
    from pathlib import Path

    python = os.environ.get("CHATMUSICIAN_VLLM_PYTHON") or setting or sys.executable
    path = Path(python).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


def composer_options(config: ServeAppConfig) -> dict[str, Any]:
    """The Composer's deployment options; the vllm engine's replica runs in the vLLM environment
    (``runtime_env`` ``py_executable``: vLLM pins its own torch and transformers, see docs/serving/engines.md)."""
    options = _options(config.composer, config.retry_after_s)
    options["max_ongoing_requests"] = composer_capacity(config)
    if config.engine == "vllm":
        from chatmusician.serve.engines.vllm_env import runtime_env

        options["ray_actor_options"]["runtime_env"] = runtime_env(
            vllm_python(config.vllm.python), config.vllm.kv_cache_gib
        )
    return options


def build_app(args: dict[str, Any] | ServeAppConfig | None = None) -> Application:
    """Ingress -> (Composer, Renderer), bound with the config's resources."""
    from chatmusician.render.deployment import build_renderer
    from chatmusician.serve.composer import Composer
    from chatmusician.serve.ingress import Ingress

    config = app_config(args)
    composer = Composer.options(**composer_options(config)).bind(config)
    renderer = build_renderer(config.render)  # CPU pool with the render config's autoscaling bounds
    return Ingress.options(**_options(config.ingress, config.retry_after_s)).bind(composer, renderer, config)


def run_serve(config: ServeAppConfig) -> None:
    """CLI entry: run the app on a local Ray (started here when none is running) until Ctrl-C."""
    import os
    import signal
    import time

    import ray
    from ray import serve

    os.environ.setdefault(
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"
    )  # keep listeners on loopback (docs/TOOLS.md)
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), _node_ip_address="127.0.0.1")

    def stop(
        signum, frame
    ):  # SIGTERM takes SIGINT's path: serve.shutdown and ray.shutdown stop every process
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler would exit past the shutdowns
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        print(
            f"ChatMusician serving on http://{config.host}:{config.port} (docs: /docs, UI: {config.ui_path})"
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
