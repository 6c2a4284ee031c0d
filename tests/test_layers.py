"""The package's layers (DESIGN.md, docs/ARCHITECTURE.md): every import points down, and the bottom layers
import alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fisher_scale"

#: top-level module or subpackage → layer; a module may import only from lower layers
LAYERS = {
    "errors": 0,
    "hyperparameters": 0,
    "config": 0,
    "optim": 1,
    "masks": 1,
    "models": 2,
    "data": 2,
    "eval": 2,
    "tracking": 3,
    "tasks": 3,
    "plan": 4,
    "train": 4,
    "study": 5,
    "tune": 6,
    "scale": 6,
    "cli": 7,
}
#: imports within one layer that the design has: masks select through optim's sharding seam, eval reads data's
#: formats, the config is built from the hyperparameters, and both raise the package's errors; a training run
#: checks its memory plan before Ray starts
PEERS = {
    ("masks", "optim"),
    ("eval", "data"),
    ("config", "hyperparameters"),
    ("config", "errors"),
    ("hyperparameters", "errors"),
    ("train", "plan"),
}


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    """The package's top-level units ``path`` imports, at module level or inside functions."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fisher_scale":
            parts = node.module.split(".")
            units |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            units |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fisher_scale.")}
    return units


def test_every_unit_has_a_layer() -> None:
    units = {_unit(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units == set(LAYERS), f"place these in LAYERS: {units ^ set(LAYERS)}"


def test_imports_point_down_only() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        for imported in _imported_units(path) - {unit}:
            if LAYERS[imported] > LAYERS[unit] or (LAYERS[imported] == LAYERS[unit] and (unit, imported) not in PEERS):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {imported} (layer {LAYERS[imported]}) "
                              f"from layer {LAYERS[unit]}")  # fmt: skip
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    ("module", "allowed", "absent"),
    [
        ("fisher_scale.hyperparameters", {"hyperparameters", "errors"}, {"torch", "pydantic", "yaml"}),
        ("fisher_scale.config", {"config", "hyperparameters", "errors"}, {"torch", "ray"}),
        ("fisher_scale.optim", {"optim", "hyperparameters", "errors"}, {"pydantic", "ray", "transformers"}),
        ("fisher_scale.masks", {"optim", "masks", "hyperparameters", "errors"}, {"pydantic", "ray", "transformers"}),
    ],
)
def test_bottom_layers_import_alone(module: str, allowed: set[str], absent: set[str]) -> None:
    """In a fresh interpreter: the module loads nothing of the package outside ``allowed`` and none of ``absent``
    (the config is read before anything heavy; the optimizers and masks are a library on torch alone)."""
    probe = (
        f"import sys, {module}\n"
        "units = {m.split('.')[1] for m in sys.modules if m.startswith('fisher_scale.')}\n"
        "print(sorted(units)); print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    units, loaded = (set(ast.literal_eval(line)) for line in lines.splitlines())
    assert units <= allowed, units - allowed
    assert not (absent & loaded), absent & loaded


def test_the_read_only_commands_load_no_torch() -> None:
    """``compare`` and ``report`` read MLflow and draw: importing torch (2+ s) would be most of their time."""
    probe = (
        "import sys\nfrom fisher_scale import cli, tracking\nfrom fisher_scale.tune import compare, report\n"
        "from fisher_scale.study import experiment\nprint(sorted(m for m in ('torch', 'deepspeed', 'transformers') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(loaded.strip()) == []
