"""Pieces: which elements of which model parameter each optimizer tensor holds (the map behind the sharding
seam, ``fisher_scale.optim.distributor``, which builds it).

Without ZeRO the optimizer holds the model's parameters themselves (one piece each, the whole
parameter). Under ZeRO it holds flat fp32 partitions; a distributor (``fisher_scale.optim.distributor``)
maps each partition to pieces ``[offset, offset + numel)`` = elements ``[start, end)`` of a flattened
parameter. The optimizer math works on pieces and never sees the parallelism (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, end)`` of the flattened parameter ``name``, stored at ``[offset, offset + end - start)``
    of the optimizer's (flattened) tensor."""

    name: str
    param: nn.Parameter
    start: int
    end: int
    offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    def of(self, tensor: Tensor) -> Tensor:
        """This piece's 1-D view into an optimizer tensor (or a tensor of its shape: grad, state)."""
        return tensor.view(-1)[self.offset : self.offset + self.numel]


PieceMap = dict[Tensor, list[Piece]]


def elementwise(value: object, tensor: Tensor) -> bool:
    """Whether an optimizer state value holds one entry per element of its tensor (moments, not step counts)."""
    return isinstance(value, Tensor) and value.shape == tensor.shape


def whole_parameters(model: nn.Module) -> PieceMap:
    """The map when the optimizer holds the model's own trainable parameters."""
    seen: PieceMap = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p not in seen:
            seen[p] = [Piece(name, p, 0, p.numel(), 0)]
    return seen
