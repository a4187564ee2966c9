"""Shared fixtures: the embedded tokenizer and tiny random Llama models built from a config (no network)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "medicalgpt"  # MedicalGPT's files, when present
DEMO = ROOT / "data" / "demo"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 directory (converted from GGUF once per machine, then cached)."""
    from medgpt.models.embedded import resolve_embedded

    return resolve_embedded("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    from medgpt.models.load import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    ensure_pad_token(tok)
    return tok


def make_tiny_model(directory: Path, tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama with the embedded tokenizer, saved as a normal model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def private_cache(tmp_path, monkeypatch, tokenizer):
    """Feature caches per test (the session tokenizer resolved the embedded model from the real cache first)."""
    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with a large init (0.5): LoRA moves its logits enough to learn a toy set in a few steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama-learnable")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
    yield
