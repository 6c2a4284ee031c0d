"""Studies on more than one Ray node, all on this machine: a multi-node local cluster (``ray.cluster_utils.Cluster``)
that loses a node mid-study, and a cluster started with ``ray start --head`` and token authentication joined
through ``distributed.address``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .test_tune import needs_data, study_tree

ROOT = Path(__file__).resolve().parents[1]
#: Ray Train's run states for ``tests.multinode`` to read, and its controller collecting reports every 0.2 s (not
#: 2 s): a checkpoint is registered well before a fast machine has trained the few steps after it
PROBED_TRAIN = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@pytest.fixture(autouse=True)
def ray_address_file() -> Iterator[None]:
    """``ray start --head`` and a local ``Cluster`` record their address in Ray's temp folder, where ``ray.init()``
    without an address looks first: a head killed leaves it behind, and the later tests' local Ray would try to join
    a dead cluster. Put it back as it was."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    yield
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(before)


@needs_data
def test_a_study_spreads_over_nodes_and_survives_losing_one(tmp_path: Path) -> None:
    """Two trials at once on three 1-CPU nodes; the node of a checkpointed trial's worker is removed without warning.
    The trial fails, Tune restarts it (``tune.max_failures``) on the node left free, and its Ray Train run resumes
    from the checkpoint on the shared storage: the study finishes with every trial once in Tune, Optuna and MLflow,
    each step logged once."""
    import optuna

    tree = study_tree(tmp_path, num_samples=2, max_concurrent=2, max_failures=1)
    tree["tune"]["metric"] = "train/loss"
    tree["eval"]["every"] = 0
    (tmp_path / "tree.json").write_text(json.dumps(tree))
    done = subprocess.run(
        [sys.executable, "-m", "tests.multinode", str(tmp_path / "tree.json"), str(tmp_path / "seen.json")],
        cwd=ROOT,
        # not the test session's Ray (its address is exported once a test started it)
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **PROBED_TRAIN},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert "preempted" in seen, "no node was removed"
    trial, lost = seen["preempted"]["trial"], seen["preempted"]["node"]
    used = {node for _, _, nodes in seen["attempts"] for node in nodes}
    assert len(used & set(seen["worker_nodes"])) >= 2  # the trials' workers spread over the nodes
    restarted = [nodes for name, _, nodes in seen["attempts"] if name == trial]
    assert len(restarted) == 2 and lost in restarted[0] and lost not in restarted[1], seen["attempts"]

    client = MlflowClient(tree["tracking"]["uri"])
    experiment = client.get_experiment_by_name(tree["name"])
    children = client.search_runs([experiment.experiment_id], filter_string="tags.`fisher_scale.kind` = 'trial'")
    assert len(children) == 2 and len({c.data.tags["ray_trial_id"] for c in children}) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(2, 13, 2)), steps  # once each, the restarted trial's too
    study = optuna.load_study(study_name=f"{seen['study']}/adamw", storage=tree["tune"]["storage"])
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    # the restarted trial went on from its checkpoint, not from its start: Tune saw a checkpoint's step twice
    progress = (tmp_path / "ray" / seen["study"] / "studies").glob(f"*{trial}*/progress.csv")
    (steps,) = [_steps(path) for path in progress]
    again = {step for step in steps if steps.count(step) == 2}
    assert len(again) == 1 and again <= {4, 8} and steps[0] == 2 and len(steps) == len(set(steps)) + 1, steps


def _steps(progress: Path) -> list[int]:
    import csv

    with progress.open() as rows:
        return [int(float(row["step"])) for row in csv.DictReader(rows)]


JOIN = """
import sys
import ray
from fisher_scale.config import build_config
from fisher_scale.config import ConfigError
from fisher_scale.train.launcher import start_ray
try:
    start_ray(build_config({"distributed": {"address": sys.argv[1]}}))
except ConfigError as error:
    sys.exit(f"error: {error}")
print(ray.cluster_resources()["CPU"])
"""


def test_a_driver_joins_a_cluster_with_token_authentication_through_distributed_address(tmp_path: Path) -> None:
    """A cluster started with ``ray start --head`` and Ray's token authentication (``RAY_AUTH_MODE=token``, the
    token in ``RAY_AUTH_TOKEN``, as the cluster README sets them up): a driver with the token joins it through
    ``distributed.address`` and sees its resources; one with another token is refused with one line that names
    what to set."""
    import secrets

    from fisher_scale.train.local import free_port

    port = free_port()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=3",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        joined = subprocess.run(
            [sys.executable, "-c", JOIN, address], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert float(joined.stdout.split()[-1]) == 3.0
        wrong = env | {"RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_gcs_server_port_wait_time_s": "1"}  # one try
        refused = subprocess.run(
            [sys.executable, "-c", JOIN, address], cwd=ROOT, env=wrong, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1].startswith("error: distributed.address"), refused.stderr
        assert "RAY_AUTH_TOKEN" in refused.stderr and token not in refused.stderr
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head's processes share its process group (SIGTERM: a 30 s wait)
        head.wait(timeout=60)
