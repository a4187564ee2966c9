"""PT and SFT stages end to end on tiny random Llamas: what a run leaves on disk, that the two ways of starting a
run are one run, that loss goes down, that resume equals an uninterrupted run, and that bad input fails early."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_tiny_model
from medgpt.config import ConfigError, build_config
from medgpt.data.records import InvalidDataError
from medgpt.report import read_metrics
from medgpt.stages import get_stage
from medgpt.training.checkpoints import COMPLETE
from medgpt.training.trainer import TrainingDiverged

# ------------------------------------------------------------------------------------------------ helpers

CONVERSATIONS = [
    [("human", "What is a fever?"), ("gpt", "A body temperature above 38 degrees Celsius.")],
    [("human", "Name the largest bone."), ("gpt", "The femur, in the thigh.")],
    [("human", "What does insulin do?"), ("gpt", "It lets cells take up glucose from the blood."),
     ("human", "And in type 1 diabetes?"), ("gpt", "The body makes too little insulin.")],
    [("system", "You are a careful assistant."), ("human", "Is aspirin a painkiller?"),
     ("gpt", "Yes, and it also thins the blood.")],
]

TEXT = [
    "Hypertension is a long-term condition in which blood pressure in the arteries stays raised.",
    "Type 2 diabetes is a chronic disorder in which the body becomes resistant to insulin.",
    "Asthma is a condition in which the airways narrow and swell and may produce extra mucus.",
    "Anaemia is a lack of healthy red blood cells to carry oxygen to the tissues of the body.",
    "Migraine is a headache disorder with recurrent attacks of moderate to severe throbbing pain.",
    "Osteoporosis makes bones weak and brittle, so that a fall or even a cough can cause a fracture.",
]


def sharegpt(turns) -> dict:
    return {"conversations": [{"from": role, "value": text} for role, text in turns]}


def write_sft(path: Path, conversations=CONVERSATIONS, copies: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(sharegpt(c)) for c in conversations] * copies
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_text(path: Path, lines=TEXT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_stage(stage: str, options: dict, torch_seed: int | None = 0) -> dict:
    """Build and run a stage; `torch_seed` scrambles the ambient RNG (the run's own `seed` must win)."""
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    spec = get_stage(stage)
    return spec.run(build_config(spec, dict(options)))


def results(output: Path) -> dict:
    return json.loads((output / "train_results.json").read_text(encoding="utf-8"))


def losses(output: Path) -> dict[int, float]:
    """step -> loss of each logged training step (the last row of a step wins)."""
    return {row["step"]: row["loss"] for row in read_metrics(output / "metrics.jsonl") if "loss" in row}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, tokenizer) -> Path:
    """Hidden size 64: bitsandbytes quantises in blocks of 64."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-64"), tokenizer, hidden=64)


@pytest.fixture
def sft_file(tmp_path) -> Path:
    return write_sft(tmp_path / "data" / "sft.jsonl", copies=2)  # 8 records


@pytest.fixture
def sft_options(tmp_path, tiny_model_dir, sft_file) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(sft_file),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "max_length": 128,
        "lora_dropout": 0.0,
        "report_to": "none",
    }


@pytest.fixture
def pt_options(tmp_path, tiny_model_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(write_text(tmp_path / "data" / "corpus.txt")),
        "output_dir": str(tmp_path / "out"),
        "block_size": 32,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "lora_dropout": 0.0,
        "report_to": "none",
    }


# ------------------------------------------------------------------------------------------------ SFT outputs


def test_sft_lora_run_leaves_adapter_tokenizer_template_config_metrics_plot_card_and_results(sft_options, tmp_path):
    out = tmp_path / "out"
    metrics = run_stage("sft", {**sft_options, "max_steps": 3})

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "run_config.yaml", "metrics.jsonl", "loss.png", "README.md",
                 "train_results.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # LoRA saves the adapter only

    adapter = weights(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        sft_options["model_name_or_path"])

    # run_config.yaml is a loadable config of the same run
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["stage"] == "sft"
    again = build_config(get_stage("sft"), saved)
    assert again.stage == "sft"
    assert again.training.max_steps == 3 and again.extras and again.data.train_file_dir == sft_options["train_file_dir"]

    rows = read_metrics(out / "metrics.jsonl")
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = (out / "README.md").read_text()
    assert "Medical disclaimer" in card and "not a medical device" in card
    assert "sft" in card and "LoRA" in card

    saved_results = results(out)
    assert saved_results == json.loads(json.dumps(metrics, default=str))
    assert saved_results["world_size"] == 1
    assert saved_results["global_step"] == 3
    assert saved_results["sft_kept"] == 8
    assert saved_results["sft_trained_tokens"] > 0 and saved_results["sft_tokens"] > saved_results["sft_trained_tokens"]

    top_level = {p.name for p in out.iterdir()}
    assert "training_args.bin" not in top_level
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert ".final-tmp" not in top_level
    checkpoint = out / "checkpoint-3"  # the Trainer saves the last step; it is marked complete
    assert (checkpoint / COMPLETE).is_file()


def test_full_training_saves_model_safetensors_and_no_adapter(sft_options, tmp_path):
    out = tmp_path / "out"
    run_stage("sft", {**sft_options, "use_peft": False})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert "full" in (out / "README.md").read_text()
    assert not [p.name for p in out.iterdir() if p.suffix == ".bin"]


def test_train_yaml_and_stage_command_with_the_same_options_give_the_same_run(sft_options, tmp_path):
    from medgpt.cli import main

    options = {k: v for k, v in sft_options.items() if k != "output_dir"}
    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text(yaml.safe_dump({"stage": "sft", **options, "output_dir": str(tmp_path / "by-yaml")}))
    torch.manual_seed(0)
    assert main(["train", str(yaml_file)]) == 0

    argv = ["sft"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)] if key in ("train_file_dir", "model_name_or_path") else [f"{key}={value}"]
    argv += ["--output_dir", str(tmp_path / "by-command")]
    torch.manual_seed(0)
    assert main(argv) == 0

    a = weights(tmp_path / "by-yaml" / "adapter_model.safetensors")
    b = weights(tmp_path / "by-command" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "by-yaml") == losses(tmp_path / "by-command")
    config_a = yaml.safe_load((tmp_path / "by-yaml" / "run_config.yaml").read_text())
    config_b = yaml.safe_load((tmp_path / "by-command" / "run_config.yaml").read_text())
    config_a.pop("output_dir"), config_b.pop("output_dir")
    assert config_a == config_b


def test_seed_alone_fixes_the_adapter_initialisation(sft_options, tmp_path):
    run_stage("sft", {**sft_options, "output_dir": str(tmp_path / "a")}, torch_seed=1)
    run_stage("sft", {**sft_options, "output_dir": str(tmp_path / "b")}, torch_seed=2)
    a = weights(tmp_path / "a" / "adapter_model.safetensors")
    b = weights(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_to_none_is_accepted(sft_options, tmp_path):
    """`report_to: none` is a string transformers understands, not None (which it turned into [None] and refused)."""
    config = build_config(get_stage("sft"), {**sft_options, "report_to": "none"})
    assert config.training.report_to == []
    config = build_config(get_stage("sft"), {k: v for k, v in sft_options.items() if k != "report_to"})
    assert config.training.report_to == []


# ------------------------------------------------------------------------------------------------ learning


def test_sft_loss_decreases_on_a_memorisable_toy_set(sft_options, learnable_model_dir, tmp_path):
    data = write_sft(tmp_path / "data" / "toy.jsonl", CONVERSATIONS[:2], copies=8)
    run_stage("sft", {**sft_options, "model_name_or_path": str(learnable_model_dir), "train_file_dir": str(data),
                      "max_steps": 30, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                      "lr_scheduler_type": "constant", "warmup_steps": 0})
    logged = losses(tmp_path / "out")
    assert len(logged) == 30
    first, last = logged[1], logged[30]
    assert all(math.isfinite(v) for v in logged.values())
    assert last < 0.5 * first, logged
    assert sum(logged[s] for s in range(26, 31)) < sum(logged[s] for s in range(1, 6))


# ------------------------------------------------------------------------------------------------ resume


def _cut_after(source: Path, target: Path, step: int, keep_metrics_until: int) -> None:
    """Copy a finished run and turn it into one killed after `keep_metrics_until` steps with checkpoint-`step`
    as its newest checkpoint: later checkpoints, final files and later metric rows are gone."""
    shutil.copytree(source, target)
    for path in list(target.iterdir()):
        if path.name.startswith("checkpoint-"):
            if int(path.name.split("-")[1]) > step:
                shutil.rmtree(path)
        elif path.name != "metrics.jsonl":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    rows = [r for r in read_metrics(target / "metrics.jsonl") if r["step"] <= keep_metrics_until and "loss" in r]
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_resumed_run_equals_the_uninterrupted_run(sft_options, tmp_path, use_peft):
    options = {**sft_options, "max_steps": 6, "save_steps": 3, "use_peft": use_peft, "learning_rate": 1e-3,
               "seed": 7}
    uninterrupted = tmp_path / "a"
    run_stage("sft", {**options, "output_dir": str(uninterrupted)})
    assert (uninterrupted / "checkpoint-3" / COMPLETE).is_file()

    resumed = tmp_path / "b"
    _cut_after(uninterrupted, resumed, step=3, keep_metrics_until=3)
    assert not (resumed / "train_results.json").exists()
    metrics = run_stage("sft", {**options, "output_dir": str(resumed), "resume_from_checkpoint": "auto"},
                        torch_seed=123)  # a different ambient RNG: everything must come from the checkpoint
    assert metrics["global_step"] == 6

    weight_file = "adapter_model.safetensors" if use_peft else "model.safetensors"
    a, b = weights(uninterrupted / weight_file), weights(resumed / weight_file)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    la, lb = losses(uninterrupted), losses(resumed)
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert lb[step] == pytest.approx(la[step], abs=1e-6), step
    # the resumed run really trained from step 3: its weights moved away from checkpoint-3
    start = weights(uninterrupted / "checkpoint-3" / weight_file)
    assert any(not torch.equal(start[k], b[k]) for k in start)


def test_resumed_run_logs_each_step_once(sft_options, tmp_path):
    options = {**sft_options, "max_steps": 6, "save_steps": 3}
    run_stage("sft", {**options, "output_dir": str(tmp_path / "a")})
    _cut_after(tmp_path / "a", tmp_path / "b", step=3, keep_metrics_until=5)  # killed at step 5
    run_stage("sft", {**options, "output_dir": str(tmp_path / "b"), "resume_from_checkpoint": "auto"})
    steps = [row["step"] for row in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_resume_from_a_checkpoint_at_max_steps_trains_no_further_step(sft_options, tmp_path, use_peft):
    # 8 samples in batches of 2: checkpoint-2 (= max_steps) sits mid-epoch, where the Trainer alone would train a
    # third step before it looks at max_steps.
    options = {**sft_options, "max_steps": 2, "save_steps": 2, "use_peft": use_peft, "learning_rate": 1e-3}
    run_stage("sft", {**options, "output_dir": str(tmp_path / "a")})
    resumed = tmp_path / "b"
    _cut_after(tmp_path / "a", resumed, step=2, keep_metrics_until=2)  # killed before the final save

    metrics = run_stage("sft", {**options, "output_dir": str(resumed), "resume_from_checkpoint": "auto"})
    assert metrics["global_step"] == results(resumed)["global_step"] == 2
    assert sorted(losses(resumed)) == [1, 2]
    weight_file = "adapter_model.safetensors" if use_peft else "model.safetensors"
    final, checkpoint = weights(resumed / weight_file), weights(resumed / "checkpoint-2" / weight_file)
    assert final.keys() == checkpoint.keys()
    assert all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert not (resumed / "checkpoint-3").exists()


def test_auto_resume_skips_a_checkpoint_cut_short_and_an_explicit_path_to_it_is_refused(sft_options, tmp_path, caplog):
    out = tmp_path / "out"
    options = {**sft_options, "max_steps": 4, "save_steps": 2}
    run_stage("sft", options)
    for path in list(out.iterdir()):  # keep the checkpoints only: a run killed while saving checkpoint-4
        if not path.name.startswith("checkpoint-"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "checkpoint-4" / COMPLETE).unlink()
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9")  # a newer one, also cut short
    (out / "checkpoint-9" / COMPLETE).unlink()

    caplog.clear()
    metrics = run_stage("sft", {**options, "resume_from_checkpoint": "auto"})
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cut short" in r.getMessage()]
    assert any("checkpoint-9" in m for m in skipped) and any("checkpoint-4" in m for m in skipped)
    assert any("resuming from" in r.getMessage() and r.getMessage().endswith("checkpoint-2") for r in caplog.records)
    assert metrics["global_step"] == 4
    assert sorted(losses(out)) == [3, 4]  # only the steps after checkpoint-2 were trained (and logged)

    assert (out / "checkpoint-4" / COMPLETE).is_file()  # saved again, whole this time

    with pytest.raises(ValueError, match="incomplete"):
        run_stage("sft", {**options, "resume_from_checkpoint": str(out / "checkpoint-9")})


def test_explicit_resume_path_that_does_not_exist_is_refused(sft_options, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run_stage("sft", {**sft_options, "resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-5")})


# ------------------------------------------------------------------------------------------------ refusals


def test_non_empty_output_dir_is_refused_untouched_and_overwrite_proceeds(sft_options, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("an earlier model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import transformers

    def no_training(*args, **kwargs):
        raise AssertionError("training started in a refused directory")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "train", no_training)
        with pytest.raises(FileExistsError, match="overwrite_output_dir"):
            run_stage("sft", sft_options)
        with pytest.raises(FileExistsError):  # auto-resume with no checkpoint to resume is a fresh start: refused
            run_stage("sft", {**sft_options, "resume_from_checkpoint": "auto"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    run_stage("sft", {**sft_options, "overwrite_output_dir": True})
    assert (out / "train_results.json").is_file()


INVALID = '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]}\n'


def test_invalid_data_is_refused_before_any_model_or_tokenizer_loads(sft_options, sft_file, monkeypatch):
    with sft_file.open("a") as handle:
        handle.write(INVALID)

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the data was validated")

    with monkeypatch.context() as patch:
        for target in ("medgpt.training.recipe.load_model", "medgpt.models.load.load_model",
                       "medgpt.stages.sft.load_tokenizer", "medgpt.stages.sft.load_model_config"):
            patch.setattr(target, must_not_load)
        with pytest.raises(InvalidDataError) as err:
            run_stage("sft", sft_options)
    assert f"{sft_file}:9" in str(err.value)


def test_skip_invalid_records_drops_them_and_trains(sft_options, sft_file, tmp_path, caplog):
    with sft_file.open("a") as handle:
        handle.write(INVALID)
    metrics = run_stage("sft", {**sft_options, "skip_invalid_records": True})
    assert metrics["sft_kept"] == 8
    assert (tmp_path / "out" / "train_results.json").is_file()
    assert any("1 invalid skipped" in r.getMessage() for r in caplog.records)


def test_nan_loss_stops_with_training_diverged_naming_the_fix(sft_options, tmp_path, monkeypatch):
    import medgpt.training.trainer as trainer_module

    real = trainer_module.chunked_lm_loss
    calls = []

    def nan_on_second_step(*args, **kwargs):
        loss, count = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 2 else loss), count

    monkeypatch.setattr(trainer_module, "chunked_lm_loss", nan_on_second_step)
    with pytest.raises(TrainingDiverged) as err:
        run_stage("sft", {**sft_options, "max_steps": 4, "save_steps": 1})
    message = str(err.value)
    assert "nan" in message and "step 1" in message and "lower learning_rate" in message
    out = tmp_path / "out"
    assert not (out / "train_results.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-1" / COMPLETE).is_file() and not (out / "checkpoint-2").exists()


def test_huge_learning_rate_diverges_with_a_hint(sft_options, tmp_path):
    with pytest.raises(TrainingDiverged, match="lower learning_rate"):
        run_stage("sft", {**sft_options, "max_steps": 8, "learning_rate": 1e6, "max_grad_norm": 0,
                          "use_peft": False, "bf16": False})  # under bf16 autocast it collapses to 0 gradients
    assert not (tmp_path / "out" / "train_results.json").exists()


# ------------------------------------------------------------------------------------------------ methods


def test_qlora_trains_a_few_steps_on_cpu_and_saves_an_adapter(sft_options, tiny64_dir, tmp_path):
    metrics = run_stage("sft", {**sft_options, "model_name_or_path": str(tiny64_dir), "qlora": True})
    out = tmp_path / "out"
    adapter = weights(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"])
    assert "QLoRA" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "run_config.yaml").read_text())["load_in_4bit"] is True


def test_freeze_trainable_layers_trains_only_the_top_layer(sft_options, tiny_model_dir, tmp_path):
    run_stage("sft", {**sft_options, "use_peft": False, "freeze_trainable_layers": 1, "learning_rate": 1e-3})
    base = weights(tiny_model_dir / "model.safetensors")
    trained = weights(tmp_path / "out" / "model.safetensors")
    layer0 = [k for k in base if k.startswith("model.layers.0.")]
    layer1 = [k for k in base if k.startswith("model.layers.1.")]
    assert layer0 and layer1
    assert all(torch.equal(base[k], trained[k]) for k in layer0)
    assert all(not torch.equal(base[k], trained[k]) for k in layer1 if k.endswith("proj.weight"))
    # the head trains, and it is tied to the input embeddings
    assert not torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_padded_and_packed_batches_give_the_same_first_step_loss(sft_options, tmp_path):
    data = write_sft(tmp_path / "data" / "four.jsonl", CONVERSATIONS)  # lengths differ: padding is real
    common = {**sft_options, "train_file_dir": str(data), "max_steps": 1, "per_device_train_batch_size": 4}
    first = {}
    for packing in (True, False):
        out = tmp_path / f"packing-{packing}"
        run_stage("sft", {**common, "packing": packing, "output_dir": str(out)})
        first[packing] = losses(out)[1]
    assert math.isfinite(first[True])
    assert first[True] == pytest.approx(first[False], abs=1e-4)


def test_neftune_uses_the_per_sample_hook_not_the_transformers_one(sft_options, tmp_path, monkeypatch):
    import transformers.trainer

    from medgpt.training import trainer as trainer_module

    def stock_hook(*args, **kwargs):
        raise AssertionError("transformers' NEFTune hook was activated: it uses the packed row's length")

    monkeypatch.setattr(transformers.trainer, "activate_neftune", stock_hook)
    noised = []
    real_hook = trainer_module.NEFTune._hook

    def spy(self, module, args, output):
        result = real_hook(self, module, args, output)
        if module.training:
            noised.append(not torch.equal(result, output))
        return result

    monkeypatch.setattr(trainer_module.NEFTune, "_hook", spy)
    run_stage("sft", {**sft_options, "neftune_noise_alpha": 5})
    assert noised and all(noised)
    saved = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    assert saved["neftune_noise_alpha"] == 5
    assert (tmp_path / "out" / "train_results.json").is_file()


def test_tensorboard_reporting_works_offline_and_writes_events(sft_options, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logs))
    run_stage("sft", {**sft_options, "report_to": "tensorboard"})
    assert list(logs.rglob("events.out.tfevents.*"))


def test_sft_truncation_counts_reach_train_results(sft_options, tmp_path):
    long_reply = " ".join(["the heart pumps blood"] * 60)
    long_prompt = " ".join(["please explain the kidney"] * 60)
    data = write_sft(tmp_path / "data" / "long.jsonl", [
        CONVERSATIONS[0],  # kept whole
        [("human", "What is a fever?"), ("gpt", "A raised temperature."),
         ("human", "Tell me more."), ("gpt", long_reply)],  # cut after the first reply
        [("human", "Describe the heart."), ("gpt", long_reply)],  # cut inside its only reply
        [("human", long_prompt), ("gpt", "Kidneys filter blood.")],  # prompt alone too long: dropped
    ])
    metrics = run_stage("sft", {**sft_options, "train_file_dir": str(data), "max_length": 80})
    saved = results(tmp_path / "out")
    assert saved["sft_kept"] == 1
    assert saved["sft_truncated_at_turn"] == 1
    assert saved["sft_truncated_in_reply"] == 1
    assert saved["sft_dropped"] == 1
    assert metrics["sft_dropped"] == 1


def test_sft_streaming_is_refused_with_the_reason(sft_options):
    with pytest.raises(ConfigError, match=r"streaming \(an option of stage pt, not sft\)"):
        run_stage("sft", {**sft_options, "streaming": True})


# ------------------------------------------------------------------------------------------------ PT


def test_pt_run_saves_outputs_and_block_counts(pt_options, tmp_path):
    metrics = run_stage("pt", pt_options)
    out = tmp_path / "out"
    for name in ("adapter_model.safetensors", "tokenizer.json", "run_config.yaml", "metrics.jsonl", "loss.png",
                 "README.md", "train_results.json"):
        assert (out / name).is_file(), name
    saved = results(out)
    assert saved["train_documents"] == len(TEXT)
    assert saved["train_blocks"] == math.ceil(saved["train_tokens"] / 32)
    assert saved["train_tokens"] > 32 * 2
    assert saved["global_step"] == 2 and saved["world_size"] == 1
    assert yaml.safe_load((out / "run_config.yaml").read_text())["stage"] == "pt"
    assert metrics["global_step"] == 2


def test_pt_validation_split_reports_eval_loss_and_perplexity(pt_options, tmp_path):
    run_stage("pt", {**pt_options, "validation_split_percentage": 34})
    saved = results(tmp_path / "out")
    assert math.isfinite(saved["eval_loss"])
    assert saved["eval_perplexity"] == pytest.approx(math.exp(saved["eval_loss"]), rel=1e-6)
    assert saved["train_documents"] == len(TEXT) - 2


def test_pt_streaming_trains_without_materialising_the_corpus(pt_options, tmp_path, monkeypatch):
    import medgpt.stages.pt as pt

    def materialised(*args, **kwargs):
        raise AssertionError("the corpus was read in full")

    monkeypatch.setattr(pt, "load_stage_data", materialised)
    monkeypatch.setattr(pt, "blocks", materialised)
    metrics = run_stage("pt", {**pt_options, "streaming": True})
    assert metrics["global_step"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


NEW_TOKENS = ["<dx_hypertension>", "<dx_t2dm>", "<rx_metformin>"]


def _train_with_new_tokens(pt_options: dict, tmp_path: Path) -> Path:
    tokens_file = tmp_path / "new_tokens.txt"
    tokens_file.write_text("\n".join(NEW_TOKENS) + "\n")
    corpus = write_text(tmp_path / "data" / "tokens.txt",
                        [f"{line} {NEW_TOKENS[i % 3]}" for i, line in enumerate(TEXT)])
    run_stage("pt", {**pt_options, "train_file_dir": str(corpus), "new_tokens_file": str(tokens_file),
                     "learning_rate": 1e-2})
    return tmp_path / "out"


def _adapter_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of base + adapter the plain peft way: base resized to the trained vocabulary, adapter loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter_dir)))
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits


def test_new_tokens_extend_the_vocabulary_train_in_full_and_merge(pt_options, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from medgpt.models.merge import merge_adapter

    assert not set(NEW_TOKENS) & set(tokenizer.get_vocab())
    out = _train_with_new_tokens(pt_options, tmp_path)

    grown = len(tokenizer) + 3
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(saved_tokenizer) == grown
    assert all(saved_tokenizer.convert_tokens_to_ids(t) >= len(tokenizer) for t in NEW_TOKENS)
    adapter = weights(out / "adapter_model.safetensors")
    full = {k: v.shape for k, v in adapter.items() if "lora_" not in k}
    assert any("embed_tokens" in k for k in full) and any("lm_head" in k for k in full), sorted(full)
    assert all(shape[0] == grown for shape in full.values())
    assert set(json.loads((out / "adapter_config.json").read_text())["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    trained_rows = [v for k, v in adapter.items() if k.endswith("embed_tokens.modules_to_save.weight")]
    base_rows = weights(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert trained_rows and not torch.equal(trained_rows[0][: len(tokenizer)], base_rows)  # trained in full

    merged = merge_adapter(out, tmp_path / "merged")
    assert AutoConfig.from_pretrained(merged).vocab_size == grown
    assert weights(merged / "model.safetensors")["model.embed_tokens.weight"].shape[0] == grown
    assert len(AutoTokenizer.from_pretrained(merged)) == grown

    ids = torch.tensor([saved_tokenizer("blood pressure <dx_t2dm> and <rx_metformin>")["input_ids"]])
    assert ids.max() >= len(tokenizer)
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    assert merged_logits.shape[-1] == grown
    assert torch.allclose(merged_logits, _adapter_logits(tiny_model_dir, out, ids), atol=1e-5)


def test_vocabulary_extended_adapter_loads_for_chat_with_the_trained_logits(pt_options, tiny_model_dir, tmp_path):
    from medgpt.serve.engine import GenerationEngine

    out = _train_with_new_tokens(pt_options, tmp_path)
    engine = GenerationEngine.load(str(out), torch_dtype="fp32")  # exact: auto is bf16 on bf16 CPUs
    ids = torch.tensor([engine.tokenizer("blood pressure <dx_t2dm>")["input_ids"]])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits
    assert torch.allclose(logits, _adapter_logits(tiny_model_dir, out, ids), atol=1e-5)


def test_new_tokens_that_already_exist_do_not_resize(pt_options, tokenizer, tmp_path, monkeypatch):
    import transformers

    tokens_file = tmp_path / "known.txt"
    tokens_file.write_text("heart\nblood\n<|im_end|>\n")
    assert {"heart", "blood", "<|im_end|>"} <= set(tokenizer.get_vocab())
    resized = []
    real = transformers.PreTrainedModel.resize_token_embeddings

    def spy(self, *args, **kwargs):
        resized.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "resize_token_embeddings", spy)
    run_stage("pt", {**pt_options, "new_tokens_file": str(tokens_file)})
    out = tmp_path / "out"
    assert not resized
    assert all("lora_" in k for k in weights(out / "adapter_model.safetensors"))
    assert not json.loads((out / "adapter_config.json").read_text()).get("modules_to_save")


def test_sample_prompts_writes_answers_from_the_trained_model(tmp_path, sft_options):
    run_stage("sft", {**sft_options, "sample_prompts": 2, "validation_split_percentage": 25})
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(row["prompt"] and isinstance(row["answer"], str) for row in rows)
    assert {row["finish_reason"] for row in rows} <= {"stop", "length"}
