"""The Renderer Serve deployment: through a DeploymentHandle, over HTTP on its own, and still up after hostile
requests."""

from __future__ import annotations

import base64

import httpx
import pytest
from conftest import free_port

from chatmusician.render import RenderConfig, RenderResult
from chatmusician.render.config import ServeRenderConfig

pytestmark = pytest.mark.integration

APP = "renderer-test"
ROUTE = "/render-test"
TUNE = "X:1\nT:Serve me\nM:4/4\nL:1/4\nQ:1/4=120\nK:G\nG A B c|d4|]\n"


@pytest.fixture(scope="module")
def renderer(ray_cluster):
    from ray import serve
    from ray.serve.context import _get_global_client

    from chatmusician.render.deployment import build_renderer

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _get_global_client().http_config.port  # Serve may already run (started by another module)
    config = RenderConfig(serve=ServeRenderConfig(num_cpus=0.25, min_replicas=1, max_replicas=2))
    try:
        handle = serve.run(build_renderer(config), name=APP, route_prefix=ROUTE)
        yield handle, f"http://127.0.0.1:{port}{ROUTE}"
    finally:
        serve.delete(APP)
        serve.shutdown()


def test_deployment_options_carry_the_autoscaling_bounds():
    from chatmusician.render.deployment import build_renderer, deployment_options

    config = RenderConfig(serve=ServeRenderConfig(num_cpus=0.5, min_replicas=2, max_replicas=7))
    options = deployment_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 0.5}
    assert (
        options["autoscaling_config"]["min_replicas"] == 2
        and options["autoscaling_config"]["max_replicas"] == 7
    )
    deployment = build_renderer(config)._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 7
    assert options["max_queued_requests"] == ServeRenderConfig().max_queued_requests > 0


def test_a_full_queue_refuses_with_backpressure_which_the_ingress_answers_503(renderer):
    """Bounded like the Composer: one replica, one request at a time, a queue of one; the rest are refused."""
    import asyncio

    from ray import serve
    from ray.serve.exceptions import BackPressureError

    from chatmusician.render.deployment import build_renderer
    from chatmusician.serve.backend import HandleBackend

    serve_cfg = ServeRenderConfig(
        num_cpus=0.1, min_replicas=1, max_replicas=1, max_ongoing_requests=1, max_queued_requests=1
    )
    slow = {"abc": TUNE, "formats": ["midi", "wav", "mp3", "svg", "png"]}
    handle = serve.run(
        build_renderer(RenderConfig(serve=serve_cfg)), name="renderer-queue", route_prefix=None
    )
    try:
        responses = [handle.render.remote(slow) for _ in range(6)]
        outcomes = []
        for response in responses:
            try:
                outcomes.append(response.result(timeout_s=120)["ok"])
            except BackPressureError:
                outcomes.append("refused")
        assert outcomes[0] is True and "refused" in outcomes, outcomes
        assert set(outcomes) <= {True, "refused"}, outcomes

        async def through_ingress():
            backend = HandleBackend(None, handle)
            results = await asyncio.gather(*(backend.render(slow) for _ in range(6)), return_exceptions=True)
            return [type(r).__name__ if isinstance(r, Exception) else r["ok"] for r in results]

        kinds = asyncio.run(through_ingress())
        assert "Overloaded" in kinds and set(kinds) <= {True, "Overloaded"}, kinds
    finally:
        serve.delete("renderer-queue")


def test_handle_renders_midi_and_svg(renderer):
    handle, _ = renderer
    data = handle.render.remote({"abc": TUNE, "formats": ["midi", "svg"]}).result(timeout_s=60)
    result = RenderResult.from_json_dict(data)
    assert result.ok, result.errors
    assert result.outputs["midi"].startswith(b"MThd") and b"Serve me" in result.outputs["svg"]
    assert result.duration_s == pytest.approx(4 * 0.5 + 2.0, abs=0.05)


def test_http_renders_and_reports_bad_requests(renderer):
    _, url = renderer
    with httpx.Client(timeout=60) as client:
        good = client.post(url, json={"abc": TUNE, "formats": ["png"]})
        assert good.status_code == 200
        assert base64.b64decode(good.json()["outputs"]["png"]).startswith(b"\x89PNG")
        bad = client.post(f"{url}/", json={"abc": TUNE, "formats": ["flac"]})
        assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "bad_request"
        not_json = client.post(
            f"{url}/", content=b"\xff\x00 not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400 and not_json.json()["errors"][0]["code"] == "bad_request"
        wrong_shape = client.post(f"{url}/", json=["abc"])
        assert wrong_shape.status_code == 400
        assert client.get(url).status_code == 400


def test_service_answers_hostile_inputs_and_stays_up(renderer):
    from test_render_pipeline import HOSTILE

    _, url = renderer
    with httpx.Client(timeout=60) as client:
        for name, abc in HOSTILE.items():
            response = client.post(f"{url}/", json={"abc": abc, "formats": ["midi", "wav", "svg"]})
            assert response.status_code in (200, 422), name
            body = response.json()
            assert body["ok"] or body["errors"], name
            assert "<script" not in base64.b64decode(body["outputs"].get("svg", "")).decode(
                "utf-8", "replace"
            )
        assert client.get(f"{url}/healthz").json() == {"status": "ok"}
        after = client.post(f"{url}/", json={"abc": TUNE, "formats": ["midi"]})
        assert after.status_code == 200 and after.json()["ok"]
