"""Every study of ``fisher-scale tune`` in one Tune experiment, so that their trials run at the same time
(``tune.max_concurrent`` trials in all) and stay fair: each study (one label: an optimizer, or an
optimizer and arm) keeps its own Optuna search, sampler state, trial budget and ASHA brackets, and a
trial is only ever compared with the trials of its own study. A trial's config names its study under
:data:`STUDY_KEY`.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from fisher_scale.study.trials import STUDY_KEY


class StudiesSearch(Searcher):
    """One searcher per study, asked in turn: the next trial goes to the study with the fewest trials so far
    (in listed order on ties) until every study has its budget, so studies progress together."""

    def __init__(self, searches: dict[str, Searcher], budgets: dict[str, int], metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searches, self.budgets = searches, budgets
        self.suggested = dict.fromkeys(searches, 0)
        self.study_of: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # each study's searcher was built with its own space, metric and mode

    def suggest(self, trial_id: str) -> dict | str | None:
        open_studies = [label for label in self.searches if self.suggested[label] < self.budgets[label]]
        if not open_studies:
            return Searcher.FINISHED
        label = min(open_studies, key=lambda name: self.suggested[name])
        config = self.searches[label].suggest(trial_id)
        if not isinstance(config, dict):
            return config  # the study's searcher waits (None) or is done early
        self.suggested[label] += 1
        self.study_of[trial_id] = label
        return {STUDY_KEY: label, **config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searches[self.study_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.study_of:
            self.searches[self.study_of[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as stream:
            self.__dict__.update(pickle.load(stream))


class StudiesScheduler(FIFOScheduler):
    """One scheduler per study (ASHA), each fed only its own study's trials; trials start first come, first
    served (FIFO) whatever their study."""

    def __init__(self, schedulers: dict[str, TrialScheduler]) -> None:
        super().__init__()
        self.schedulers = schedulers

    def _of(self, trial: Any) -> TrialScheduler:
        return self.schedulers[trial.config[STUDY_KEY]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{label}: {s.debug_string()}" for label, s in self.schedulers.items())

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.schedulers, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as stream:
            self.schedulers = pickle.load(stream)
