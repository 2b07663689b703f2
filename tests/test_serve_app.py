"""The whole Serve app on the session's local Ray, over real HTTP: Composer (tiny model) + real Renderer + Ingress.

One app for the module (started once); it is shut down at the end so that other modules can start Serve again.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import free_port

from chatmusician.client import ApiError, AppClient
from chatmusician.corpora import nottingham_files

pytestmark = pytest.mark.integration

APP = "chatmusician-test"
OVERLOAD = {"max_ongoing_requests": 8, "max_queued_requests": 4}  # 12 accepted at once, the rest refused


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_model_path):
    from ray import serve

    from chatmusician.serve.app import app_config, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = app_config(
        {
            "model": tiny_model_path,
            "torch_threads": 1,
            "max_new_tokens_cap": 256,
            "web_ui": False,  # the web UI has its own module (test_serve_webui.py)
            "composer": {"num_cpus": 0.5, **OVERLOAD},
            "ingress": {"num_cpus": 0.1},
            "render": {"serve": {"num_cpus": 0.1, "max_replicas": 1}},
        }
    )
    try:
        serve.run(build_app(config), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_healthz_and_the_official_openai_client(base_url):
    import openai

    with AppClient(base_url) as app:
        assert app.health()["status"] == "ok" and app.models() == ["chatmusician"]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["chatmusician"]
    messages = [
        {"role": "user", "content": "Compose a jig."},
        {"role": "assistant", "content": "X:1\nK:G\nGAB|"},
        {"role": "user", "content": "Now a reel."},
    ]
    reply = client.chat.completions.create(model="chatmusician", messages=messages, max_tokens=12, seed=5)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 20  # the history went into the prompt
    stream = client.chat.completions.create(
        model="chatmusician", messages=messages, max_tokens=12, seed=5, stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # same seed: the batch path and the stream path agree
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="chatmusician", messages=messages, max_tokens=257
        )  # over the cap


def test_concurrent_requests_are_batched(base_url):
    from ray import serve

    async def burst():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            body = {
                "model": "chatmusician",
                "messages": [{"role": "user", "content": "Compose a reel."}],
                "max_tokens": 16,
            }
            # No more than max_queued_requests at once: Serve counts a request as queued at the caller until
            # it is assigned a replica, so a larger burst can be refused before the replica sees any of it.
            burst_size = OVERLOAD["max_queued_requests"]
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(burst_size))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text[:300] for r in responses]
    stats = serve.get_deployment_handle("Composer", app_name=APP).stats.remote().result()
    assert stats["largest_batch"] > 1


def test_overload_gives_503_with_retry_after_and_never_another_5xx(base_url):
    async def flood():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            body = {"prompt": "Compose a reel.", "params": {"max_new_tokens": 48}, "formats": []}
            return await asyncio.gather(*(client.post("/v1/compose", json=body) for _ in range(30)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8 and statuses.count(503) >= 1, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"


def test_render_and_compose_through_the_real_renderer(base_url):
    tune = nottingham_files()[0].read_text().strip().split("\n\n")[0]
    with AppClient(base_url, timeout=60) as app:
        rendered = app.render(tune, ["midi", "svg"])
        assert rendered.ok, rendered.errors
        assert rendered.outputs["midi"].startswith(b"MThd") and b"<svg" in rendered.outputs["svg"][:500]
        broken = app.render("X:1\nK:G\n" + "z" * 10, ["wav"], tune_index=3)  # HTTP 422: a result, not raised
        assert not broken.ok and broken.errors[0]["code"]
        composed = app.compose(
            task={"family": "form", "fields": {"form": "AABB"}}, params={"max_new_tokens": 8}
        )
        with pytest.raises(ApiError) as refused:
            app.compose("a reel", task={"family": "form", "fields": {"form": "AABB"}})
    assert (refused.value.status, refused.value.code) == (400, "invalid_request")
    body = composed.body
    assert composed.completion_tokens <= 8
    assert "AABB" in body["prompt"] and isinstance(body["extraction"]["found"], bool)
