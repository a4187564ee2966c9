"""`medgpt plan`: parameter counts against real models and peft, activation bytes against the tensors autograd
really keeps, the public VRAM table, the fixes and the CLI; the slow test compares a whole estimate with the
measured peak RSS growth of training steps on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import ROOT
from medgpt.arguments import AdapterArguments
from medgpt.cli import main
from medgpt.config import ConfigError
from medgpt.models import lean
from medgpt.models.adapters import attach_adapter, freeze_layers
from medgpt.plan.memory import (
    GiB,
    Hardware,
    Setup,
    estimate,
    frozen_weight_bytes,
    layer_activation_bytes,
    lora_parameters,
    model_shape,
    read_model_config,
    trainable_parameters,
)
from medgpt.plan.verdict import dtype_advice, find_gpu, fixes

CPU = Hardware("CPU", 16, False, cuda=False)


def small_llama(layers: int = 2, **overrides) -> LlamaConfig:
    values = dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaConfig(**{**values, **overrides})


def qwen_like() -> Qwen2Config:
    """Biases on q/k/v and an untied head: the parts a Llama-only formula would miss."""
    return Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def real_count(model, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# ------------------------------------------------------------------------------------------------ counts


def test_parameter_count_equals_the_real_models(tiny_model_dir):
    tiny = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    assert model_shape(read_model_config(str(tiny_model_dir))).total == real_count(tiny)
    torch.manual_seed(0)
    assert model_shape(qwen_like()).total == real_count(Qwen2ForCausalLM(qwen_like()))


def test_an_adapter_directory_is_planned_on_its_base(tiny_model_dir, tmp_path):
    adapter = attach_adapter(LlamaForCausalLM.from_pretrained(tiny_model_dir), AdapterArguments())
    adapter.save_pretrained(tmp_path)  # adapter_config.json names the base directory
    base = model_shape(read_model_config(str(tiny_model_dir)))
    assert model_shape(read_model_config(str(tmp_path))).total == base.total


@pytest.mark.parametrize("targets", ["all", "q_proj,v_proj"])
@pytest.mark.parametrize("rank", [4, 16])
def test_lora_trainable_count_equals_peft(targets, rank):
    model = attach_adapter(Qwen2ForCausalLM(qwen_like()), AdapterArguments(lora_rank=rank, target_modules=targets))
    assert lora_parameters(model_shape(qwen_like()), rank, targets) == real_count(model, trainable=True)


def test_reward_model_lora_count_includes_the_trained_score_head():
    from transformers import Qwen2ForSequenceClassification

    config = qwen_like()
    config.num_labels = 1
    model = attach_adapter(Qwen2ForSequenceClassification(config), AdapterArguments(), "SEQ_CLS", ["score"])
    shape = model_shape(qwen_like(), head="reward")
    assert trainable_parameters(shape, Setup(stage="rm")) == real_count(model, trainable=True)
    assert shape.total == real_count(Qwen2ForSequenceClassification(config))


def test_freeze_count_equals_freeze_layers():
    model = Qwen2ForCausalLM(qwen_like())
    freeze_layers(model, 2)
    setup = Setup(method="freeze", trainable_layers=2)
    assert trainable_parameters(model_shape(qwen_like()), setup) == real_count(model, trainable=True)


def test_4bit_weight_bytes_equal_the_loaded_quantised_model(tmp_path, tokenizer):
    from peft import prepare_model_for_kbit_training

    from medgpt.arguments import ModelArguments
    from medgpt.models.load import load_model

    config = small_llama(vocab_size=len(tokenizer), tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = prepare_model_for_kbit_training(load_model(ModelArguments(model_name_or_path=str(tmp_path),
                                                                      load_in_4bit=True), tokenizer))
    stored = 0
    for param in model.parameters():
        stored += param.untyped_storage().nbytes()
        state = getattr(param, "quant_state", None)
        if state is not None:  # the 8-bit block scales and their fp32 second-level scales
            stored += state.absmax.numel() * state.absmax.element_size()
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    estimated = frozen_weight_bytes(model_shape(config), Setup(method="qlora", bits=4))
    assert estimated == pytest.approx(stored, rel=0.01)


# ------------------------------------------------------------------------------------------------ activations


def saved_bytes(model, ids, checkpointing: bool = False) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward, weights excluded (lean recipes included:
    what `medgpt.models.lean.Recompute` keeps as a tensor is counted, what it turns into a recipe is not)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def lean_pack(recompute, tensor):
        packed = lean_pack.original(recompute, tensor)
        return pack(packed) if isinstance(packed, torch.Tensor) else packed

    lean_pack.original = lean.Recompute._pack
    # Our counting hook would make the lean hooks stand aside as they do for checkpointing's: not here.
    with mock.patch.object(lean, "_outer_hooks_active", lambda: checkpointing), \
            mock.patch.object(lean.Recompute, "_pack", lean_pack), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


def measured_layer_bytes(setup: Setup, dtype: torch.dtype, tokens=(2, 64)) -> float:
    """Per token and layer: a 3-layer model minus a 2-layer one isolates one layer's share."""
    totals = []
    for layers in (2, 3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(small_llama(layers)).to(dtype)
        if setup.lean_activations:
            lean.use_lean_activations(model)
        if setup.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.adapter:
            model = attach_adapter(model, AdapterArguments(lora_rank=setup.lora_rank, lora_dropout=setup.lora_dropout))
        elif setup.method == "freeze":
            freeze_layers(model, setup.trainable_layers)
        model.train()
        totals.append(saved_bytes(model, torch.randint(0, 256, tokens), setup.gradient_checkpointing))
    return (totals[1] - totals[0]) / (tokens[0] * tokens[1])


@pytest.mark.parametrize("setup", [
    Setup(method="full", bits=32),
    Setup(method="lora", bits=32, lora_dropout=0.05),
    Setup(method="lora", bits=32, lora_dropout=0.0),
    Setup(method="full", bits=16),
    Setup(method="lora", bits=16, lora_dropout=0.05),
    Setup(method="lora", bits=16, lora_dropout=0.0),
    Setup(method="full", bits=32, lean_activations=False),
    Setup(method="lora", bits=32, lora_dropout=0.0, lean_activations=False),
    Setup(method="lora", bits=16, lora_dropout=0.05, lean_activations=False),
], ids=lambda s: f"{s.method}-{s.bits}bit-dropout{s.lora_dropout if s.adapter else '-'}"
                 f"{'' if s.lean_activations else '-stock'}")
def test_layer_activation_bytes_match_what_autograd_keeps(setup):
    measured = measured_layer_bytes(setup, torch.float32 if setup.bits == 32 else torch.bfloat16)
    assert layer_activation_bytes(model_shape(small_llama()), setup, CPU) == pytest.approx(measured, rel=0.05)


def test_checkpointing_keeps_one_hidden_state_per_layer_and_frozen_layers_keep_nothing():
    shape = model_shape(small_llama())
    assert measured_layer_bytes(Setup(method="full", bits=32, gradient_checkpointing=True), torch.float32) \
        == pytest.approx(4 * shape.hidden, rel=0.05)
    # freezing all but the top layer: the added (lower, frozen) layer keeps nothing
    assert measured_layer_bytes(Setup(method="freeze", bits=32, trainable_layers=1), torch.float32) \
        == pytest.approx(0, abs=16)


# ------------------------------------------------------------------------------------------------ estimates


LLAMA2 = {"7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
          "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8)}


@pytest.fixture(scope="module")
def llama7b():
    return model_shape(LlamaConfig(vocab_size=32000, **LLAMA2["7B"]))


def test_estimates_stay_within_a_quarter_of_the_public_vram_table(llama7b):
    from medgpt.docs import REFERENCE_ROWS

    for label, (public_7b, _, _), fields in REFERENCE_ROWS:
        setup = Setup(batch=1, max_length=1024, gradient_checkpointing=True, **fields)
        ours = estimate(llama7b, setup, find_gpu("H100")).total / GiB
        assert 0.75 * public_7b <= ours <= 1.1 * public_7b, label


def test_fixes_make_a_full_7b_run_fit_on_a_24gb_gpu_cheapest_first(llama7b):
    setup, gpu = Setup(method="full", batch=4, max_length=2048), find_gpu("4090")
    assert not estimate(llama7b, setup, gpu).fits
    found = fixes(llama7b, setup, gpu)
    assert found[0].change == "gradient_checkpointing: true" and found[-1].estimate.fits
    assert not any(fix.estimate.fits for fix in found[:-1])
    totals = [estimate(llama7b, setup, gpu).total] + [fix.estimate.total for fix in found]
    assert totals == sorted(totals, reverse=True)


def test_zero_stages_split_states_then_weights_and_ddp_doubles_gradients(llama7b):
    gpu, full = find_gpu("A100"), Setup(method="full", gpus=8)
    lines = {zero: {line.label: line.bytes for line in estimate(llama7b, replace(full, zero=zero), gpu).lines}
             for zero in (0, 1, 2, 3)}
    single = {line.label: line.bytes for line in estimate(llama7b, replace(full, gpus=1), gpu).lines}
    assert lines[0]["gradients"] == 2 * single["gradients"]  # DDP's bucket copy
    assert lines[1]["weights"] == lines[2]["weights"] == single["weights"]
    assert lines[3]["weights"] == pytest.approx(single["weights"] / 8)
    assert lines[2]["gradients"] == pytest.approx(lines[1]["gradients"] / 8)
    # DeepSpeed keeps fp32 master weights + fp32 Adam states: 12 bytes per param, split 8 ways
    assert lines[1]["optimizer"] == pytest.approx(llama7b.total * 12 / 8)


def test_stages_add_their_extra_models_and_rollout_cache(llama7b):
    gpu = find_gpu("H100")

    def lines(**fields):
        return {line.label: line for line in estimate(llama7b, Setup(**fields), gpu).lines}

    assert "extra models" in lines(stage="dpo", method="full") and "extra models" not in lines(stage="dpo")
    mounted, separate = lines(stage="ppo")["extra models"], lines(stage="ppo", method="full")["extra models"]
    assert "reward model: a LoRA adapter of the same base" in mounted.how and "reward model" in separate.how
    assert mounted.bytes < 0.01 * separate.bytes  # an adapter, not a second base
    grpo = lines(stage="grpo")
    assert "extra models" not in grpo and grpo["KV cache"].phase == "rollout"
    assert lines(stage="dpo")["activations"].bytes == pytest.approx(2 * lines(stage="sft")["activations"].bytes)


def test_dtype_advice_follows_the_hardware():
    assert dtype_advice(find_gpu("H100"), Setup()).startswith("bf16")
    old = dtype_advice(find_gpu("V100"), Setup(method="full", bits=32))
    assert old.startswith("fp16 with loss scaling") and "NaN" in old and "fp32 weights" in old
    assert dtype_advice(CPU, Setup()).startswith("fp32")


def test_bad_setups_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="cannot be trained in full"):
        estimate(model_shape(small_llama()), Setup(method="full", bits=4), CPU)
    with pytest.raises(ConfigError, match="unknown GPU 'B9000'.*H100"):
        find_gpu("B9000")
    assert find_gpu("RTX 4090").name == "4090" and find_gpu("a100-80gb").name == "A100"


# ------------------------------------------------------------------------------------------------ CLI


def test_plan_command_prints_the_table_the_verdict_and_the_dtype(tiny_model_dir, capsys):
    assert main(["plan", "--model", str(tiny_model_dir), "--gpu", "T4", "--max_length", "512", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("weights", "gradients", "optimizer", "activations", "logits", "verdict: fits", "dtype: fp16"):
        assert text in out


def test_plan_command_needs_only_config_json_and_lists_fixes_when_it_does_not_fit(tmp_path, capsys):
    LlamaConfig(vocab_size=32000, **LLAMA2["7B"]).save_pretrained(tmp_path)  # no weights, no tokenizer
    assert main(["plan", "--model", str(tmp_path), "--gpu", "4090", "--method", "full", "--batch", "4",
                 "--max-length", "2048"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 total" in out and "does not fit" in out
    assert out.index("gradient_checkpointing: true") < out.index("use_peft: true")


def test_plan_of_an_unreachable_hub_name_says_what_to_give(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    assert main(["plan", "--model", "nobody/no-such-model-xyz", "--gpu", "H100"]) == 2
    assert "cannot read config.json of 'nobody/no-such-model-xyz'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ measured


@pytest.mark.slow
def test_embedded_model_count_and_measured_rss_growth_of_a_training_step(embedded_dir):
    """One step of LoRA and of full training on the embedded model (fp32, CPU, 1 × 256 tokens), each in a fresh
    process: the estimate of what a step adds (gradients, AdamW states, activations, logits) must lie within
    0.6-1.6× of the measured peak-RSS growth. Wide, because RSS also counts allocator caching and library
    buffers, which dominate at this size."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(embedded_dir)
    assert model_shape(read_model_config("smollm2-135m")).total == real_count(real)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_memory.py"), "--device", "cpu",
                          "--model", "smollm2-135m", "--cases", "lora,full", "--batch", "1", "--length", "256"],
                         capture_output=True, text=True, timeout=900, check=True)
    results = {r["case"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    for case in ("lora", "full"):
        assert "error" not in results[case], results[case]
        assert 0.6 <= results[case]["ratio"] <= 1.6, results[case]
    assert results["full"]["measured_gib"] > results["lora"]["measured_gib"]
