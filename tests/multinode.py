"""A study on a multi-node local Ray cluster (``ray.cluster_utils.Cluster``), run by ``test_multinode`` in a process
of its own (a process joins one Ray instance; the test session has its own): a head node that only drives trials
(no CPUs) and three 1-CPU worker nodes. Once a trial has a checkpoint, the node running its training worker is
removed, as a spot preemption takes a node. Writes what it saw as JSON::

    python -m tests.multinode STUDY_TREE.json OUT.json
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def train_attempts() -> list[tuple[str, str, list[tuple[str, int]]]]:
    """Every Ray Train run attempt so far: its run's name (the trial id), the run's status and its workers' nodes
    and process ids (Ray Train's state actor, with ``RAY_TRAIN_ENABLE_STATE_TRACKING=1``)."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    if actor is None:
        return []
    runs = ray.get(actor.get_train_runs.remote())
    attempts = ray.get(actor.get_train_run_attempts.remote())
    return [
        (runs[run_id].name, runs[run_id].status.value, [(worker.node_id, worker.pid) for worker in attempt.workers])
        for run_id, of_run in attempts.items()
        if run_id in runs
        for attempt in of_run.values()
    ]


def preempt_once_checkpointed(cluster: Any, storage: Path, seen: dict[str, Any]) -> None:
    """Wait until a running trial has a registered checkpoint, then take the node of its training worker away.

    The worker is frozen (SIGSTOP) the moment its run's checkpoint snapshot appears, so however fast this machine
    trains, the trial cannot finish between the check and the removal; then its node goes (no graceful stop) and the
    frozen process, which would never notice its raylet is gone, is killed as the lost machine's would be."""
    import ray

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        workers: dict[str, tuple[Any, int]] = {}  # trial -> (node, pid) of a running attempt's worker
        if ray.is_initialized():
            nodes = {node.node_id: node for node in cluster.worker_nodes}
            for trial, status, placed in train_attempts():
                on_workers = [(nodes[node], pid) for node, pid in placed if node in nodes]
                if status == "RUNNING" and on_workers:
                    workers[trial] = on_workers[0]
        # registered checkpoints: Ray Train lists them in its snapshot (a checkpoint folder appears before that)
        for trial in (path.parent.name for path in storage.glob("*/train/*/checkpoint_manager_snapshot.json")):
            if trial in workers:
                node, pid = workers[trial]
                os.kill(pid, signal.SIGSTOP)
                seen["preempted"] = {"trial": trial, "node": node.node_id}
                cluster.remove_node(node, allow_graceful=False)
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.05)


def main(tree_file: str, out_file: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from fisher_scale.config import build_config, with_values
    from fisher_scale.tune.study import run_study

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    cfg = with_values(build_config(json.loads(Path(tree_file).read_text())), {"distributed.address": cluster.address})
    seen: dict[str, Any] = {"worker_nodes": [node.node_id for node in workers]}
    storage = Path(cfg.distributed.storage_path)
    remover = threading.Thread(target=preempt_once_checkpointed, args=(cluster, storage, seen), daemon=True)
    remover.start()
    state = run_study(cfg)
    seen["study"] = state.study
    seen["attempts"] = [(trial, status, [node for node, _ in placed]) for trial, status, placed in train_attempts()]
    Path(out_file).write_text(json.dumps(seen))
    ray.shutdown()  # the driver leaves before its cluster goes
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
