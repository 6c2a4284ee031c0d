"""A study on a multi-node local Ray cluster (``ray.cluster_utils.Cluster``), run by ``test_multinode`` in a process
of its own (a process joins one Ray instance; the test session has its own): a head node that only drives trials
(no CPUs) and three 1-CPU worker nodes. Once a trial has a checkpoint, the node running its training worker is
removed, as a spot preemption takes a node. Writes what it saw as JSON::

    python -m tests.multinode STUDY_TREE.json OUT.json
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def train_attempts() -> list[tuple[str, str, list[str]]]:
    """Every Ray Train run attempt so far: its run's name (the trial id), the run's status and its workers' nodes
    (Ray Train's state actor, with ``RAY_TRAIN_ENABLE_STATE_TRACKING=1``)."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    if actor is None:
        return []
    runs = ray.get(actor.get_train_runs.remote())
    attempts = ray.get(actor.get_train_run_attempts.remote())
    return [
        (runs[run_id].name, runs[run_id].status.value, [worker.node_id for worker in attempt.workers])
        for run_id, of_run in attempts.items()
        if run_id in runs
        for attempt in of_run.values()
    ]


def preempt_once_checkpointed(cluster: Any, storage: Path, seen: dict[str, Any]) -> None:
    """Wait until a running trial has a checkpoint, then remove the node of its training worker (no graceful stop)."""
    import ray

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        # registered checkpoints: Ray Train lists them in its snapshot (a checkpoint folder appears before that)
        checkpointed = {path.parent.name for path in storage.glob("*/train/*/checkpoint_manager_snapshot.json")}
        if checkpointed and ray.is_initialized():
            for trial, status, nodes in train_attempts():
                node = next((n for n in cluster.worker_nodes if n.node_id in nodes), None)
                if trial in checkpointed and status == "RUNNING" and node is not None:
                    seen["preempted"] = {"trial": trial, "node": node.node_id}
                    cluster.remove_node(node, allow_graceful=False)
                    return
        time.sleep(0.2)


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
    seen["attempts"] = train_attempts()
    Path(out_file).write_text(json.dumps(seen))
    ray.shutdown()  # the driver leaves before its cluster goes
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
