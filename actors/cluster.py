"""Joining Ray: the cluster a job was submitted to, or a local one for single-machine runs."""
from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

# one torch thread per worker process unless a stage asks for more: workers share the machine's cores
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect(num_cpus: int | None = None) -> None:
    """ray.init once: attach to RAY_ADDRESS (set by `ray job submit`; `auto` finds a `ray start` cluster on this
    machine), or else start a private local cluster for this run."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": WORKER_ENV})
    logger.info("Ray resources: %s", ray.cluster_resources())
