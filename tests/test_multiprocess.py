"""Two processes on CPU (gloo): `torchrun` data parallel tokenises once, trains and writes once; `accelerate launch`
with the shipped FSDP config runs FSDP2 (`MEDGPT_CPU_FSDP=1`: the Trainer's accelerator, the code path of GPUs)
and matches a one-process run with the same global batch, saves full loadable weights, resumes its sharded
checkpoints, answers sample prompts with every process; without it runs as DDP with one warning; DeepSpeed ZeRO-3
trains and gathers its partitioned weights; RM, DPO and KTO under FSDP2 save full weights and resume; independent
one-process runs under a 2-process launch are refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medgpt.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict:
    env = {**os.environ, "MEDGPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEDGPT_CPU_FSDP",
                *[k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]):
        env.pop(key, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU machine
    env.update(extra)
    return env


def accelerate_launch(config: str, options: list[str], env: dict, stage: str = "sft") -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/CONFIG --num_processes 2 -m medgpt.cli STAGE OPTIONS`,
    from the repository root as the README says (the DeepSpeed configs name their JSON file relative to it)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "medgpt.cli", stage, *options]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def write_sft(path: Path, records: int = 8) -> Path:
    pairs = [("What is a fever?", "A body temperature above 38 degrees Celsius."),
             ("Name the largest bone.", "The femur, in the thigh.")]
    lines = []
    for i in range(records):
        question, answer = pairs[i % len(pairs)]
        lines.append(json.dumps({"conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": answer}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_torchrun_two_cpu_processes_train_one_model_and_rank_zero_writes_once(tmp_path, tiny_model_dir):
    data = write_sft(tmp_path / "sft.jsonl")
    out = tmp_path / "out"
    env = clean_env(tmp_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "medgpt.cli", "sft",
        f"model_name_or_path={tiny_model_dir}", f"train_file_dir={data}", f"output_dir={out}",
        "max_steps=2", "per_device_train_batch_size=2", "logging_steps=1", "save_steps=1", "max_length=128",
        "report_to=none", "lora_dropout=0",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]

    results = json.loads((out / "train_results.json").read_text())
    assert results["world_size"] == 2
    assert results["global_step"] == 2
    assert results["epoch"] == 1.0  # 8 records / (2 processes x 2 per device) = 2 steps: each rank saw half

    assert len(list(out.glob("adapter_model.safetensors"))) == 1
    assert len(list(out.rglob("run_config.yaml"))) == 1
    assert not (out / ".final-tmp").exists()
    assert not [p for p in out.iterdir() if p.suffix == ".bin"]
    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "checkpoint_complete.json").is_file()
        assert len(list(checkpoint.glob("adapter_model.safetensors"))) == 1

    rows = read_metrics(out / "metrics.jsonl")
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2]  # one row per step: only rank 0 writes
    assert len([row for row in rows if "train_runtime" in row]) == 1

    # one process tokenised, the other waited on the file lock and loaded the same features
    assert log.count("tokenised 8 samples") == 1, log[-6000:]
    assert log.count("using cached features") == 1, log[-6000:]


# ------------------------------------------------------------------------------------------------ FSDP, DeepSpeed

# fp32: 2-process and 1-process runs must agree to float rounding (bf16 compute, the default on CPUs with bf16
# matrix units, rounds differently in each; test_fsdp2_with_bf16_compute_saves_fp32_weights covers it)
FULL = ["max_steps=4", "per_device_train_batch_size=2", "logging_steps=1", "save_steps=2", "max_length=64",
        "report_to=none", "use_peft=false", "learning_rate=1e-3", "bf16=false"]


def sft_options(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model_name_or_path={model}", f"train_file_dir={data}", f"output_dir={out}", *FULL, *extra]


def run_ok(done: subprocess.CompletedProcess) -> str:
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    return log


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir):
    """One FSDP2 run (2 processes x 2 samples) and one single-process run (4 samples a step), same data."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_sft(root / "sft.jsonl", records=16)
    env = clean_env(root, MEDGPT_CPU_FSDP="1")
    log = run_ok(accelerate_launch("fsdp.yaml", sft_options(tiny_model_dir, data, root / "fsdp", "sample_prompts=1"), env))
    single = [sys.executable, "-m", "medgpt.cli", "sft",
              *sft_options(tiny_model_dir, data, root / "single", "per_device_train_batch_size=4")]
    run_ok(subprocess.run(single, cwd=root, env=clean_env(root), capture_output=True, text=True, timeout=300))
    return root, data, log


def test_fsdp2_two_processes_equal_one_process_with_the_same_global_batch(fsdp_run, tiny_model_dir):
    root, _, log = fsdp_run
    results = json.loads((root / "fsdp" / "train_results.json").read_text())
    assert (results["distributed_type"], results["world_size"], results["global_step"]) == ("fsdp", 2, 4)
    assert "engine: fsdp, 2 process(es)" in log
    sharded, single = load_file(root / "fsdp" / "model.safetensors"), load_file(root / "single" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert sharded.keys() == single.keys()  # the tied lm_head is not written a second time
    for name, weight in single.items():
        assert sharded[name].shape == weight.shape, name  # full tensors, not shards
        moved = float((weight - start[name]).abs().max())
        assert moved > 1e-3, name  # four steps of lr 1e-3 moved every tensor …
        # … and the sharded run took the same steps: 2-process reductions differ from 1-process ones by
        # float rounding only (measured 7e-9 at lr 5e-5)
        torch.testing.assert_close(sharded[name], weight, atol=1e-6, rtol=0, msg=name)


def test_fsdp2_final_model_loads_and_answers_as_the_sharded_model_did(fsdp_run):
    root, _, _ = fsdp_run
    from medgpt.serve.engine import GenerationEngine, SamplingParams

    out = root / "fsdp"
    model = AutoModelForCausalLM.from_pretrained(out)  # what a user loads, on any machine
    reference = AutoModelForCausalLM.from_pretrained(root / "single")
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    # samples.jsonl was answered by the sharded model, with every process taking part; the loaded model agrees
    sample = json.loads((out / "samples.jsonl").read_text(encoding="utf-8").splitlines()[0])
    engine = GenerationEngine.load(str(out), torch_dtype="fp32")  # the dtype the run trained and answered in
    messages = read_sft_prompt(root / "sft.jsonl")
    again = engine.generate([messages], SamplingParams(max_new_tokens=128, temperature=0))[0]
    assert (again.text, again.finish_reason) == (sample["answer"], sample["finish_reason"])


def read_sft_prompt(path: Path) -> list:
    from medgpt.data.records import Message

    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])["conversations"][0]
    return [Message(role="user", content=first["value"])]


def test_fsdp2_sharded_checkpoint_resumes_to_the_uninterrupted_weights(fsdp_run, tiny_model_dir):
    root, data, _ = fsdp_run
    checkpoint = root / "fsdp" / "checkpoint-2"
    assert (checkpoint / "checkpoint_complete.json").is_file()
    assert list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))  # SHARDED_STATE_DICT: one file per rank
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    run_ok(accelerate_launch("fsdp.yaml", sft_options(tiny_model_dir, data, resumed, "resume_from_checkpoint=auto"),
                             clean_env(root, MEDGPT_CPU_FSDP="1")))
    assert json.loads((resumed / "train_results.json").read_text())["global_step"] == 4
    final, uninterrupted = load_file(resumed / "model.safetensors"), load_file(root / "fsdp" / "model.safetensors")
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(final[name], weight, atol=1e-7, rtol=0, msg=name)


def test_fsdp2_with_bf16_compute_saves_full_fp32_weights_that_load(tmp_path, tiny_model_dir):
    """What GPU users run: FSDP2 with bf16 mixed precision (accelerate's policy: bf16 parameters for compute,
    fp32 shards kept); the final weights are the gathered fp32 master weights."""
    data = write_sft(tmp_path / "sft.jsonl")
    out = tmp_path / "out"
    options = [option for option in sft_options(tiny_model_dir, data, out, "max_steps=2", "save_steps=100")
               if option != "bf16=false"] + ["bf16=true"]
    log = run_ok(accelerate_launch("fsdp.yaml", options, clean_env(tmp_path, MEDGPT_CPU_FSDP="1")))
    assert "precision: bf16 compute" in log, log[-4000:]
    results = json.loads((out / "train_results.json").read_text())
    assert (results["distributed_type"], results["world_size"], results["global_step"]) == ("fsdp", 2, 2)
    saved, start = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == start.keys()
    for name, weight in start.items():
        assert (saved[name].shape, saved[name].dtype) == (weight.shape, torch.float32), name
    moved = [name for name in saved if float((saved[name] - start[name]).abs().max()) > 1e-4]
    assert len(moved) == len(saved), sorted(set(saved) - set(moved))  # fp32 masters keep every small update
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 17, 300, 42]])).logits).all()


def write_kto(path: Path) -> Path:
    rows = [{"prompt": "What is a fever?", "completion": "A body temperature above 38 degrees Celsius.", "label": True},
            {"prompt": "What is a fever?", "completion": "A kind of bone.", "label": False},
            {"prompt": "Name the largest bone.", "completion": "The femur, in the thigh.", "label": True},
            {"prompt": "Name the largest bone.", "completion": "The heart.", "label": False}] * 2
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_fsdp2_preference_stages_save_full_weights_and_resume_their_sharded_checkpoints(stage, tmp_path, tiny_model_dir):
    """The other stages the FSDP config serves: full training of a reward model (score head included), DPO and KTO
    (the reference a frozen copy, prepared by the same accelerator) write gathered weights that load, and resume
    from their sharded checkpoints to the uninterrupted weights."""
    data = write_kto(tmp_path / "kto.jsonl") if stage == "kto" else ROOT / "data" / "demo" / "preference"
    out = tmp_path / "out"
    options = [f"model_name_or_path={tiny_model_dir}", f"train_file_dir={data}", f"output_dir={out}",
               "max_steps=2", "per_device_train_batch_size=2", "save_steps=1", "logging_steps=1", "max_length=96",
               "report_to=none", "use_peft=false", "learning_rate=1e-3", "bf16=false"]
    run_ok(accelerate_launch("fsdp.yaml", options, clean_env(tmp_path, MEDGPT_CPU_FSDP="1"), stage=stage))
    results = json.loads((out / "train_results.json").read_text())
    assert (results["distributed_type"], results["world_size"], results["global_step"]) == ("fsdp", 2, 2)
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    saved, start = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    shared = [name for name in start if name in saved]
    assert len(shared) == len(start)  # every base tensor, gathered (a reward model adds its score head)
    assert all(saved[name].shape == start[name].shape for name in shared)
    assert max(float((saved[name] - start[name]).abs().max()) for name in shared) > 1e-4
    if stage == "rm":
        from transformers import AutoModelForSequenceClassification

        assert saved["score.weight"].shape[0] == 1
        model = AutoModelForSequenceClassification.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 17, 300, 42]])).logits).all()
    # killed after step 1 and resumed from its sharded checkpoint: the uninterrupted run's weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    again = [o for o in options if not o.startswith("output_dir=")] + [f"output_dir={resumed}",
                                                                         "resume_from_checkpoint=auto"]
    run_ok(accelerate_launch("fsdp.yaml", again, clean_env(tmp_path, MEDGPT_CPU_FSDP="1"), stage=stage))
    assert [row["step"] for row in read_metrics(resumed / "metrics.jsonl") if "loss" in row] == [2]  # not a restart
    final = load_file(resumed / "model.safetensors")
    assert final.keys() == saved.keys()
    for name, weight in saved.items():
        torch.testing.assert_close(final[name], weight, atol=1e-6, rtol=0, msg=name)


def test_fsdp_config_on_cpu_runs_as_ddp_with_one_warning(tmp_path, tiny_model_dir):
    data = write_sft(tmp_path / "sft.jsonl")
    out = tmp_path / "out"
    options = sft_options(tiny_model_dir, data, out, "max_steps=2", "use_peft=true", "save_steps=100")
    log = run_ok(accelerate_launch("fsdp.yaml", options, clean_env(tmp_path)))
    assert log.count("FSDP needs GPUs") == 1, log[-4000:]
    results = json.loads((out / "train_results.json").read_text())
    assert (results["distributed_type"], results["world_size"]) == ("ddp", 2)
    assert (out / "adapter_model.safetensors").is_file()


def test_independent_one_process_runs_under_a_two_process_launch_are_refused(tmp_path, tiny_model_dir):
    data = write_sft(tmp_path / "sft.jsonl")
    out = tmp_path / "out"
    done = accelerate_launch("multi_gpu.yaml", sft_options(tiny_model_dir, data, out, "use_cpu=false"),
                             clean_env(tmp_path))
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "started 2 processes but each runs alone (world size 1)" in log, log[-4000:]
    assert not (out / "train_results.json").exists()


def test_deepspeed_zero3_on_cpu_trains_and_saves_the_gathered_weights(tmp_path, tiny_model_dir):
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    # configs/sft.yaml's data and batches: the two processes get different numbers of labelled tokens, so the
    # chunked loss would call the partitioned head a different number of times (a collective mismatch, gloo aborts)
    # unless the chunk counts are made equal
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "medgpt.cli", "sft", "configs/sft.yaml",
               f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", "max_steps=2", "eval_strategy=no",
               "use_peft=false", "save_steps=100", "sample_prompts=1", "report_to=none",
               "bf16=false"]  # DeepSpeed's bf16 keeps bf16 weights: two warm-up steps vanish in their rounding
    log = run_ok(subprocess.run(command, cwd=ROOT, env=clean_env(tmp_path), capture_output=True, text=True,
                                timeout=300))
    results = json.loads((out / "train_results.json").read_text())
    assert (results["distributed_type"], results["world_size"], results["zero_stage"]) == ("deepspeed", 2, 3)
    start = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    # partitions are [0]-shaped on every process: counting and the vocabulary check use the real sizes
    total = sum(t.numel() for name, t in start.items() if name != "lm_head.weight")
    assert f"trainable parameters: {total:,} of {total:,}" in log
    for name, weight in saved.items():
        assert weight.shape == start[name].shape, name
    assert float((saved["model.norm.weight"] - start["model.norm.weight"]).abs().max()) > 1e-5  # trained (warmup)
    AutoModelForCausalLM.from_pretrained(out)
    assert len((out / "samples.jsonl").read_text(encoding="utf-8").splitlines()) == 1  # generated by both processes
