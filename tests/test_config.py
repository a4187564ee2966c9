"""Config: YAML + overrides -> typed sections, strict names, MedicalGPT aliases, checks before any model loads."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from transformers import TrainingArguments
from trl import DPOConfig, SFTConfig

from medgpt import config as config_module
from medgpt.config import (
    ConfigError,
    build_config,
    check_context_length,
    load_config,
    parse_overrides,
    resolved_options,
    write_run_config,
)
from medgpt.stages import Stage

SFT = Stage("sft", "test sft", lambda c: {}, SFTConfig)
PT = Stage("pt", "test pt", lambda c: {}, TrainingArguments, data_kind="text")
DPO = Stage("dpo", "test dpo", lambda c: {}, DPOConfig, data_kind="preference")
BASE = {"model_name_or_path": "some/model", "train_file_dir": "data/demo/sft", "output_dir": "out"}


def test_unknown_option_is_an_error_that_lists_the_closest_names():
    with pytest.raises(ConfigError) as err:
        build_config(SFT, {**BASE, "learnig_rate": 1e-4, "lora_rnk": 8})
    message = str(err.value)
    assert "learnig_rate (did you mean: learning_rate?)" in message
    assert "lora_rnk (did you mean: lora_rank," in message
    assert "medgpt sft --help" in message


def test_option_of_another_stage_is_unknown_here():
    # `beta` means something in DPO; PT has no such option.
    assert build_config(DPO, {**BASE, "beta": 0.2}).training.beta == 0.2
    with pytest.raises(ConfigError, match="beta"):
        build_config(PT, {**BASE, "beta": 0.2})


def test_yaml_then_key_value_then_dash_flags_override_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "stage": "sft", "learning_rate": "2e-5", "lora_rank": 4}))
    config = load_config(SFT, path, ["lora_rank=16", "--lora_alpha", "32", "--use_dora", "--num_train_epochs=2"])
    assert config.training.learning_rate == pytest.approx(2e-5)  # PyYAML reads 2e-5 as a string
    assert config.adapter.lora_rank == 16
    assert config.adapter.lora_alpha == 32.0
    assert config.adapter.use_dora is True
    assert config.training.num_train_epochs == 2


def test_medicalgpt_aliases_are_accepted_and_written_back_under_our_names(tmp_path):
    config = build_config(SFT, {**BASE, "template_name": "chatml", "model_max_length": 256,
                                "train_on_inputs": True, "neft_alpha": 5, "torch_dtype": "bfloat16"})
    assert config.run.template == "chatml"
    assert config.training.max_length == 256
    assert config.run.train_on_prompt is True
    assert config.training.neftune_noise_alpha == 5
    assert config.model.torch_dtype == "bf16"
    written = yaml.safe_load(write_run_config(config, tmp_path).read_text())
    assert written["template"] == "chatml" and written["max_length"] == 256
    assert not {"template_name", "model_max_length", "train_on_inputs", "neft_alpha"} & set(written)


def test_alias_and_canonical_name_together_is_an_error():
    with pytest.raises(ConfigError, match="alias"):
        build_config(SFT, {**BASE, "template": "chatml", "template_name": "qwen"})


def test_bad_dtype_and_bad_types_are_explained():
    with pytest.raises(ConfigError, match="torch_dtype"):
        build_config(SFT, {**BASE, "torch_dtype": "float8"})
    with pytest.raises(ConfigError, match="lora_rank: expected an integer"):
        build_config(SFT, {**BASE, "lora_rank": "eight"})
    with pytest.raises(ConfigError, match="use_peft: expected true or false"):
        build_config(SFT, {**BASE, "use_peft": "maybe"})


def test_shared_names_reach_both_the_loader_and_the_trainer():
    config = build_config(SFT, {**BASE, "trust_remote_code": True, "gradient_checkpointing": True})
    assert config.model.trust_remote_code is True and config.training.trust_remote_code is True
    assert config.model.gradient_checkpointing is True
    assert config.training.activation_checkpointing is True  # transformers' new name for it


def test_trust_remote_code_is_off_by_default():
    config = build_config(SFT, BASE)
    assert config.model.trust_remote_code is False and config.training.trust_remote_code is False


def test_precision_is_chosen_from_the_hardware_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("medgpt.hardware.cpu_bf16", lambda: "none")  # a CPU without bf16 units: tests/test_precision.py
    for stage in (SFT, DPO, PT):  # TRL configs default bf16=None, which would raise on CPU
        config = build_config(stage, BASE)
        assert config.training.bf16 is False and config.training.fp16 is False
        assert config.training.use_cpu is True  # so torchrun / accelerate form one data-parallel group


def test_fp16_on_cpu_fails_with_the_fix(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        build_config(SFT, {**BASE, "fp16": True})


def test_4bit_without_bitsandbytes_fails_before_loading(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'medgpt\[quant\]'"):
        build_config(SFT, {**BASE, "qlora": True})


def test_impossible_combinations_fail_with_the_fix():
    cases = [
        ({"qlora": True, "use_peft": False}, "use_peft must stay true"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "choose one"),
        ({"load_in_8bit": True, "use_peft": False}, "cannot be trained in full"),
        ({"freeze_trainable_layers": 2}, "set use_peft: false"),
        ({"streaming": True}, "streaming \\(an option of stage pt, not sft\\)"),
        ({"rope_scaling": "ntk"}, "linear, dynamic, yarn"),
        ({"template": "chatm"}, "chatml"),
        ({"model_name_or_path": None}, "model_name_or_path is required"),
        ({"train_file_dir": None}, "no training data"),
    ]
    for extra, fix in cases:
        with pytest.raises((ConfigError, ValueError), match=fix):
            build_config(SFT, {**BASE, **extra})


def test_streaming_pt_needs_max_steps():
    with pytest.raises(ConfigError, match="set max_steps"):
        build_config(PT, {**BASE, "streaming": True})
    assert build_config(PT, {**BASE, "streaming": True, "max_steps": 5}).data.streaming


def test_qlora_implies_4bit_loading():
    assert build_config(SFT, {**BASE, "qlora": True}).model.load_in_4bit is True


def test_length_past_the_context_needs_rope_scaling():
    from transformers import LlamaConfig

    model_config = LlamaConfig(max_position_embeddings=512)
    config = build_config(PT, {**BASE, "block_size": 1024})
    with pytest.raises(ConfigError, match="rope_scaling: linear"):
        check_context_length(config, model_config, 1024)
    check_context_length(build_config(PT, {**BASE, "rope_scaling": "linear"}), model_config, 1024)
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        check_context_length(build_config(SFT, BASE), model_config, 2048)
    check_context_length(config, model_config, 512)


def test_stage_mismatch_between_file_and_command():
    with pytest.raises(ConfigError, match="stage 'dpo'"):
        build_config(SFT, {**BASE, "stage": "dpo"})


def test_run_config_is_fully_resolved_and_loads_again(tmp_path):
    config = build_config(SFT, {**BASE, "learning_rate": 1e-4, "lora_rank": 4})
    path = write_run_config(config, tmp_path)
    written = yaml.safe_load(path.read_text())
    # every option of every section is there, not only the given ones
    assert {"lora_dropout", "torch_dtype", "warmup_steps", "packing", "max_length", "stage"} <= set(written)
    assert "given by the user: learning_rate, lora_rank, model_name_or_path, output_dir, train_file_dir" in path.read_text().splitlines()[0]
    again = build_config(SFT, written)
    assert resolved_options(again) == resolved_options(config)


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["a=3", "b=true", "--c", "[x, y]", "--flag", "--d=none", "e=2e-5"]) == {
        "a": 3, "b": True, "c": ["x", "y"], "flag": True, "d": "none", "e": "2e-5"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["stray"])


def test_nested_yaml_mapping_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: x\n")
    with pytest.raises(ConfigError, match="options are flat"):
        load_config(SFT, path)


def test_every_own_option_has_help_text():
    import dataclasses

    for section in config_module.OWN_SECTIONS:
        for f in dataclasses.fields(section):
            assert len(f.metadata.get("help", "")) > 20, f"{section.__name__}.{f.name} lacks help"


def test_stage_help_is_the_parameter_manual(capsys):
    from medgpt import cli

    assert cli.main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "torch_dtype (default: auto)" in out and "Ampere" in out
    assert "load_in_4bit" in out and "learning_rate" in out and "max_length (default: 1024)" in out
    assert "template_name -> template" in out


def test_none_stays_a_string_where_strings_are_valid():
    config = build_config(SFT, {**BASE, "report_to": "none", "max_steps": 3})
    assert config.training.report_to in ("none", [], ["none"])
    assert build_config(SFT, {**BASE, "max_train_samples": "none"}).data.max_train_samples is None


def test_none_unsets_optional_options_and_removed_upstream_names_get_a_hint():
    config = build_config(SFT, {**BASE, "peft_path": "None", "template": "none"})
    assert config.adapter.peft_path is None and config.run.template is None
    with pytest.raises(ConfigError, match="TENSORBOARD_LOGGING_DIR"):
        build_config(SFT, {**BASE, "logging_dir": "runs"})


def test_yaml_no_is_the_string_no_for_string_options(tmp_path):
    # YAML 1.1 reads a bare `no` as false; `eval_strategy: no` must still mean "no evaluation"
    path = tmp_path / "c.yaml"
    path.write_text("eval_strategy: no\nsave_strategy: no\n")
    config = load_config(SFT, path, [f"{k}={v}" for k, v in BASE.items()] + ["max_steps=2", "packing=no"])
    assert config.training.eval_strategy == "no" and config.training.save_strategy == "no"
    assert config.training.packing is False  # a boolean option keeps its boolean


def test_activation_checkpointing_follows_our_option_in_every_trainer_config():
    # TRL's DPOConfig defaults it to on; our gradient_checkpointing (default off) is the one switch
    assert build_config(DPO, {**BASE, "train_file_dir": "data/demo/preference"}).training.activation_checkpointing is False
    on = build_config(DPO, {**BASE, "train_file_dir": "data/demo/preference", "gradient_checkpointing": True})
    assert on.training.activation_checkpointing is True and on.model.gradient_checkpointing is True


# ------------------------------------------------------------------------------------------------ MedicalGPT habits


def test_an_option_of_another_stage_names_the_stage_it_belongs_to():
    with pytest.raises(ConfigError) as err:
        build_config(PT, {**BASE, "model_max_length": 512})
    message = str(err.value)
    assert "max_length (also spelled model_max_length: an option of stage sft, rm, dpo" in message
    assert "not pt; pt calls it block_size)" in message
    with pytest.raises(ConfigError, match=r"train_on_prompt \(also spelled train_on_inputs: an option of stage sft, "
                                          r"not pt\)"):
        build_config(PT, {**BASE, "train_on_inputs": True})
    with pytest.raises(ConfigError, match=r"block_size \(an option of stage pt, not sft; sft calls it max_length\)"):
        build_config(SFT, {**BASE, "block_size": 512})


def test_model_type_auto_means_any_architecture():
    assert build_config(SFT, {**BASE, "model_type": "auto"}).model.model_type is None
    assert build_config(SFT, {**BASE, "model_type": "llama"}).model.model_type == "llama"


def test_use_fast_tokenizer_true_is_accepted_and_false_refused_with_why():
    assert build_config(SFT, {**BASE, "use_fast_tokenizer": True}).model.use_fast_tokenizer is True
    with pytest.raises(ConfigError, match="transformers 5 has only fast tokenizers"):
        build_config(SFT, {**BASE, "use_fast_tokenizer": "false"})


def test_do_train_and_do_predict_are_accepted_only_at_what_medgpt_does():
    assert build_config(SFT, {**BASE, "do_train": True, "do_predict": False}).training.do_train is True
    with pytest.raises(ConfigError, match="medgpt eval --model"):
        build_config(SFT, {**BASE, "do_train": False})
    with pytest.raises(ConfigError, match="medgpt predict"):
        build_config(SFT, {**BASE, "do_predict": True})


def test_do_eval_must_agree_with_the_validation_data():
    assert build_config(SFT, {**BASE, "do_eval": True, "validation_split_percentage": 10})
    assert build_config(SFT, {**BASE, "do_eval": False})
    with pytest.raises(ConfigError, match="do_eval: true needs validation data"):
        build_config(SFT, {**BASE, "do_eval": True})
    with pytest.raises(ConfigError, match="drop the validation data to skip evaluation"):
        build_config(SFT, {**BASE, "do_eval": "false", "validation_file_dir": "data/demo/sft"})


def test_trainer_options_medgpt_sets_itself_are_refused_at_other_values():
    pt = {**BASE, "train_file_dir": "data/demo/pretrain"}
    assert build_config(PT, {**pt, "remove_unused_columns": False, "prediction_loss_only": True})
    with pytest.raises(ConfigError, match="prediction_loss_only: pt always runs with prediction_loss_only: true"):
        build_config(PT, {**pt, "prediction_loss_only": False})
    with pytest.raises(ConfigError, match="remove_unused_columns: false"):
        build_config(PT, {**pt, "remove_unused_columns": True})
    assert build_config(DPO, {**BASE, "remove_unused_columns": True})  # DPO's trainer honours it


def test_resolved_config_of_fixed_options_loads_again(tmp_path):
    config = build_config(SFT, {**BASE, "do_train": True, "validation_split_percentage": 5})
    written = yaml.safe_load(write_run_config(config, tmp_path).read_text())
    assert written["do_train"] is True and written["do_eval"] is True and written["prediction_loss_only"] is True
    assert "block_size" not in written and "streaming" not in written  # PT's options are not SFT's
    assert resolved_options(build_config(SFT, written)) == resolved_options(config)


def test_yaml_yes_and_no_stay_words_booleans_still_read_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("use_peft: no\nresume_from_checkpoint: yes\nreport_to: none\n")
    config = load_config(SFT, path, [f"{k}={v}" for k, v in BASE.items()])
    assert config.adapter.use_peft is False and config.training.resume_from_checkpoint == "auto"


def test_trl_grpo_option_names_point_to_ours():
    from medgpt.stages import get_stage

    with pytest.raises(ConfigError) as err:
        build_config(get_stage("grpo"), {**BASE, "num_generations": 4, "beta": 0.1})
    message = str(err.value)
    assert "num_generations (grpo calls it num_samples_per_prompt)" in message
    assert "not grpo; grpo calls it kl_coef)" in message


@pytest.mark.parametrize("shard", ["0/2", "3/2", "half", "1/0"])
def test_a_malformed_train_shard_is_refused(shard):
    with pytest.raises(ConfigError, match="train_shard must be K/N"):
        build_config(SFT, {**BASE, "train_shard": shard})
    assert build_config(SFT, {**BASE, "train_shard": " 2 / 2"}).data.train_shard == "2/2"
