"""Selecting, applying, reporting, saving and loading FISH masks (ALGORITHMS.md §3).

A mask is a dict of parameter name → bool tensor of the parameter's shape; True entries train,
False entries stay exactly at their value whatever the optimizer does.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fisher_scale.errors import InputError, MissingInput
from fisher_scale.optim.around_step import AroundStep
from fisher_scale.optim.layers import full_shape
from fisher_scale.optim.pieces import PieceMap, elementwise, whole_parameters

Mask = dict[str, Tensor]


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise InputError(f"mask.ratio must be in (0, 1], got {ratio!r}")


#: ``mask.selection``: the highest Fisher scores (FISH), k seeded random entries, or the lowest scores
SELECTIONS = ("fisher", "random", "reversed")


def select_mask(
    scores: Mapping[str, Tensor],
    ratio: float,
    *,
    always_keep: Mapping[str, Tensor] | None = None,
    selection: str = "fisher",
    seed: int = 0,
) -> Mask:
    """One global top-k over all candidates, ``k = round(ratio · N)`` with N counting every candidate
    and every always-kept parameter (a task head, kept whole, counts against the budget).

    ``selection`` picks which k (FISH-Tuning's contrastive baselines keep the same count): the highest
    scores, k entries drawn uniformly with ``seed`` (the scores unused), or the lowest scores. Ties at the
    threshold go to the lowest flat index in name order, so exactly k entries are kept and every rank with
    the same scores (and seed) selects the same mask.
    """
    _check_ratio(ratio)
    if selection not in SELECTIONS:
        raise InputError(f"mask.selection must be one of {SELECTIONS}, got {selection!r}")
    always_keep = always_keep or {}
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    if selection == "reversed":
        flat = -flat
    elif selection == "random":
        flat = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(seed))
    kept_whole = sum(p.numel() for p in always_keep.values())
    k = round(ratio * (flat.numel() + kept_whole)) - kept_whole
    if k < 1:
        raise InputError(
            f"mask.ratio={ratio} keeps {k + kept_whole} entries, no more than the {kept_whole} of the always-trained "
            "task head: raise the ratio"
        )
    k = min(k, flat.numel())
    threshold = torch.topk(flat, k, sorted=False).values.min()
    keep = flat > threshold
    ties = torch.nonzero(flat == threshold).squeeze(1)
    keep[ties[: k - int(keep.sum())]] = True
    mask, start = {}, 0
    for name in names:
        count = scores[name].numel()
        mask[name] = keep[start : start + count].view(scores[name].shape).clone()
        start += count
    mask.update({n: torch.ones_like(p, dtype=torch.bool) for n, p in always_keep.items()})
    return mask


def equal_budget_ratio(model: nn.Module, rank: int) -> float:
    """The ratio at which this PEFT-LoRA model (rank r') trains as many entries as vanilla LoRA at
    ``rank`` r: ``P(r) / P(r')``, counted per adapted layer from its actual A and B matrices (their
    full shapes, also when ZeRO-3 has partitioned them)."""
    shapes = {name: full_shape(p) for name, p in model.named_parameters()}
    target, actual = 0.0, 0
    for name, shape in shapes.items():
        if ".lora_A." in name or ".lora_embedding_A." in name:
            layer_rank = shape[0] if ".lora_A." in name else shape[1 if len(shape) > 1 else 0]
            b_name = name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            pair = math.prod(shape) + math.prod(shapes[b_name])
            actual += pair
            target += pair * rank / layer_rank
    if actual == 0:
        raise InputError("equal_budget_ratio needs a PEFT LoRA model (no lora_A parameter found)")
    ratio = target / actual
    _check_ratio(ratio)
    return ratio


_BLOCK = re.compile(r"^(.*?\.layers\.\d+)\.")


def mask_report(mask: Mapping[str, Tensor]) -> dict[str, float]:
    """Kept fractions: overall, per LoRA A / B kind, per transformer block and per matrix.

    Keys: ``kept/all``, ``kept/lora_A``, ``kept/lora_B``, ``kept/block/<...layers.N>``,
    ``kept/param/<name>``; this is what shows the LoRA B = 0 trap (``kept/lora_A`` = 0).
    """
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(key: str, m: Tensor) -> None:
        groups[key][0] += int(m.sum())
        groups[key][1] += m.numel()

    for name, m in mask.items():
        add("kept/all", m)
        add(f"kept/param/{name}", m)
        for kind in ("lora_A", "lora_B"):
            if f".{kind}." in name:
                add(f"kept/{kind}", m)
        block = _BLOCK.match(name)
        if block:
            add(f"kept/block/{block.group(1)}", m)
    return {key: kept / total for key, (kept, total) in groups.items()}


class MaskedUpdates:
    """Applies a mask to a model and its optimizer: masked entries get no gradient (a tensor hook
    zeroes it before accumulation, so gradient clipping and data-parallel reduction see zeros), and
    around every ``optimizer.step()`` their values are restored, so weight decay and optimizers that
    mix entries (AdaFish) cannot move them.

    Masked entries hold no optimizer state outside ``step()``: after each step every per-element state
    tensor of a masked tensor (moments) is packed to its kept entries, and just before the next it is
    unpacked with zeros at the masked ones, which is where an update starts them. So the state resident
    during forward and backward, where a step's memory peaks, is the kept entries' only; a FISH rank-16
    adapter masked to the rank-8 count holds rank 8's moments. :meth:`full_state` unpacks around code that
    reads the state as the optimizer's own (checkpoints).

    ``pieces`` maps the optimizer's tensors to parameter ranges (``fisher_scale.optim.pieces``); by
    default the optimizer holds the parameters themselves. Under ZeRO each rank passes its partition
    map and so stores the mask only for the elements it owns. ``register=False`` leaves the step hooks to
    the caller, which runs :meth:`pre_step`/:meth:`post_step` in its own :class:`~fisher_scale.optim.around_step.
    AroundStep` list (the training loop nests them inside its non-finite guard).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        mask: Mapping[str, Tensor],
        pieces: PieceMap | None = None,
        *,
        register: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self._params = dict(model.named_parameters())
        self._pieces = whole_parameters(model) if pieces is None else pieces
        self._owned: dict[Tensor, Tensor] = {}  # optimizer tensor → its bool mask (same shape)
        self._packed: dict[Tensor, set[str]] = {}  # optimizer tensor → its state keys held packed
        self._grad_hooks: list = []
        self._saved: dict[Tensor, Tensor] = {}
        self.update(mask)
        self._around = AroundStep(optimizer, [self]) if register else None

    def update(self, mask: Mapping[str, Tensor]) -> None:
        """Switch to a new mask (a refresh); newly masked entries keep their current value and lose their state,
        newly kept ones start from zero state."""
        check_mask_matches(mask, self._params)
        self._unpack()
        self._packed = {}
        for hook in self._grad_hooks:
            hook.remove()
        self._grad_hooks = []
        for name, m in mask.items():
            param = self._params[name]
            keep = m.to(param.device)
            self._grad_hooks.append(param.register_hook(lambda g, keep=keep: g * keep))
        self._owned = {}
        for tensor, pieces in self._pieces.items():
            owned = torch.ones(tensor.numel(), dtype=torch.bool, device=tensor.device)
            for piece in pieces:
                if piece.name in mask:
                    piece.of(owned).copy_(mask[piece.name].reshape(-1)[piece.start : piece.end])
            if not owned.all():
                self._owned[tensor] = owned.view(tensor.shape)
        self._pack()

    def _pack(self) -> None:
        """Per-element state of masked tensors down to the kept entries."""
        packed = {}
        for tensor, owned in self._owned.items():
            state, keys = self.optimizer.state.get(tensor, {}), set()
            for key, value in state.items():
                if elementwise(value, tensor):
                    state[key] = value[owned]
                    keys.add(key)
            if keys:
                packed[tensor] = keys
        self._packed = packed

    def _unpack(self) -> None:
        for tensor, keys in self._packed.items():
            state = self.optimizer.state[tensor]
            for key in keys:
                full = state[key].new_zeros(tensor.shape)
                full[self._owned[tensor]] = state[key]
                state[key] = full

    @contextlib.contextmanager
    def full_state(self) -> Iterator[None]:
        """The optimizer state at full size (zeros at masked entries) inside the block."""
        self._unpack()
        try:
            yield
        finally:
            self._pack()

    def pre_step(self) -> None:
        """Before a ``step()`` call: remember the masked tensors' values and unpack their state."""
        self._saved = {t: t.detach().clone() for t in self._owned}
        self._unpack()

    @torch.no_grad()
    def post_step(self) -> None:
        """After it: masked entries back to their values, their state packed again."""
        for tensor, owned in self._owned.items():
            tensor.copy_(torch.where(owned, tensor, self._saved[tensor]))
        self._saved = {}
        self._pack()

    def remove(self) -> None:
        for hook in self._grad_hooks:
            hook.remove()
        if self._around is not None:
            self._around.remove()


def apply_mask(
    model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mapping[str, Tensor], pieces: PieceMap | None = None
) -> MaskedUpdates:
    """Train only the True entries of ``mask`` with ``optimizer`` (any torch optimizer); see :class:`MaskedUpdates`."""
    return MaskedUpdates(model, optimizer, mask, pieces)


def check_mask_matches(mask: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """A clear error when a mask names parameters the model lacks or has other shapes."""
    missing = [n for n in mask if n not in params]
    wrong = [
        f"{n}: mask {tuple(m.shape)} vs parameter {full_shape(params[n])}"
        for n, m in mask.items()
        if n in params and tuple(m.shape) != full_shape(params[n])
    ]
    if missing or wrong:
        raise InputError(
            "mask does not match the model: "
            + (f"unknown parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"shape mismatches {wrong[:5]}" if wrong else "")
        )


def save_mask(mask: Mapping[str, Tensor], path: str | Path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the mask as safetensors (bool tensors keyed by parameter name)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: m.to(torch.bool).contiguous().cpu() for n, m in mask.items()},
        str(path),
        metadata={"format": "fisher_scale.mask", **(metadata or {})},
    )
    return path


def load_mask(path: str | Path, model: nn.Module | None = None) -> Mask:
    """Read a mask written by :func:`save_mask`; with ``model``, check that it matches its parameters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"mask file not found: {path}")
    try:
        mask = load_file(str(path))
    except SafetensorError as error:
        raise InputError(f"{path} is not a safetensors mask file: {error}") from None
    not_bool = [n for n, m in mask.items() if m.dtype != torch.bool]
    if not_bool:
        raise InputError(f"{path}: entries {not_bool[:5]} are not boolean masks")
    if model is not None:
        try:
            check_mask_matches(mask, dict(model.named_parameters()))
        except ValueError as error:
            raise InputError(f"{path}: {error}") from None
    return mask
