"""Joining Ray: the cluster a job was submitted to, or a local one for single-machine runs."""
from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

# one torch thread per worker process unless a stage asks for more: workers share the machine's cores
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def local_cpus() -> int:
    """Logical CPUs of a private local cluster: two more than the cores, so that a trainer's two workers and the
    Ray Data tasks that feed them can all be scheduled on a 2-core laptop (they mostly wait on each other);
    ANYTOKEN_LOCAL_CPUS sets it."""
    return int(os.environ.get("ANYTOKEN_LOCAL_CPUS", (os.cpu_count() or 1) + 2))


def connect(num_cpus: int | None = None) -> None:
    """ray.init once: attach to RAY_ADDRESS (set by `ray job submit`; `auto` finds a `ray start` cluster on this
    machine), or else start a private local cluster for this run."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus or local_cpus(), runtime_env={"env_vars": WORKER_ENV})
    logger.info("Ray resources: %s", ray.cluster_resources())


# --- pools: a cluster's node groups, told apart by node labels (cluster/*.yaml: pool=data, pool=gpu) ------------
def selects(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Whether a node with `labels` satisfies a Ray label selector: `value`, `!value`, `in(a,b)` or `!in(a,b)`."""
    for key, want in selector.items():
        negate = want.startswith("!")
        body = want[1:] if negate else want
        values = [v.strip() for v in body[3:-1].split(",")] if body.startswith("in(") and body.endswith(")") else [body]
        if (labels.get(key) in values) == negate:
            return False
    return True


def pool_cpus(selector: dict[str, str] | None, work: str) -> float:
    """CPUs of the alive nodes a label selector admits (every node when it is empty). No such node is said, not
    refused: on an autoscaling cluster it means the pool has not started yet, and `work` waits for it."""
    nodes = [n for n in ray.nodes() if n["Alive"] and selects(n.get("Labels") or {}, selector or {})]
    if selector and not nodes:
        logger.warning("no node has the labels %s yet: the %s wait for the autoscaler to start one "
                       "(or for ever, on a cluster without such nodes)", selector, work)
    return sum(n["Resources"].get("CPU", 0.0) for n in nodes)
