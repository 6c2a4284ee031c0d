"""Distributors: which parameter ranges each flat fp32 partition of a DeepSpeed engine holds.

Verified on deepspeed 0.19.8 (CPU, gloo):

- ZeRO 1/2 (and the bf16 optimizer) hand the client optimizer one flat fp32 partition per param
  group. Every model parameter with elements in this rank's partition carries ``_hp_mapping``:
  ``hp_fragment`` is a view of that partition, ``hp_fragment_address`` says where, and
  ``lp_fragment_address`` which elements of the flattened parameter it holds.
- ZeRO 3 partitions every parameter on its own: rank r holds flattened elements
  ``[r·n, (r+1)·n)``, n = ``partition_numel()``, zero-padded past ``ds_numel``; the flat tensor of
  sub-group g (``fp32_partitioned_groups_flat[g]``) concatenates those partitions in
  ``fp16_groups[g]`` order. The client's ``param_groups`` are only filled during its step, so the
  map is built up front from the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from fisher_scale.optim.pieces import Piece, PieceMap


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _mapped_partitions(flats: list[Tensor], named: dict[str, nn.Parameter]) -> PieceMap:
    """ZeRO 1/2 and bf16: pieces from each parameter's ``_hp_mapping``."""
    pieces: PieceMap = {flat: [] for flat in flats}
    for name, param in named.items():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        flat = next((f for f in flats if _same_storage(f, mapping.hp_fragment)), None)
        if flat is None:
            continue
        count = mapping.hp_fragment_address.numel
        start = mapping.lp_fragment_address.start
        pieces[flat].append(Piece(name, param, start, start + count, mapping.hp_fragment_address.start))
    return pieces


def _stage3_partitions(zero_optimizer: object, named: dict[str, nn.Parameter]) -> PieceMap:
    import deepspeed.comm as dist

    names = {id(p): n for n, p in named.items()}
    pieces: PieceMap = {}
    rank = dist.get_rank(group=zero_optimizer.dp_process_group)
    for flat, params in zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups, strict=True):
        offset, flat_pieces = 0, []
        for param in params:
            per_rank = param.partition_numel()
            start = rank * per_rank
            count = max(0, min(per_rank, param.ds_numel - start))
            if count:
                flat_pieces.append(Piece(names[id(param)], param, start, start + count, offset))
            offset += per_rank
        pieces[flat] = flat_pieces
    return pieces


def partition_pieces(engine: object, model: nn.Module) -> PieceMap | None:
    """The piece map of the partitions ``engine``'s client optimizer updates on this rank, or None when
    it updates the (replicated) parameters themselves."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    zero_optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return _stage3_partitions(zero_optimizer, named)
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(zero_optimizer, "fp32_groups_flat_partition", None)  # bf16 optimizer at stage 0
    if flats is None:
        return None  # stage 0 in fp32: the client optimizer holds the parameters
    return _mapped_partitions(list(flats), named)


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """Whole parameters on every rank for the duration (ZeRO 3 keeps only partitions); a no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextlib.contextmanager
def functional_model(engine: object, model: nn.Module) -> Iterator[None]:
    """Whole parameters and no ZeRO-3 module hooks for the duration, so ``torch.func`` can call the model
    with parameters of its own (FISH scoring); a no-op below ZeRO 3. DeepSpeed's hooks are re-registered
    after, which it supports (it invalidates its fetch trace)."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    offload = engine.optimizer.parameter_offload
    with gathered_parameters(model):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
