"""Connecting to Ray the same way in every workflow: the cluster in ``RAY_ADDRESS``, else a local one on loopback.

A local cluster must coexist with others on the host (a user's second job, a test session): every listener on
127.0.0.1 and on free ports. Ray's dashboard agent listens on 52365 unless told otherwise, and ``ray.init``
cannot tell it, so a second local cluster would die at start-up (raylet: "Timed out waiting for file ...
metrics_agent_port"; agent: "address already in use"): :func:`own_dashboard_agent_port` gives it a free one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_dashboard_agent_port() -> None:
    """Make this process's next local cluster's dashboard agent take a free port (the default of Ray's node
    parameters, the one ``ray.init`` leaves unset)."""
    import inspect

    from ray._private import parameter

    init = parameter.RayParams.__init__
    params = inspect.signature(init).parameters.values()
    names = [p.name for p in params if p.default is not inspect.Parameter.empty]
    defaults = list(init.__defaults__)
    defaults[names.index("dashboard_agent_listen_port")] = free_port()
    init.__defaults__ = tuple(defaults)


def init_local(**kwargs) -> None:
    """Start a local Ray with every listener on loopback and a free dashboard-agent port."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every listener on loopback
    own_dashboard_agent_port()
    options = {"address": "local", "include_dashboard": False, "log_to_driver": False}
    ray.init(**{**options, "_node_ip_address": "127.0.0.1", **kwargs})


@contextmanager
def ray_session(**local_kwargs) -> Iterator[bool]:
    """Use the caller's Ray, the cluster in ``RAY_ADDRESS``, or a local one (``local_kwargs`` go to
    ``ray.init``); shut down only what was started here. Yields whether Ray was started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            init_local(**local_kwargs)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
