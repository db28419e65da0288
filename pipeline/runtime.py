"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import os

import ray


def init_ray(
    address: str | None = None, num_cpus: int | None = None, worker_env: dict[str, str] | None = None, **kwargs
) -> None:
    """Join the cluster when there is one, else start an embedded local Ray.

    Under `ray job submit` the driver runs on the head with RAY_ADDRESS set, so it joins that
    cluster. Otherwise (a laptop, a test) an embedded Ray is started; "local" makes sure a
    cluster left running on this machine by `ray start` is not joined by accident.

    worker_env: environment variables for the workers of an embedded Ray, which inherit the
    driver's environment when it starts them (a variable the user has set is kept). A cluster's
    workers are started by the cluster, so there they must be set where the cluster is started.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == "local":
        for name, value in (worker_env or {}).items():
            os.environ.setdefault(name, value)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=kwargs.pop("log_to_driver", True),
            **kwargs,
        )
    else:
        ray.init(address=address, **kwargs)


def cluster_resources() -> dict[str, float]:
    """What the cluster this process joined has in all (CPU, GPU, custom resources)."""
    return {k: float(v) for k, v in ray.cluster_resources().items()}
