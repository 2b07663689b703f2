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
