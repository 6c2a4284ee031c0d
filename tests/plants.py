"""Deliberate sharding faults, planted in the local launcher's workers (``run_jobs(..., prepare=plant)``), so
that each equivalence test can show it fails on a real sharding bug and not only passes on correct code.

Each plant is an off-by-one in where a rank believes its share lies: the kind of bug a changed DeepSpeed
layout or a wrong rank offset produces, and the smallest one a comparison has to catch.
"""

from __future__ import annotations

import dataclasses

from fisher_scale.optim.pieces import Piece, PieceMap


def _misplaced(piece: Piece) -> Piece:
    """The piece one element further into its optimizer tensor than it is, and one element shorter: each
    element it addresses is its neighbour, and its first element is addressed by no piece."""
    return dataclasses.replace(piece, end=piece.end - 1, offset=piece.offset + 1) if piece.numel > 1 else piece


def _misplaced_map(pieces: PieceMap) -> PieceMap:
    return {flat: [_misplaced(p) for p in ps] for flat, ps in pieces.items()}


def misplaced_partition_pieces() -> None:
    """Every ZeRO partition's piece map is off by one element, past the distributor's own coverage check (the
    Fisher optimizers, masks, guard and checkpoints read the map; AdamW's update does not)."""
    from fisher_scale.train import worker

    real = worker.from_engine

    def misplaced(engine: object, model: object) -> object:
        distributor = real(engine, model)
        if distributor.partitioned:
            distributor.pieces = _misplaced_map(distributor.pieces)
        return distributor

    worker.from_engine = misplaced


def misplaced_checkpoint_ranges() -> None:
    """Optimizer state is saved under element ranges one off from those it holds (training is unaffected)."""
    from fisher_scale.train import checkpoint

    real = checkpoint._piece_states
    checkpoint._piece_states = lambda optimizer, pieces: real(optimizer, _misplaced_map(pieces))


def overlapping_rank_batches() -> None:
    """Ranks above 0 start their micro-batch one example early, so one example is seen twice, one never."""
    from fisher_scale.train.batches import StepBatches

    real = StepBatches.indices

    def indices(self: StepBatches, step: int, rank: int, micro: int) -> list[int]:
        chosen = real(self, step, rank, micro)
        return chosen if rank == 0 else real(self, step, rank - 1, micro)[-1:] + chosen[:-1]

    StepBatches.indices = indices


def rotated_evaluation_share() -> None:
    """Evaluation puts rank 1's results back one position off within its share: each of its examples is
    reported with its neighbour's result (the metrics, sums over all examples, do not change)."""
    from fisher_scale import eval as evaluation

    real = evaluation.all_gather_object

    def gathered(results: object) -> list:
        shares = real(results)
        return [share[1:] + share[:1] if r == 1 else share for r, share in enumerate(shares)]

    evaluation.all_gather_object = gathered
