"""Placement and node loss on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``, loopback only).

Used by tests/test_multi_node.py in a subprocess (a process joins one Ray cluster; the test session holds its
own). Nodes, CPU-backed, labelled like cluster.yaml's by the resources Ray gives real ones:

    head     1 CPU, cpu_node                      (driver, Renderer, Ray Data tasks)
    a800-k   1 CPU, 2 GPUs (declared), accelerator_type:A800, trainer_slot   x3
    v100     1 CPU, 2 GPUs (declared), accelerator_type:V100, trainer_slot

Then, in one cluster: tokenize (tasks write the shards) -> pretraining on A800 (2 workers, the reference run) ->
SFT on V100 -> two impossible jobs (clear error, no hang) -> a Renderer replica's actor options -> the same
pretraining again, an A800 node holding a worker removed once checkpoint 2 exists. Prints a JSON report on the
last line: where every train worker bundle was placed, per node label.

    python tests/multi_node_cluster.py CONFIG.pkl OUT_DIR
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["HF_HUB_OFFLINE"] = "1"

CPU, A800, V100 = "cpu_node", "accelerator_type:A800", "accelerator_type:V100"


class BundleWatch:
    """Polls the GCS placement-group table while a run fits: which nodes its worker bundles were placed on.
    Only groups created after the watch began count (the table also keeps earlier runs' removed groups)."""

    def __init__(self, key: str):
        from ray.util import placement_group_table

        self.key, self.nodes, self.groups = key, set(), {}
        self._before = set(placement_group_table())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        from ray.util import placement_group_table

        while not self._stop.is_set():
            for pg_id, pg in placement_group_table().items():
                if pg_id in self._before:
                    continue
                bundles = pg.get("bundles", {})
                placed = pg.get("bundles_to_node_id", {})
                nodes = [placed[i] for i, res in bundles.items() if self.key in res and placed.get(i)]
                if nodes:
                    self.groups[pg_id] = nodes
                    self.nodes.update(nodes)
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tune_fit(pretrain) -> dict:
    """How many A800 sweep trials (2 GPU workers each) the mixed cluster holds at once, by the sweep's own
    count, then that many trials' worth of placement groups as Tune + Train reserve them: every one is placed
    at once (no trial waits), and no A800 GPU is left for another."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from chatmusician.train.placement import live_nodes, worker_resources
    from chatmusician.tune.space import max_concurrent

    trial = replace(pretrain, profile="a800", num_workers=2, cpus_per_worker=0.1, resources_per_worker={})
    concurrent = max_concurrent(trial, 0.01, live_nodes())
    need = worker_resources(trial)
    groups = [placement_group([{"CPU": 0.01}] + [need] * trial.num_workers) for _ in range(concurrent)]
    try:
        ray.get([g.ready() for g in groups], timeout=120)  # all placed: a wait here would fail the run
        left = ray.available_resources()
        return {
            "concurrent": concurrent,
            "placed": len(groups),
            "gpus_left": left.get("GPU", 0.0),
            "totals_would_say": int(ray.cluster_resources()["GPU"] // trial.num_workers),
        }
    finally:
        for g in groups:
            remove_placement_group(g)


def main(config_path: str, out_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from chatmusician.data.pipeline import write_shards
    from chatmusician.render.deployment import deployment_options
    from chatmusician.train.config import TrainConfigError
    from chatmusician.train.recipe import train

    job = pickle.loads(Path(config_path).read_bytes())
    out = Path(out_dir)
    with socket.socket() as s:  # the head's dashboard agent must not take the host-wide default 52365
        s.bind(("127.0.0.1", 0))
        agent_port = s.getsockname()[1]
    base = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    head = {
        **base,
        "resources": {CPU: 1},
        "include_dashboard": False,
        "dashboard_agent_listen_port": agent_port,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    labels = {cluster.head_node.node_id: "cpu"}
    try:
        for k in range(3):
            node = cluster.add_node(**base, num_gpus=2, resources={A800: 1, "trainer_slot": 1})
            labels[node.node_id] = f"a800-{k}"
        labels[cluster.add_node(**base, num_gpus=2, resources={V100: 1, "trainer_slot": 1}).node_id] = "v100"
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        report = {"labels": labels}

        manifest = write_shards(job["tokenize"])  # tasks on every node write into the shared folder
        report["shards"] = len(manifest["shards"])

        pretrain, sft = job["pretrain"], job["sft"]
        with BundleWatch(A800) as watch:
            train(pretrain)
        report["pretrain_nodes"] = sorted(labels[n] for n in watch.nodes)
        with BundleWatch(V100) as watch:
            train(sft)
        report["sft_nodes"] = sorted(labels[n] for n in watch.nodes)

        report["impossible"] = []
        for cfg in (replace(sft, accelerator_type="H100"), replace(pretrain, num_workers=4)):
            start = time.monotonic()
            try:
                train(cfg)
                report["impossible"].append({"error": None})
            except TrainConfigError as err:
                report["impossible"].append({"error": str(err), "seconds": time.monotonic() - start})

        report["tune"] = tune_fit(pretrain)

        @ray.remote
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        options = deployment_options(job["render"])["ray_actor_options"]
        report["renderer_node"] = labels[ray.get(where.options(**options).remote())]

        # Node loss: once step 3 is logged (checkpoint 2 was reported before it began), remove the A800 node that
        # holds one of the run's workers: the node, its raylet and every process on it, not only a worker.
        # Synchronous upload: checkpoint 2 is committed before step 3 starts, so where the run resumes is certain
        # (with the default background upload a node lost mid-upload resumes from the checkpoint before it).
        lossy = replace(pretrain, run_name="node_loss", max_failures=1, async_checkpoint_upload=False)
        run_dir = Path(lossy.storage_path) / lossy.run_name
        metrics = run_dir / "metrics.jsonl"
        removed = {}

        def logged_steps() -> list[int]:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            return [json.loads(line)["step"] for line in lines if line.strip()]

        def remove_a_worker_node(watch: BundleWatch, done: threading.Event):
            while not done.is_set() and not (watch.nodes and 3 in logged_steps()):
                done.wait(0.05)  # a condition poll, not a fixed sleep
            if done.is_set():
                return
            node_id = next(iter(watch.nodes))  # a node holding one of this run's workers
            node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
            removed["steps_logged"] = logged_steps()
            cluster.remove_node(node, allow_graceful=False)
            removed["node"] = labels[node_id]

        done = threading.Event()
        with BundleWatch(A800) as watch:
            killer = threading.Thread(target=remove_a_worker_node, args=(watch, done), daemon=True)
            killer.start()
            try:
                result = train(lossy)
            finally:
                done.set()
                killer.join(timeout=60)
        report["node_loss"] = {
            **removed,
            "groups": [sorted(labels[n] for n in nodes) for nodes in watch.groups.values()],
            "final_step": result.metrics.get("step"),
            "final_checkpoint": Path(result.checkpoint.path).name if result.checkpoint else None,
        }
        (out / "report.json").write_text(json.dumps(report))
        print(json.dumps(report))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
