"""Output directories: refusing to clobber, atomic final saves, and the model card."""

from __future__ import annotations

import datetime
import os

import pytest

from medgpt.outputs import DISCLAIMER, atomic_directory, prepare_output_dir, write_model_card


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


# ------------------------------------------------------------------------------------------ prepare_output_dir


def test_prepare_output_dir_refuses_a_non_empty_directory_and_says_how_to_proceed(tmp_path):
    (tmp_path / "model.safetensors").write_text("precious")
    with pytest.raises(FileExistsError) as err:
        prepare_output_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "overwrite_output_dir" in message
    assert "resume" in message
    assert (tmp_path / "model.safetensors").read_text() == "precious"


def test_prepare_output_dir_allows_a_non_empty_directory_when_overwriting_or_resuming(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    assert prepare_output_dir(tmp_path, overwrite=True) == tmp_path
    assert prepare_output_dir(tmp_path, resuming=True) == tmp_path
    assert (tmp_path / "checkpoint-10").is_dir()  # allowing is not deleting


def test_prepare_output_dir_creates_a_missing_directory_with_parents(tmp_path):
    target = tmp_path / "runs" / "sft" / "out"
    assert prepare_output_dir(str(target)) == target
    assert target.is_dir()


def test_prepare_output_dir_accepts_an_existing_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty") == tmp_path / "empty"


# ------------------------------------------------------------------------------------------ atomic_directory


def test_atomic_directory_on_success_publishes_the_files_and_leaves_no_temporaries(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        assert tmp != final and tmp.parent == final.parent and tmp.is_dir()
        assert not final.exists()  # nothing visible while writing
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    assert (final / "config.json").read_text() == "{}"
    assert (final / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "final"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"


def test_atomic_directory_replaces_an_existing_directory_completely(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old.bin").write_text("old")
    (final / "config.json").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
    assert (final / "config.json").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_failure_leaves_the_previous_directory_untouched(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="crash while saving"):
        with atomic_directory(final) as tmp:
            (tmp / "config.json").write_text("half")
            (tmp / "partial.bin").write_text("half")
            raise RuntimeError("crash while saving")
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
    assert (final / "config.json").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_failure_without_a_previous_directory_creates_nothing(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "x").write_text("1")
            raise KeyboardInterrupt
    assert not final.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_directory_clears_a_stale_temporary_from_a_killed_run(tmp_path):
    final = tmp_path / "final"
    stale = tmp_path / f".tmp-final-{os.getpid()}"
    stale.mkdir()
    (stale / "garbage").write_text("from a killed run")
    with atomic_directory(final) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in final.iterdir()) == ["x"]
    assert _leftovers(tmp_path) == []


def test_atomic_directory_survives_a_stale_old_directory_from_a_killed_run(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("old")
    stale = tmp_path / f".old-final-{os.getpid()}"
    stale.mkdir()
    (stale / "config.json").write_text("older")
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("new")
    assert (final / "config.json").read_text() == "new"
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ model card


def test_model_card_names_base_model_stages_data_metrics_and_disclaimer(tmp_path):
    out = tmp_path / "medgpt-sft-dpo"
    out.mkdir()
    path = write_model_card(out, base_model="smollm2-135m", stages=["sft", "dpo"],
                            data=["data/demo/sft", "data/demo/preference"],
                            metrics={"eval_loss": 1.234567, "train_steps": 30, "rewards/accuracy": 0.875},
                            method="LoRA r=8", template="chatml", notes="A demo run.")
    assert path == out / "README.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    assert "base_model: smollm2-135m" in text
    assert "tags: [medgpt, medical, sft, dpo]" in text
    assert "# medgpt-sft-dpo" in text
    assert "**Base model:** `smollm2-135m`" in text
    assert "**Stages:** sft -> dpo" in text
    assert "**Method:** LoRA r=8" in text
    assert "**Chat template:** chatml" in text
    assert "`data/demo/sft`, `data/demo/preference`" in text
    assert "| metric | value |" in text
    assert "| eval_loss | 1.235 |" in text  # floats to 4 significant digits
    assert "| train_steps | 30 |" in text
    assert "| rewards/accuracy | 0.875 |" in text
    assert "A demo run." in text
    assert DISCLAIMER in text
    assert "not a medical device" in text
    assert datetime.date.today().isoformat() in text


def test_model_card_without_metrics_or_data_still_has_the_disclaimer(tmp_path):
    text = write_model_card(tmp_path, base_model="Qwen/Qwen2.5-0.5B-Instruct", stages=["pt"], data=[]).read_text()
    assert "(none recorded)" in text
    assert "**Data:** n/a" in text
    assert "**Method:** n/a" in text
    assert "the tokenizer's own" in text
    assert text.rstrip().endswith(DISCLAIMER)


def test_model_card_front_matter_is_valid_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    text = write_model_card(tmp_path, base_model="smollm2-135m", stages=["sft", "dpo"], data=["d"]).read_text()
    _, front, _ = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "smollm2-135m"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["medgpt", "medical", "sft", "dpo"]


def test_model_card_overwrites_an_existing_readme(tmp_path):
    (tmp_path / "README.md").write_text("stale")
    write_model_card(tmp_path, base_model="b", stages=["sft"], data=["d"])
    assert "stale" not in (tmp_path / "README.md").read_text()
