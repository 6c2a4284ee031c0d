"""Checkpoints keyed by parameter name and range: resuming equals not stopping, also on fewer workers;
non-finite steps stop with the step and layer, or are skipped exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisher_scale.train.local import run_jobs

from .test_distributed import DATA, adapter, experiment, max_relative_difference

pytestmark = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"needs the offline GLUE copy in {DATA}")


@pytest.mark.parametrize("optimizer,lr,stage", [("adafisher", 1e-3, 2), ("adamw", 1e-2, 3)])
def test_resume_equals_uninterrupted_also_from_two_workers_to_one(
    tmp_path: Path, optimizer: str, lr: float, stage: int
) -> None:
    common = {
        "lr": lr,
        "optimizer__name": optimizer,
        "train__steps": 8,
        "train__checkpoint_every": 4,
        "distributed__zero_stage": stage,
    }
    run_jobs(2, [("whole", experiment("whole", tmp_path, data__batch_size=2, **common), None)], tmp_path)
    checkpoint = tmp_path / "whole-checkpoint-4"
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in checkpoint.glob("optimizer.rank*.pt")} == {"optimizer.rank0.pt", "optimizer.rank1.pt"}
    # the same global batch on one worker (ZeRO 0) and on two (the same stage) from the step-4 checkpoint
    run_jobs(
        1,
        [
            (
                "one",
                experiment("one", tmp_path, data__batch_size=4, **{**common, "distributed__zero_stage": 0}),
                str(checkpoint),
            )
        ],
        tmp_path,
    )
    run_jobs(2, [("two", experiment("two", tmp_path, data__batch_size=2, **common), str(checkpoint))], tmp_path)
    whole = adapter(tmp_path, "whole")
    assert max_relative_difference(adapter(tmp_path, "two"), whole) < 1e-6
    assert max_relative_difference(adapter(tmp_path, "one"), whole) < 1e-4
    resumed_reports = torch.load(tmp_path / "one-reports.pt", weights_only=False)
    assert [r["step"] for r in resumed_reports] == [8]


def test_nonfinite_loss_stops_with_the_step_or_is_skipped_exactly(tmp_path: Path) -> None:
    """AdaFisher at lr 1e36 (steps of lr/λ) sends LoRA B to ~1e37 in step 1: step 2's loss overflows."""
    common = {
        "lr": 1e36,
        "optimizer__name": "adafisher",
        "train__steps": 6,
        "train__log_every": 6,
        "data__batch_size": 2,
    }
    with pytest.raises(AssertionError, match=r"FloatingPointError: non-finite (loss|gradient).* at optimizer step \d"):
        run_jobs(2, [("fail", experiment("fail", tmp_path, **common), None)], tmp_path)
    run_jobs(2, [("skip", experiment("skip", tmp_path, train__skip_nonfinite=True, **common), None)], tmp_path)
    report = torch.load(tmp_path / "skip-reports.pt", weights_only=False)[-1]
    assert report["skipped_steps"] == 5  # steps 2-6: the weights stay those after step 1, which overflow
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path, "skip").values())


def test_full_fine_tuning_without_peft_matches_across_ranks_under_zero2_and_zero3(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    common = {"lr": 1e-3, "optimizer__name": "adamw", "peft__enabled": False, "train__steps": 4, "train__log_every": 4}
    run_jobs(1, [("one", experiment("one", tmp_path, data__batch_size=4, **common), None)], tmp_path)
    jobs = [
        (f"zero{s}", experiment(f"zero{s}", tmp_path, data__batch_size=2, distributed__zero_stage=s, **common), None)
        for s in (2, 3)
    ]
    run_jobs(2, jobs, tmp_path)
    one = load_file(str(tmp_path / "one" / "adapter" / "model.safetensors"))
    assert "model.embed_tokens.weight" in one and len(one) > 10  # every weight trained and saved whole
    for name, _, _ in jobs:
        two = load_file(str(tmp_path / name / "adapter" / "model.safetensors"))
        assert max_relative_difference(two, one) < 1e-4, name
