"""Data parallel on CPU: `torchrun --nproc_per_node 2 -m medgpt.cli sft …` forms one group of two processes
(gloo), tokenises once, trains, and rank 0 alone writes the outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from medgpt.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    env = {**os.environ, "MEDGPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU data parallel even on a GPU machine
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
