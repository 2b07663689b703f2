"""serve_config.yaml: valid for Serve and for build_app; and `serve deploy` of it against a real `ray start --head`.

The deploy test starts its own head node on free ports with its own --temp-dir (so that no other Ray driver on
this machine finds it), and stops only that node's processes: a bare `ray stop` would kill every Ray on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


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


def own_processes(temp_dir: str):
    """The processes of the head node started with ``temp_dir`` (their command lines name it) and their children."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in me and any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                roots.append(proc)
        except psutil.Error:
            continue
    found = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                found.setdefault(proc.pid, proc)
        except psutil.Error:
            continue
    return [p for pid, p in found.items() if pid not in me]


def stop_own_head(temp_dir: str) -> None:
    """`ray stop` for one node only: SIGTERM its processes, SIGKILL what is left after a grace period."""
    import psutil

    procs = own_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.mark.integration
def test_serve_deploy_on_ray_start_head(tmp_path, tiny_model_path):
    temp_dir = tempfile.mkdtemp(prefix="cm-serve-", dir="/tmp")  # short: Ray's socket paths must stay short
    gcs_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every listener on loopback
        "RAY_AUTH_MODE": "token",  # CLI clients need it with 2.60's token auth (docs/TOOLS.md)
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{dashboard_port}"

    config = load_config()
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    # CPU override for the tiny model: no GPU, fractional CPUs, one replica each.
    app["args"] |= {
        "model": tiny_model_path,
        "precision": "fp32",
        "device": "cpu",
        "torch_threads": 1,
        "web_ui": False,
    }
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.25, "num_gpus": 0}
        deployment["autoscaling_config"] |= {"min_replicas": 1, "max_replicas": 1}
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
             "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        deployed = subprocess.run(
            [SERVE, "deploy", str(config_path), "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        url = f"http://127.0.0.1:{http_port}"
        deadline, health = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert health is not None and health.status_code == 200, "the app never became healthy"
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "chatmusician",
                "messages": [{"role": "user", "content": "Compose a jig."}],
                "max_tokens": 8,
            },
            timeout=120,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 8
        status = subprocess.run(
            [SERVE, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
        )
        assert "RUNNING" in status.stdout and "Composer" in status.stdout
    finally:
        stop_own_head(temp_dir)
        assert not own_processes(temp_dir), "processes of our head node survived"
        subprocess.run(["rm", "-rf", temp_dir], check=False)
