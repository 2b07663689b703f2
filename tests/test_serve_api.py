"""The HTTP routes without Ray: build_api over an in-process backend (echo engine + a recording fake renderer)."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from chatmusician.prompts import musical_form
from chatmusician.serve.backend import Overloaded, coalesce_deltas
from chatmusician.serve.composer import Composer
from chatmusician.serve.config import ServeAppConfig
from chatmusician.serve.ingress import build_api
from chatmusician.serve.openai_api import ChatMessage, messages_to_turns

TUNE = "X:1\nT:Test\nM:4/4\nL:1/8\nK:G\nGABc d2e2|f2g2 a4|]"


class LocalBackend:
    """The real Composer (its class, without a Serve replica) over the echo engine; a recording fake renderer."""

    def __init__(self, config: ServeAppConfig):
        self.config, self.composer = config, Composer.func_or_class(config)
        self.renders: list[dict] = []
        self.overloaded = False

    async def generate(self, request):
        if self.overloaded:
            raise Overloaded("queue full")
        return await self.composer.generate(request)

    async def stream(self, request):
        if self.overloaded:
            raise Overloaded("queue full")
        async for event in self.composer.stream(request):
            yield event

    async def render(self, request):
        self.renders.append(request)
        outputs = {f: base64.b64encode(f.encode()).decode() for f in request["formats"]}
        return {"ok": "K:" in request["abc"], "outputs": outputs, "errors": [], "warnings": []}


CONFIG = ServeAppConfig(engine="echo", max_new_tokens_cap=100, max_body_bytes=20_000, max_prompt_chars=5_000)


@pytest.fixture()
def backend():
    return LocalBackend(CONFIG)


@pytest.fixture()
def client(backend):
    with TestClient(build_api(backend, CONFIG)) as c:
        yield c


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


def test_healthz_models_and_openapi(client):
    assert client.get("/healthz").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["chatmusician"] and models["object"] == "list"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/compose", "/v1/render", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_docs_work_offline_with_assets_served_by_the_app(client):
    import re

    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
        assert assets and not [a for a in assets if "://" in a], assets  # no CDN
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 1000, asset
    docs_assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", client.get("/docs").text)
    bundle = client.get(next(a for a in docs_assets if a.endswith("swagger-ui-bundle.js")))
    assert b"SwaggerUIBundle" in bundle.content


def test_compose_returns_text_abc_validation_and_requested_renders(client, backend):
    body = client.post(
        "/v1/compose", json={"prompt": f"Here:\n{TUNE}\nEnjoy", "formats": ["png", "mp3"]}
    ).json()
    assert body["text"].startswith("Here:") and body["abc"].startswith("X:1\nT:Test")
    assert body["extraction"]["found"] and isinstance(body["validation"], list)
    assert set(body["render"]["outputs"]) == {"png", "mp3"} and backend.renders[-1]["abc"] == body["abc"]
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    # The server's default formats apply when the request names none; [] renders nothing.
    assert backend.renders and client.post("/v1/compose", json={"prompt": TUNE}).json()["render"][
        "outputs"
    ].keys() == {
        "svg",
        "midi",
    }
    assert client.post("/v1/compose", json={"prompt": TUNE, "formats": []}).json()["render"] is None


def test_compose_without_abc_renders_nothing_and_says_so(client, backend):
    body = client.post("/v1/compose", json={"prompt": "just words"}).json()
    assert body["abc"] is None and body["render"] is None and not body["extraction"]["found"]
    assert body["extraction"]["message"] and not backend.renders


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"chords": 5}, "chords"),
        ({"chords": []}, "chords"),
        ({"chords": ["C", 7]}, "chords"),
        ({"description": ["M", "6/8"]}, "description"),
        ({"description": {"M": {"nested": 1}}}, "description"),
        ({"form": None}, "form"),
    ],
)
def test_compose_task_fields_of_the_wrong_type_are_400_naming_the_field(client, fields, field):
    family = {"chords": "chords", "description": "text_to_music", "form": "form"}[field]
    response = client.post("/v1/compose", json={"task": {"family": family, "fields": fields}})
    error = assert_error(response, 400, "invalid_task")
    assert error["param"] == f"task.fields.{field}" and repr(field) in error["message"]


def test_compose_task_uses_the_prompt_builders(client):
    body = client.post("/v1/compose", json={"task": {"family": "form", "fields": {"form": "AABB"}}}).json()
    assert body["prompt"] == musical_form("AABB") == body["text"]  # the echo engine answers with the prompt
    assert_error(
        client.post("/v1/compose", json={"task": {"family": "fugue", "fields": {}}}), 400, "invalid_task"
    )
    error = assert_error(client.post("/v1/compose", json={"task": {"family": "form"}}), 400, "invalid_task")
    assert "form" in error["message"]
    assert_error(
        client.post("/v1/compose", json={"prompt": "a", "task": {"family": "form"}}), 400, "invalid_request"
    )
    assert_error(client.post("/v1/compose", json={}), 400, "invalid_request")


def test_compose_history_reaches_the_composer(client):
    body = client.post(
        "/v1/compose", json={"prompt": "again", "history": [["q1", "a1"]], "formats": []}
    ).json()
    # echo: prompt tokens are the templated conversation's words
    assert body["usage"]["prompt_tokens"] == len(
        "Human: q1 </s> Assistant: a1 </s> Human: again </s> Assistant: ".split()
    )


@pytest.mark.parametrize(
    "payload, status, code",
    [
        ({"prompt": "x", "params": {"max_new_tokens": 101}}, 400, "invalid_parameter"),  # over the cap
        ({"prompt": "x", "params": {"temperature": -1}}, 400, "invalid_request"),  # schema range
        ({"prompt": "x", "params": {"beams": 2}}, 400, "invalid_request"),  # unknown parameter
        ({"prompt": "x", "formats": ["pdf"]}, 400, "invalid_request"),
        ({"prompt": "   "}, 400, "empty_prompt"),
        ({"prompt": "word " * 1100}, 413, "input_too_long"),  # over max_prompt_chars
    ],
)
def test_bad_compose_requests_get_structured_errors(client, payload, status, code):
    assert_error(client.post("/v1/compose", json=payload), status, code)


def test_malformed_json_oversized_bodies_and_unknown_routes(client):
    assert_error(
        client.post("/v1/compose", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_request",
    )
    assert_error(client.post("/v1/compose", json={"prompt": "x" * 30_000}), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is counted while reading
        for _ in range(30):
            yield b"x" * 1000

    assert_error(
        client.post("/v1/render", content=chunked(), headers={"content-type": "application/json"}),
        413,
        "request_too_large",
    )
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/compose"), 405, "method_not_allowed")


def test_overload_is_503_with_retry_after(client, backend):
    backend.overloaded = True
    response = client.post("/v1/compose", json={"prompt": "x"})
    assert_error(response, 503, "overloaded")
    assert response.headers["retry-after"] == str(CONFIG.retry_after_s)
    stream = client.post(
        "/v1/chat/completions",
        json={"model": "chatmusician", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    assert_error(stream, 503, "overloaded")


def test_render_route(client, backend):
    ok = client.post("/v1/render", json={"abc": TUNE, "formats": ["svg"]})
    assert ok.status_code == 200 and ok.json()["outputs"].keys() == {"svg"}
    assert (
        client.post("/v1/render", json={"abc": "no key"}).status_code == 422
    )  # render failed: 422 + its errors
    assert_error(client.post("/v1/render", json={"abc": ""}), 400, "invalid_request")


def test_messages_to_turns():
    m = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="q1"),
        ChatMessage(role="assistant", content="a1"),
        ChatMessage(role="user", content=[{"type": "text", "text": "q2"}]),
        ChatMessage(role="user", content="more"),
    ]
    assert messages_to_turns(m) == ("q2\nmore", [("Be brief.\nq1", "a1")])
    with pytest.raises(ValueError):
        messages_to_turns([ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a")])
    with pytest.raises(ValueError):
        messages_to_turns([ChatMessage(role="assistant", content="a"), ChatMessage(role="user", content="q")])


def test_chat_completions_plain_and_streamed(client):
    request = {
        "model": "chatmusician",
        "messages": [{"role": "user", "content": "la la la"}],
        "max_tokens": 2,
    }
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "la la ",
    }
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "la la " and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert_error(
        client.post("/v1/chat/completions", json={**request, "model": "gpt-4"}), 404, "model_not_found"
    )
    assert_error(client.post("/v1/chat/completions", json={**request, "n": 9}), 400, "invalid_parameter")
    bad_turns = {**request, "messages": [{"role": "assistant", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=bad_turns), 400, "invalid_messages")
    over_cap = {**request, "max_tokens": 101, "stream": True}
    assert_error(client.post("/v1/chat/completions", json=over_cap), 400, "invalid_parameter")


def test_official_openai_client_against_the_app(client):
    import openai

    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    assert [m.id for m in oa.models.list()] == ["chatmusician"]
    reply = oa.chat.completions.create(
        model="chatmusician", messages=[{"role": "user", "content": "do re mi"}], extra_body={"top_k": 5}
    )
    assert reply.choices[0].message.content == "do re mi"
    streamed = oa.chat.completions.create(
        model="chatmusician", messages=[{"role": "user", "content": "fa so"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "fa so"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(
            model="chatmusician", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert err.value.status_code == 400 and isinstance(err.value.body, dict)


def test_api_key_cors_unknown_fields_and_a_failure_mid_stream():
    config = dataclasses.replace(CONFIG, api_key="sesame", cors_origins=["https://app.example.org"])
    backend = LocalBackend(config)
    request = {"model": "chatmusician", "messages": [{"role": "user", "content": "la la"}], "logit_bias": {}}
    with TestClient(build_api(backend, config)) as c:
        assert_error(c.post("/v1/chat/completions", json=request), 401, "missing_api_key")
        wrong = c.post("/v1/chat/completions", json=request, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "invalid_api_key")
        auth = {"Authorization": "Bearer sesame"}
        ok = c.post("/v1/chat/completions", json=request, headers=auth)  # unknown logit_bias: ignored
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "la la"
        assert c.get("/healthz").status_code == 200  # not under /v1
        preflight = c.options(
            "/v1/chat/completions",
            headers={"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.org"

        async def failing(_request):
            yield {"start": {"prompt_tokens": 1}}
            yield {"delta": "la "}
            raise RuntimeError("replica died")

        backend.stream = failing
        with c.stream("POST", "/v1/chat/completions", json={**request, "stream": True}, headers=auth) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "stream_failed"


def test_coalesce_deltas_joins_each_choices_consecutive_deltas_and_keeps_their_order():
    done = {"done": {"finish_reason": "stop"}}
    events = [(0, {"delta": "X:"}), (1, {"delta": "K:"}), (0, {"delta": "1\n"}), (0, done), (0, {"delta": "?"}),
              (1, {"delta": "G"}), (1, None)]  # fmt: skip
    assert coalesce_deltas(events) == [
        (0, {"delta": "X:1\n"}), (1, {"delta": "K:G"}), (0, done), (0, {"delta": "?"}), (1, None),
    ]  # fmt: skip
    assert coalesce_deltas([]) == [] and coalesce_deltas([(0, done)]) == [(0, done)]


def test_api_key_covers_every_computing_route_and_the_page_stays_open():
    from chatmusician.serve.webui import mount_ui

    config = dataclasses.replace(CONFIG, api_key="sesame")
    backend = LocalBackend(config)
    auth = {"Authorization": "Bearer sesame"}
    with TestClient(mount_ui(build_api(backend, config), backend, config)) as c:
        assert c.get("/ui/").status_code == 200 and c.get("/ui/static/app.js").status_code == 200
        assert c.get("/healthz").status_code == 200
        assert_error(c.post("/ui/api/analyze", json={"text": TUNE}), 401, "missing_api_key")
        assert c.post("/ui/api/analyze", json={"text": TUNE}, headers=auth).status_code == 200
        sample = "/ui/soundfont/violin-mp3/Db4.mp3"
        assert_error(c.get(sample), 401, "missing_api_key")  # no render for a client without the key
        assert not backend.renders
        c.cookies.set("chatmusician_api_key", "sesame")  # the page's cookie (abcjs sends no header)
        assert c.get(sample).status_code != 401 and backend.renders
        assert_error(c.post("/ui/api/analyze", json={"text": TUNE}), 401, "missing_api_key")  # header only


def test_a_failure_answers_a_generic_500_and_keeps_the_details_in_the_log(client, backend):
    async def failing(_request):
        raise RuntimeError("secret stack detail")

    backend.generate = failing
    request = {"model": "chatmusician", "messages": [{"role": "user", "content": "x"}]}
    failed = TestClient(client.app, raise_server_exceptions=False).post("/v1/chat/completions", json=request)
    assert_error(failed, 500, "internal_error")
    assert "secret" not in failed.text and "RuntimeError" not in failed.text


def test_openai_bodies_are_valid_openai_types(client):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    chat = {"model": "chatmusician", "messages": [{"role": "user", "content": "la la la"}], "n": 2}
    ChatCompletion.model_validate(client.post("/v1/chat/completions", json=chat).json(), strict=True)
    body = {"model": "chatmusician", "prompt": ["la la", "do re mi"], "n": 2, "logprobs": 1}
    Completion.model_validate(client.post("/v1/completions", json=body).json(), strict=True)
    # echo: the prompt's first token has a null logprob (as OpenAI's and vLLM's; the openai types say float)
    completion = client.post("/v1/completions", json={**body, "echo": True}).json()
    once = client.post("/v1/completions", json={**body, "n": 1}).json()["usage"]["prompt_tokens"]
    assert completion["usage"]["prompt_tokens"] == once  # each prompt counted once, whatever n
    choice = completion["choices"][0]
    starts, text = choice["logprobs"]["text_offset"], choice["text"]
    answer = [text[a:b] for a, b in zip(starts[-2:], [starts[-1], len(text)], strict=True)]
    assert answer == ["la ", "la"]  # the answer's offsets index the returned text, after the echoed prompt
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    for event in events:
        ChatCompletionChunk.model_validate(json.loads(event), strict=True)


def test_health_probe_never_waits_behind_a_request_in_flight():
    import asyncio

    composer = Composer.func_or_class(dataclasses.replace(CONFIG, health_probe_idle_s=0.0))

    async def scenario():
        stream = composer.stream({"prompt": "la la la", "params": {}})
        assert "start" in await stream.__anext__() and "delta" in await stream.__anext__()
        await composer.check_health()  # a request is generating: no probe behind it
        during = composer.stats()["probes"]
        async for _ in stream:
            pass
        await composer.check_health()
        return during, composer.stats()["probes"]

    assert asyncio.run(scenario()) == (0, 1)
