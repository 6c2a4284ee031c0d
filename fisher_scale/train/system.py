"""System metrics per node (CPU, memory, GPU memory) over each report's window, named and measured as MLflow's
system-metrics monitor does (psutil), collected on the workers: only the driver talks to MLflow, so rank 0 reports
them for every node (``system/node<k>/<name>``) with its training metrics. (MLflow's own monitor classes would
cost each worker a 2 s import of ``mlflow``.)"""

from __future__ import annotations

import os

import psutil
import torch

from fisher_scale.optim.distributor import all_reduce_numbers
from fisher_scale.train.metrics import SYSTEM

#: the per-node names, MLflow's (``mlflow.system_metrics``): a node's CPU use since the last report, its memory now
CPU_NAMES = ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage")
#: with GPUs: the memory torch's allocator holds on the node's GPUs (their sum), now
GPU_NAMES = ("gpu_memory_reserved_megabytes",)


def node_metric(node: int, name: str) -> str:
    return f"{SYSTEM}node{node}/{name}"


class NodeMonitor:
    """Every rank calls :meth:`take` at each report (a collective); each node's first local rank measures the
    machine, every rank adds its GPU's memory, and all ranks get every node's figures."""

    def __init__(self, rank: int, world: int, *, use_gpu: bool) -> None:
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank))
        self.node = int(os.environ.get("NODE_RANK", rank // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        (nodes,) = all_reduce_numbers(self.node + 1, op="max")  # Ray may place unequal numbers of workers per node
        self.nodes = int(nodes)
        self.use_gpu = use_gpu
        self.names = CPU_NAMES + GPU_NAMES * use_gpu
        psutil.cpu_percent()  # starts psutil's CPU-time window; the first figure comes from the next call

    def take(self) -> dict[str, float]:
        """Each node's figures since the last call, summed over ranks into the node's slots (a collective)."""
        slots = [0.0] * (self.nodes * len(self.names))
        base = self.node * len(self.names)
        if self.local_rank == 0:
            memory = psutil.virtual_memory()
            measured = (psutil.cpu_percent(), memory.used / 1e6, memory.used / memory.total * 100)
            slots[base : base + len(CPU_NAMES)] = measured
        if self.use_gpu:
            slots[base + len(CPU_NAMES)] = torch.cuda.memory_reserved() / 1e6
        summed = all_reduce_numbers(*slots)
        return {
            node_metric(node, name): summed[node * len(self.names) + offset]
            for node in range(self.nodes)
            for offset, name in enumerate(self.names)
        }
