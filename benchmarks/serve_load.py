"""The API server under concurrent streaming clients: time to first token and total time per client, 8 at once
against the same 8 requests one at a time, and aggregate generated tokens per second.

`medgpt serve` runs in a child process (so the clients' threads do not share its interpreter); each client
sends one streaming `/v1/chat/completions` request (greedy, `max_tokens` the same for all, its own question)
and records when its request left, when the first content chunk came and when `[DONE]` came; tokens are the
server's `usage` counts. One warm-up request goes first. Then:

  concurrent   all clients start together (a barrier), each request joins the server's running batch
  serial       the same requests one after another (what a server generating one request at a time gives
               every client: each waits for those before it)

Printed per client: its TTFT and total in both phases; then aggregate tokens/s of each phase
(sum of tokens / wall time of the phase). The last line is

  clients=8 ttft_p50_s=A ttft_p95_s=B total_tokens_per_s=C vs_serial=R

with A, B the concurrent phase's TTFT percentiles, C its tokens/s and R = C / the serial phase's tokens/s.
The CPU's bf16 path and the load of the machine are printed first: compare only runs on a quiet machine.

    .venv/bin/python benchmarks/serve_load.py                 # embedded smollm2-135m, 8 clients x 64 tokens
    .venv/bin/python benchmarks/serve_load.py --tiny          # seconds: a tiny random model, checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is anaemia and what causes it?", "How is high blood pressure treated?", "What are the signs of a stroke?",
    "How should a minor burn be cared for?", "What does the liver do?", "When is a fever dangerous in adults?",
    "What is the difference between a virus and a bacterium?", "How can type 2 diabetes be prevented?",
    "What are common side effects of ibuprofen?", "Why do we need vitamin D?", "What is asthma?",
    "How is a sprained ankle treated?", "What does a cardiologist do?", "How does the immune system fight infection?",
    "What is a normal resting heart rate?", "What are the symptoms of dehydration?",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "medgpt.cli", "serve", "--model", model, "--port", str(port),
               "--served-model-name", "bench", "--dtype", args.dtype, "--max-batch", str(args.clients)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not answer /health within {args.start_timeout} s")


def one_stream(url: str, question: str, max_tokens: int) -> dict:
    """Send one streaming request; seconds to its first content chunk and to [DONE], and its token count."""
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "total": time.perf_counter() - start, "tokens": tokens}


def concurrent_phase(url: str, questions: list[str], max_tokens: int) -> tuple[list[dict], float]:
    results: list[dict | None] = [None] * len(questions)
    barrier = threading.Barrier(len(questions) + 1)

    def client(index: int) -> None:
        barrier.wait()
        results[index] = one_stream(url, questions[index], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def serial_phase(url: str, questions: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """One at a time; each client's TTFT and total include waiting for the requests before it, as they would."""
    start, results = time.perf_counter(), []
    for question in questions:
        waited = time.perf_counter() - start
        result = one_stream(url, question, max_tokens)
        results.append({**result, "ttft": waited + result["ttft"], "total": waited + result["total"]})
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and 16 tokens: checks the script")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default 64; 16 with --tiny)")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from medgpt.hardware import cpu_bf16, cpu_name
    from harness import make_tiny_model  # the benchmarks' smoke-mode model

    max_tokens = args.max_tokens or (16 if args.tiny else 64)
    questions = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i})" if i >= len(QUESTIONS) else "")
                 for i in range(args.clients)]
    print(f"cpu: {cpu_name()} (bf16 path: {cpu_bf16()}), load average {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} cores; model {'tiny random' if args.tiny else args.model}, {args.clients} clients x "
          f"{max_tokens} tokens, greedy, streaming", flush=True)
    with tempfile.TemporaryDirectory(prefix="medgpt-serve-load-") as scratch:
        model = str(make_tiny_model(Path(scratch))) if args.tiny else args.model
        port = free_port()
        server = start_server(model, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            one_stream(url, "Hello", 4)  # warm-up
            together, together_wall = concurrent_phase(url, questions, max_tokens)
            alone, alone_wall = serial_phase(url, questions, max_tokens)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"{'client':>6} {'ttft_s':>8} {'total_s':>8} {'tokens':>6} | one at a time: {'ttft_s':>8} {'total_s':>8}")
    for index, (c, s) in enumerate(zip(together, alone)):
        print(f"{index:>6} {c['ttft']:>8.2f} {c['total']:>8.2f} {c['tokens']:>6} | {'':>15}{s['ttft']:>8.2f} "
              f"{s['total']:>8.2f}")
    together_rate = sum(r["tokens"] for r in together) / together_wall
    alone_rate = sum(r["tokens"] for r in alone) / alone_wall
    ttfts = [r["ttft"] for r in together]
    print(f"concurrent: {together_wall:.2f} s, {together_rate:.1f} tokens/s, mean total per client "
          f"{statistics.mean(r['total'] for r in together):.2f} s; one at a time: {alone_wall:.2f} s, "
          f"{alone_rate:.1f} tokens/s, mean total per client {statistics.mean(r['total'] for r in alone):.2f} s; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(f"clients={args.clients} ttft_p50_s={percentile(ttfts, 0.5):.3f} ttft_p95_s={percentile(ttfts, 0.95):.3f} "
          f"total_tokens_per_s={together_rate:.1f} vs_serial={together_rate / alone_rate:.2f}")


if __name__ == "__main__":
    main()
