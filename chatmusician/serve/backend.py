"""What the Ingress talks to: the Composer and the Renderer behind one small interface (:class:`Backend`), over
Serve deployment handles in the app (:class:`HandleBackend`) or any test double."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle


class Overloaded(Exception):
    """The composer's queue is full: the client should retry later (503 + Retry-After)."""


class Backend(Protocol):
    """What the routes need from the deployments (a fake in unit tests, handles in Serve)."""

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def render(self, request: dict[str, Any]) -> dict[str, Any]: ...


def coalesce_deltas(events: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """(choice index, event) in order, with each choice's consecutive ``{"delta"}`` events joined into one
    (fewer SSE chunks when a stream runs ahead of its client; text and order per choice unchanged)."""
    out: list[tuple[int, Any]] = []
    open_delta: dict[int, int] = {}  # choice -> position in out of its delta still open for joining
    for i, event in events:
        if isinstance(event, dict) and set(event) == {"delta"}:
            if i in open_delta:
                at = open_delta[i]
                out[at] = (i, {"delta": out[at][1]["delta"] + event["delta"]})
                continue
            open_delta[i] = len(out)
        else:
            open_delta.pop(i, None)
        out.append((i, event))
    return out


class HandleBackend:
    """The backend over Serve deployment handles; Serve's BackPressureError becomes :class:`Overloaded`."""

    def __init__(self, composer: DeploymentHandle, renderer: DeploymentHandle):
        self.composer, self.renderer = composer, renderer

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.composer.generate.remote(request)
        except BackPressureError as error:
            raise Overloaded(str(error)) from None

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from ray.serve.exceptions import BackPressureError

        events = self.composer.options(stream=True).stream.remote(request)
        try:
            first = await events.__anext__()
        except BackPressureError as error:
            raise Overloaded(str(error)) from None
        yield first
        async for event in events:
            yield event

    async def render(self, request: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.renderer.render.remote(request)
        except BackPressureError as error:
            raise Overloaded(str(error)) from None
