"""Each optimizer's hyperparameters, once: names, defaults, ranges and meaning.

The optimizers validate their arguments with these classes, the config builds its ``optimizer.*`` schema
from them and the README's optimizer table is checked against them. Plain dataclasses (no torch, no
pydantic): the optimizers stay a library on torch alone and the config loads nothing heavy.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

from fisher_scale.errors import InputError

#: AdamW's β2, fixed (in ``adamw`` and in the Fisher optimizers' AdamW fallback)
ADAMW_BETA2 = 0.999
EMA_MODES = ("convex", "official")
FALLBACKS = ("adamw", "official")
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default: Any, doc: str, *, choices: tuple[str, ...] | None = None, **bounds: float) -> Any:
    """A dataclass field carrying its meaning and its valid values (``ge``/``gt``/``le``/``lt`` or ``choices``)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "bounds": bounds})


def expected(spec: dataclasses.Field) -> str:
    """What a valid value of ``spec`` is, in words: ``in [0, 1)``, ``one of ('convex', 'official')``."""
    choices, bounds = spec.metadata["choices"], spec.metadata["bounds"]
    if choices is not None:
        return f"one of {choices}" if len(choices) > 1 else repr(choices[0])
    kind = "an integer " if spec.type == "int" else ""
    if len(bounds) == 2:
        (low, a), (high, b) = sorted(bounds.items(), key=lambda kv: kv[0][0] != "g")
        return f"{kind}in {'[' if low == 'ge' else '('}{a:g}, {b:g}{']' if high == 'le' else ')'}"
    return kind + " ".join(f"{_BOUNDS[name][1]} {value:g}" for name, value in bounds.items())


def _valid(spec: dataclasses.Field, value: Any) -> bool:
    choices, bounds = spec.metadata["choices"], spec.metadata["bounds"]
    if choices is not None:
        return value in choices
    if spec.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        return False
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return all(_BOUNDS[name][0](value, bound) for name, bound in bounds.items())


@dataclass(frozen=True, kw_only=True)
class AdamWHyperparameters:
    """``adamw`` (torch's AdamW, β2 = 0.999); the Fisher optimizers extend these."""

    lr: float = setting(1e-3, "learning rate", ge=0)
    beta: float = setting(0.9, "momentum β (AdamW's β1)", ge=0, lt=1)
    weight_decay: float = setting(
        0.0, "AdamW, AdaFisherW and AdaFish: decoupled; AdaFisher: added to the gradient", ge=0
    )
    eps: float = setting(1e-8, "AdamW's ε (also in the Fisher optimizers' AdamW fallback)", gt=0)

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if not _valid(spec, value):
                raise InputError(f"{spec.name} must be {expected(spec)}, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class AdaFisherHyperparameters(AdamWHyperparameters):
    """``adafisher`` and ``adafisherw`` (ALGORITHMS.md §1)."""

    damping: float = setting(1e-3, "λ added to F̃ (the normalised factors contain zeros)", gt=0)
    ema_decay: float = setting(0.8, "γ of the factor EMA", ge=0, lt=1)
    ema_mode: str = setting(
        "convex",
        "convex: F ← γF + (1-γ)F_new, min-max normalised when used (paper Eq. 3); official: the reference "
        "code's (γ/10)·F + (γ/100)·minmax(F_new) from ones",
        choices=EMA_MODES,
    )
    curvature_interval: int = setting(1, "statistics on optimizer steps k with k % T == 0", ge=1)
    fallback: str = setting(
        "adamw",
        "parameters of layers without a rule: AdamW (β1 = β, β2 = 0.999, ε = eps), or official: F̃ = 1 like the "
        "reference",
        choices=FALLBACKS,
    )


@dataclass(frozen=True, kw_only=True)
class AdaFishHyperparameters(AdaFisherHyperparameters):
    """``adafish`` (ALGORITHMS.md §2, the project's reconstruction): the convex EMA only."""

    ema_mode: str = setting(
        "convex", "the convex EMA (there is no reference code to be official to)", choices=("convex",)
    )
    max_full_dim: int = setting(
        64, "factor sides of a Linear/Conv2d layer up to this size are full matrices (LoRA's r × r sides)", ge=0
    )


#: optimizer name → its hyperparameters
HYPERPARAMETERS: dict[str, type[AdamWHyperparameters]] = {
    "adamw": AdamWHyperparameters,
    "adafisher": AdaFisherHyperparameters,
    "adafisherw": AdaFisherHyperparameters,
    "adafish": AdaFishHyperparameters,
}


def hyperparameters_of(name: str, values: dict[str, Any]) -> AdamWHyperparameters:
    """``values`` checked as optimizer ``name``'s hyperparameters; unknown keys are a ``ValueError`` naming them."""
    if name not in HYPERPARAMETERS:
        raise InputError(f"optimizer name must be one of {sorted(HYPERPARAMETERS)}, got {name!r}")
    cls = HYPERPARAMETERS[name]
    accepted = [spec.name for spec in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise InputError(f"{name} does not take {unknown} (it takes {accepted})")
    return cls(**values)


def markdown_table() -> str:
    """The README's optimizer table, built from the classes above (a test keeps the README equal to it)."""
    rows = ["| argument | optimizers | default | valid | meaning |", "|---|---|---|---|---|"]
    specs = {name: {spec.name: spec for spec in dataclasses.fields(cls)} for name, cls in HYPERPARAMETERS.items()}
    seen: list[dataclasses.Field] = []
    for fields in specs.values():
        for spec in fields.values():
            if any(spec.name == other.name and spec.metadata == other.metadata for other in seen):
                continue
            seen.append(spec)
            users = ", ".join(name for name, own in specs.items() if spec.name in own and own[spec.name] == spec)
            default = f"`{spec.default}`" if isinstance(spec.default, str) else f"{spec.default:g}"
            rows.append(f"| `{spec.name}` | {users} | {default} | {expected(spec)} | {spec.metadata['doc']} |")
    return "\n".join(rows)
