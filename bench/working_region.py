"""Where AdaFisher and AdaFish train: dev accuracy over an lr × damping grid, repeated over seeds.

The main job's setup (``tune_configs/demo.yaml``: all-MiniLM-L6-v2 + LoRA r8 on GLUE SST-2, batch 32,
100 steps) for each optimizer, lr, damping and seed, evaluated once at the end on every dev sentence.
Runs in local 1-process groups (no Ray: one model load per process, not per run), ``--procs`` at once.
A cell is ``collapsed`` when a run predicts one class for ≥ 99 % of the sentences (chance level), as the
sweeps tag it. Prints a table per optimizer and writes JSON and a heat map per optimizer.

    python bench/working_region.py [--seeds 0,1] [--procs 2] [--out outputs/working-region] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from fisher_scale.config import build_config
from fisher_scale.train.local import run_jobs
from fisher_scale.train.metrics import COLLAPSED_SHARE

#: lr × damping per optimizer: AdaFisher's step scales with lr/λ, so its working lrs move with λ
GRIDS = {
    "adafisher": {"lr": (3e-4, 1e-3, 3e-3), "damping": (1e-4, 1e-3, 1e-2)},
    "adafish": {"lr": (7e-3, 2e-2, 6e-2), "damping": (1e-4, 1e-3, 1e-2)},
}
DEMO = Path(__file__).resolve().parents[1] / "tune_configs" / "demo.yaml"


def job(optimizer: str, lr: float, damping: float, seed: int, out: Path) -> tuple:
    tree = yaml.safe_load(DEMO.read_text())
    tree.pop("tune")
    name = f"{optimizer}-lr{lr:g}-d{damping:g}-s{seed}"
    changes = [
        f"optimizer.name={optimizer}",
        f"lr={lr}",
        f"optimizer.damping={damping}",
        f"seed={seed}",
        "train.steps=100",  # the maps' budget, whatever the main job's
        "train.skip_nonfinite=true",  # a step with a non-finite gradient is dropped; a run that blows up is diverged
        "eval.every=0",
        "eval.max_examples=null",
        "train.checkpoint_every=0",
        f"train.output_dir={out / name}",
    ]
    return name, build_config(tree, changes).model_dump(mode="json"), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default=",".join(GRIDS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--procs", type=int, default=2, help="runs at once (one process each)")
    parser.add_argument("--out", type=Path, default=Path("outputs/working-region"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [
        (optimizer, lr, damping)
        for optimizer in args.optimizers.split(",")
        for lr, damping in itertools.product(GRIDS[optimizer]["lr"], GRIDS[optimizer]["damping"])
    ]
    jobs = [job(*cell, seed, args.out) for cell in cells for seed in seeds]
    pending = [j for j in jobs if not (args.out / f"{j[0]}-reports.pt").is_file()]  # a rerun continues
    chunks = [pending[i :: args.procs] for i in range(args.procs) if pending[i :: args.procs]]
    with ThreadPoolExecutor(max(1, len(chunks))) as pool:
        list(pool.map(lambda chunk: run_jobs(1, chunk, args.out), chunks))

    rows = []
    for optimizer, lr, damping in cells:
        finals = [torch.load(args.out / f"{optimizer}-lr{lr:g}-d{damping:g}-s{s}-reports.pt")[-1] for s in seeds]
        accuracy = [f["glue/sst2/accuracy"] for f in finals]
        rows.append(
            {
                "optimizer": optimizer,
                "lr": lr,
                "damping": damping,
                "accuracy": accuracy,
                "mean": statistics.fmean(accuracy),
                "collapsed": sum(f["glue/sst2/majority_share"] >= COLLAPSED_SHARE for f in finals),
                "diverged": sum(bool(f.get("train/diverged")) for f in finals),
            }
        )
    console = Console(width=120)
    for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
        table = Table(title=f"{optimizer}: SST-2 dev accuracy after 100 steps, seeds {args.seeds} (mean: per seed)")
        table.add_column("lr \\ damping", justify="right")
        dampings = GRIDS[optimizer]["damping"]
        for damping in dampings:
            table.add_column(f"{damping:g}", justify="right")
        for lr in GRIDS[optimizer]["lr"]:
            cells_text = []
            for damping in dampings:
                (row,) = [r for r in rows if (r["optimizer"], r["lr"], r["damping"]) == (optimizer, lr, damping)]
                flags = "".join(("C" * row["collapsed"], "D" * row["diverged"]))
                per_seed = "/".join(f"{100 * a:.1f}" for a in row["accuracy"])
                cells_text.append(f"{100 * row['mean']:.1f} ({per_seed}){' ' + flags if flags else ''}")
            table.add_row(f"{lr:g}", *cells_text)
        console.print(table)
        plot(rows, optimizer, args.out / f"{optimizer}_working_region.png")
    console.print("C: a seed collapsed to one class (chance level); D: a seed diverged")
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=2))


def plot(rows: list[dict], optimizer: str, path: Path) -> None:
    """Mean accuracy as a heat map over lr (rows) × damping (columns), log axes by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, dampings = GRIDS[optimizer]["lr"], GRIDS[optimizer]["damping"]
    values = [
        [
            next(r["mean"] for r in rows if (r["optimizer"], r["lr"], r["damping"]) == (optimizer, lr, d))
            for d in dampings
        ]
        for lr in lrs
    ]
    fig, ax = plt.subplots(figsize=(5, 4))
    image = ax.imshow(values, vmin=0.5, vmax=0.85, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(dampings)), [f"{d:g}" for d in dampings])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    for i, j in itertools.product(range(len(lrs)), range(len(dampings))):
        ax.text(
            j,
            i,
            f"{100 * values[i][j]:.1f}",
            ha="center",
            va="center",
            color="white" if values[i][j] < 0.7 else "black",
        )
    ax.set(xlabel="damping λ", ylabel="lr", title=f"{optimizer}: SST-2 dev accuracy, 100 steps")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
