"""Training jobs in plain local ``torch.distributed`` processes (gloo, or NCCL with one GPU a rank), without Ray.

The worker loop is the one Ray Train runs; this launcher exists for what needs many short runs in
one process group and no cluster: the distributed-numerics tests (N ranks against one) and the
ZeRO memory benchmark and the GPU check. Reports and checkpoints land in ``out``: ``<job>-reports.pt`` (rank 0's
metrics) and ``<job>-checkpoint-<step>/`` (every rank's files, merged as Ray merges them).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from fisher_scale.errors import RunFailed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Jobs = list[tuple[str, dict[str, Any], str | None]]


class JobsFailed(RunFailed):
    """A rank of a local job group raised; the message holds every failed rank's traceback."""


def _worker(
    rank: int, world: int, port: int, jobs: Jobs, out: str, prepare: Callable[[], None] | None, backend: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    from fisher_scale.config import ExperimentConfig
    from fisher_scale.optim.distributor import barrier
    from fisher_scale.train.worker import Run

    try:
        if prepare is not None:
            prepare()
        for name, config, restore in jobs:
            reports: list[dict[str, Any]] = []

            def reporter(
                metrics: dict[str, Any], directory: Path | None, name: str = name, reports: list = reports
            ) -> None:
                reports.append(metrics)
                if directory is not None:  # every rank adds its files, as Ray merges them into one checkpoint
                    import shutil

                    shutil.copytree(directory, Path(out) / f"{name}-checkpoint-{metrics['step']}", dirs_exist_ok=True)
                barrier()

            cfg = ExperimentConfig.model_validate(config)
            Run(cfg, rank, world, reporter=reporter, restored=Path(restore) if restore else None).train()
            if rank == 0:
                torch.save(reports, Path(out) / f"{name}-reports.pt")
            barrier()
        (Path(out) / f"done-rank{rank}").touch()
    except BaseException:
        (Path(out) / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()
    # Every rank passed the last barrier and wrote its results. Leave without interpreter finalisation:
    # destroy_process_group() leaves the gloo groups (DeepSpeed keeps references) and their threads alive,
    # so they would be torn down during shutdown, possibly after the peer has exited.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_jobs(
    world: int, jobs: Jobs, out: Path, prepare: Callable[[], None] | None = None, backend: str = "gloo"
) -> None:
    """Each job: (name, config dict, checkpoint directory to resume from or None). ``prepare``, a picklable
    function, runs in every worker before its jobs (tests plant deliberate faults with it). ``backend="nccl"``
    puts rank r on GPU r (jobs then set ``distributed.use_gpu``)."""
    if backend == "nccl" and world > torch.cuda.device_count():
        raise ValueError(f"backend nccl puts one rank on each GPU: {world} ranks, {torch.cuda.device_count()} GPUs")
    out.mkdir(parents=True, exist_ok=True)
    for marker in out.glob("done-rank*"):
        marker.unlink()
    try:
        mp.spawn(_worker, args=(world, free_port(), jobs, str(out), prepare, backend), nprocs=world, join=True)
    except Exception as error:
        finished = all((out / f"done-rank{r}").is_file() for r in range(world))
        errors = sorted(out.glob("error-rank*.txt"))
        if finished and not errors:
            # every rank finished every job and wrote its results: a native abort while tearing the
            # gloo group down (seen intermittently here, no Python traceback) loses nothing; say so
            warnings.warn(f"distributed jobs finished, then a process died at exit: {error}", stacklevel=2)
            return
        details = "\n".join(p.read_text() for p in errors)
        raise JobsFailed(f"distributed jobs failed:\n{details}") from error
