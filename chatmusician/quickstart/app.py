"""The running platform: a local Ray for every stage, and stage 8, the Serve app (Ingress -> Composer, Renderer:
REST, OpenAI-compatible API, web UI) on the final model, on a free loopback port."""

from __future__ import annotations

import os
import time

from chatmusician.client import AppClient

APP_NAME = "quickstart"


def start_ray(num_cpus: int) -> bool:
    """A local Ray for every stage (unless the caller has one), with the dashboard on and its address handed to
    every process: Tune's placement-group cleaner asks the State API, and with no address it guesses among the
    Ray instances on the host (chatmusician.tune.sweep.connect does the same). Returns whether it started Ray."""
    import ray
    import ray.data

    from chatmusician.ray_local import free_port, init_local
    from chatmusician.tune.sweep import API_SERVER_ENV

    ray.data.DataContext.get_current().enable_progress_bars = False  # the job prints its own progress
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):  # a running cluster: join it the sweep's way (its dashboard's address)
        from chatmusician.tune.sweep import connect

        return connect()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ[API_SERVER_ENV] = url
    init_local(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=True,  # the workers' output reaches the driver's fds: the log file
        runtime_env={"env_vars": {API_SERVER_ENV: url}},
    )
    return True


def start_app(model: str) -> AppClient:
    """Deploy the app on this Ray and wait until it answers; a client of it."""
    from ray import serve

    from chatmusician.ray_local import free_port
    from chatmusician.serve.app import build_app
    from chatmusician.serve.config import DeploymentOptions, ServeAppConfig

    port = free_port()
    config = ServeAppConfig(
        model=model, port=port, composer=DeploymentOptions(num_cpus=1.0, max_ongoing_requests=16)
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    app = AppClient(f"http://127.0.0.1:{port}")
    app.wait_healthy(deadline_s=300)
    return app


def stop_app() -> None:
    from ray import serve

    serve.delete(APP_NAME)


def stop_ray(started_ray: bool) -> None:
    """Shut down the Ray this job started (a Ray it joined keeps running)."""
    import ray

    if started_ray:
        ray.shutdown()


def serve_until_interrupted(started_ray: bool) -> None:
    """Keep the app up until Ctrl-C, then stop it and the Ray this job started (``keep_serving``)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_app()
        stop_ray(started_ray)
