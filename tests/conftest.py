"""Shared fixtures: offline settings, the tiny model, and ONE local Ray cluster for the whole session.

A Ray cluster per test costs seconds of start-up on 2 cores, so every integration test that needs Ray takes
``ray_cluster``; tests that need their own cluster (``ray start`` for job submission) start it on free ports.
"""

from __future__ import annotations

import os
import socket

import pytest

# Keep every Ray listener on loopback (docs/TOOLS.md) and never reach a model hub from tests.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray gives its dashboard 60 s to come up; on a loaded 2-core host that is not always enough.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The cached nano LLaMA + tokenizer (built once, ~10 s)."""
    from chatmusician.model.tiny import ensure_tiny

    return str(ensure_tiny("nano"))


def own_dashboard_agent_port() -> None:
    """Ray's dashboard agent listens on 52365 unless told otherwise, and ``ray.init`` cannot tell it: a second
    cluster on the host then dies at start-up (raylet: "Timed out waiting for file ... metrics_agent_port",
    the agent: "address already in use"). Make this process's next local cluster take a free port instead."""
    import inspect

    from ray._private import parameter

    init = parameter.RayParams.__init__
    names = [
        p for p in inspect.signature(init).parameters.values() if p.default is not inspect.Parameter.empty
    ]
    defaults = list(init.__defaults__)
    defaults[[p.name for p in names].index("dashboard_agent_listen_port")] = free_port()
    init.__defaults__ = tuple(defaults)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session: 4 logical CPUs so that Data tasks never starve 2 train workers
    (docs/TOOLS.md), the dashboard on a free port (Tune needs it), everything on loopback."""
    import ray

    if not ray.is_initialized():
        own_dashboard_agent_port()
        ray.init(
            address="local",  # never attach to a cluster another `ray start` left in /tmp/ray
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    yield ray
    from contextlib import suppress

    with suppress(Exception):
        from ray import serve

        serve.shutdown()
    ray.shutdown()
