"""Sweeps: search-space checks, the comparison maths, and real studies (Ray Tune + Optuna + MLflow)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fisher_scale.config import ConfigError, build_config
from fisher_scale.data import default_data_dir
from fisher_scale.study.trials import split_study_key
from fisher_scale.train.local import free_port
from fisher_scale.tune.compare import Comparison, TrialRecord, comparison_table, equal_budget
from fisher_scale.tune.space import check_study, optuna_distributions, study_spaces

needs_data = pytest.mark.skipif(
    not (default_data_dir() / "gsm8k" / "test.jsonl").is_file(), reason="needs ../shared/data/gsm8k"
)


def study_tree(tmp_path: Path, **tune: Any) -> dict[str, Any]:
    """A tiny study: 1-worker trials of a few steps, evaluated on a handful of GSM8K examples."""
    return {
        "name": "tune-test",
        "seed": 3,
        "lr": 1e-3,
        "model": {"name": "tiny"},
        "optimizer": {"name": "adamw"},
        "data": {"max_length": 512, "max_train_examples": 32, "batch_size": 2},
        "train": {"steps": 12, "log_every": 2, "checkpoint_every": 4},
        "eval": {"every": 4, "max_examples": 4, "batch_size": 4, "max_new_tokens": 2},
        "distributed": {"num_workers": 1, "storage_path": str(tmp_path / "ray")},
        "tune": {
            "metric": "gsm8k/loss",
            "num_samples": 3,
            "max_concurrent": 1,
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "space": {"lr": {"loguniform": [1e-5, 3e-1]}},
            **tune,
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


# --- search spaces, checked before Ray starts ---


def test_default_space_searches_the_issue_keys() -> None:
    cfg = build_config({"mask": {"enabled": True}})
    (label, (base, space)), *rest = study_spaces(cfg).items()
    assert not rest and label == "adafisher" and base is cfg
    assert set(space) == {"lr", "optimizer.damping", "optimizer.ema_decay", "peft.rank", "mask.ratio"}
    check_study(cfg)


def test_per_optimizer_studies_fix_the_optimizer_and_merge_overrides() -> None:
    cfg = build_config(
        {
            "tune": {
                "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "optimizer.damping": {"loguniform": [1e-4, 1e-1]}},
                "optimizers": {"adamw": {"optimizer.damping": None}, "adafish": {"lr": {"loguniform": [1e-2, 1]}}},
            }
        }
    )
    studies = study_spaces(cfg)
    assert list(studies) == ["adamw", "adafish"]
    assert studies["adamw"][0].optimizer.name == "adamw" and set(studies["adamw"][1]) == {"lr"}
    assert studies["adafish"][0].optimizer.name == "adafish"
    assert studies["adafish"][1]["lr"].edges() == (1e-2, 1.0)
    distributions = optuna_distributions(studies["adafish"][1])
    assert distributions["lr"].log and distributions["optimizer.damping"].high == 1e-1


def test_a_study_searches_only_the_optimizer_keys_its_optimizer_takes() -> None:
    default = build_config({"tune": {"optimizers": {"adamw": {}, "adafisher": {}}}})
    studies = study_spaces(default)
    assert set(studies["adamw"][1]) == {"lr", "peft.rank", "mask.ratio"}
    assert {"optimizer.damping", "optimizer.ema_decay"} <= set(studies["adafisher"][1])
    fixed = study_spaces(build_config({"optimizer": {"name": "adamw"}}))
    assert set(fixed["adamw"][1]) == {"lr", "peft.rank", "mask.ratio"}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optimizer.dampng": {"uniform": [0.1, 0.2]}}, "did you mean optimizer.damping"),
        ({"lr": {"uniform": [0.1, 0.1]}}, "empty range"),
        ({"lr": {"loguniform": [0, 0.1]}}, "low > 0"),
        ({"lr": {"choice": []}}, "empty list"),
        ({"lr": {"uniform": [0.1, 0.2], "int": [1, 2]}}, "exactly one"),
        ({"peft.rank": {"choice": [0, 8]}}, "tune.space.peft.rank: value 0 is invalid"),
        ({"peft.rank": {"uniform": [4, 16]}}, "tune.space.peft.rank: value 8.44 is invalid"),
        ({"optimizer.ema_decay": {"uniform": [0.5, 1.5]}}, "value 1.5 is invalid"),
        ({"tune.num_samples": {"int": [1, 3]}}, "not a config key"),
    ],
)
def test_bad_search_space_names_the_key(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_study(build_config({"tune": {"space": space}}))


def test_metric_that_training_never_reports_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"tune.metric: 'glue/sst2/accuracy' is never reported.*gsm8k/loss"):
        check_study(build_config({"tune": {"metric": "glue/sst2/accuracy"}}))
    with pytest.raises(ConfigError, match="curvature_contrast/median' is never reported"):
        check_study(build_config({"optimizer": {"name": "adamw"}, "tune": {"metric": "curvature_contrast/median"}}))
    cfg = build_config({"data": {"dataset": "glue/mrpc"}, "tune": {"metric": "glue/mrpc/f1", "mode": "max"}})
    check_study(cfg)  # MRPC reports F1
    masked = {"mask": {"enabled": True}, "tune": {"metric": "mask/kept/lora_A", "mode": "max"}}
    check_study(build_config(masked))  # a masked run reports its kept fractions
    with pytest.raises(ConfigError, match="'mask/kept/lora_A' is never reported"):
        check_study(build_config({**masked, "mask": {"enabled": False}}))


def test_asha_needs_the_metric_before_its_grace_period() -> None:
    tune = {"scheduler": "asha", "grace_period": 10}
    with pytest.raises(ConfigError, match=r"set eval\.every"):
        check_study(build_config({"tune": tune}))  # eval only at the end
    with pytest.raises(ConfigError, match=r"must be below train\.steps"):
        check_study(build_config({"train": {"steps": 10}, "eval": {"every": 5}, "tune": tune}))
    check_study(build_config({"eval": {"every": 5}, "tune": tune}))


def test_searched_worker_counts_must_fit_and_asha_fixes_the_step_budget() -> None:
    from fisher_scale.train.launcher import check_resources
    from fisher_scale.tune.space import resource_configs

    cfg = build_config({"tune": {"space": {"distributed.num_workers": {"int": [1, 4]}}}})
    configs = resource_configs(check_study(cfg))
    assert sorted(c.distributed.num_workers for c in configs) == [1, 1, 4]  # base, then the range's edges
    with pytest.raises(ConfigError, match="needs 4 CPUs"):
        for trial_cfg in configs:
            check_resources(trial_cfg, {"CPU": 2.0})
    asha = {"scheduler": "asha", "grace_period": 5, "space": {"train.steps": {"int": [20, 40]}}}
    with pytest.raises(ConfigError, match=r"ASHA's max_t is train\.steps"):
        check_study(build_config({"eval": {"every": 5}, "tune": asha}))


def test_searching_the_optimizer_and_listing_optimizers_conflict() -> None:
    space = {"optimizer.name": {"choice": ["adamw", "adafisher"]}}
    assert list(study_spaces(build_config({"tune": {"space": space}}))) == ["searched"]
    with pytest.raises(ConfigError, match=r"tune\.optimizers already fixes"):
        study_spaces(build_config({"tune": {"space": space, "optimizers": {"adamw": {}}}}))


def test_arms_run_every_optimizer_study_once_per_arm_with_their_values_fixed() -> None:
    fish = {"peft.rank": 16, "mask.enabled": True, "mask.budget_rank": 8}
    tune = {
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
        "optimizers": {"adamw": {}, "adafisher": {"optimizer.damping": {"loguniform": [1e-4, 1e-1]}}},
        "arms": {"lora": {}, "fish": fish},
    }
    studies = study_spaces(build_config({"tune": tune}))
    assert list(studies) == ["adamw-lora", "adamw-fish", "adafisher-lora", "adafisher-fish"]
    for label, (base, space) in studies.items():
        optimizer, arm = label.split("-")
        assert base.optimizer.name == optimizer
        assert (base.peft.rank, base.mask.enabled, base.mask.budget_rank) == (
            (16, True, 8) if arm == "fish" else (8, False, None)
        )
        assert set(space) == ({"lr", "optimizer.damping"} if optimizer == "adafisher" else {"lr"})
    single = study_spaces(
        build_config({"optimizer": {"name": "adamw"}, "tune": {"arms": {"random": {"mask.selection": "random"}}}})
    )
    assert list(single) == ["adamw-random"] and single["adamw-random"][0].mask.selection == "random"


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ({}, r"tune\.arms: empty"),
        ({"with mask": {}}, r"tune\.arms\.with mask: name arms with letters"),
        (
            {"fish": {"mask.enabeld": True}},
            r"tune\.arms\.fish: not config keys: mask\.enabeld; did you mean mask\.enabled",
        ),
        ({"fast": {"lr": 0.1}}, r"tune\.arms\.fast: lr also searched in study adamw"),
        (
            {"fish": {"mask.enabled": True, "mask.budget_rank": 16}},
            r"mask\.budget_rank=16 needs .* at most peft\.rank=8",
        ),
        ({"other": {"optimizer.name": "adafish"}}, r"an arm cannot set optimizer\.name"),
    ],
)
def test_bad_arms_name_the_arm_and_key(arms: dict, message: str) -> None:
    tune = {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}, "optimizers": {"adamw": {}}, "arms": arms}
    with pytest.raises(ConfigError, match=message):
        study_spaces(build_config({"tune": tune}))


def test_seeds_repeat_every_study_with_its_seed_fixed() -> None:
    """``tune.seeds``: each optimizer × arm study once per seed, the seed set in its base and nothing else changed;
    the key splits back into the label ``compare`` groups by and the replicate."""
    tune = {
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
        "optimizers": {"adamw": {}, "adafisher": {}},
        "arms": {"lora": {}, "wide": {"peft.rank": 16}},
        "seeds": [4, 0],
    }
    cfg = build_config({"seed": 9, "tune": tune})
    studies = study_spaces(cfg)
    plain = study_spaces(build_config({"seed": 9, "tune": {**tune, "seeds": None}}))
    assert list(studies) == [f"{label}/seed{seed}" for label in plain for seed in (4, 0)]
    for key, (base, space) in studies.items():
        label, replicate = split_study_key(key)
        assert replicate == f"seed{base.seed}" and base.seed in (4, 0)
        fixed = {"seed", "tune"}  # the seed, and tune.seeds itself
        assert base.model_dump(exclude=fixed) == plain[label][0].model_dump(exclude=fixed) and space == plain[label][1]
    assert split_study_key("adamw-lora") == ("adamw-lora", None)


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"seeds": [0, 1, 0]}, r"tune\.seeds: 0 listed twice"),
        ({"seeds": []}, r"tune\.seeds"),
        ({"seeds": [0, 1], "space": {"seed": {"choice": [1, 2]}}}, r"tune\.space\.seed: searched in study adamw"),
    ],
)
def test_bad_seeds_name_the_key(tune: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        study_spaces(build_config({"optimizer": {"name": "adamw"}, "tune": tune}))


def test_replicates_of_one_study_are_compared_seed_by_seed(tmp_path: Path) -> None:
    """Trials of a ``tune.seeds`` study are tracked with their label, replicate and seed; ``compare`` reads each
    replicate as one repeated study, so the paired verdict is over the seeds (hand-computed here)."""
    from types import SimpleNamespace

    from fisher_scale import tracking
    from fisher_scale.study.callbacks import STUDY_KEY, MlflowTrials
    from fisher_scale.tune.compare import load_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "replicates", uri)
    parent = client.create_run(experiment).info.run_id
    arms = {"lora": {}, "wide": {"peft.rank": 16}}
    cfg = build_config({"optimizer": {"name": "adamw"}, "tune": {"space": {}, "arms": arms, "seeds": [0, 1]}})
    bases = {key: base.model_dump(mode="json") for key, (base, _) in study_spaces(cfg).items()}
    callback = MlflowTrials(uri, experiment, parent, "study-1", bases)
    finals = {"adamw-lora/seed0": 0.80, "adamw-lora/seed1": 0.78, "adamw-wide/seed0": 0.84, "adamw-wide/seed1": 0.83}
    for number, (key, value) in enumerate(finals.items()):
        trial = SimpleNamespace(trial_id=f"t{number}", config={STUDY_KEY: key, "lr": 1e-3})
        callback.on_trial_result(0, [], trial, {"step": 10, "m": value})
    writer = callback._writer._process
    callback.on_experiment_end([])  # everything written in the writer process, which then ends
    assert writer.exitcode == 0 and callback._writer._process is None
    records = load_trials(client, experiment, "m")
    assert sorted((r.study, r.arm, r.params["seed"]) for r in records) == [
        ("study-1/seed0", "adamw-lora", "0"),
        ("study-1/seed0", "adamw-wide", "0"),
        ("study-1/seed1", "adamw-lora", "1"),
        ("study-1/seed1", "adamw-wide", "1"),
    ]
    rows = {row["arm"]: row for row in comparison_table(records, "m", "max", reference="adamw-lora")}
    assert rows["adamw-lora"]["studies"] == 2 and rows["adamw-lora"]["mean best m"] == pytest.approx(0.79)
    # differences 0.04 and 0.05: every bootstrap mean lies in [0.04, 0.05], which excludes 0
    assert rows["adamw-wide"]["vs adamw-lora"] == pytest.approx(0.045)
    assert rows["adamw-wide"]["verdict"] == "better"


# --- the comparison ---


def record(run: str, study: str, optimizer: str, start: int, metric: dict[int, float], times: dict[int, float]):
    rec = TrialRecord(run, study, optimizer, start, {"lr": "0.01"})
    rec.history = {"m": metric, "time/train_s": times, "train/loss": metric}
    return rec


def test_comparison_table_medians_over_studies_and_time_to_target() -> None:
    records = [
        # study A: adamw's best final 0.5 (reaches 0.6 at step 4, t=2), adafisher's best 0.3 (reaches at 2, t=1.5)
        record("1", "A", "adamw", 1, {2: 0.9, 4: 0.6, 6: 0.5}, {2: 1.0, 4: 2.0, 6: 3.0}),
        record("2", "A", "adamw", 2, {2: 0.95, 4: 0.8}, {2: 1.0, 4: 2.0}),
        record("3", "A", "adafisher", 3, {2: 0.55, 4: 0.3}, {2: 1.5, 4: 3.0}),
        # study B: adamw 0.7 never reaches 0.6; adafisher 0.4 reaches at step 4 (t=2.5)
        record("4", "B", "adamw", 1, {2: 0.8, 4: 0.7}, {2: 1.0, 4: 2.0}),
        record("5", "B", "adafisher", 2, {2: 0.7, 4: 0.4}, {2: 1.2, 4: 2.5}),
    ]
    rows = {row["arm"]: row for row in comparison_table(records, "m", "min", target=0.6)}
    assert rows["adamw"]["trials"] == 3 and rows["adamw"]["studies"] == 2
    assert rows["adamw"]["best m"] == 0.5
    assert rows["adamw"]["median best m"] == pytest.approx((0.5 + 0.7) / 2)
    assert rows["adamw"]["median steps to target"] == 4 and rows["adamw"]["studies reaching target"] == 1
    assert rows["adamw"]["median train s to target"] == 2.0
    assert rows["adafisher"]["median steps to target"] == pytest.approx((2 + 4) / 2)
    assert rows["adafisher"]["median train s to target"] == pytest.approx((1.5 + 2.5) / 2)
    kept = equal_budget(records)  # study A: adamw has 2 trials, adafisher 1 -> adamw keeps its first
    assert sorted(r.run_id for r in kept) == ["1", "3", "4", "5"]
    rows = {row["arm"]: row for row in comparison_table(records, "m", "max")}
    assert rows["adamw"]["best m"] == 0.8 and "median steps to target" not in rows["adamw"]


def test_comparison_ranks_arms_and_names_each_arms_best_trial_and_its_values() -> None:
    """Rows come best first by the median of the study bests, rank 1 the winner (an arm without a finite value
    last, unranked), each naming its best trial and that trial's searched values (only the keys it used)."""
    from fisher_scale.tune.report import markdown_report

    def trial(trial_id: str, arm: str, final: float, params: dict[str, str]) -> TrialRecord:
        rec = TrialRecord(f"run-{trial_id}", "A", arm, 0, params, trial_id=trial_id)
        rec.history = {"m": {10: final}}
        return rec

    records = [
        trial("t1", "adamw", 0.80, {"lr": "0.001"}),
        trial("t2", "adamw", 0.83, {"lr": "0.002"}),
        trial("t3", "adafisher", 0.85, {"lr": "0.0005", "optimizer.damping": "0.01"}),
        trial("t4", "adafish", float("nan"), {"lr": "0.02", "optimizer.damping": "0.1"}),
        trial("t5", "adamw-fish", 0.70, {"lr": "0.003"}),
    ]
    searched = ["lr", "optimizer.damping"]
    rows = comparison_table(records, "m", "max", searched=searched)
    assert [(r["rank"], r["arm"]) for r in rows] == [
        (1, "adafisher"),
        (2, "adamw"),
        (3, "adamw-fish"),
        (None, "adafish"),
    ]
    assert list(rows[0])[:2] == ["rank", "arm"]
    assert (rows[1]["best trial"], rows[1]["best values"]) == ("t2", "lr=0.002")
    assert rows[0]["best values"] == "lr=0.0005, optimizer.damping=0.01" and rows[3]["best trial"] is None
    assert [r["arm"] for r in comparison_table(records, "m", "min")][:3] == ["adamw-fish", "adamw", "adafisher"]
    comparison = Comparison("m", "max", 5, rows, "run", "sqlite:///x.db")
    text = markdown_report("exp", comparison)
    assert "| **1** | adafisher | 1 | 1 | 0.85 | t3 | lr=0.0005, optimizer.damping=0.01 |" in text
    assert "| 2 | adamw | 2 | 1 | 0.83 | t2 | lr=0.002 |" in text


def test_plot_axes_follow_what_each_hyperparameter_is() -> None:
    """lr and damping on log axes even over a narrow range, a choice of integers (rank {4, 8}) or of names as
    categories, other numbers linear unless they span more than 50x."""
    from fisher_scale.tune.compare import hyperparameter_axis

    assert hyperparameter_axis("lr", ["0.001", "0.003", "0.002"]) == ("log", [])
    assert hyperparameter_axis("optimizer.damping", ["0.01", "0.05"]) == ("log", [])
    assert hyperparameter_axis("peft.rank", ["8", "4", "8", "16"]) == ("categorical", ["4", "8", "16"])
    assert hyperparameter_axis("mask.selection", ["random", "fisher"]) == ("categorical", ["fisher", "random"])
    assert hyperparameter_axis("optimizer.ema_decay", ["0.8", "0.95", "0.9"]) == ("linear", [])
    assert hyperparameter_axis("mask.ratio", ["0.001", "0.5"]) == ("log", [])


def test_comparison_plots_draw_only_keys_a_run_used(tmp_path: Path) -> None:
    """Every plot is written; a searched key no compared run used (AdamW's damping) gets no plot, and stopped
    trials and choices are drawn without error."""
    from fisher_scale.tune.compare import plot_comparison

    records = []
    for number, (arm, params, stopped) in enumerate(
        (
            ("adamw", {"lr": "0.001", "peft.rank": "4"}, None),
            ("adamw", {"lr": "0.002", "peft.rank": "8"}, 4),
            ("adafisher", {"lr": "0.001", "peft.rank": "8"}, None),
        )
    ):
        rec = TrialRecord(str(number), "A", arm, number, params, trial_id=f"t{number}", stopped_at=stopped)
        rec.history = {
            "m": {4: 0.5 + number / 10, 8: 0.6},
            "train/loss": {4: 1.0, 8: 0.8},
            "time/train_s": {4: 1, 8: 2},
        }
        records.append(rec)
    paths = plot_comparison(records, "m", "max", ["lr", "optimizer.damping", "peft.rank"], tmp_path)
    assert sorted(p.name for p in paths) == [
        "m_curves.png", "m_vs_lr.png", "m_vs_peft_rank.png", "m_vs_time.png", "parallel_coordinates.png",
        "training_curves.png",
    ]  # fmt: skip
    assert all(p.stat().st_size > 1000 for p in paths)


def test_bootstrap_interval_is_the_exact_bootstrap_of_the_mean() -> None:
    """For 4 values the bootstrap distribution can be enumerated exactly (4⁴ equally likely resamples): scipy's
    seeded percentile interval lies within a sliver of its 2.5 and 97.5 percentiles."""
    import itertools

    import numpy as np

    from fisher_scale.tune.compare import bootstrap_interval

    values = [0.78, 0.81, 0.80, 0.84]
    means = [float(np.mean(r)) for r in itertools.product(values, repeat=len(values))]
    low, high = np.percentile(means, [2.5, 97.5])
    interval = bootstrap_interval(values)
    assert interval == pytest.approx((low, high), abs=0.0025)  # the resample means step by 0.0025
    assert interval == bootstrap_interval(values)  # seeded
    assert bootstrap_interval([0.8]) is None


def test_paired_verdicts_need_an_interval_that_excludes_zero() -> None:
    from fisher_scale.tune.compare import paired_verdict

    assert paired_verdict([0.02, 0.03, 0.025], "max")[0] == "better"
    assert paired_verdict([0.02, 0.03, 0.025], "min")[0] == "worse"
    assert paired_verdict([-0.01, 0.02, 0.005], "max")[0] == "not distinguishable"
    assert paired_verdict([0.02], "max") == ("too few studies", None)
    # three studies (seeds): adafisher beats adamw by 1-3 points in each, adafish differs by -2 to +3
    bests = {"adamw": (0.80, 0.78, 0.82), "adafisher": (0.81, 0.81, 0.84), "adafish": (0.83, 0.76, 0.82)}
    records = [
        record(f"{optimizer}{study}", study, optimizer, 1, {100: value}, {100: 10.0})
        for optimizer, values in bests.items()
        for study, value in zip("ABC", values, strict=True)
    ]
    rows = {row["arm"]: row for row in comparison_table(records, "m", "max")}
    assert rows["adamw"]["verdict"] == "reference" and rows["adamw"]["mean best m"] == pytest.approx(0.80)
    assert rows["adafisher"]["vs adamw"] == pytest.approx(0.02) and rows["adafisher"]["verdict"] == "better"
    assert rows["adafish"]["vs adamw"] == pytest.approx(1 / 300) and rows["adafish"]["verdict"] == "not distinguishable"
    rows = {row["arm"]: row for row in comparison_table(records, "m", "max", reference="adafisher")}
    assert rows["adafisher"]["verdict"] == "reference" and rows["adamw"]["verdict"] == "worse"
    assert rows["adamw"]["vs adafisher"] == pytest.approx(-0.02)


def test_least_time_to_target_is_taken_over_trials_not_from_the_fewest_steps() -> None:
    fast_steps = record("1", "A", "adamw", 1, {8: 0.5}, {8: 100.0})  # reaches at step 8 after 100 s
    fast_time = record("2", "A", "adamw", 2, {4: 0.9, 16: 0.5}, {4: 10.0, 16: 40.0})  # step 16 after 40 s
    (row,) = comparison_table([fast_steps, fast_time], "m", "min", target=0.6)
    assert row["median steps to target"] == 8 and row["median train s to target"] == 40.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qmc_sampler_covers_the_space_more_evenly_than_random_search(seed: int) -> None:
    """``tune.sampler: qmc``: 16 trials over two ranges have a lower discrepancy (scipy's, an independent
    measure of how evenly points fill the unit square) than 16 random-search trials with the same seed."""
    import optuna
    from scipy.stats import qmc

    from fisher_scale.tune.study import optuna_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0), "y": optuna.distributions.FloatDistribution(0, 1)}

    def points(sampler: str) -> list[list[float]]:
        study = optuna.create_study(sampler=optuna_sampler(sampler, seed))
        trials = [study.ask(space) for _ in range(16)]
        return [[t.params["x"], t.params["y"]] for t in trials]

    assert isinstance(optuna_sampler("qmc", seed), optuna.samplers.QMCSampler)
    assert points("qmc") == points("qmc")  # seeded
    assert qmc.discrepancy(points("qmc")) < qmc.discrepancy(points("random"))


def test_collapsed_and_diverged_trials_are_reported_as_such(tmp_path: Path) -> None:
    """The MLflow ``outcome`` tag and the trial table's status follow each report: a classifier predicting one
    class is ``collapsed`` whatever its accuracy, the worker's divergence flag makes ``diverged``, and a report
    without an evaluation changes nothing."""
    from types import SimpleNamespace

    from fisher_scale import tracking
    from fisher_scale.study.callbacks import MlflowTrials, TrialTable
    from fisher_scale.train.metrics import report_outcome
    from fisher_scale.train.worker import diverged

    assert report_outcome({"glue/sst2/majority_share": 1.0, "glue/sst2/accuracy": 0.509}) == "collapsed"
    assert report_outcome({"glue/sst2/majority_share": 0.62, "train/diverged": 0.0}) == "trained"
    assert report_outcome({"train/diverged": 1.0, "glue/sst2/majority_share": 0.6}) == "diverged"
    assert report_outcome({"train/loss": 0.4, "train/diverged": 0.0}) is None
    assert diverged(0.69, float("nan")) and diverged(0.69, 2.2) and not diverged(0.69, 2.0)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "outcomes", uri)
    parent = client.create_run(experiment).info.run_id
    base = build_config({}).model_dump(mode="json")
    callback = MlflowTrials(uri, experiment, parent, "study-1", {"adamw": base})
    table = TrialTable("adamw", "glue/sst2/accuracy", "max", [], {"adamw": base})
    trial = SimpleNamespace(trial_id="t1", config={}, status="RUNNING", last_result={}, error_file=None)
    tags = lambda: client.get_run(callback.run_id(trial)).data.tags.get("outcome")  # noqa: E731
    for result, expected in (
        ({"step": 5, "train/loss": 0.7, "train/diverged": 0.0}, None),
        ({"step": 10, "train/diverged": 0.0, "glue/sst2/majority_share": 1.0}, "collapsed"),
        ({"step": 15, "train/loss": 0.69, "train/diverged": 0.0}, "collapsed"),
        ({"step": 20, "train/diverged": 0.0, "glue/sst2/majority_share": 0.7}, "trained"),
        ({"step": 25, "train/diverged": 0.0, "glue/sst2/majority_share": 0.995}, "collapsed"),
    ):
        callback.on_trial_result(0, [], trial, result)
        assert tags() == expected, result
    trial.last_result = result
    callback.on_trial_complete(0, [], trial)
    table.on_trial_complete(0, [], trial)
    table.on_experiment_end([])
    assert tags() == "collapsed" and table._rows["t1"]["status"] == "collapsed"


def test_trials_their_scheduler_stopped_are_pruned_in_optuna_and_tagged_in_mlflow(tmp_path: Path) -> None:
    """A trial that ends before train.steps without an error was stopped by ASHA: PRUNED in Optuna with its
    intermediate values at the training steps (not Tune's report count) and the last one as its value, tagged
    ``stopped_by``/``stopped_at_step`` in MLflow, ``stopped`` in the table; a trial that reaches the last step is
    COMPLETE and untagged. The objective is named after the metric, the trials link the three systems."""
    from types import SimpleNamespace

    import optuna
    from rich.console import Console

    from fisher_scale import tracking
    from fisher_scale.study.callbacks import MlflowTrials, TrialTable, _fmt
    from fisher_scale.tune.study import EvalStepOptunaSearch

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = EvalStepOptunaSearch(
        {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
        metric="gsm8k/loss",
        mode="min",
        storage=optuna.storages.RDBStorage(storage),
        study_name="study-1/adamw",
        max_steps=12,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "stops", uri)
    parent = client.create_run(experiment).info.run_id
    base = build_config({"train": {"steps": 12}}).model_dump(mode="json")
    callback = MlflowTrials(uri, experiment, parent, "study-1", {"adamw": base}, scheduler="asha")
    table = TrialTable("study-1", "gsm8k/loss", "min", ["lr"], {"adamw": base})
    table._console = Console(file=io.StringIO(), width=80)  # a log file: one plain line per event
    trials = {}
    for trial_id, last_step in (("stopped", 8), ("finished", 12)):
        trials[trial_id] = trial = SimpleNamespace(
            trial_id=trial_id, config=search.suggest(trial_id), status="RUNNING", last_result={}, error_file=None
        )
        for iteration, step in enumerate(range(4, last_step + 1, 4), 1):
            result = {"step": step, "training_iteration": iteration, "gsm8k/loss": 3.0 - step / 10}
            if step < last_step:  # Tune gives the result a trial ends on to on_trial_complete only
                search.on_trial_result(trial_id, result)
            search.on_trial_result(trial_id, {"step": step + 2, "training_iteration": iteration, "train/loss": 1.0})
            callback.on_trial_result(0, [], trial, result)
            table.on_trial_result(0, [], trial, result)
        trial.last_result = result
        search.on_trial_complete(trial_id, result)
        callback.on_trial_complete(0, [], trial)
        table.on_trial_complete(0, [], trial)
    table.on_experiment_end([])

    study = optuna.load_study(study_name="study-1/adamw", storage=storage)
    assert study.metric_names == ["gsm8k/loss"]
    stopped, finished = study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and finished.state == optuna.trial.TrialState.COMPLETE
    assert stopped.intermediate_values == {4: pytest.approx(2.6), 8: pytest.approx(2.2)}
    assert sorted(finished.intermediate_values) == [4, 8, 12]
    assert stopped.value == pytest.approx(2.2) and finished.value == pytest.approx(1.8)
    assert [t.user_attrs for t in study.trials] == [{"ray_trial_id": "stopped"}, {"ray_trial_id": "finished"}]
    tags = {t: client.get_run(callback.run_id(trials[t])).data.tags for t in trials}
    assert (tags["stopped"]["stopped_by"], tags["stopped"]["stopped_at_step"]) == ("asha", "8")
    assert "stopped_by" not in tags["finished"] and tags["finished"]["optuna_study"] == "study-1/adamw"
    assert tags["finished"]["searched"] == "lr"
    assert {t: row["status"] for t, row in table._rows.items()} == {"stopped": "stopped", "finished": "TERMINATED"}
    lines = table.console.file.getvalue().splitlines()
    assert len(lines) == 2 + 3 + 2 and all(len(line) <= 80 and "\x1b" not in line for line in lines)
    lr = _fmt(trials["stopped"].config["lr"])
    assert lines[0] == f"trial stopped: running, step 4, loss 2.6 (best 2.6); lr={lr}"
    assert lines[2] == f"trial stopped: stopped, step 8, loss 2.2 (best 2.2); lr={lr}"
    assert lines[-1].startswith("trial finished: terminated, step 12, loss 1.8 (best 1.8); lr=")


def test_importances_come_from_the_study_optuna_stored(tmp_path: Path) -> None:
    """Per study (label), Optuna's importances: the key the objective depends on ranks first; a study with too
    few finished trials reports none."""
    import optuna

    from fisher_scale.study.experiment import StudyState
    from fisher_scale.tune.study import importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = build_config({"tune": {"storage": storage}})
    state = StudyState("study-1", {}, "", "", "")
    floats = optuna.distributions.FloatDistribution
    space = {"lr": floats(1e-4, 1e-2, log=True), "optimizer.damping": floats(0.0, 1.0)}
    for label, count in (("adamw", 12), ("adafish", 2)):
        study = optuna.create_study(
            study_name=f"study-1/{label}", storage=storage, sampler=optuna.samplers.RandomSampler(0)
        )
        for _ in range(count):
            trial = study.ask(space)
            study.tell(trial, 1000 * trial.params["lr"] + 0.01 * trial.params["optimizer.damping"])
    ranked = importances(cfg, state, "adamw")
    assert set(ranked) == {"lr", "optimizer.damping"} and ranked["lr"] > 0.9
    assert importances(cfg, state, "adafish") == {}


def test_local_stores_are_created_where_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh checkout has no outputs/ folder: the SQLite files of MLflow and Optuna get theirs."""
    from fisher_scale.tracking import check_reachable, tracking_uri
    from fisher_scale.tune.study import optuna_storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(build_config({"tracking": {"uri": "sqlite:///outputs/deep/mlflow.db"}}))
    assert uri == f"sqlite:///{tmp_path}/outputs/deep/mlflow.db" and (tmp_path / "outputs" / "deep").is_dir()
    check_reachable(uri)
    storage = optuna_storage("sqlite:///other/optuna.db")
    assert storage.url == f"sqlite:///{tmp_path}/other/optuna.db" and (tmp_path / "other" / "optuna.db").is_file()
    assert tracking_uri(build_config({})) == f"sqlite:///{tmp_path}/mlflow.db"


def test_run_searches_read_every_page(tmp_path: Path) -> None:
    """A search returns one page (1000 runs by default); ``all_runs`` follows MLflow's page tokens to the end."""
    from fisher_scale import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "pages", uri)
    made = [client.create_run(experiment, tags={"kind": "trial" if i != 2 else "other"}).info.run_id for i in range(6)]
    found = tracking.all_runs(client, experiment, "tags.kind = 'trial'", page_size=2)
    assert sorted(run.info.run_id for run in found) == sorted(made[:2] + made[3:])


def test_a_new_experiment_opens_in_the_ui_runs_view_and_the_printed_link_goes_there(tmp_path: Path) -> None:
    """MLflow 3's UI shows an experiment without a kind as a GenAI (traces) page with no runs: ours are tagged as
    training experiments, and the link names the runs page (credentials left out)."""
    from fisher_scale import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "kinds", uri)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.runs_view(uri, experiment) == (
        f"mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000/#/experiments/{experiment}/runs"
    )
    assert tracking.runs_view("https://bob:pw@mlflow.example.org/", "7") == (
        "https://bob:***@mlflow.example.org/#/experiments/7/runs"
    )


def test_a_study_run_logs_the_studys_own_params_not_one_trials() -> None:
    """The parent run's params leave out what differs between trials (the searched keys, each study's optimizer
    and lr under tune.optimizers, the seed of replicates) and keep what they share and the study's settings."""
    from fisher_scale.study.experiment import study_params
    from fisher_scale.tune.space import resource_configs

    cfg = build_config(
        {
            "tune": {
                "optimizers": {"adamw": {}, "adafisher": {"optimizer.damping": {"loguniform": [1e-4, 1e-1]}}},
                "seeds": [0, 1],
            }
        }
    )
    params = study_params(cfg, resource_configs(check_study(cfg)), {"lr", "optimizer.damping"})
    assert {"lr", "optimizer.name", "optimizer.damping", "seed"}.isdisjoint(params)
    assert params["peft.rank"] == cfg.peft.rank and params["tune.metric"] == cfg.tune.metric
    assert not any(key.startswith("tracking.") for key in params)


def test_resume_finds_only_the_same_study_name_and_command(tmp_path: Path) -> None:
    from fisher_scale.study.experiment import StudyState, find_resumable, write_state

    root = str(tmp_path)
    for study, kind, finished in (
        ("demo-20260101-000000", "tune", False),
        ("demo-20260102-000000", "tune", True),
        ("demo-big-20260103-000000", "tune", False),
        ("demo-20260104-000000", "scale", False),
    ):
        write_state(root, StudyState(study, {}, "sqlite:///x.db", "1", "r", kind=kind, finished=finished))
    assert find_resumable(root, "demo", "tune").study == "demo-20260101-000000"
    assert find_resumable(root, "demo", "scale").study == "demo-20260104-000000"
    assert find_resumable(root, "demo-big", "tune").study == "demo-big-20260103-000000"
    assert find_resumable(root, "dem", "tune") is None


def test_compare_finds_the_tracking_uri_its_newest_study_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fisher-scale compare NAME`` works as ``tune`` prints it: the store is the one the newest study of that name
    wrote down (any command, finished or not, across the roots), not ``./mlflow.db``."""
    from fisher_scale.study.experiment import StudyState, write_state
    from fisher_scale.tune.compare import experiment_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/ray_results, the second default root: none here
    stores = {name: tmp_path / f"{name}.db" for name in ("old", "new", "other")}
    for store in stores.values():
        store.touch()
    for root, study, store in (
        ("outputs/ray", "tune-demo-20260101-000000", "old"),
        (str(tmp_path / "shared"), "tune-demo-20260102-000000", "new"),
        ("outputs/ray", "tune-demo-big-20260103-000000", "other"),
    ):
        write_state(root, StudyState(study, {}, f"sqlite:///{stores[store]}", "1", "r", finished=store != "new"))
    assert experiment_tracking_uri("tune-demo", None, None) == f"sqlite:///{stores['old']}"
    assert experiment_tracking_uri("tune-demo", None, str(tmp_path / "shared")) == f"sqlite:///{stores['new']}"
    assert experiment_tracking_uri("tune-demo", "sqlite:///other.db", None) == f"sqlite:///{stores['other']}"
    from fisher_scale.study.experiment import compare_command

    printed = {
        path: compare_command(build_config({"name": "tune-demo", "distributed": {"storage_path": path}}))
        for path in ("outputs/ray", str(tmp_path / "outputs" / "ray"), "/mnt/shared/ray", "s3://bucket/ray")
    }
    assert printed == {
        "outputs/ray": "fisher-scale compare tune-demo",
        str(tmp_path / "outputs" / "ray"): "fisher-scale compare tune-demo",
        "/mnt/shared/ray": "fisher-scale compare tune-demo --storage /mnt/shared/ray",
        "s3://bucket/ray": "fisher-scale compare tune-demo --storage s3://bucket/ray",
    }


def test_compare_never_creates_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no study of the name and no database where it falls back to, compare says where it looked and leaves
    nothing behind (no file, no folder)."""
    from fisher_scale.errors import InputError
    from fisher_scale.tune.compare import compare_experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(InputError, match=r"no MLflow database at .*mlflow\.db \(no study tune-demo-<timestamp> under "):
        compare_experiment("tune-demo")
    with pytest.raises(InputError, match=r"no MLflow database at .*deep/mlflow\.db \(--tracking-uri\)"):
        compare_experiment("tune-demo", tracking_uri="sqlite:///outputs/deep/mlflow.db")
    assert list(tmp_path.iterdir()) == []  # (the home folder is never made either)


# --- tracking server ---


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path: Path) -> None:
    from fisher_scale.tune.study import run_study

    tree = study_tree(tmp_path)
    tree["tracking"]["uri"] = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot reach the MLflow tracking server at http://127\.0\.0\.1"):
        run_study(build_config(tree))
    assert time.monotonic() - started < 30
    assert not (tmp_path / "ray").exists()  # nothing was started or written


@pytest.fixture
def mlflow_server(tmp_path: Path, postgres: Callable[[str], str]):
    """A real ``mlflow server`` on loopback with its backend store on PostgreSQL (as on a cluster) and its own
    artifact folder."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            postgres(f"mlflow_{tmp_path.name}"),
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                if reply.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(process.pid, signal.SIGTERM)
        pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@needs_data
def test_sweep_with_early_stopping_runs_to_the_end_tracked_on_a_server(
    ray_session: None, tmp_path: Path, mlflow_server: str, postgres: Callable[[str], str]
) -> None:
    """Two studies (arms of ``tune.arms``) run side by side in one Tune experiment, each with its own Optuna study,
    budget and ASHA; ASHA stops trials (their placement groups are freed, the next trials run), and MLflow
    on a real server gets a parent run with one finished child per trial, params, step metrics and artifacts.
    Optuna and the MLflow server keep their records on PostgreSQL, as the cluster configs have them. The trials
    train in their reused Tune actors (``tune.train_in_trial``), ASHA stopping them mid-run; the resume test below
    runs Ray Train trials."""
    import optuna
    from mlflow import MlflowClient

    from fisher_scale.tune.study import run_study

    arms = {"narrow": {"peft.rank": 2}, "wide": {"peft.rank": 4}}
    tree = study_tree(
        tmp_path, scheduler="asha", grace_period=4, reduction_factor=2, arms=arms, max_concurrent=2, train_in_trial=True
    )
    tree["tracking"]["uri"] = mlflow_server
    tree["tune"]["storage"] = postgres(f"optuna_{tmp_path.name}")
    cfg = build_config(tree)
    state = run_study(cfg)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tune-test")
    parent = client.get_run(state.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["tune.metric"] == "gsm8k/loss"
    children = client.search_runs([experiment.experiment_id], filter_string="tags.`fisher_scale.kind` = 'trial'")
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {state.parent_run_id}
    assert len({c.data.tags["ray_trial_id"] for c in children}) == 6
    assert all(c.info.status == "FINISHED" for c in children)
    by_arm = {
        label: [c for c in children if c.data.tags["study_label"] == label] for label in ("adamw-narrow", "adamw-wide")
    }
    assert [len(runs) for runs in by_arm.values()] == [3, 3]
    narrow, wide = by_arm.values()
    assert any(
        a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time for a in narrow for b in wide
    )
    last_steps, stopped_at = [], {}
    for child in children:
        assert child.data.params["optimizer.name"] == "adamw" and "lr" in child.data.params
        assert child.data.params["peft.rank"] == ("2" if child in narrow else "4")
        assert child.data.params["distributed.num_workers"] == "1"
        losses = client.get_metric_history(child.info.run_id, "train/loss")
        evals = client.get_metric_history(child.info.run_id, "gsm8k/loss")
        assert [m.step for m in evals] == sorted({m.step for m in evals}) and evals
        last_steps.append(max(m.step for m in losses))
        if last_steps[-1] < cfg.train.steps:
            assert child.data.tags["stopped_by"] == "asha"
            stopped_at[child.data.tags["ray_trial_id"]] = int(child.data.tags["stopped_at_step"])
        else:
            assert "stopped_by" not in child.data.tags
    assert min(last_steps) < cfg.train.steps, f"ASHA stopped nothing: last steps {last_steps}"
    assert max(last_steps) == cfg.train.steps
    for child, last in zip(children, last_steps, strict=True):  # ASHA lets a trial at the last step finish
        output = tmp_path / "ray" / state.study / "outputs" / child.data.tags["ray_trial_id"]
        assert (output / "result.json").is_file() == (last == cfg.train.steps), (last, output)
    for label, runs in by_arm.items():
        best = state.best[label]
        assert best["trial_id"] in {c.data.tags["ray_trial_id"] for c in runs}
        assert {a.path for a in client.list_artifacts(best["run_id"], "adapter")} >= {"adapter/adapter_config.json"}
        study = optuna.load_study(study_name=f"{state.study}/{label}", storage=cfg.tune.storage)
        finished = sum(t.state.name == "COMPLETE" for t in study.trials)  # lr: the only searched key
        assert best["importances"] == ({"lr": pytest.approx(1.0)} if finished >= 3 else {}), finished
        assert len(study.trials) == 3 and study.metric_names == ["gsm8k/loss"]
        for trial in study.trials:  # pruned where ASHA stopped it, intermediate values at the eval steps
            ray_id = trial.user_attrs["ray_trial_id"]
            (run,) = [c for c in children if c.data.tags["ray_trial_id"] == ray_id]  # Optuna, Ray and MLflow linked
            assert run.data.tags["optuna_trial_number"] == str(trial.number)
            assert run.data.tags["optuna_study"] == study.study_name
            assert trial.state.name == ("PRUNED" if ray_id in stopped_at else "COMPLETE")
            assert sorted(trial.intermediate_values) == list(range(4, stopped_at.get(ray_id, 12) + 1, 4))
    parent_artifacts = {a.path for a in client.list_artifacts(state.parent_run_id)}
    assert {"best_adapter", "plots", "config.json", "comparison.json"} <= parent_artifacts
    plots = {a.path for a in client.list_artifacts(state.parent_run_id, "plots")}
    assert {"plots/training_curves.png", "plots/gsm8k_loss_vs_lr.png", "plots/gsm8k_loss_vs_time.png"} <= plots
    _check_what_the_mlflow_ui_reads(mlflow_server, experiment.experiment_id, state.study, state.parent_run_id)

    from fisher_scale.tune.compare import compare_experiment

    first = compare_experiment("tune-test", tracking_uri=mlflow_server, out=tmp_path / "compare")
    # found through the study's study.json, as `fisher-scale compare tune-test --storage ...` finds it
    comparison = compare_experiment("tune-test", storage=str(tmp_path / "ray"), target=100.0, out=tmp_path / "compare")
    assert comparison.tracking_uri == mlflow_server and client.get_run(first.run_id).info.lifecycle_stage == "deleted"
    assert (comparison.metric, comparison.mode, comparison.trials) == ("gsm8k/loss", "min", 6)
    rows = {row["arm"]: row for row in comparison.rows}
    assert parent.data.tags["fisher_scale.reference"] == "adamw-narrow"
    assert rows["adamw-narrow"]["verdict"] == "reference" and rows["adamw-wide"]["verdict"] == "too few studies"
    row = rows["adamw-narrow"]
    assert row["trials"] == 3 and row["studies"] == 1
    histories = [client.get_metric_history(c.info.run_id, "gsm8k/loss") for c in narrow]
    finals = [max(history, key=lambda m: m.step).value for history in histories]
    assert row["best gsm8k/loss"] == pytest.approx(min(finals)) == state.best["adamw-narrow"]["metric"]
    assert row["median steps to target"] == 4  # every trial's first evaluation (step 4) is below 100
    assert (tmp_path / "compare" / "training_curves.png").is_file()
    logged = client.search_runs([experiment.experiment_id], filter_string="tags.`fisher_scale.kind` = 'compare'")
    assert len(logged) == 1 and "comparison.json" in {a.path for a in client.list_artifacts(logged[0].info.run_id)}

    from fisher_scale.tune.report import write_report

    text = write_report("tune-test", comparison, tmp_path / "compare").read_text()
    assert "- `model.name`: tiny" in text and "- studies (seeds): 3; trials compared: 6" in text
    assert f"| adamw-narrow | 3 | 1 | {row['best gsm8k/loss']:.4g} |" in text
    assert "![training_curves](training_curves.png)" in text
    assert "report.md" in {a.path for a in client.list_artifacts(comparison.run_id)}


def _reference_losses(cfg: Any, values: dict[str, Any], tmp_path: Path) -> dict[int, float]:
    """``train/loss`` by step of the study's base config with ``values``, trained by the local launcher."""
    import torch

    from fisher_scale.config import with_values
    from fisher_scale.train.local import run_jobs

    ((base, _),) = study_spaces(cfg).values()
    reference = with_values(base, {**values, "train.output_dir": str(tmp_path / "reference")})
    run_jobs(1, [("reference", reference.model_dump(mode="json"), None)], tmp_path)
    return {r["step"]: r["train/loss"] for r in torch.load(tmp_path / "reference-reports.pt", weights_only=False)}


@needs_data
def test_one_worker_trials_train_in_their_reused_tune_actor_as_a_worker_process_would(
    ray_session: None, tmp_path: Path
) -> None:
    """``tune.train_in_trial``: two trials of the same point train one after the other in one reused Tune actor,
    with no Ray Train run, and report the losses of that config trained by the local launcher (a process and a
    process group of its own); both runs are tracked, and the best one's adapter comes from its Tune checkpoint."""
    from mlflow import MlflowClient

    from fisher_scale.tune.study import run_study

    tree = study_tree(tmp_path, num_samples=2, sampler="random", space={"lr": {"choice": [2e-3]}}, train_in_trial=True)
    cfg = build_config(tree)
    state = run_study(cfg)

    study = tmp_path / "ray" / state.study
    assert not (study / "train").exists()  # where Ray Train runs would have been stored
    results = [
        [json.loads(line) for line in path.read_text().splitlines()] for path in study.glob("studies/*/result.json")
    ]
    assert len(results) == 2 and len({r["pid"] for trial in results for r in trial}) == 1, "the actor was not reused"
    expected = _reference_losses(cfg, {"lr": 2e-3}, tmp_path)
    client = MlflowClient(cfg.tracking.uri)
    children = client.search_runs([state.experiment_id], filter_string="tags.`fisher_scale.kind` = 'trial'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        losses = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "train/loss")}
        assert losses == pytest.approx(expected, rel=1e-6) and len(losses) == 6
        assert "/studies/" in child.data.tags["checkpoint"]  # Tune's own checkpoint of the trial
        output = study / "outputs" / child.data.tags["ray_trial_id"]
        assert json.loads((output / "result.json").read_text())["metrics"]["step"] == cfg.train.steps
    best = state.best["adamw"]
    assert {a.path for a in client.list_artifacts(best["run_id"], "adapter")} >= {"adapter/adapter_config.json"}


@needs_data
def test_a_trial_training_in_its_actor_resumes_from_its_tune_checkpoint_when_the_actor_dies(
    ray_session: None, tmp_path: Path
) -> None:
    """``tune.train_in_trial`` with ``tune.max_failures``: the trial's actor is killed after its first checkpoint,
    Tune restarts the trial, which resumes from that checkpoint and reports the losses of an uninterrupted run."""
    import threading

    from mlflow import MlflowClient

    from fisher_scale.tune.study import run_study

    from .test_ray_train import kill_after_first_checkpoint

    tree = study_tree(
        tmp_path, num_samples=1, sampler="random", space={"lr": {"choice": [2e-3]}}, train_in_trial=True, max_failures=1
    )
    tree["train"]["steps"] = 24
    cfg = build_config(tree)
    killed: list[int] = []
    done = threading.Event()
    checkpoints = f"{tmp_path}/ray/*/studies/*/checkpoint_*/trainer_state.json"
    # ImplicitFunc: Tune's actor of a function trainable
    watcher = threading.Thread(
        target=lambda: killed.extend(kill_after_first_checkpoint(checkpoints, "ImplicitFunc", done))
    )
    watcher.start()
    try:
        state = run_study(cfg)
    finally:
        done.set()
        watcher.join()
    assert killed, "the trial finished before its actor could be killed: nothing was resumed"
    (trial,) = (tmp_path / "ray" / state.study).glob("studies/*/result.json")
    rows = [json.loads(line) for line in trial.read_text().splitlines()]
    restarted = [r["step"] for r in rows if r["pid"] != killed[0]]
    assert restarted and min(restarted) >= 4, restarted  # from its checkpoint on, not from step 0
    expected = _reference_losses(cfg, {"lr": 2e-3}, tmp_path)
    client = MlflowClient(cfg.tracking.uri)
    (child,) = client.search_runs([state.experiment_id], filter_string="tags.`fisher_scale.kind` = 'trial'")
    assert child.info.status == "FINISHED"
    losses = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "train/loss")}
    assert losses == pytest.approx(expected, rel=1e-6) and max(losses) == 24


def test_training_in_the_trial_needs_one_worker() -> None:
    with pytest.raises(ConfigError, match=r"tune.train_in_trial.*distributed.num_workers=1, not 2"):
        build_config({"distributed": {"num_workers": 2}, "tune": {"train_in_trial": True}})


def _check_what_the_mlflow_ui_reads(url: str, experiment: str, study: str, parent_run_id: str) -> None:
    """The UI's own page and the endpoint its runs table reads (``ajax-api``): the study's parent run and its
    children nested under it, each named, with the grouped metric columns and no ``step`` column."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/", timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    body = json.dumps({"experiment_ids": [experiment], "max_results": 100}).encode()
    request = urllib.request.Request(
        f"{url}/ajax-api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        runs = json.load(reply)["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}
    children = [r for r in runs if tags[r["info"]["run_id"]].get("fisher_scale.kind") == "trial"]
    assert names[parent_run_id] == study and len(children) == 6
    for child in children:
        run_id = child["info"]["run_id"]
        assert tags[run_id]["mlflow.parentRunId"] == parent_run_id
        assert names[run_id] == f"{tags[run_id]['study_label']}-{tags[run_id]['ray_trial_id']}"
        columns = {m["key"] for m in child["data"]["metrics"]}
        assert {"train/loss", "train/tokens_per_s", "gsm8k/loss", "time/train_s", "memory/peak_bytes"} <= columns
        assert "step" not in columns and any(c.startswith("system/node0/") for c in columns)


def mlflow_children(db: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tune-test")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string="tags.`fisher_scale.kind` = 'trial'")


@needs_data
def test_interrupted_study_resumes_without_lost_or_duplicated_trials(tmp_path: Path) -> None:
    """Ctrl+C after the first trial finished, then ``--resume``: every trial ends once, one MLflow run
    each, in the same parent run and Optuna studies (two replicates of ``--seeds``, one trial each: the
    restored search keeps each study's budget, each trial its replicate's seed)."""
    import optuna
    from mlflow import MlflowClient

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study_tree(tmp_path, num_samples=1)))
    command = [str(Path(sys.executable).parent / "fisher-scale"), "tune", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([*command, "--seeds", "0,1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not any(run.info.status == "FINISHED" for run in mlflow_children(tmp_path / "mlflow.db")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in 300 s"
        time.sleep(2)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    interrupted = mlflow_children(tmp_path / "mlflow.db")
    assert len(interrupted) in (1, 2) and sum(r.info.status == "FINISHED" for r in interrupted) == 1

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    children = mlflow_children(tmp_path / "mlflow.db")
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    assert len({run.data.tags["ray_trial_id"] for run in children}) == 2
    assert {run.info.run_id for run in interrupted} <= {run.info.run_id for run in children}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-test")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`fisher_scale.kind` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    assert {run.data.tags["study_label"] for run in children} == {"adamw"}
    replicates = {run.data.tags["fisher_scale.replicate"]: run.data.params["seed"] for run in children}
    assert replicates == {"seed0": "0", "seed1": "1"}
    for replicate in replicates:  # the restored search kept each study's budget: one trial each
        study = optuna.load_study(
            study_name=f"{parents[0].data.tags['fisher_scale.study']}/adamw/{replicate}",
            storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        )
        assert [t.state.name for t in study.trials] == ["COMPLETE"], replicate
