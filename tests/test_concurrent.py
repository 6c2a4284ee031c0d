"""Concurrent studies in one Tune experiment (``fisher_scale.tune.concurrent``): each study keeps its own
searcher, trial budget and ASHA, checked against separate per-study objects fed the same events."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune import Callback
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


def constant_trial(config: dict) -> None:
    """A trial that reports its config's level at every step (no training)."""
    from ray import tune

    for step in range(1, 9):
        tune.report({"step": step, "m": config["level"]})


class CtrlCOnce(Callback):
    """Ctrl+C (SIGINT to this process, which Tune handles by saving the experiment and stopping) when trial
    ``level`` first reports, once: a marker file says it happened, so the resumed experiment, which unpickles a
    fresh copy, runs on."""

    def __init__(self, level: float, marker: Path) -> None:
        self.level, self.marker = level, marker

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result["m"] == self.level and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGINT)


#: trial levels in the order the trials run; ASHA (rungs at steps 2 and 4) stops the 3rd, 5th and 7th at step 2
#: and the 8th at step 4
LEVELS = [0.5, 0.9, 0.3, 0.7, 0.4, 0.8, 0.2, 0.6]


def last_steps(tmp_path: Path, *, interrupt: bool, keep_state: bool) -> dict[float, int]:
    """The last step of each trial of one ASHA experiment, run through or interrupted as the 5th trial starts and
    resumed; with or without :class:`SchedulerState`."""
    from ray import tune

    from fisher_scale.study.callbacks import SchedulerState

    scheduler = StudiesScheduler({"a": asha()})
    path = tmp_path / f"interrupt{interrupt}-state{keep_state}"
    path.mkdir()
    callbacks = [CtrlCOnce(LEVELS[4], path / "interrupted")] if interrupt else []
    tuner = tune.Tuner(
        constant_trial,
        param_space={"study": "a", "level": tune.grid_search(LEVELS)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(
            name="asha",
            storage_path=str(path),
            callbacks=[*callbacks, SchedulerState(scheduler)] if keep_state else callbacks,
            verbose=0,
        ),
    )
    results = tuner.fit()
    if interrupt:
        assert len([r for r in results if r.metrics.get("step") == 8]) < len(LEVELS)  # it did stop early
        results = tune.Tuner.restore(str(path / "asha"), constant_trial, resume_unfinished=True).fit()
    return {r.config["level"]: r.metrics["step"] for r in results}


def test_a_resumed_asha_study_stops_the_trials_an_uninterrupted_one_stops(tmp_path: Path, ray_session) -> None:
    """Tune does not save its scheduler with the experiment: without SchedulerState the resumed ASHA forgets the
    rungs of the trials before the interruption and lets the 5th trial run on."""
    through = last_steps(tmp_path, interrupt=False, keep_state=True)
    assert through == {0.5: 8, 0.9: 8, 0.3: 2, 0.7: 8, 0.4: 2, 0.8: 8, 0.2: 2, 0.6: 4}, through
    assert last_steps(tmp_path, interrupt=True, keep_state=True) == through
    assert last_steps(tmp_path, interrupt=True, keep_state=False)[0.4] == 8
