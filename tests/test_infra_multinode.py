"""The `multinode_cluster` fixture: tasks asking for the custom resource land on both worker nodes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import ray


def _rendezvous_and_task():
    """Defined inside a function so Ray ships them by value (workers cannot import tests/)."""

    @ray.remote(num_cpus=0)
    class Rendezvous:
        """Lets tasks wait until all of them are running at the same time."""

        def __init__(self):
            self.arrived = 0

        def arrive(self):
            self.arrived += 1

        def count(self):
            return self.arrived

    def node_of_concurrent_task(rendezvous, expected: int) -> str:
        rendezvous.arrive.remote()
        deadline = time.monotonic() + 120
        while ray.get(rendezvous.count.remote()) < expected:
            assert time.monotonic() < deadline, "the tasks never ran concurrently"
            time.sleep(0.05)
        return ray.get_runtime_context().get_node_id()

    return Rendezvous, node_of_concurrent_task


def test_custom_resource_tasks_run_on_both_worker_nodes(multinode_cluster):
    c = multinode_cluster
    ray.init(address=c.address)
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert set(nodes) == {c.head_node_id, *c.worker_node_ids}
        assert [nodes[w].get(c.worker_resource) for w in c.worker_node_ids] == [1.0, 1.0]
        assert c.worker_resource not in nodes[c.head_node_id]
        assert ray.cluster_resources()[c.worker_resource] == 2.0

        # Each worker has one unit of the resource, so two tasks holding one unit each and
        # running at the same time must be on different workers, and never on the head.
        Rendezvous, node_of_concurrent_task = _rendezvous_and_task()
        rendezvous = Rendezvous.remote()
        task = ray.remote(node_of_concurrent_task).options(num_cpus=0, resources={c.worker_resource: 1})
        placed = ray.get([task.remote(rendezvous, 2) for _ in range(2)], timeout=180)
        assert sorted(placed) == sorted(c.worker_node_ids)
    finally:
        ray.shutdown()


def test_cluster_runs_with_token_auth(multinode_cluster):
    """A driver with a wrong token is turned away by the GCS; with the cluster's token it joins."""
    script = f"import ray; ray.init(address={multinode_cluster.address!r}); print('connected')"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # Ray retries a refused GCS connection once a second for 20 s by default; two tries suffice.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, RAY_gcs_server_port_wait_time_s="2")
    wrong = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert wrong.returncode != 0 and "connected" not in wrong.stdout
    assert "InvalidAuthToken" in wrong.stderr
    env["RAY_AUTH_TOKEN"] = multinode_cluster.token
    right = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert right.returncode == 0 and "connected" in right.stdout, right.stderr[-2000:]
