"""The app's HTTP client against a real loopback server (a tiny http.server speaking the app's wire formats):
errors carry the status and the API's error body, a 422 render is a result, the health wait keeps its deadline."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

from chatmusician.client import ApiError, AppClient

TUNE = "X:1\nT:Test\nM:4/4\nL:1/8\nK:G\nGABc d2e2|]"


class Handler(BaseHTTPRequestHandler):
    healthy_after = 0  # /healthz answers 503 this many times first
    seen: list[tuple[str, str, dict | None, str | None]] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def reply(self, status: int, body) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        Handler.seen.append(("GET", self.path, None, self.headers.get("Authorization")))
        if self.path == "/healthz":
            Handler.healthy_after -= 1
            if Handler.healthy_after >= 0:
                return self.reply(503, {"error": {"code": "overloaded", "message": "starting"}})
            return self.reply(200, {"status": "ok", "model": "chatmusician", "uptime_s": 1})
        if self.path == "/v1/models":
            return self.reply(
                200, {"object": "list", "data": [{"id": "chatmusician"}, {"id": "chatmusician:a"}]}
            )
        self.reply(404, {"error": {"code": "not_found", "message": "Not Found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append(("POST", self.path, body, self.headers.get("Authorization")))
        if self.path == "/v1/compose":
            if "prompt" not in body:
                error = {"type": "invalid_request_error", "code": "invalid_request", "param": "prompt",
                         "message": "give exactly one of prompt and task"}  # fmt: skip
                return self.reply(400, {"error": error})
            render = {"ok": True, "outputs": {"midi": base64.b64encode(b"MThd").decode()}, "errors": []}
            return self.reply(200, {"text": "Here:\n" + TUNE, "abc": TUNE, "finish_reason": "stop",
                                    "usage": {"prompt_tokens": 7, "completion_tokens": 30},
                                    "extraction": {"found": True}, "render": render})  # fmt: skip
        if self.path == "/v1/render":
            if body["formats"] == ["flac"]:
                return self.reply(400, {"error": {"code": "invalid_request", "message": "formats.0: flac"}})
            failed = {"code": "abc2midi_failed", "message": "Error in line 2", "stage": "midi"}
            return self.reply(422, {"ok": False, "outputs": {}, "errors": [failed], "warnings": []})
        if self.path == "/v1/chat/completions":
            return self.reply(500, b"<html>proxy error</html>")
        self.reply(404, {"error": {"code": "not_found", "message": "Not Found"}})


@pytest.fixture
def server():
    Handler.healthy_after, Handler.seen = 0, []
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_compose_and_models_are_typed_and_send_only_what_was_given(server):
    with AppClient(server, api_key="k") as app:
        tune = app.compose(
            "a reel", params={"max_new_tokens": 8}, formats=["midi"], constrained=True, key="G"
        )
        assert app.models() == ["chatmusician", "chatmusician:a"]
    assert (tune.abc, tune.found, tune.completion_tokens, tune.finish_reason) == (TUNE, True, 30, "stop")
    assert tune.render is not None and tune.render.ok and tune.render.outputs["midi"] == b"MThd"
    method, path, body, auth = Handler.seen[0]
    assert (method, path, auth) == ("POST", "/v1/compose", "Bearer k")
    assert body == {"prompt": "a reel", "params": {"max_new_tokens": 8}, "formats": ["midi"],
                    "constrained": True, "history": [], "key": "G"}  # fmt: skip


def test_a_refusal_raises_with_status_code_and_the_apis_error_body(server):
    with AppClient(server) as app:
        with pytest.raises(ApiError) as refused:
            app.compose(task=None)
        with pytest.raises(ApiError) as bad_format:
            app.render(TUNE, ["flac"])
        with pytest.raises(ApiError) as not_json:
            app.chat([{"role": "user", "content": "hi"}])
    err = refused.value
    assert (err.status, err.code, err.body["error"]["param"]) == (400, "invalid_request", "prompt")
    assert str(err) == "/v1/compose answered HTTP 400 invalid_request: give exactly one of prompt and task"
    assert bad_format.value.status == 400 and "flac" in bad_format.value.message
    assert (not_json.value.status, not_json.value.code) == (500, "http_error")
    assert "proxy error" in not_json.value.message


def test_a_tune_the_tools_cannot_render_is_a_result_not_an_error(server):
    with AppClient(server) as app:
        rendered = app.render("X:1\nK:G\nzzz", ["midi"])
    assert not rendered.ok and rendered.outputs == {} and rendered.errors[0]["code"] == "abc2midi_failed"


def test_wait_healthy_polls_until_the_app_answers_200(server):
    Handler.healthy_after = 3
    with AppClient(server) as app:
        assert app.wait_healthy(deadline_s=30, interval_s=0.05)["status"] == "ok"
    assert sum(path == "/healthz" for _, path, _, _ in Handler.seen) == 4


def test_wait_healthy_keeps_its_deadline_and_says_what_it_last_saw(server):
    nothing = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with AppClient(nothing) as app:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"/healthz did not answer 200 within 1 s \(ConnectError\)"):
            app.wait_healthy(deadline_s=1, interval_s=0.1)
        assert time.monotonic() - start < 5
    Handler.healthy_after = 10**6
    with AppClient(server) as app, pytest.raises(TimeoutError, match=r"\(HTTP 503\)"):
        app.wait_healthy(deadline_s=0.5, interval_s=0.1)


def test_wait_healthy_stops_at_once_when_the_server_has_exited(server):
    with AppClient(f"http://127.0.0.1:{free_port()}") as app:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="exited"):
            app.wait_healthy(deadline_s=60, alive=lambda: False)
        assert time.monotonic() - start < 1
