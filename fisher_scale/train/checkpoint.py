"""Checkpoints that do not depend on the number of workers.

Optimizer state (moments, and Fisher factors) is stored per piece, keyed by parameter name and
element range, so a run saved by N ranks resumes on M ranks: every rank maps all pieces and copies
the ranges it owns now. Layout of a checkpoint directory:

    adapter/                 PEFT ``save_pretrained`` (or ``model.safetensors`` of the trainable weights)
    optimizer.rank<r>.pt     rank r's pieces, its RNG state, the Fisher factors (same on all ranks)
    mask.safetensors         the FISH mask, when one is active
    trainer_state.json       next step, workers, and the run's metrics so far
    manifest.rank<r>.json    size and SHA-256 of each file rank r wrote, written after them

Ray Train merges the ranks' folders into one checkpoint. The manifests make a damaged checkpoint (a truncated
file, a rank's files missing) an error that names the file, checked before a resume reads anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fisher_scale.errors import DamagedCheckpoint, InputError, MissingInput
from fisher_scale.optim import FisherOptimizer
from fisher_scale.optim.pieces import PieceMap, elementwise

STATE = "trainer_state.json"
MANIFESTS = "manifest.rank*.json"


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
        raise MissingInput(f"{directory} holds no optimizer.rank*.pt")
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


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise MissingInput(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise DamagedCheckpoint(f"{path}: not a readable safetensors file ({error})") from None


def load_weights(directory: Path, model: nn.Module) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, _read_safetensors(directory / "adapter_model.safetensors"))
    else:
        weights = _read_safetensors(directory / "model.safetensors")
        unknown = set(weights) - {n for n, _ in model.named_parameters()}
        if unknown:
            raise InputError(f"{directory}: weights for parameters the model lacks: {sorted(unknown)[:5]}")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int) -> None:
    """Record every file in ``directory`` (what this rank wrote into its own folder); call it last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.match(MANIFESTS))
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / f"manifest.rank{rank}.json").write_text(json.dumps(entries, indent=1))


def check_files(directory: Path) -> None:
    """Every file the manifests in ``directory`` list is there, whole and unchanged."""
    for manifest in sorted(directory.glob(MANIFESTS)):
        try:
            entries = json.loads(manifest.read_text())
        except (OSError, ValueError) as error:
            raise DamagedCheckpoint(f"{manifest}: unreadable manifest ({error})") from None
        for name, entry in entries.items():
            path = directory / name
            if not path.is_file():
                raise DamagedCheckpoint(f"{path}: missing (listed in {manifest.name})")
            if path.stat().st_size != entry["bytes"]:
                raise DamagedCheckpoint(
                    f"{path}: {path.stat().st_size} bytes, {manifest.name} says {entry['bytes']} (truncated or "
                    "overwritten)"
                )
            if _sha256(path) != entry["sha256"]:
                raise DamagedCheckpoint(f"{path}: its content differs from the SHA-256 in {manifest.name}")


def check_checkpoint(directory: Path) -> dict[str, Any]:
    """The trainer state of a whole checkpoint: every rank's manifest present and every file matching it."""
    if not (directory / STATE).is_file():
        raise MissingInput(f"{directory} is not a fisher-scale checkpoint directory (no {STATE})")
    try:
        state = read_state(directory)
        workers = int(state["workers"])
    except (OSError, ValueError, KeyError) as error:
        raise DamagedCheckpoint(f"{directory / STATE}: unreadable ({type(error).__name__}: {error})") from None
    manifests = len(list(directory.glob(MANIFESTS)))
    if manifests != workers:
        raise DamagedCheckpoint(
            f"{directory}: written by {workers} rank(s) but holds {manifests} manifest.rank*.json: files are missing"
        )
    check_files(directory)
    return state
