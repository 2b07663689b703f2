"""Run one training config on a local two-node Ray cluster (``ray.cluster_utils.Cluster``, loopback only).

Used by tests/test_train_recipe.py in a subprocess, because a process joins one Ray cluster and the test session
already holds the shared one. Each node offers one ``trainer_slot``, so a config asking for one slot per worker
puts one worker on each node. Prints the nodes' slots as JSON on the last line.

    python tests/two_node_train.py CONFIG.pkl
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["HF_HUB_OFFLINE"] = "1"


def main(config_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from chatmusician.train.recipe import train

    cfg = pickle.loads(open(config_path, "rb").read())
    node = {"num_cpus": 2, "resources": {"trainer_slot": 1}, "node_ip_address": "127.0.0.1"}
    with socket.socket() as s:  # the head's dashboard agent must not take the host-wide default 52365
        s.bind(("127.0.0.1", 0))
        agent_port = s.getsockname()[1]
    head = {**node, "include_dashboard": False, "dashboard_agent_listen_port": agent_port}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        train(cfg)
        slots = [n["Resources"].get("trainer_slot", 0) for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"trainer_slots_per_node": sorted(slots)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
