"""The memory check ``train``, ``tune`` and ``scale`` run before Ray starts, and the largest batch that fits."""

from __future__ import annotations

import json
from collections.abc import Iterable

from fisher_scale.config import ConfigError, ExperimentConfig, with_values
from fisher_scale.plan.memory import MemoryPlan, ModelFacts, model_facts, plan_memory

#: the share of a device's memory a plan may fill: the rest is the CUDA context, NCCL's buffers and the caching
#: allocator's fragmentation, which ``torch.cuda.max_memory_allocated`` (the measured peak) does not count
USABLE = 0.9
GIB = 2**30
#: the largest batch :func:`largest_batch` tries
MAX_BATCH = 4096


_FACTS: dict[str, ModelFacts] = {}


def facts_of(cfg: ExperimentConfig) -> ModelFacts:
    """:func:`model_facts`, read once per model, adapter, optimizer, mask and dataset setting in a process (a
    grid's points and a search space's edges share them)."""
    sections = (cfg.model, cfg.peft, cfg.optimizer, cfg.mask)
    key = json.dumps([[s.model_dump(mode="json") for s in sections], cfg.lr, cfg.data.dataset], sort_keys=True)
    if key not in _FACTS:
        _FACTS[key] = model_facts(cfg)
    return _FACTS[key]


def size(n: float) -> str:
    """Bytes as people read them: KiB, MiB or GiB, three significant digits."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def setting(cfg: ExperimentConfig) -> str:
    """What a plan depends on, in a few words."""
    return (
        f"{cfg.model.name}, {cfg.optimizer.name}{' + mask' if cfg.mask.enabled else ''}, {cfg.model.dtype}, "
        f"ZeRO {cfg.distributed.zero_stage} × {cfg.distributed.num_workers} worker(s), "
        f"batch {cfg.data.batch_size} × {cfg.data.max_length} tokens"
    )


def device_memory(cfg: ExperimentConfig) -> tuple[int, str] | None:
    """The memory one rank may use, and where the figure comes from; None where it is not known here (a GPU run
    submitted from a machine without one, a CPU run on a remote cluster, neither with
    ``distributed.device_memory_gib``)."""
    if cfg.distributed.device_memory_gib is not None:
        return int(cfg.distributed.device_memory_gib * GIB), "distributed.device_memory_gib"
    if cfg.distributed.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(0).total_memory, f"{torch.cuda.get_device_name(0)} here"
    if cfg.distributed.address is not None:
        return None
    import psutil

    workers = cfg.distributed.num_workers
    return psutil.virtual_memory().total // workers, f"this machine's memory / {workers} worker(s)"


def fits(plan: MemoryPlan, memory: int) -> bool:
    return plan.peak <= USABLE * memory


#: the batch key each phase grows with; the others grow with neither
BATCH_OF_PHASE = {"activations": "data.batch_size", "mask scoring": "mask.batch_size", "evaluation": "eval.batch_size"}


def largest_batch(cfg: ExperimentConfig, memory: int, key: str = "data.batch_size", phase: str | None = None) -> int:
    """The largest value of ``key`` (a batch size, up to :data:`MAX_BATCH`) whose plan fits ``memory`` (only the
    held memory and ``phase``, when given); 0 when none does."""
    facts = facts_of(cfg)

    def fitting(batch: int) -> bool:
        plan = plan_memory(with_values(cfg, {key: batch}), facts)
        if phase is None:
            return fits(plan, memory)
        return sum(plan.held.values()) + plan.phases[phase] <= USABLE * memory

    low, high = 0, 1
    while high <= MAX_BATCH and fitting(high):
        low, high = high, 2 * high
    high = min(high, MAX_BATCH + 1)
    while high - low > 1:  # fitting(low) (or low = 0), not fitting(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fitting(middle) else (low, middle)
    return low


def refusal(cfg: ExperimentConfig, plan: MemoryPlan, memory: int, source: str) -> str:
    """Why ``cfg`` does not fit, and the keys that would make it fit: each phase over the memory by itself names
    the batch it grows with, at the largest value that fits."""
    changes = []
    over = [p for p, size in plan.phases.items() if sum(plan.held.values()) + size > USABLE * memory]
    for phase in over:
        key = BATCH_OF_PHASE.get(phase)
        batch = largest_batch(cfg, memory, key, phase) if key else 0
        if batch:
            keeps = " (data.gradient_accumulation_steps keeps the global batch)" if key == "data.batch_size" else ""
            changes.append(f"{key} ≤ {batch}{keeps}")
    if not cfg.model.activation_checkpointing and {"activations", "mask scoring"} & set(over):
        changes.append("model.activation_checkpointing: true")
    if cfg.distributed.zero_stage < 3:
        changes.append(f"distributed.zero_stage: {'3' if cfg.distributed.zero_stage == 2 else '2 or 3'}")
    changes.append("more distributed.num_workers")
    return (
        f"the memory plan needs {size(plan.peak)} per rank (at its {plan.peak_phase}), more than "
        f"{USABLE:.0%} of {size(memory)} ({source}); set {'; or '.join(changes)}. "
        "`fisher-scale plan` shows the terms; --no-memory-check (distributed.memory_check: false) runs it anyway"
    )


def check_memory(configs: Iterable[tuple[str, ExperimentConfig]]) -> None:
    """Every config whose plan does not fit its device, in one ``ConfigError`` (``label``: which point it is;
    default: :func:`setting`); configs with ``distributed.memory_check`` off, or with no device memory known, pass."""
    problems = []
    for label, cfg in configs:
        memory = device_memory(cfg) if cfg.distributed.memory_check else None
        if memory is None:
            continue
        plan = plan_memory(cfg, facts_of(cfg))
        if not fits(plan, memory[0]):
            problems.append(f"{label or setting(cfg)}: {refusal(cfg, plan, *memory)}")
    if problems:
        raise ConfigError("\n".join(problems))
