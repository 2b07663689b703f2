"""serve_config.yaml: valid for Serve and for build_app (its `serve deploy` against a real `ray start --head`, with
the model the job chain made: tests/test_job_chain.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_serve_config_passes_serves_schema_and_build_app():
    from ray.serve.schema import ServeDeploySchema

    from chatmusician.serve.app import app_config, build_app

    schema = ServeDeploySchema.model_validate(load_config())
    (app,) = schema.applications
    assert app.import_path == "chatmusician.serve.app:build_app"
    deployments = {d.name: d for d in app.deployments}
    assert deployments["Composer"].ray_actor_options.num_gpus == 1
    assert not deployments["Renderer"].ray_actor_options.num_gpus
    assert all(d.autoscaling_config for d in deployments.values())
    assert "working_dir" not in (app.runtime_env or {})
    config = app_config(app.args)
    assert (config.generation.temperature, config.generation.max_new_tokens) == (0.2, 1536)
    build_app(app.args)  # binds Ingress -> (Composer, Renderer) without a cluster
    with pytest.raises(SystemExit):  # jsonargparse refuses unknown args with a message naming them
        app_config({**app.args, "modle": "typo"})


def test_gpu_vllm_serve_config_is_valid_and_sized_for_vllm():
    from ray.serve.schema import ServeDeploySchema

    from chatmusician.serve.app import app_config, build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.vllm.yaml").read_text()))
    (app,) = schema.applications
    config = app_config(app.args)
    composer = {d.name: d for d in app.deployments}["Composer"]
    assert config.engine == "vllm" and config.vllm.enforce_eager is None  # CUDA graphs on a GPU
    assert composer.max_ongoing_requests >= 2 * config.vllm.max_num_seqs  # never caps vLLM's batch
    build_app(app.args)


@pytest.mark.integration
def test_serve_command_stopped_with_sigterm_leaves_no_process(tmp_path, tiny_model_path):
    """SIGTERM (what a process manager sends) stops everything `chatmusician serve` started, as Ctrl-C does:
    no Ray agent, raylet or worker outlives the command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from conftest import free_port

    from chatmusician.client import AppClient

    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "chatmusician.cli", "serve", "--engine", "echo", "--port", str(port),
               "--model", tiny_model_path,
               "--web_ui", "false", "--composer.num_cpus", "0.1", "--ingress.num_cpus", "0.1"]  # fmt: skip
    server = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True)
    try:
        with AppClient(f"http://127.0.0.1:{port}") as app:
            app.wait_healthy(deadline_s=240, alive=lambda: server.poll() is None)
        started = psutil.Process(server.pid).children(recursive=True)
        assert started and server.poll() is None
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) is not None

        def alive(process: psutil.Process) -> bool:
            try:
                return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(p) for p in started):
            time.sleep(0.5)
        left = [" ".join(p.cmdline()[:2]) for p in started if alive(p)]
        assert not left, left
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
