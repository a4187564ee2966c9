"""The benchmark scripts still run (smoke mode on CPU); their numbers come from real runs, not from here."""

from __future__ import annotations

import json
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
