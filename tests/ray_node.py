"""A second Ray node on this machine, on loopback: ``ray_node.py GCS_ADDRESS GPUS`` starts a raylet of its own that
joins the Ray at GCS_ADDRESS with GPUS declared GPUs and one CPU, and keeps it until this process is terminated.

Why not ``ray start --address``: on Linux ``ray start`` replaces 127.0.0.1 with the machine's interface address
(Ray's cluster mode), and with that mode off it refuses to add a node; Ray's own multi-node tests
(``ray.cluster_utils``) start a node like this, and ``tests/test_ray_cluster.py`` runs this script in a mount
namespace of its own to make a node that cannot see a directory the head sees.
"""

from __future__ import annotations

import os
import signal
import sys
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1: nothing outside this machine is reached

from ray._private.node import Node  # noqa: E402
from ray._private.parameter import RayParams  # noqa: E402


def main(gcs_address: str, gpus: int) -> None:
    params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=gpus,
                       object_store_memory=100 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
                       node_manager_port=0, include_log_monitor=False)
    params.dashboard_agent_listen_port = None  # a free one: the head's agent has the default
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"joined {gcs_address} as node {node.node_id}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit handlers stop the raylet
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
