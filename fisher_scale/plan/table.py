"""``fisher-scale plan``'s output: a config's terms, or one row per point of its ``scale.grid``."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fisher_scale.config import ExperimentConfig, with_values
from fisher_scale.plan.check import device_memory, facts_of, fits, largest_batch, size
from fisher_scale.plan.memory import MemoryPlan, plan_memory

#: short column names of the grid table
COLUMNS = {
    "model.name": "model",
    "distributed.num_workers": "workers",
    "distributed.zero_stage": "ZeRO",
    "optimizer.name": "optimizer",
    "global_batch": "global batch",
    "fp32 master weights": "master",
    "gradients": "grads",
    "optimizer state": "state",
    "Fisher factors": "Fisher",
}


def verdict(cfg: ExperimentConfig, plan: MemoryPlan) -> tuple[bool | None, str, int | None]:
    """Whether the plan fits the device (None: memory unknown), the device, and the largest batch that fits (None
    without an activation term)."""
    memory = device_memory(cfg)
    if memory is None:
        return None, "device memory unknown: set distributed.device_memory_gib", None
    batch = largest_batch(cfg, memory[0]) if "activations" in plan.phases else None  # else no batch term
    return fits(plan, memory[0]), f"{size(memory[0])} ({memory[1]})", batch


def _fits(ok: bool | None) -> str:
    return "?" if ok is None else "yes" if ok else "[red]no"


def terms_table(title: str, cfg: ExperimentConfig) -> tuple[Table, bool]:
    """One config: what is held for the whole run, each phase's working set, the peak and the verdict."""
    plan = plan_memory(cfg, facts_of(cfg))
    table = Table(title=title)
    table.add_column("per rank")
    table.add_column("bytes", justify="right")
    for name, value in plan.held.items():
        table.add_row(name, size(value))
    for name, value in plan.phases.items():
        table.add_row(f"+ {name}" + (" (peak)" if name == plan.peak_phase else ""), size(value))
    table.add_row("[bold]peak", f"[bold]{size(plan.peak)}")
    if "activations" in plan.phases:  # the other setting of activation checkpointing, for comparison
        other = not cfg.model.activation_checkpointing
        alternative = plan_memory(with_values(cfg, {"model.activation_checkpointing": other}), facts_of(cfg))
        setting = "with" if other else "without"
        table.add_row(f"  activations {setting} checkpointing", size(alternative.phases["activations"]))
    ok, device, batch = verdict(cfg, plan)
    table.add_row("device", device)
    table.add_row("fits", _fits(ok))
    if batch is not None:
        table.add_row("largest data.batch_size", str(batch))
    table.caption = "; ".join(plan.notes) or None
    return table, ok is not False


def points_table(title: str, points: list[tuple[dict[str, Any], ExperimentConfig]]) -> tuple[Table, bool]:
    """One row per grid point (a column per grid key): the held terms, the peak phase's working set, the peak,
    whether it fits and the largest training batch that does."""
    table = Table(title=title)
    plans = [(grid, cfg, plan_memory(cfg, facts_of(cfg))) for grid, cfg in points]
    keys, held = list(plans[0][0]), list(plans[0][2].held)
    for key in keys:
        table.add_column(COLUMNS.get(key, key.rsplit(".", 1)[-1]), no_wrap=True)
    for column in (*(COLUMNS.get(h, h) for h in held), "peak phase", "its working set", "peak", "fits", "max batch"):
        table.add_column(column, justify="right")
    all_fit, devices = True, set()
    for grid, cfg, plan in plans:
        ok, device, batch = verdict(cfg, plan)
        all_fit &= ok is not False
        devices.add(device)
        terms = (size(plan.held[h]) for h in held)
        working = (plan.peak_phase, size(plan.phases[plan.peak_phase]), size(plan.peak))
        table.add_row(*(str(grid[k]) for k in keys), *terms, *working, _fits(ok), str(batch or "-"))
    table.caption = "device: " + ", ".join(sorted(devices))
    return table, all_fit
