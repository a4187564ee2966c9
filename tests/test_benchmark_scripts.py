"""The benchmark scripts still run (smoke mode on CPU); their numbers come from real runs, not from here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_in_tiny_cpu_mode():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--steps", "3", "--warmup", "1"], capture_output=True, text=True, timeout=300, check=True)
    *runs, check = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["attention"] for r in runs] == ["sdpa", "sdpa", "sdpa_packed"] and all(r["tokens_per_s"] > 0 for r in runs)
    assert runs[0]["vs_padded"] == 1.0
    # float32 on CPU: the packed document sees exactly what it sees alone
    assert check["sdpa"] < 1e-4 and check["eager"] < 1e-4 and check["sdpa_packed"] < 1e-4


def test_rl_throughput_runs_in_tiny_mode_and_ends_with_the_summary_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rl_throughput.py"), "--tiny",
                          "--output", str(tmp_path / "rl.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = dict(pair.split("=") for pair in out.stdout.strip().splitlines()[-1].split())
    assert list(fields) == ["ppo_steps_per_min", "grpo_steps_per_min", "ppo_peak_rss_gb", "ppo_over_grpo_step_time",
                            "roles_memory_over_base"]
    ppo, grpo, rss, ratio, roles = (float(v) for v in fields.values())
    assert ppo > 0 and grpo > 0 and rss > 0 and ratio > 0
    assert 1.0 < roles < 1.2  # actor, critic, reference and reward model on one base: adapters on top of it
    results = json.loads((tmp_path / "rl.json").read_text())["results"]
    tokens = [results[s]["completions_per_step"] * results[s]["mean_completion_length"] for s in ("ppo", "grpo")]
    per_token = [results[s]["seconds_per_step"] / t for s, t in zip(("ppo", "grpo"), tokens)]
    assert abs(ratio - per_token[0] / per_token[1]) < 0.01  # the ratio at equal generated tokens (2 decimals)
    for side in ("ppo", "grpo"):  # the same work per step: one generate call of 4 completions, at most 8 new tokens
        steps = results[side]["per_step"]
        assert len(steps) == 3 and results[side]["timed_steps"] == 2
        assert all(s["generate_calls"] == 1 and s["generated_rows"] == 4 and 0 < s["new_positions"] <= 8
                   for s in steps)
    assert abs(results["ppo"]["peak_rss_bytes"] / 1e9 - rss) < 0.006


def test_lm_eval_parity_holds_in_tiny_mode(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_eval_parity.py"), "--tiny",
                          "--output", str(tmp_path / "parity.json")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("parity=ok questions=8")
    rules = json.loads((tmp_path / "parity.json").read_text())["rules"]
    assert [r["scoring"] for r in rules] == ["letter", "sum", "char", "byte"]
    assert all(r["medgpt_accuracy"] == r["lm_eval_accuracy"] and r["max_abs_score_difference"] < 1e-3 for r in rules)


def test_head_input_benchmark_runs_in_tiny_mode_and_ends_with_the_summary_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "head_input.py"), "--tiny",
                          "--output", str(tmp_path / "head.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = dict(pair.split("=") for pair in out.stdout.strip().splitlines()[-1].split())
    assert list(fields)[:3] == ["speedup_rows_1", "speedup_rows_4", "speedup_rows_8"] and "cpu_bf16" in fields
    result = json.loads((tmp_path / "head.json").read_text())
    assert set(result["seconds_per_forward"]) == {"with", "without"}
    assert all(t > 0 for side in result["seconds_per_forward"].values() for t in side.values())


def test_mcq_scoring_measurement_runs_in_tiny_mode(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mcq_scoring.py"), "--tiny",
                          "--output", str(tmp_path / "scoring.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "scoring.json").read_text())["results"]
    assert [r["scoring"] for r in results] == ["mean", "sum", "char", "byte", "letter", "generate"]
    assert all(0 <= r["ci"][0] <= r["accuracy"] <= r["ci"][1] <= 1 and r["n"] == 8 for r in results)
    assert out.stdout.strip().splitlines()[-1].startswith("best=")
