"""``bench/gpu_check.py`` in its CPU mode (gloo, tiny model, 2 ranks so that the collectives run), so the GPU
check cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_trains_every_optimizer_stage_and_mask_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--cpu", "--workers", "2", "--steps", "8", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["zero_stage"], r["optimizer"], r["mask"]) for r in rows} == {
        (stage, optimizer, mask)
        for stage in (0, 2, 3)
        for optimizer in ("adamw", "adafisher", "adafish")
        for mask in (False, True)
    }
    assert all(r["finite"] and r["last_epoch_loss"] < r["first_epoch_loss"] for r in rows)
    assert all(r["step_time_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    # AdaFisher keeps one moment where AdamW keeps two, plus the small factors
    assert all(r["state_ratio_to_adamw"] < 0.75 for r in rows if r["optimizer"] == "adafisher" and not r["mask"])
    # masked entries (half of them) hold no state between steps: AdamW's moments halve, its step counts stay
    adamw = {(r["zero_stage"], r["mask"]): r["state_bytes"] for r in rows if r["optimizer"] == "adamw"}
    assert all(0.5 <= adamw[(stage, True)] / adamw[(stage, False)] < 0.55 for stage in (0, 2, 3)), adamw
    assert result["agreement"] == 0.0 and result["failures"] == []  # gloo twice: the same run, bit for bit


def test_failures_name_each_broken_run() -> None:
    check = _module()
    good = {"name": "z2-adamw-mask0", "finite": True, "first_epoch_loss": 2.0, "last_epoch_loss": 1.0}
    flat = {**good, "name": "z3-adafish-mask1", "last_epoch_loss": 2.0}
    nan = {**good, "name": "z0-adafisher-mask0", "finite": False}
    problems = check.failures([good, flat, nan], agreement=3e-4)
    assert problems == [
        "z0-adafisher-mask0: a non-finite loss",
        "z3-adafish-mask1: loss did not decrease (2.0000 → 2.0000)",
        "NCCL/GPU and gloo/CPU runs differ by 3.00e-04 (> 0.0001)",
    ]
