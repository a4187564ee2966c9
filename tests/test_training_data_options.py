"""The data options MedicalGPT users pass, each shown to take effect on real files and tokenizers: parallel
tokenisation gives the same features, PT adds the BOS its tokenizer adds, keep_linebreaks keeps each line's
break, cache_dir reaches hub datasets, streaming keeps a validation set, resume_from_checkpoint true is auto."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, make_tiny_model
from medgpt.config import ConfigError, build_config, load_config
from medgpt.data.features import build_in_chunks, map_in_chunks
from medgpt.data.loading import load_stage_data
from medgpt.data.readers import ReadOptions, read_records
from medgpt.stages import get_stage

pytestmark = pytest.mark.usefixtures("private_cache")
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="MedicalGPT fixtures not present")


def first_lines(path: Path, n: int, target: Path) -> Path:
    with path.open(encoding="utf-8") as source:
        target.write_text("".join(next(source) for _ in range(n)), encoding="utf-8")
    return target


@pytest.fixture
def bos_tokenizer(embedded_dir):
    """The embedded tokenizer made to put a BOS before every text, as Llama / Mistral / Gemma tokenizers do."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.add_bos_token = True
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


# ------------------------------------------------------------------------------------------------ PT


@needs_fixtures
def test_pt_documents_start_with_the_bos_the_tokenizer_adds_as_medicalgpt(bos_tokenizer, tmp_path):
    from medgpt.stages.pt import blocks

    corpus = first_lines(FIXTURES / "fever.txt", 12, tmp_path / "fever.txt")
    records = read_records(str(corpus), ("text",), ReadOptions(line_endings=True)).records
    features, info = blocks(records, bos_tokenizer, block_size=10_000)
    # MedicalGPT: tokenizer(text) (special tokens included), EOS appended, concatenated
    expected = [t for r in records for t in bos_tokenizer(r.text)["input_ids"] + [bos_tokenizer.eos_token_id]]
    assert features[0]["input_ids"] == expected and info["documents"] == len(records)
    starts = [i for i, p in enumerate(features[0]["position_ids"]) if p == 0]
    assert len(starts) == len(records)
    assert all(features[0]["input_ids"][i] == bos_tokenizer.bos_token_id for i in starts)
    assert all(features[0]["labels"][i] == -100 for i in starts)  # BOS itself is never a target


def test_pt_adds_no_bos_where_the_tokenizer_adds_none(tokenizer):
    from medgpt.data.processors import leading_bos
    from medgpt.data.records import Source, TextRecord
    from medgpt.stages.pt import blocks

    assert tokenizer.bos_token is not None and leading_bos(tokenizer) is None  # SmolLM2 (like Qwen)
    features, _ = blocks([TextRecord("Fever is common.", Source("x", 1))], tokenizer, 64)
    assert features[0]["input_ids"] == tokenizer("Fever is common.")["input_ids"] + [tokenizer.eos_token_id]


@needs_fixtures
def test_pt_blocks_are_the_same_with_several_tokenising_processes(tokenizer, tmp_path):
    from medgpt.stages.pt import blocks

    corpus = first_lines(FIXTURES / "fever.txt", 120, tmp_path / "fever.txt")
    records = read_records(str(corpus), ("text",)).records
    one, one_info = blocks(records, tokenizer, 64, workers=None)
    three, three_info = blocks(records, tokenizer, 64, workers=3)
    assert len(one) > 10 and one == three and one_info == three_info


@needs_fixtures
def test_sft_features_are_the_same_with_several_tokenising_processes(tokenizer):
    from medgpt.data.templates import ChatFormat
    from medgpt.stages.sft import sft_features

    records = read_records(str(FIXTURES / "medical_sft_1K_format.jsonl"), ("conversation",), limit=40).records
    chat = ChatFormat(tokenizer)
    build = lambda chunk: sft_features(chat, chunk, 256, False)  # noqa: E731
    single, single_info = build(records)
    parallel, parallel_info = build_in_chunks(build, records, 3)
    assert parallel == single and parallel_info == single_info
    assert single_info["kept"] < len(records) and single_info["tokens"] > 40 * 50  # truncations were counted too


def test_map_in_chunks_runs_in_other_processes_and_keeps_order():
    import os

    results = map_in_chunks(lambda chunk: [(x * 2, os.getpid()) for x in chunk], list(range(50)), 2)
    flat = [pair for part in results for pair in part]
    assert [x for x, _ in flat] == [2 * x for x in range(50)]
    assert os.getpid() not in {pid for _, pid in flat}
    assert map_in_chunks(len, [1, 2, 3], None) == [3]  # one worker: in this process, one chunk


def pt_options(tmp_path, model_dir, corpus) -> dict:
    return {"model_name_or_path": str(model_dir), "train_file_dir": str(corpus), "output_dir": str(tmp_path / "out"),
            "block_size": 32, "max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
            "save_steps": 100, "lora_dropout": 0.0, "report_to": "none"}


@needs_fixtures
def test_pt_run_with_workers_and_linebreaks_trains_on_what_medicalgpt_would(tmp_path, tiny_model_dir, caplog, tokenizer):
    corpus = first_lines(FIXTURES / "fever.txt", 30, tmp_path / "fever.txt")
    options = {**pt_options(tmp_path, tiny_model_dir, corpus), "preprocessing_num_workers": 2}
    caplog.set_level(logging.INFO)
    metrics = get_stage("pt").run(build_config(get_stage("pt"), options))
    assert "in 2 processes" in caplog.text
    lines = [line.strip() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    # keep_linebreaks (default true): each document is its line with its line break, then EOS
    expected = sum(len(tokenizer(line + "\n")["input_ids"]) + 1 for line in lines)
    assert metrics["train_tokens"] == expected
    without = get_stage("pt").run(build_config(get_stage("pt"), {**options, "keep_linebreaks": False,
                                                                 "output_dir": str(tmp_path / "out2")}))
    assert without["train_tokens"] == sum(len(tokenizer(line)["input_ids"]) + 1 for line in lines)


def test_preprocessing_num_workers_is_refused_where_features_are_not_built_record_by_record():
    base = {"model_name_or_path": "m", "train_file_dir": "data/demo/preference", "output_dir": "o"}
    with pytest.raises(ConfigError, match=r"preprocessing_num_workers \(an option of stage pt, sft, rm, dpo, orpo"):
        build_config(get_stage("kto"), {**base, "preprocessing_num_workers": 2})


# ------------------------------------------------------------------------------------------------ streaming


def test_streaming_keeps_the_validation_set_and_evaluates_it(tmp_path, tiny_model_dir):
    train = tmp_path / "train.txt"
    train.write_text("".join(f"Document {i} about fever and its causes in adults.\n" for i in range(40)), "utf-8")
    validation = tmp_path / "validation.txt"
    validation.write_text("Fever is a raised body temperature.\nAspirin lowers a fever.\n", "utf-8")
    options = {**pt_options(tmp_path, tiny_model_dir, train), "streaming": True,
               "validation_file_dir": str(validation)}
    metrics = get_stage("pt").run(build_config(get_stage("pt"), options))
    assert "eval_loss" in metrics and "eval_perplexity" in metrics
    with pytest.raises(ConfigError, match="a stream cannot be split"):
        build_config(get_stage("pt"), {**options, "validation_file_dir": None, "validation_split_percentage": 10})


# ------------------------------------------------------------------------------------------------ hub


def test_cache_dir_reaches_hub_datasets(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config_name=None, split=None, streaming=False, cache_dir=None):
        calls.append(cache_dir)
        rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 3
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = build_config(get_stage("sft"), {"model_name_or_path": "m", "dataset_name": "some/medical-sft",
                                             "output_dir": str(tmp_path / "o"), "cache_dir": str(tmp_path / "hub")})
    assert config.model.cache_dir == config.data.cache_dir == str(tmp_path / "hub")
    data = load_stage_data(config.data, ("conversation",))
    assert len(data.train) == 3 and calls == [str(tmp_path / "hub")]


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("spelling", ["yaml true", "--resume_from_checkpoint True", "resume_from_checkpoint=yes"])
def test_resume_from_checkpoint_true_means_auto(tmp_path, spelling):
    from medgpt.training.checkpoints import COMPLETE
    from medgpt.training.recipe import begin_run

    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / COMPLETE).write_text("{}")
    base = {"model_name_or_path": "m", "train_file_dir": "data/demo/sft", "output_dir": str(out)}
    path = tmp_path / "run.yaml"
    if spelling == "yaml true":
        path.write_text(yaml.safe_dump({**base, "resume_from_checkpoint": True}))
        config = load_config(get_stage("sft"), path)
    else:
        path.write_text(yaml.safe_dump(base))
        config = load_config(get_stage("sft"), path, spelling.split())
    assert config.training.resume_from_checkpoint == "auto"
    assert begin_run(config) == str(out / "checkpoint-3")


def test_resume_from_checkpoint_false_starts_fresh_and_a_path_stays_a_path(tmp_path):
    base = {"model_name_or_path": "m", "train_file_dir": "data/demo/sft", "output_dir": str(tmp_path / "o")}
    assert load_config(get_stage("sft"), None, [f"{k}={v}" for k, v in base.items()]
                       + ["--resume_from_checkpoint", "False"]).training.resume_from_checkpoint is None
    config = build_config(get_stage("sft"), {**base, "resume_from_checkpoint": "o/checkpoint-7"})
    assert config.training.resume_from_checkpoint == "o/checkpoint-7"
