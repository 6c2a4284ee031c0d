"""The sharding seam (DESIGN.md): the one place that knows how ranks share parameters and talk to each other.

A distributor owns, for one execution path, the piece map of the client optimizer's tensors (checked when it
is built to cover every trainable element exactly once), the reductions the optimizers, masks, guard and loop
need, ZeRO-3's gathered-parameter and functional-model contexts. The module-level collectives below are the
package's only calls of ``torch.distributed`` collectives: they pack tensors onto the process group's device
(NCCL takes GPU tensors only) and hand results back where the inputs were.

- :class:`Distributor`: replicated parameters (one process, or data parallelism without ZeRO).
- :class:`Zero12`: ZeRO 1/2 hand the client optimizer one flat fp32 partition per param group. Every model
  parameter with elements in this rank's partition carries ``_hp_mapping``: ``hp_fragment`` is a view of that
  partition, ``hp_fragment_address`` says where, ``lp_fragment_address`` which elements of the flattened
  parameter it holds.
- :class:`Zero3`: rank r holds flattened elements ``[r·n, (r+1)·n)`` of every parameter, n =
  ``partition_numel()``, zero-padded past ``ds_numel``; the flat tensor of sub-group g
  (``fp32_partitioned_groups_flat[g]``) concatenates those partitions in ``fp16_groups[g]`` order. The client's
  ``param_groups`` are only filled during its step, so the map is built up front from the engine.

The DeepSpeed internals were verified on deepspeed 0.19.8 (CPU, gloo); a release without one is an error
naming it, never an empty map.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fisher_scale.optim.pieces import Piece, PieceMap, whole_parameters

OPS = {"sum": "SUM", "max": "MAX"}


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without a process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def group_device() -> torch.device:
    """Where the default process group's collectives run: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(*tensors: Tensor, op: str = "sum") -> list[Tensor]:
    """Each tensor summed (or maxed) over the ranks, returned in its own dtype and on its own device.

    One collective: the tensors are packed into one buffer of their common dtype on the group's device.
    Without a process group (or with one rank) the inputs come back as they are.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if rank_world()[1] == 1 or not tensors:
        return list(tensors)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    packed = torch.cat([t.detach().reshape(-1).to(group_device(), dtype) for t in tensors])
    torch.distributed.all_reduce(packed, op=getattr(torch.distributed.ReduceOp, OPS[op]))
    chunks = packed.split([t.numel() for t in tensors])
    return [chunk.view(t.shape).to(t.device, t.dtype) for chunk, t in zip(chunks, tensors, strict=True)]


def all_reduce_numbers(*values: float, op: str = "sum") -> list[float]:
    """:func:`all_reduce` of Python numbers (counts, losses, flags), in fp64."""
    return [float(v) for v in all_reduce(torch.tensor(values, dtype=torch.float64), op=op)[0]]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    world = rank_world()[1]
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for without a process group)."""
    if rank_world()[1] > 1:
        torch.distributed.barrier()


class Distributor:
    """Replicated parameters: the optimizer holds the model's own trainable parameters on every rank."""

    #: whether ranks hold disjoint pieces (ZeRO partitions) rather than whole replicated parameters
    partitioned: ClassVar[bool] = False
    #: what a coverage error names as the source of the map
    source: ClassVar[str] = "the model's trainable parameters"

    def __init__(self, model: nn.Module, pieces: PieceMap | None = None) -> None:
        self.model = model
        self.pieces = whole_parameters(model) if pieces is None else pieces
        self._check_coverage()

    def _check_coverage(self) -> None:
        """Every trainable element in exactly one piece: on this rank (replicated) or over all ranks. Partitioned
        maps are gathered before anything is judged, so every rank fails together (none waits in a collective)."""
        held = [(p.name, p.start, p.end) for pieces in self.pieces.values() for p in pieces]
        problems = [
            f"piece {piece.name}[{piece.start}:{piece.end}) lies outside its flat tensor"
            for tensor, pieces in self.pieces.items()
            for piece in pieces
            if piece.offset < 0 or piece.offset + piece.numel > tensor.numel() or piece.numel <= 0
        ]
        if self.partitioned:
            shares = all_gather_object((held, problems))
            held = [entry for share, _ in shares for entry in share]
            problems = [problem for _, share in shares for problem in share]
        by_name: dict[str, list[tuple[int, int]]] = {}
        for name, start, end in held:
            by_name.setdefault(name, []).append((start, end))
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            numel, covered = getattr(param, "ds_numel", param.numel()), 0
            for start, end in sorted(by_name.pop(name, [])):
                if start != covered:
                    which = "held twice" if start < covered else "held by no rank"
                    problems.append(f"elements [{min(start, covered)}:{max(start, covered)}) of {name!r} are {which}")
                covered = max(covered, end)
            if covered != numel:
                problems.append(f"{name!r} is covered up to element {covered} of {numel}")
        if by_name:
            problems.append(f"it names parameters the model does not train: {sorted(by_name)[:3]}")
        if problems:
            self._fail("; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))

    def _fail(self, problem: str) -> None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        raise RuntimeError(
            f"{type(self).__name__} piece map from {self.source} is wrong: {problem} (deepspeed {version}; "
            "fisher_scale reads its internals as verified on deepspeed 0.19.8)"
        )

    @contextlib.contextmanager
    def gathered(self, parameters: list[nn.Parameter] | None = None) -> Iterator[None]:
        """``parameters`` (default: all the model's) whole on every rank for the duration (they already are)."""
        yield

    @contextlib.contextmanager
    def functional(self) -> Iterator[None]:
        """Whole parameters and no module hooks of DeepSpeed's, so ``torch.func`` can call the model with
        parameters of its own (FISH scoring); nothing to do here."""
        yield


def _require(obj: object, attribute: str) -> Any:
    """``obj.attribute``, or an error naming the DeepSpeed release that lacks it."""
    if not hasattr(obj, attribute):
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__}: {type(obj).__name__} has no {attribute!r}, which fisher_scale's "
            "distributor reads (verified on deepspeed 0.19.8)"
        )
    return getattr(obj, attribute)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Zero12(Distributor):
    """ZeRO 1/2: pieces from each parameter's ``_hp_mapping``."""

    partitioned = True
    source = "DeepSpeed ZeRO-1/2's _hp_mapping"

    def __init__(self, model: nn.Module, flats: list[Tensor]) -> None:
        pieces: PieceMap = {flat: [] for flat in flats}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            mapping = _require(param, "_hp_mapping")
            if mapping is None:
                continue  # no element of this parameter in this rank's partition
            fragment = _require(mapping, "hp_fragment")
            flat = next((f for f in flats if _same_storage(f, fragment)), None)
            if flat is None:
                continue
            count = _require(mapping, "hp_fragment_address").numel
            start = _require(mapping, "lp_fragment_address").start
            pieces[flat].append(Piece(name, param, start, start + count, mapping.hp_fragment_address.start))
        super().__init__(model, pieces)


class Zero3(Distributor):
    """ZeRO 3: every parameter partitioned on its own, whole only inside :meth:`gathered`."""

    partitioned = True
    source = "DeepSpeed ZeRO-3's partitioned groups"

    def __init__(self, model: nn.Module, zero_optimizer: object) -> None:
        import deepspeed.comm as dist

        self.offload = _require(zero_optimizer, "parameter_offload")
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        rank = dist.get_rank(group=_require(zero_optimizer, "dp_process_group"))
        pieces: PieceMap = {}
        flats = _require(zero_optimizer, "fp32_partitioned_groups_flat")
        for flat, params in zip(flats, _require(zero_optimizer, "fp16_groups"), strict=True):
            offset, flat_pieces = 0, []
            for param in params:
                per_rank = param.partition_numel()
                start = rank * per_rank
                count = max(0, min(per_rank, param.ds_numel - start))
                if count:
                    flat_pieces.append(Piece(names[id(param)], param, start, start + count, offset))
                offset += per_rank
            pieces[flat] = flat_pieces
        super().__init__(model, pieces)

    @contextlib.contextmanager
    def gathered(self, parameters: list[nn.Parameter] | None = None) -> Iterator[None]:
        import deepspeed

        chosen = list(self.model.parameters()) if parameters is None else parameters
        with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
            yield

    @contextlib.contextmanager
    def functional(self) -> Iterator[None]:
        """DeepSpeed's hooks are re-registered after, which it supports (it invalidates its fetch trace)."""
        remove, restore = (
            _require(self.offload, "_remove_module_hooks"),
            _require(self.offload, "setup_zero_stage3_hooks"),
        )
        with self.gathered():
            remove()
            try:
                yield
            finally:
                restore()


def from_engine(engine: object, model: nn.Module) -> Distributor:
    """The distributor of a DeepSpeed engine's client optimizer on this rank, validated."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return Zero3(model, engine.optimizer)
    if stage in (1, 2):
        return Zero12(model, list(_require(engine.optimizer, "single_partition_of_fp32_groups")))
    distributor = Distributor(model)
    held = {id(t) for group in engine.optimizer.param_groups for t in group["params"]}
    if held != {id(t) for t in distributor.pieces}:
        distributor._fail(
            f"at ZeRO stage 0 DeepSpeed's optimizer ({type(engine.optimizer).__name__}) does not hold the model's "
            "trainable parameters themselves (a bf16/fp16 wrapper?): use ZeRO stage 1-3"
        )
    return distributor
