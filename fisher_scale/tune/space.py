"""Search spaces: ``tune.space`` (and per-optimizer overrides) checked against the config schema and
turned into Optuna distributions; every mistake is a ``ConfigError`` before Ray starts."""

from __future__ import annotations

import difflib
import re
from typing import Any

from fisher_scale.config import ConfigError, Dimension, ExperimentConfig, OptimizerConfig, searchable_keys, with_values
from fisher_scale.study.trials import replicate_key


def study_spaces(cfg: ExperimentConfig) -> dict[str, tuple[ExperimentConfig, dict[str, Dimension]]]:
    """One (base config, space) per Optuna study: per listed optimizer (``tune.optimizers``, optimizer
    fixed, overrides applied, ``null`` drops a key), else one study labelled by the optimizer name (or
    ``searched`` when ``optimizer.name`` is itself a dimension), a fixed optimizer's space without the keys it
    does not take; with ``tune.arms`` each of those
    once per arm, its values fixed, labelled ``<optimizer>-<arm>``; with ``tune.seeds`` each of those once
    per seed, keyed ``<label>/seed<n>``."""
    tune = cfg.tune
    if tune.optimizers is None:
        searched = "optimizer.name" in tune.space
        space = dict(tune.space) if searched else _taken_by(cfg.optimizer.name, tune.space)
        studies = {"searched" if searched else cfg.optimizer.name: (cfg, space)}
    elif "optimizer.name" in tune.space:
        raise ConfigError("tune.space.optimizer.name: drop it, tune.optimizers already fixes one optimizer per study")
    else:
        studies = {}
        for name, overrides in tune.optimizers.items():
            space = _taken_by(name, {k: v for k, v in {**tune.space, **overrides}.items() if v is not None})
            base = with_values(cfg, {"optimizer.name": name}, origin=f"tune.optimizers.{name}")
            studies[name] = (base, space)
    if tune.arms is not None:
        if tune.optimizers is not None and any("optimizer.name" in values for values in tune.arms.values()):
            raise ConfigError("tune.arms: an arm cannot set optimizer.name when tune.optimizers fixes one per study")
        studies = _with_arms(studies, tune.arms)
    return _with_seeds(studies, tune.seeds) if tune.seeds is not None else studies


def _taken_by(optimizer: str, space: dict[str, Dimension]) -> dict[str, Dimension]:
    """``space`` without the ``optimizer.*`` keys ``optimizer`` does not take (AdamW has no damping to search)."""
    taken = set(OptimizerConfig(name=optimizer).hyperparameters(lr=0.0))
    unused = {f"optimizer.{key}" for key in OptimizerConfig.model_fields if key not in taken | {"name"}}
    return {k: v for k, v in space.items() if k not in unused}


def _with_seeds(
    studies: dict[str, tuple[ExperimentConfig, dict[str, Dimension]]], seeds: list[int]
) -> dict[str, tuple[ExperimentConfig, dict[str, Dimension]]]:
    """Every study once per seed, the seed fixed in its base: repeated studies run side by side."""
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ConfigError(f"tune.seeds: {', '.join(map(str, repeated))} listed twice; a replicate needs its own seed")
    searched = [label for label, (_, space) in studies.items() if "seed" in space]
    if searched:
        raise ConfigError(f"tune.space.seed: searched in study {searched[0]} and fixed per replicate by tune.seeds")
    return {
        replicate_key(label, seed): (with_values(base, {"seed": seed}, origin="tune.seeds"), space)
        for label, (base, space) in studies.items()
        for seed in seeds
    }


def _with_arms(
    studies: dict[str, tuple[ExperimentConfig, dict[str, Dimension]]], arms: dict[str, dict[str, Any]]
) -> dict[str, tuple[ExperimentConfig, dict[str, Dimension]]]:
    """Every study once per arm: the arm's values fixed in its base (checked like ``--set``), never searched."""
    if not arms:
        raise ConfigError("tune.arms: empty; list at least one arm (an arm with no values, {}, is the base config)")
    known = set(searchable_keys())
    for arm, values in arms.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", arm):
            raise ConfigError(
                f"tune.arms.{arm}: name arms with letters, digits and underscores (it labels folders and metrics)"
            )
        unknown = [k for k in values if k not in known]
        if unknown:
            close = [m for k in unknown for m in difflib.get_close_matches(k, known, n=1)]
            raise ConfigError(
                f"tune.arms.{arm}: not config keys: {', '.join(unknown)}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
    armed = {}
    for label, (base, space) in studies.items():
        for arm, values in arms.items():
            both = sorted(set(values) & set(space))
            if both:
                searched = ", ".join(both)
                raise ConfigError(f"tune.arms.{arm}: {searched} also searched in study {label}: fix it or search it")
            armed[f"{label}-{arm}"] = (with_values(base, values, origin=f"tune.arms.{arm}"), space)
    return armed


#: where inside a continuous range the checks probe: a non-round fraction, so a uniform range on an int key gives
#: a non-integer value there and is refused
_INTERIOR = 0.37


def _probe_values(dimension: Dimension) -> list[Any]:
    """The edges, and for continuous ranges a non-round interior point (catches ``uniform`` on an int key)."""
    values = list(dimension.edges())
    if dimension.kind in ("uniform", "loguniform"):
        low, high = dimension.edges()
        values.append(low + _INTERIOR * (high - low))
    return values


def check_space(label: str, base: ExperimentConfig, space: dict[str, Dimension]) -> None:
    """Every key exists in the schema and every value the space can produce makes a valid config."""
    known = searchable_keys()
    problems = []
    for key, dimension in space.items():
        where = f"tune.space.{key}" if label == "-" else f"tune.space.{key} (study {label})"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; searchable keys: {', '.join(known)}"
            problems.append(f"  {where}: not a config key{hint}")
            continue
        for value in _probe_values(dimension):
            try:
                with_values(base, {key: value}, origin=where)
            except ConfigError as error:
                problems.append(f"  {where}: value {value!r} is invalid: {str(error).splitlines()[-1].strip()}")
                break
    if problems:
        raise ConfigError("the search space is invalid:\n" + "\n".join(problems))
    try:
        optuna_distributions(space)
    except ValueError as error:
        raise ConfigError(f"tune.space: Optuna cannot sample it: {error}") from None


def check_study(cfg: ExperimentConfig) -> dict[str, tuple[ExperimentConfig, dict[str, Dimension]]]:
    """The studies of ``cfg``, after checking spaces, the target metric and early-stopping settings."""
    from fisher_scale.tasks import is_eval_metric
    from fisher_scale.train.metrics import reported_metrics

    tune = cfg.tune
    studies = study_spaces(cfg)
    for label, (base, space) in studies.items():
        check_space(label if len(studies) > 1 else "-", base, space)
        reported = reported_metrics(base)
        if tune.metric not in reported:
            raise ConfigError(
                f"tune.metric: {tune.metric!r} is never reported by this training (study {label}); "
                f"it reports: {', '.join(sorted(reported))}"
            )
    if tune.scheduler == "asha" and any("train.steps" in space for _, space in studies.values()):
        raise ConfigError("tune.space.train.steps: ASHA's max_t is train.steps; fix it when tune.scheduler=asha")
    if tune.scheduler == "asha":
        if tune.grace_period >= cfg.train.steps:
            raise ConfigError(
                f"tune.grace_period={tune.grace_period} must be below train.steps={cfg.train.steps} "
                "for ASHA to stop anything"
            )
        intermediate = cfg.eval.every if is_eval_metric(tune.metric) else cfg.train.log_every
        if not intermediate or intermediate > tune.grace_period:
            raise ConfigError(
                f"tune.scheduler=asha needs {tune.metric!r} reported before the grace period of {tune.grace_period} "
                f"steps: set eval.every (eval metrics) or train.log_every (training metrics) to at most it"
            )
    return studies


def optuna_distributions(space: dict[str, Dimension]) -> dict[str, Any]:
    """Optuna distributions of a space, keyed by dotted config key (what ``OptunaSearch`` samples)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    distributions: dict[str, Any] = {}
    for key, dimension in space.items():
        values = dimension.edges()
        if dimension.kind == "choice":
            distributions[key] = CategoricalDistribution(list(values))
        elif dimension.kind == "int":
            distributions[key] = IntDistribution(values[0], values[1])
        else:
            distributions[key] = FloatDistribution(values[0], values[1], log=dimension.kind == "loguniform")
    return distributions


#: searched keys whose values change a trial's memory: their edges are planned before Ray starts
MEMORY_KEYS = ("distributed.", "data.batch_size", "data.max_length", "mask.batch_size", "peft.rank", "model.")


def edge_configs(
    studies: dict[str, tuple[ExperimentConfig, dict[str, Dimension]]], keys: tuple[str, ...]
) -> list[ExperimentConfig]:
    """Each study's base, and its searched values of ``keys`` (dotted keys or their prefixes) at the edges of
    their ranges, one key at a time."""
    configs = []
    for base, space in studies.values():
        configs.append(base)
        for key, dimension in space.items():
            if key.startswith(keys):
                configs += [with_values(base, {key: value}) for value in dimension.edges()]
    return configs


def resource_configs(studies: dict[str, tuple[ExperimentConfig, dict[str, Dimension]]]) -> list[ExperimentConfig]:
    """The configs whose workers must fit the cluster (a trial that cannot would wait for workers forever)."""
    return edge_configs(studies, ("distributed.",))
