"""Checkpoints keyed by parameter name and range: resuming equals not stopping, also on fewer workers;
non-finite steps stop with the step and layer, or are skipped exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisher_scale.train.local import JobsFailed, run_jobs

from . import plants
from .test_distributed import DATA, GENERIC_KERNELS, TOLERANCE, adapter, experiment, max_relative_difference, replanted

pytestmark = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"needs the offline GLUE copy in {DATA}")


# the masked case checkpoints at step 4 the state MaskedUpdates holds packed since the mask at step 2
@pytest.mark.parametrize("optimizer,lr,stage,mask", [("adafisher", 1e-3, 2, False), ("adamw", 1e-2, 3, True)])
def test_resume_equals_uninterrupted_also_from_two_workers_to_one(
    tmp_path: Path, optimizer: str, lr: float, stage: int, mask: bool
) -> None:
    common = {
        "lr": lr,
        "optimizer__name": optimizer,
        "train__steps": 8,
        "train__checkpoint_every": 4,
        "distributed__zero_stage": stage,
        "mask": {"enabled": mask, "budget_rank": 2, "samples": 8, "warmup_steps": 2},
    }
    whole_job = ("whole", experiment("whole", tmp_path, data__batch_size=2, **common), None)
    run_jobs(2, [whole_job], tmp_path)
    # the same run saving its optimizer state under element ranges one off: training is unchanged, a resume is not
    run_jobs(2, replanted([whole_job], ["whole"], tmp_path), tmp_path, prepare=plants.misplaced_checkpoint_ranges)
    checkpoint = tmp_path / "whole-checkpoint-4"
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in checkpoint.glob("optimizer.rank*.pt")} == {"optimizer.rank0.pt", "optimizer.rank1.pt"}
    # the same global batch on one worker (ZeRO 0) and on two (the same stage) from the step-4 checkpoint
    one = experiment("one", tmp_path, data__batch_size=4, **{**common, "distributed__zero_stage": 0})
    one_planted = experiment("oneplanted", tmp_path, data__batch_size=4, **{**common, "distributed__zero_stage": 0})
    run_jobs(
        1,
        [("one", one, str(checkpoint)), ("oneplanted", one_planted, str(tmp_path / "wholeplanted-checkpoint-4"))],
        tmp_path,
    )
    run_jobs(2, [("two", experiment("two", tmp_path, data__batch_size=2, **common), str(checkpoint))], tmp_path)
    whole = adapter(tmp_path, "whole")
    assert max_relative_difference(adapter(tmp_path, "wholeplanted"), whole) == 0
    assert max_relative_difference(adapter(tmp_path, "two"), whole) < 1e-6  # the same ranks, the same sums
    assert max_relative_difference(adapter(tmp_path, "one"), whole) < TOLERANCE
    assert max_relative_difference(adapter(tmp_path, "oneplanted"), whole) > 100 * TOLERANCE
    resumed_reports = torch.load(tmp_path / "one-reports.pt", weights_only=False)
    assert [r["step"] for r in resumed_reports] == [4, 8]  # the checkpoint's own report again, then step 8


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_loss_stops_with_the_step_or_is_skipped_exactly(tmp_path: Path, stage: int) -> None:
    """AdaFisher at lr 1e36 (steps of lr/λ) sends LoRA B to ~1e37 in step 1: step 2's loss overflows. At ZeRO-0 the
    guard sees the gradients; at ZeRO-2 DeepSpeed drops the step itself and the loop reports it."""
    common = {
        "lr": 1e36,
        "optimizer__name": "adafisher",
        "train__steps": 6,
        "train__log_every": 6,
        "data__batch_size": 2,
        "distributed__zero_stage": stage,
    }
    with pytest.raises(JobsFailed, match=r"NonFiniteError: non-finite (loss|gradient).* at optimizer step \d"):
        run_jobs(2, [("fail", experiment("fail", tmp_path, **common), None)], tmp_path)
    run_jobs(2, [("skip", experiment("skip", tmp_path, train__skip_nonfinite=True, **common), None)], tmp_path)
    report = torch.load(tmp_path / "skip-reports.pt", weights_only=False)[-1]
    assert report["train/skipped_steps"] == 5  # steps 2-6: the weights stay those after step 1, which overflow
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path, "skip").values())


#: the key projection's bias: softmax is unchanged by adding q·b to every score of a query, so its exact gradient is
#: zero, and what it gets is rounding noise that AdamW normalises into lr-sized steps of either sign
ZERO_GRADIENT = ".self_attn.k_proj.bias"


@pytest.mark.parametrize("kernels", ["native", "generic"])
def test_full_fine_tuning_without_peft_matches_across_ranks_under_zero2_and_zero3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernels: str
) -> None:
    """Every weight trained (embeddings included) and saved whole, on this CPU's kernels and on the generic ones.

    Full fine-tuning trains entries whose gradient cancels to rounding noise (the key bias; k_proj directions
    that every key shares), which AdamW at eps 1e-8 turns into lr-sized steps: 2 ranks then ended 2-4e-5 from
    one rank on native AVX2 kernels and 2.3e-4 on the generic ones (2.4e-4 on another AMD EPYC). eps = 1e-5 bounds
    AdamW's sensitivity to noise by 1/eps, and the key bias, which carries nothing but noise, is not compared:
    the rest then agree within 1.3e-6 on both paths.
    """
    from safetensors.torch import load_file

    if kernels == "generic":
        for name, value in GENERIC_KERNELS.items():
            monkeypatch.setenv(name, value)  # read by the spawned workers' torch
    common = {
        "lr": 1e-3,
        "optimizer__name": "adamw",
        "optimizer__eps": 1e-5,
        "peft__enabled": False,
        "train__steps": 4,
        "train__log_every": 4,
    }
    run_jobs(1, [("one", experiment("one", tmp_path, data__batch_size=4, **common), None)], tmp_path)
    jobs = [
        (f"zero{s}", experiment(f"zero{s}", tmp_path, data__batch_size=2, distributed__zero_stage=s, **common), None)
        for s in (2, 3)
    ]
    run_jobs(2, jobs, tmp_path)
    run_jobs(2, replanted(jobs, ["zero3"], tmp_path), tmp_path, prepare=plants.overlapping_rank_batches)

    def weights(name: str) -> dict[str, torch.Tensor]:
        saved = load_file(str(tmp_path / name / "adapter" / "model.safetensors"))
        return {k: v for k, v in saved.items() if not k.endswith(ZERO_GRADIENT)}

    one = weights("one")
    assert "model.embed_tokens.weight" in one and len(one) > 10  # every weight trained and saved whole
    for name in ("zero2", "zero3"):
        assert max_relative_difference(weights(name), one) < TOLERANCE, name
    assert max_relative_difference(weights("zero3planted"), one) > 100 * TOLERANCE
