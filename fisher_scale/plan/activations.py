"""Activation memory of a training step, per token: what autograd saves for backward, layer by layer.

The terms below were read off eager PyTorch (saved-tensor hooks on transformers' Qwen2 decoder, SDPA
attention, PEFT LoRA) and are checked against that count in ``tests/test_plan.py``. Only what a tensor
that needs a gradient saves is counted, so a frozen linear layer keeps nothing of its input, and the first
layer keeps nothing before its first trained module (its input, the embedding, needs no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: ``model_type`` values whose layers are the Llama/Qwen2 decoder (RMSNorm, rotary attention, SiLU-gated MLP)
DECODER_TYPES = ("qwen2", "llama", "mistral")
#: the decoder layer's linear modules, by where their input comes from
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")
#: bytes of an fp32 value: what RMSNorm, SDPA's log-sum-exp and the loss keep in fp32 whatever the activation dtype
FP32 = 4


@dataclass(frozen=True)
class DecoderShape:
    """What the activation terms need of a decoder's config: its sizes, and its head's outputs (the vocabulary of
    a causal LM, the labels of a sequence classifier, which pools one token per sequence)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    outputs: int
    causal: bool = True

    @classmethod
    def of(cls, config: Any, causal: bool = True) -> DecoderShape | None:
        """The shape of a transformers config, or None for a model type these terms do not describe."""
        if getattr(config, "model_type", None) not in DECODER_TYPES:
            return None
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            outputs=config.vocab_size if causal else config.num_labels,
            causal=causal,
        )


@dataclass(frozen=True)
class Training:
    """Which weights train: LoRA adapters on ``targets`` (module names such as ``q_proj``), or all (``full``)."""

    targets: frozenset[str]
    rank: int
    dropout: float
    full: bool = False

    def trains(self, module: str) -> bool:
        return self.full or module in self.targets


def _rms_norm(shape: DecoderShape, p: int, training: Training) -> int:
    """An RMSNorm whose input needs a gradient: its input upcast to fp32 (the input itself in fp32 models) and the
    fp32 reciprocal root mean square; a trained weight also keeps the normalised input."""
    return FP32 * shape.hidden + FP32 + p * shape.hidden * training.full


def decoder_layer(
    shape: DecoderShape, p: int, training: Training, *, first: bool, tokens: int, padded: bool = True
) -> int:
    """Bytes one decoder layer saves per token with ``p``-byte activations, in a ``padded`` batch of ``tokens``-long
    sequences or a full one (the per-batch parts are in :func:`_fixed`)."""
    h, m, r = shape.hidden, shape.intermediate, training.rank
    grad = not first or training.full  # the layer's input needs a gradient (full training: the embedding's)
    saved = 0

    def linears(names: tuple[str, ...], width: int, shared: bool) -> int:
        """Trained linear modules reading one input of ``width``: the input once (``shared``: already saved by
        the op that made it), or with LoRA dropout a dropped copy and its mask per module (the host's dropout
        keeps the mask in the activation dtype; a GPU's fused one in bytes: an upper bound there); each LoRA B
        its r-wide input."""
        trained = [n for n in names if training.trains(n)]
        if not trained:
            return 0
        if training.dropout and not training.full:
            inputs = len(trained) * width * 2 * p
        else:
            inputs = 0 if shared else width * p
        return inputs + (0 if training.full else len(trained) * r * p)

    if grad:
        saved += _rms_norm(shape, p, training)  # the input's
    saved += linears(ATTENTION_INPUTS, h, shared=False)
    grad = grad or any(training.trains(n) for n in ATTENTION_INPUTS)
    # SDPA keeps q, k, v, its output and the fp32 log-sum-exp; with a padding mask, transformers repeats k and v
    # to every query head first (grouped-query attention goes without a mask only), and SDPA keeps the mask's row
    kv_heads = shape.heads if padded else shape.kv_heads
    if grad:
        saved += (2 * shape.heads + 2 * kv_heads) * shape.head_dim * p + FP32 * shape.heads + tokens * p * padded
    saved += linears(("o_proj",), shape.heads * shape.head_dim, shared=grad)
    grad = grad or training.trains("o_proj")
    if grad:
        saved += _rms_norm(shape, p, training)  # the post-attention one
    saved += linears(MLP_INPUTS, h, shared=False)
    grad = grad or any(training.trains(n) for n in MLP_INPUTS)
    if grad:
        saved += 3 * m * p  # SiLU's input, and both factors of the gated product
    saved += linears(("down_proj",), m, shared=False)
    return saved


def _head(shape: DecoderShape, p: int, training: Training) -> int:
    """Per token after the last layer: the final RMSNorm; a causal LM's fp32 log-softmax of its logits, a
    classifier's trained head (PEFT's ``modules_to_save``) its input; in full training, the embedding's token ids
    and the trained output layer's input."""
    norm = _rms_norm(shape, p, training)
    if shape.causal:
        return norm + FP32 * shape.outputs + (p * shape.hidden + 8) * training.full
    return norm + p * shape.hidden + 8 * training.full


def _fixed(shape: DecoderShape, p: int, *, batch: int, tokens: int) -> int:
    """Saved once per batch: the rotary tables (per position, shared by the sequences and the layers) and the
    loss's own: a causal LM's int64 labels (shifted by padding one position; a single sequence's shift stays a
    view of the padded row), a classifier's pooled positions, labels and log-softmax; and the fp32 loss."""
    if shape.causal:
        loss = 8 * (batch * tokens + (batch == 1))
    else:
        loss = batch * (3 * 8 + FP32 * shape.outputs)
    return 2 * shape.head_dim * p * tokens + loss + FP32


def decoder_model(
    shape: DecoderShape, p: int, training: Training, *, batch: int, tokens: int, padded: bool = True
) -> int:
    """Bytes a causal LM's forward saves for ``batch`` sequences of ``tokens``."""
    per_token = decoder_layer(shape, p, training, first=True, tokens=tokens, padded=padded)
    per_token += (shape.layers - 1) * decoder_layer(shape, p, training, first=False, tokens=tokens, padded=padded)
    fixed = _fixed(shape, p, batch=batch, tokens=tokens)
    return batch * tokens * (per_token + _head(shape, p, training)) + fixed


def checkpointed_model(
    shape: DecoderShape, p: int, training: Training, *, batch: int, tokens: int, padded: bool = True
) -> int:
    """With activation checkpointing: each layer keeps only its input, and backward recomputes one layer at a
    time, holding that layer's saved tensors on top."""
    per_token = shape.layers * shape.hidden * p
    per_token += decoder_layer(shape, p, training, first=False, tokens=tokens, padded=padded)
    fixed = _fixed(shape, p, batch=batch, tokens=tokens)
    return batch * tokens * (per_token + _head(shape, p, training)) + fixed


def loss_working_set(shape: DecoderShape, p: int, *, batch: int, tokens: int) -> int:
    """A causal LM's loss backward: the fp32 gradients into and out of the log-softmax over every token, and the
    cast back to a lower-precision logits gradient (a classifier's pooled loss is a few bytes a sequence)."""
    return batch * tokens * shape.outputs * (2 * FP32 + (p if p != FP32 else 0)) * shape.causal
