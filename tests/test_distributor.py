"""The sharding seam: piece maps are checked to cover every trainable element once, missing DeepSpeed internals
are named, and the collectives pack mixed tensors into one call and hand each back as it came."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fisher_scale.optim.distributor import (
    Distributor,
    Zero12,
    all_gather_object,
    all_reduce,
    all_reduce_numbers,
)
from fisher_scale.optim.pieces import Piece
from fisher_scale.train.local import free_port


class OneRankPartition(Distributor):
    """A partitioned map on one rank: its check is the one ZeRO maps get, over a one-rank gather."""

    partitioned = True
    source = "a test"


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False), nn.Linear(2, 2))
    model[2].requires_grad_(False)  # frozen: no piece needed
    return model


def _flat_map(model: nn.Module, ranges: dict[str, list[tuple[int, int]]], size: int = 24) -> dict:
    """Pieces of one flat tensor holding ``ranges`` of each named parameter, back to back."""
    flat, pieces, offset = torch.zeros(size), [], 0
    params = dict(model.named_parameters())
    for name, spans in ranges.items():
        for start, end in spans:
            pieces.append(Piece(name, params[name], start, end, offset))
            offset += end - start
    return {flat: pieces}


COMPLETE = {"0.weight": [(0, 12)], "0.bias": [(0, 4)], "1.weight": [(0, 3), (3, 8)]}


def test_a_map_covering_every_trainable_element_once_is_accepted() -> None:
    model = _model()
    assert OneRankPartition(model, _flat_map(model, COMPLETE)).partitioned
    assert set(Distributor(model).pieces) == {p for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "ranges,size,problem",
    [
        ({**COMPLETE, "0.weight": [(0, 11)]}, 24, r"'0\.weight' is covered up to element 11 of 12"),
        ({**COMPLETE, "1.weight": [(0, 3), (4, 8)]}, 24, r"elements \[3:4\) of '1\.weight' are held by no rank"),
        ({**COMPLETE, "0.bias": [(0, 4), (2, 4)]}, 26, r"elements \[2:4\) of '0\.bias' are held twice"),
        (COMPLETE, 20, r"piece 1\.weight\[3:8\) lies outside its flat tensor"),
        ({**COMPLETE, "2.weight": [(0, 4)]}, 28, r"names parameters the model does not train: \['2\.weight'\]"),
    ],
)
def test_a_broken_map_is_refused_naming_the_parameter_and_deepspeed(ranges: dict, size: int, problem: str) -> None:
    model = _model()
    with pytest.raises(RuntimeError, match=problem) as error:
        OneRankPartition(model, _flat_map(model, ranges, size))
    assert "from a test is wrong" in str(error.value) and "deepspeed" in str(error.value)


def test_missing_deepspeed_internals_are_named_not_an_empty_map() -> None:
    with pytest.raises(RuntimeError, match=r"deepspeed .*: Parameter has no '_hp_mapping'"):
        Zero12(_model(), [torch.zeros(24)])


def test_collectives_without_a_process_group_return_their_inputs() -> None:
    x = torch.arange(3.0)
    assert all_reduce(x)[0] is x
    assert all_reduce_numbers(2, 3.5) == [2.0, 3.5]
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce(x, op="mean")


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        matrix = torch.full((2, 3), float(rank + 1))
        vector = torch.tensor([rank, -rank], dtype=torch.float64) + 0.25
        summed = all_reduce(matrix, vector)
        (most,) = all_reduce(torch.tensor([rank, 5 - rank], dtype=torch.float64), op="max")
        numbers = all_reduce_numbers(rank + 0.5, 1)
        torch.save(
            {"summed": summed, "most": most, "numbers": numbers, "objects": all_gather_object(("rank", rank))},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_over_two_gloo_ranks_sum_max_and_gather_in_each_inputs_dtype(tmp_path: Path) -> None:
    mp.spawn(_collectives_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        matrix, vector = result["summed"]
        assert matrix.dtype == torch.float32 and matrix.shape == (2, 3) and torch.equal(matrix, torch.full((2, 3), 3.0))
        assert vector.dtype == torch.float64 and vector.tolist() == [1.5, -0.5]
        assert result["most"].tolist() == [1.0, 5.0]
        assert result["numbers"] == [2.0, 2.0]
        assert result["objects"] == [("rank", 0), ("rank", 1)]


def test_a_stage0_engine_whose_optimizer_holds_other_tensors_is_refused() -> None:
    """At ZeRO-0 the client must update the model's own parameters; a wrapper holding copies (DeepSpeed's fp16 or
    bf16 optimizer) would leave the Fisher optimizers with no piece to update, silently."""
    from types import SimpleNamespace

    from fisher_scale.optim.distributor import from_engine

    model = _model()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def engine(params: list) -> SimpleNamespace:
        optimizer = SimpleNamespace(param_groups=[{"params": params}])
        return SimpleNamespace(zero_optimization_stage=lambda: 0, optimizer=optimizer)

    assert not from_engine(engine(trainable), model).partitioned
    with pytest.raises(RuntimeError, match="does not hold the model's trainable parameters themselves"):
        from_engine(engine([p.detach().clone() for p in trainable]), model)
