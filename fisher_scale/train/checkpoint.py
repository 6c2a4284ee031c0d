"""Checkpoints that do not depend on the number of workers.

Optimizer state (moments, and Fisher factors) is stored per piece, keyed by parameter name and
element range, so a run saved by N ranks resumes on M ranks: every rank maps all pieces and copies
the ranges it owns now. Layout of a checkpoint directory:

    adapter/                 PEFT ``save_pretrained`` (or ``model.safetensors`` of the trainable weights)
    optimizer.rank<r>.pt     rank r's pieces, its RNG state, the Fisher factors (same on all ranks)
    mask.safetensors         the FISH mask, when one is active
    trainer_state.json       next step, workers, and the run's metrics so far
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fisher_scale.optim import FisherOptimizer
from fisher_scale.optim.pieces import PieceMap, elementwise

STATE = "trainer_state.json"


def _piece_states(optimizer: torch.optim.Optimizer, pieces: PieceMap) -> list[dict[str, Any]]:
    saved = []
    for tensor, tensor_pieces in pieces.items():
        state = optimizer.state.get(tensor, {})
        if not state:
            continue
        for piece in tensor_pieces:
            tensors = {k: piece.of(v).clone() for k, v in state.items() if elementwise(v, tensor)}
            scalars = {k: v for k, v in state.items() if k not in tensors}
            saved.append(
                {"name": piece.name, "start": piece.start, "end": piece.end, "tensors": tensors, "scalars": scalars}
            )
    return saved


def save_optimizer(directory: Path, rank: int, optimizer: torch.optim.Optimizer, pieces: PieceMap) -> None:
    payload = {"pieces": _piece_states(optimizer, pieces), "rng": torch.get_rng_state()}
    if isinstance(optimizer, FisherOptimizer):
        payload["fisher"] = optimizer.curvature.state_dict()
    torch.save(payload, directory / f"optimizer.rank{rank}.pt")


def load_optimizer(directory: Path, rank: int, world: int, optimizer: torch.optim.Optimizer, pieces: PieceMap) -> None:
    """Fill this rank's optimizer state from every saved rank's pieces (any number of saved ranks). The files are
    read as tensors and plain containers only (no unpickled objects) and memory-mapped, so a rank reads the
    ranges it copies, not every rank's state."""
    files = sorted(directory.glob("optimizer.rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no optimizer.rank*.pt")
    payloads = [torch.load(f, weights_only=True, mmap=True) for f in files]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for payload in payloads:
        for entry in payload["pieces"]:
            by_name.setdefault(entry["name"], []).append(entry)
    for tensor, tensor_pieces in pieces.items():
        state: dict[str, Any] = {}
        for piece in tensor_pieces:
            for entry in by_name.get(piece.name, []):
                low, high = max(piece.start, entry["start"]), min(piece.end, entry["end"])
                if low >= high:
                    continue
                # copies: torch's AdamW advances a tensor ``step`` in place, one per parameter
                state.update({k: v.clone() if isinstance(v, Tensor) else v for k, v in entry["scalars"].items()})
                for key, values in entry["tensors"].items():
                    target = state.setdefault(key, torch.zeros_like(tensor))
                    view = target.view(-1)[piece.offset + low - piece.start : piece.offset + high - piece.start]
                    view.copy_(values[low - entry["start"] : high - entry["start"]])
        if state:
            optimizer.state[tensor] = state
    if isinstance(optimizer, FisherOptimizer):
        optimizer.curvature.load_state_dict(payloads[0]["fisher"])
    if len(files) == world:
        torch.set_rng_state(payloads[rank]["rng"])


def save_weights(directory: Path, model: nn.Module) -> None:
    """The adapter with PEFT's ``save_pretrained`` layout, or the trainable weights of a full fine-tune."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(directory / "model.safetensors"))


def load_weights(directory: Path, model: nn.Module) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        weights = directory / "adapter_model.safetensors"
        set_peft_model_state_dict(model, load_file(str(weights)))
    else:
        weights = load_file(str(directory / "model.safetensors"))
        unknown = set(weights) - {n for n, _ in model.named_parameters()}
        if unknown:
            raise ValueError(f"{directory}: weights for parameters the model lacks: {sorted(unknown)[:5]}")
        params = dict(model.named_parameters())
        if not any(hasattr(p, "ds_id") for p in params.values()):
            model.load_state_dict(weights, strict=False)
            return
        import deepspeed

        for name, value in weights.items():  # loaded under ZeRO-3: one parameter whole at a time
            with torch.no_grad(), deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                params[name].copy_(value)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE).write_text(json.dumps(state, indent=2))


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE).read_text())
