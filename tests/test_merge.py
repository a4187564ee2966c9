"""Merging a LoRA adapter: the merged model computes what base + adapter computed, and saves cleanly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from medgpt.cli import main
from medgpt.data.templates import TEMPLATE_FILE
from medgpt.models.merge import merge_adapter
from medgpt.serve.engine import TEMPLATE_META

JINJA = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"


def randomise(model, *names: str, seed: int = 1) -> None:
    """LoRA starts as a no-op (lora_B = 0): give the named parameters random values so the adapter matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.normal_(0, 0.5)


def save_adapter(peft_model, tokenizer, directory, stage="sft"):
    peft_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / TEMPLATE_FILE).write_text(JINJA, encoding="utf-8")
    (directory / TEMPLATE_META).write_text(json.dumps({"template": "chatml"}), encoding="utf-8")
    (directory / "run_config.yaml").write_text(yaml.safe_dump({"stage": stage, "train_file_dir": "data/sft"}))
    return directory


@pytest.fixture(scope="module")
def causal_adapter(tmp_path_factory, tiny_model_dir, tokenizer):
    """(adapter dir, logits of base + adapter on `ids`, ids)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    randomise(peft_model, "lora_B")
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = peft_model.eval()(input_ids=ids).logits
    return save_adapter(peft_model, tokenizer, tmp_path_factory.mktemp("lora")), logits, ids


def merged_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory).eval()(input_ids=ids).logits


def test_merged_model_logits_equal_adapter_model_logits(causal_adapter, tmp_path, tiny_model_dir):
    adapter, expected, ids = causal_adapter
    out = merge_adapter(adapter, tmp_path / "merged")
    assert torch.allclose(merged_logits(out, ids), expected, atol=1e-5)
    assert not torch.allclose(merged_logits(tiny_model_dir, ids), expected, atol=1e-3)  # the adapter mattered


def test_merge_writes_tokenizer_template_card_and_only_safetensors(causal_adapter, tmp_path, tiny_model_dir):
    adapter, _, _ = causal_adapter
    out = merge_adapter(adapter, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json", TEMPLATE_FILE,
            TEMPLATE_META, "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth")) or n.startswith("adapter_")]
    assert (out / TEMPLATE_FILE).read_text(encoding="utf-8") == JINJA
    assert json.loads((out / TEMPLATE_META).read_text()) == {"template": "chatml"}
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.splitlines()[6] == "# merged"
    assert f"base_model: {tiny_model_dir}" in card and "sft" in card and "LoRA merged" in card and "chatml" in card
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == JINJA


def test_merge_keeps_base_vocabulary_when_unchanged(causal_adapter, tmp_path, tokenizer):
    from transformers import AutoConfig

    adapter, _, _ = causal_adapter
    out = merge_adapter(adapter, tmp_path / "merged")
    assert AutoConfig.from_pretrained(out).vocab_size == len(tokenizer)


def test_merge_casts_to_requested_dtype(causal_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, _, _ = causal_adapter
    out = merge_adapter(adapter, tmp_path / "merged", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_reward_model_merge_keeps_trained_head_and_pad_token(tmp_path, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "base-without-pad"  # like Llama: the merge must set pad_token_id, not inherit it
    unpadded = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=None)
    unpadded.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    assert model.config.pad_token_id is None
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["score"]))
    randomise(peft_model, "lora_B", "score.modules_to_save")
    batch = tokenizer(["the patient has a fever", "rest"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
    adapter = save_adapter(peft_model, tokenizer, tmp_path / "rm-lora", stage="rm")

    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.pad_token_id == tokenizer.pad_token_id
    assert merged.config.num_labels == 1
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)


def test_vocabulary_extended_adapter_merges_with_trained_embeddings(tmp_path, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "untied-base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<symptom>", "<diagnosis>", "<drug>"])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(extended))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"]))
    randomise(peft_model, "lora_B", "modules_to_save")
    ids = torch.tensor([[1, 2, 3, len(tokenizer), len(tokenizer) + 1, len(tokenizer) + 2]])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    adapter = save_adapter(peft_model, extended, tmp_path / "vocab-lora")

    out = merge_adapter(adapter, tmp_path / "merged")
    assert expected.shape[-1] == len(tokenizer) + 3
    assert torch.allclose(merged_logits(out, ids), expected, atol=1e-5)


def test_padded_base_vocabulary_is_not_shrunk_to_the_tokenizer(tmp_path, tiny_model_dir, tokenizer):
    """Qwen-style bases have more embedding rows than tokens; a merge must leave them alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "padded-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer) + 7, mean_resizing=False)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    randomise(peft_model, "lora_B")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    out = merge_adapter(save_adapter(peft_model, tokenizer, tmp_path / "lora"), tmp_path / "merged")
    assert AutoConfig.from_pretrained(out).vocab_size == len(tokenizer) + 7
    assert torch.allclose(merged_logits(out, ids), expected, atol=1e-5)


def test_base_override_replaces_the_adapters_base(causal_adapter, tmp_path, tiny_model_dir):
    adapter, expected, ids = causal_adapter
    moved = tmp_path / "moved-lora"
    moved.mkdir()
    for path in adapter.iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="--base"):
        merge_adapter(moved, tmp_path / "a")
    out = merge_adapter(moved, tmp_path / "b", base=str(tiny_model_dir))
    assert torch.allclose(merged_logits(out, ids), expected, atol=1e-5)


def test_merge_refuses_non_empty_output_before_loading(causal_adapter, tmp_path, monkeypatch):
    import medgpt.models.merge as merge

    adapter, _, _ = causal_adapter
    monkeypatch.setattr(merge, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(adapter, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_merge_refuses_a_directory_without_adapter_config(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not a LoRA adapter directory"):
        merge_adapter(tiny_model_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_crash_while_saving_leaves_no_output(causal_adapter, tmp_path, monkeypatch):
    import medgpt.models.merge as merge

    adapter, _, _ = causal_adapter

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge, "write_model_card", crash)
    with pytest.raises(RuntimeError):
        merge_adapter(adapter, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_cli_merge_writes_a_loadable_model(causal_adapter, tmp_path):
    adapter, expected, ids = causal_adapter
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert torch.allclose(merged_logits(tmp_path / "merged", ids), expected, atol=1e-5)


def test_cli_merge_refusals_exit_non_zero_with_a_message(causal_adapter, tmp_path, tiny_model_dir, capsys):
    adapter, _, _ = causal_adapter
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    assert main(["merge", "--adapter", str(adapter), "--output", str(taken)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tiny_model_dir), "--output", str(tmp_path / "new")]) == 2
    assert "not a LoRA adapter directory" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "new")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ hard bases


def test_merge_survives_a_model_whose_get_input_embeddings_raises(causal_adapter, tmp_path, monkeypatch):
    # ChatGLM-style models raise NotImplementedError there: MedicalGPT's merge crashed on it
    from transformers import LlamaForCausalLM

    adapter_dir, logits, ids = causal_adapter
    original = LlamaForCausalLM.get_input_embeddings

    def not_implemented(self):
        raise NotImplementedError

    monkeypatch.setattr(LlamaForCausalLM, "get_input_embeddings", not_implemented)
    merge_adapter(adapter_dir, tmp_path / "merged")
    monkeypatch.setattr(LlamaForCausalLM, "get_input_embeddings", original)
    assert torch.allclose(merged_logits(tmp_path / "merged", ids), logits, atol=1e-5)


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tokenizer):
    """A QLoRA adapter trained by `medgpt sft` (2 steps, 4-bit NF4 base of hidden size 64) and the logits of that
    adapter model as training computed them (4-bit base in train mode: bitsandbytes' CPU inference kernel
    repacks weights and rounds in bf16)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from conftest import make_tiny_model
    from medgpt.config import build_config
    from medgpt.stages import get_stage

    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("qlora")
    base = make_tiny_model(root / "base", tokenizer, hidden=64)
    data = root / "sft.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"What is {w}?"}, {"from": "gpt", "value": f"{w} is common."}]}
            for w in ("fever", "a cough", "asthma", "anaemia")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    options = {"model_name_or_path": str(base), "train_file_dir": str(data), "output_dir": str(root / "adapter"),
               "qlora": True, "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 0.05,
               "lora_dropout": 0.0, "max_length": 64, "save_steps": 100, "report_to": "none"}
    stage = get_stage("sft")
    stage.run(build_config(stage, options))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model = PeftModel.from_pretrained(model, root / "adapter").train()
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return root / "adapter", logits, ids


@pytest.mark.usefixtures("private_cache")
def test_qlora_adapter_merges_into_the_dequantised_base_and_keeps_its_logits(qlora_adapter, tmp_path):
    adapter_dir, logits, ids = qlora_adapter
    assert yaml.safe_load((adapter_dir / "run_config.yaml").read_text())["load_in_4bit"] is True
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path / "merged")]) == 0  # auto
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # plain 16/32-bit weights
    merged = merged_logits(tmp_path / "merged", ids)
    assert torch.allclose(merged, logits, atol=1e-4), (merged - logits).abs().max()  # the stated tolerance
    # into the original full-precision weights the same adapter computes something else: the quantisation error
    merge_adapter(adapter_dir, tmp_path / "into-original", dequantize="off")
    assert (merged_logits(tmp_path / "into-original", ids) - logits).abs().max() > 1e-2


def test_dequantize_without_bitsandbytes_says_what_to_install(causal_adapter, tmp_path, monkeypatch):
    import importlib.util

    from medgpt.models import merge

    real = importlib.util.find_spec
    monkeypatch.setattr(merge.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs bitsandbytes \(pip install 'medgpt\[quant\]'\); or pass --dequantize off"):
        merge_adapter(causal_adapter[0], tmp_path / "m", dequantize="on")
    assert not (tmp_path / "m").exists()
