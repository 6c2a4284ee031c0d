"""Concurrent studies in one Tune experiment (``fisher_scale.tune.concurrent``): each study keeps its own
searcher, trial budget and ASHA, checked against separate per-study objects fed the same events."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from fisher_scale.tune.concurrent import StudiesScheduler, StudiesSearch


class Recorder(Searcher):
    """A searcher that suggests a counter and records what it is told."""

    def __init__(self, name: str) -> None:
        super().__init__(metric="m", mode="max")
        self.name, self.asked, self.results, self.completed = name, [], [], []

    def suggest(self, trial_id: str) -> dict:
        self.asked.append(trial_id)
        return {"lr": float(len(self.asked))}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.results.append((trial_id, result["m"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed.append((trial_id, error))


def test_studies_take_turns_until_each_has_its_budget_and_hear_only_their_trials(tmp_path) -> None:
    searches = {"adamw-lora": Recorder("a"), "adamw-fish": Recorder("b")}
    search = StudiesSearch(searches, {"adamw-lora": 3, "adamw-fish": 1}, "m", "max")
    configs = [search.suggest(f"t{i}") for i in range(5)]
    assert configs[:4] == [
        {"study": "adamw-lora", "lr": 1.0},
        {"study": "adamw-fish", "lr": 1.0},
        {"study": "adamw-lora", "lr": 2.0},
        {"study": "adamw-lora", "lr": 3.0},
    ]
    assert configs[4] == Searcher.FINISHED
    search.on_trial_result("t1", {"m": 0.5})
    search.on_trial_result("t0", {"m": 0.7})
    search.on_trial_complete("t1", {"m": 0.6}, error=True)
    assert searches["adamw-lora"].results == [("t0", 0.7)] and searches["adamw-lora"].completed == []
    assert searches["adamw-fish"].results == [("t1", 0.5)] and searches["adamw-fish"].completed == [("t1", True)]
    search.save(str(tmp_path / "search.pkl"))
    restored = StudiesSearch({}, {}, "m", "max")
    restored.restore(str(tmp_path / "search.pkl"))
    assert restored.suggest("t5") == Searcher.FINISHED and restored.study_of["t3"] == "adamw-lora"


def test_each_study_keeps_its_own_optuna_space_and_sampler() -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    from fisher_scale.tune.study import EvalStepOptunaSearch

    def optuna_search(low: float, high: float) -> EvalStepOptunaSearch:
        return EvalStepOptunaSearch(
            {"lr": FloatDistribution(low, high, log=True)},
            metric="m",
            mode="max",
            sampler=optuna.samplers.RandomSampler(0),
            max_steps=8,
        )

    search = StudiesSearch(
        {"adamw": optuna_search(1e-4, 1e-3), "adafish": optuna_search(1e-2, 1e-1)},
        {"adamw": 4, "adafish": 4},
        "m",
        "max",
    )
    configs = [search.suggest(f"t{i}") for i in range(8)]
    for config in configs:
        low, high = (1e-4, 1e-3) if config["study"] == "adamw" else (1e-2, 1e-1)
        assert low <= config["lr"] <= high, config
    alone = optuna_search(1e-2, 1e-1)  # the same seeded sampler alone gives adafish's values in order
    assert [c["lr"] for c in configs if c["study"] == "adafish"] == [alone.suggest(f"s{i}")["lr"] for i in range(4)]


def asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="step", metric="m", mode="max", max_t=8, grace_period=2, reduction_factor=2)


@pytest.mark.parametrize("seed", [0, 1])
def test_asha_decisions_equal_one_scheduler_per_study(seed: int) -> None:
    """Interleaved reports of two studies at very different accuracy levels: the combined scheduler decides
    exactly what a separate ASHA per study decides, which one shared ASHA would not (it stops the weak study)."""
    import random

    rng = random.Random(seed)
    trials = [SimpleNamespace(trial_id=f"{s}{i}", config={"study": s}) for s in ("strong", "weak") for i in range(4)]
    level = {"strong": 0.9, "weak": 0.5}
    events = [
        (trial, step, level[trial.config["study"]] + rng.uniform(-0.05, 0.05)) for step in (2, 4) for trial in trials
    ]
    rng.shuffle(events)
    events.sort(key=lambda event: event[1])  # a rung's reports arrive in any order, but after the earlier rung
    combined = StudiesScheduler({"strong": asha(), "weak": asha()})
    separate = {"strong": asha(), "weak": asha()}
    shared = asha()
    for trial in trials:
        combined.on_trial_add(None, trial)
        separate[trial.config["study"]].on_trial_add(None, trial)
        shared.on_trial_add(None, trial)
    decisions = {"combined": [], "separate": [], "shared": []}
    for trial, step, value in events:
        result = {"step": step, "m": value}
        decisions["combined"].append(combined.on_trial_result(None, trial, result))
        decisions["separate"].append(separate[trial.config["study"]].on_trial_result(None, trial, result))
        decisions["shared"].append(shared.on_trial_result(None, trial, result))
    assert decisions["combined"] == decisions["separate"]
    assert decisions["shared"] != decisions["separate"]
