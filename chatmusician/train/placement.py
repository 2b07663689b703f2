"""Where a run's workers go, and whether the cluster can ever hold them: one resource-fitting model shared by
training (fail fast before Ray Train waits forever) and Tune (how many trials fit at once).

A worker asks for the profile's CPUs, one GPU on GPU profiles, custom resources and the
``accelerator_type:<X>`` share Ray Train adds for ``ScalingConfig(accelerator_type=X)``. A worker must fit on
one node; a run's workers may spread over nodes. Nodes are their *total* resources (what a run can ever get).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from chatmusician.train.config import TrainConfig, TrainConfigError
from chatmusician.train.profiles import get_profile

EPS = 1e-9


def scaling_config(cfg: TrainConfig):
    """Workers of the profile's kind: one GPU each plus ``accelerator_type:<A800|V100>`` so that Ray places
    pretraining on A800 nodes and SFT on V100 nodes; fractional CPUs on the cpu profile."""
    from ray.train import ScalingConfig

    profile = get_profile(cfg.profile)
    cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else profile.cpus_per_worker
    accelerator = profile.accelerator_type if cfg.accelerator_type is None else (cfg.accelerator_type or None)
    return ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=profile.use_gpu,
        resources_per_worker={
            "CPU": cpus,
            **({"GPU": 1} if profile.use_gpu else {}),
            **cfg.resources_per_worker,
        },
        accelerator_type=accelerator,
    )


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one train worker asks Ray for (see the module docstring)."""
    sc = scaling_config(cfg)
    need = dict(sc.resources_per_worker or {})
    if sc.accelerator_type:
        need[f"accelerator_type:{sc.accelerator_type}"] = 0.001
    return {k: v for k, v in need.items() if v}


def workers_that_fit(need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers needing ``need`` the nodes (their total resources) hold at most."""
    return sum(
        int(min((node.get(k, 0.0) + EPS) // v for k, v in need.items())) if need else 1 << 30
        for node in nodes
    )


def trials_that_fit(cfg: TrainConfig, trial_cpus: float, nodes: list[dict[str, float]]) -> int:
    """Tune trials of ``cfg`` that the nodes hold at once: each is a driver (``trial_cpus`` CPUs, any node) plus
    ``num_workers`` workers that must each fit on a node of the right kind. Counting nodes, not cluster totals,
    is what keeps an SFT sweep on 16 A800 + 8 V100 from starting three trials when the V100s hold one."""
    need = worker_resources(cfg)
    trials = workers_that_fit(need, nodes) // cfg.num_workers
    spare_cpus = sum(n.get("CPU", 0.0) for n in nodes) - need.get("CPU", 0.0) * cfg.num_workers * trials
    while trials and spare_cpus + EPS < trial_cpus * trials:  # the drivers' CPUs come out of the same nodes
        trials -= 1
        spare_cpus += need.get("CPU", 0.0) * cfg.num_workers
    return trials


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def placement_error(cfg: TrainConfig, nodes: list[dict[str, float]]) -> str | None:
    """One line saying why no set of ``nodes`` can hold the run's workers, or None when they can."""
    need = worker_resources(cfg)
    fit = workers_that_fit(need, nodes)
    if fit >= cfg.num_workers:
        return None
    have = sorted({k for n in nodes for k in n if k.startswith("accelerator_type:")}) or ["none"]
    biggest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    too_big = [k for k, v in need.items() if biggest[k] + EPS < v]
    detail = f"; no node has that much {', '.join(too_big)}" if too_big else ""
    return (
        f"{cfg.num_workers} worker(s) of profile {cfg.profile!r} need {need} each, but the cluster's "
        f"{len(nodes)} node(s) hold {fit} (accelerator types: {', '.join(have)}){detail}: "
        "add such nodes, or change profile / accelerator_type / num_workers"
    )


def check_placement(cfg: TrainConfig) -> None:
    """Fail with one clear line when no set of the cluster's nodes can hold the run's workers: Ray Train would
    otherwise retry its worker group forever. ``placement_wait_s`` gives an autoscaling cluster time to add
    nodes first (the check repeats until they fit or the time is up)."""
    deadline = time.monotonic() + cfg.placement_wait_s
    while (error := placement_error(cfg, live_nodes())) is not None:
        if time.monotonic() >= deadline:
            raise TrainConfigError(error)
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


@contextmanager
def connected(log_to_driver: bool = True) -> Iterator[None]:
    """Ray for a train entry point: the caller's, ``RAY_ADDRESS``'s cluster, or a local one started here (and
    shut down after; ``log_to_driver`` False keeps its workers' output off this terminal). Every entry connects
    before it builds a trainer, so the placement check always runs."""
    import ray

    from chatmusician.ray_local import ray_session

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    quiet = {} if log_to_driver else {"logging_level": "ERROR"}  # a person's terminal: no Ray start-up lines
    with ray_session(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=log_to_driver, **quiet):
        yield
