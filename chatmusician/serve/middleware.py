"""ASGI middleware of the app: a bound on request bodies and the API key check."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from chatmusician.serve import openai_api as api


def error_response(
    status: int, code: str, message: str, headers: dict | None = None, **extra: Any
) -> JSONResponse:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(api.error_body(code, message, type_, **extra), status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or counted when chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        return error_response(413, "request_too_large", f"the request body is over {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read up to the limit, then replay what was read.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


KEY_COOKIE = "chatmusician_api_key"
"""The web UI's copy of the key for the soundfont samples abcjs fetches itself (it cannot add a header)."""


def key_exempt(method: str, path: str, ui_path: str) -> bool:
    """Paths open without the API key: CORS preflights, the health probe, the page and its static files, and
    the API docs; every route that computes (``/v1/*``, ``/ui/api/*``, ``/ui/soundfont/*``) needs the key."""
    ui = "/" + ui_path.strip("/")
    docs = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
    return (
        method == "OPTIONS"
        or path in ("/healthz", ui, ui + "/", *docs)
        or path.startswith((ui + "/static/", "/static-offline-docs/"))
    )


class ApiKeyAuth:
    """ASGI middleware: every request but :func:`key_exempt`'s needs ``Authorization: Bearer <key>``, else 401;
    the UI's soundfont samples also take the key from the page's cookie (abcjs fetches them without headers)."""

    def __init__(self, app, key: str, ui_path: str = "/ui"):
        self.app, self.key, self.ui_path = app, key.encode(), ui_path
        self.samples = "/" + ui_path.strip("/") + "/soundfont/"

    def _cookie(self, scope) -> bytes:
        from http.cookies import SimpleCookie

        cookies = SimpleCookie(dict(scope["headers"]).get(b"cookie", b"").decode("latin-1"))
        return cookies[KEY_COOKIE].value.encode() if KEY_COOKIE in cookies else b""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or key_exempt(scope["method"], scope["path"], self.ui_path):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"].startswith(self.samples):
            if hmac.compare_digest(self._cookie(scope), self.key):
                return await self.app(scope, receive, send)
        code, message = (
            ("invalid_api_key", "the API key is wrong")
            if given
            else ("missing_api_key", "this server needs an API key: 'Authorization: Bearer <key>'")
        )
        response = JSONResponse(
            api.error_body(code, message, "authentication_error"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        return await response(scope, receive, send)
