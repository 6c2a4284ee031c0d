"""DeepSpeed ZeRO with sharded Fisher state: 2 ranks at batch b end where 1 rank at batch 2b ends.

Runs in plain gloo process groups (fisher_scale.train.local): every configuration of the matrix shares
one 2-process group and one 1-process group, so the 40 runs cost about as much as a few Ray fits.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fisher_scale.train.local import run_jobs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"needs the offline GLUE copy in {DATA}")

# AdaFish solves (D ⊗ P + λI) x = m in the factors' eigenbases: with λ = 1e-3 that system has condition ~1/λ and
# turns fp32 rounding of the gradient sum (which the number of ranks changes) into ~1e-4 differences; λ = 0.1
# keeps the comparison at float precision. AdamW's m/√v likewise amplifies rounding at lr 1e-2.
OPTIMIZERS = {
    "adamw": {"lr": 1e-3},
    "adafisher": {"lr": 1e-3},
    "adafisherw": {"lr": 1e-3},
    "adafish": {"lr": 0.3, "optimizer__damping": 0.1},
}


def experiment(name: str, out: Path, **changes: object) -> dict:
    config = {
        "seed": 0,
        "model": {"name": "tiny"},
        "peft": {"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"dataset": "glue/sst2", "source": str(DATA / "glue"), "max_length": 64, "max_train_examples": 64},
        "train": {"steps": 20, "log_every": 10, "output_dir": str(out / name)},
        "eval": {"enabled": False},
        "distributed": {"deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    }
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return config


def adapter(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "adapter" / "adapter_model.safetensors"))


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def test_two_ranks_equal_one_rank_for_every_stage_optimizer_and_mask(tmp_path: Path) -> None:
    references, distributed = [], []
    for optimizer, settings in OPTIMIZERS.items():
        for mask in (False, True):
            common = {
                **settings,
                "optimizer__name": optimizer,
                "mask": {"enabled": mask, "ratio": 0.3, "samples": 8, "warmup_steps": 2},
            }
            tag = f"{optimizer}-mask{int(mask)}"
            references.append((f"{tag}-ref", experiment(f"{tag}-ref", tmp_path, data__batch_size=4, **common), None))
            for stage in range(4):
                name = f"{tag}-zero{stage}"
                distributed.append(
                    (
                        name,
                        experiment(name, tmp_path, data__batch_size=2, distributed__zero_stage=stage, **common),
                        None,
                    )
                )
    run_jobs(1, references, tmp_path)
    run_jobs(2, distributed, tmp_path)
    failures = []
    for name, _, _ in distributed:
        reference = adapter(tmp_path, name.rsplit("-", 1)[0] + "-ref")
        difference = max_relative_difference(adapter(tmp_path, name), reference)
        initial_change = max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k)
        assert initial_change > 0, f"{name}: training did not move LoRA B"
        if difference > 1e-4:
            failures.append(f"{name}: {difference:.2e}")
    assert not failures, failures


def test_profiled_steps_split_time_and_report_memory_and_size(tmp_path: Path) -> None:
    """``train.profile``: forward/backward/optimizer/communication add up to at most the step time, ZeRO's
    collectives are seen, and the reported parameter count is the model's (counted here independently)."""
    from fisher_scale.models import Lora, apply_lora, load_model

    jobs = [
        (
            f"zero{stage}",
            experiment(
                f"zero{stage}",
                tmp_path,
                distributed__zero_stage=stage,
                train__profile=True,
                train__steps=6,
                train__log_every=3,
            ),
            None,
        )
        for stage in (2, 3)
    ]
    run_jobs(2, jobs, tmp_path)
    lora = Lora(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))
    expected = sum(p.numel() for p in apply_lora(load_model("tiny"), lora, task="causal_lm").parameters())
    for name, _, _ in jobs:
        reports = torch.load(tmp_path / f"{name}-reports.pt")
        assert [r["step"] for r in reports] == [3, 6]
        for report in reports:
            phases = sum(report[f"time/{p}_s"] for p in ("forward", "backward", "optimizer"))
            assert report["time/comm_s"] > 0, name
            assert 0.3 * report["step_time_s"] < phases + report["time/comm_s"] <= 1.01 * report["step_time_s"]
            assert min(report[f"time/{p}_s"] for p in ("forward", "backward", "optimizer")) > 0
            assert report["memory/peak_bytes"] > 50 * 2**20
            assert report["model/parameters"] == expected, name


def test_zero3_training_time_evaluation_on_two_ranks_equals_one_rank(tmp_path: Path) -> None:
    """Under ZeRO-3 every forward gathers parameters collectively: two ranks with uneven shares (5 examples,
    batches of 2) and different generation lengths must still pair up, and report what one rank reports."""
    shared = {
        "distributed__zero_stage": 3,
        "train__steps": 2,
        "train__log_every": 2,
        "eval__enabled": True,
        "eval__max_examples": 5,
        "eval__batch_size": 2,
        "eval__max_new_tokens": 6,
    }
    gsm8k = {"data__dataset": "gsm8k", "data__source": str(DATA / "gsm8k"), "data__max_length": 384}
    for world, batch in ((1, 4), (2, 2)):  # the same global batch
        jobs = [
            (f"gsm8k-{world}", experiment("gsm8k", tmp_path, data__batch_size=batch, **shared, **gsm8k), None),
            (f"sst2-{world}", experiment("sst2", tmp_path, data__batch_size=batch, **shared), None),
        ]
        run_jobs(world, jobs, tmp_path / ("one" if world == 1 else "two"))
    for name, keys in (("gsm8k", ("gsm8k/loss", "gsm8k/accuracy")), ("sst2", ("glue/sst2/loss", "glue/sst2/accuracy"))):
        one = torch.load(tmp_path / "one" / f"{name}-1-reports.pt")[-1]
        two = torch.load(tmp_path / "two" / f"{name}-2-reports.pt")[-1]
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4), (name, key)
