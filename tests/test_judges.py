"""Judges of a win rate through the public OpenAI-compatible HTTP API: our own `medgpt serve` of a tiny model
taught to always answer "A" (a judge with pure position bias: asking both orders turns it into ties), and a stub
endpoint that prefers one content (wins, losses and ties counted as documented)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import DEMO, ROOT
from medgpt.data.records import Message
from medgpt.evaluation import EvalSpec, evaluate_model
from medgpt.evaluation.judges import JUDGE_PROMPT, JUDGE_SYSTEM, EndpointJudge
from teaching import teach

ANSWERS = [{"question": "What does the heart do?", "answer": "It pumps blood around the body."},
           {"question": "What does insulin do?", "answer": "It lowers blood sugar."},
           {"question": "Where is the liver?", "answer": "Under the right ribs."}]
OTHERS = [{"question": "What does the heart do?", "answer": "It digests food."},
          {"question": "What does insulin do?", "answer": "It lowers blood sugar."},  # identical: a tie unasked
          {"question": "Where is the liver?", "answer": "In the left foot."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def always_a_judge(learnable_model_dir, tokenizer, tmp_path_factory):
    """`medgpt serve` of a tiny model taught to reply "A" to the judge prompt, whichever answer comes first."""
    pairs = [(a["answer"], b["answer"]) for a, b in zip(ANSWERS, OTHERS)] + \
            [(b["answer"], a["answer"]) for a, b in zip(ANSWERS, OTHERS)]
    conversations = [[Message("system", JUDGE_SYSTEM),
                      Message("user", JUDGE_PROMPT.format(question=q["question"], first=x, second=y)),
                      Message("assistant", "A")] for q, (x, y) in zip(ANSWERS * 2, pairs)]
    model = teach(learnable_model_dir, tokenizer, conversations, tmp_path_factory.mktemp("judge") / "m", 30)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "medgpt.cli", "serve", "--model", str(model), "--port",
                                str(port), "--served-model-name", "judge"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_judge_that_always_prefers_the_first_answer_gives_ties_not_wins(always_a_judge):
    judge = EndpointJudge(always_a_judge)  # the model name comes from /v1/models
    assert judge.model == "judge"
    assert judge.verdict(ANSWERS[0]["question"], ANSWERS[0]["answer"], OTHERS[0]["answer"]) == 1.0  # says A
    assert judge.outcomes(ANSWERS, OTHERS) == [0.5, 0.5, 0.5]  # A first: A; B first: A -> a tie each time


def test_medgpt_eval_reports_each_judge_url_with_an_interval(always_a_judge, tiny_model_dir, tmp_path):
    answers = tmp_path / "other.jsonl"
    open_file = DEMO / "eval" / "open_questions.jsonl"
    rows = [{"question": json.loads(line)["question"], "answer": "Drink water and rest."}
            for line in open_file.read_text().splitlines()[:2]]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = EvalSpec(open_file=str(open_file), compare_with=str(answers), judges=[always_a_judge + "/v1"], limit=2,
                    max_new_tokens=4)
    metrics = evaluate_model(str(tiny_model_dir), spec, tmp_path / "eval")
    judged = metrics["judges"][always_a_judge + "/v1"]
    assert (judged["win_rate"], judged["ties"], judged["win_n"]) == (0.5, 2, 2)
    assert judged["win_rate_ci"] == [0.5, 0.5] and "win_rate" not in metrics  # no reward model was given


class Stub(BaseHTTPRequestHandler):
    """Prefers the answer that mentions pumping; says nothing useful when neither does."""

    asked: list[str] = []

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /v1/models
        self._send({"data": [{"id": "stub"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        Stub.asked.append(prompt)
        first = prompt.split("[Answer A]")[1].split("[Answer B]")[0]
        second = prompt.split("[Answer B]")[1]
        reply = "A" if "pumps" in first else "The answer is B." if "pumps" in second else "hmm"
        self._send({"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def log_message(self, *args):
        pass


def test_endpoint_verdicts_in_both_orders_give_wins_losses_and_ties():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = EndpointJudge(f"http://127.0.0.1:{server.server_port}/v1", name="stub")
        Stub.asked.clear()
        assert judge.outcomes(ANSWERS, OTHERS) == [1.0, 0.5, 0.5]  # wins; identical; neither mentions pumping
        assert len(Stub.asked) == 4 and judge.unparsed == 2  # the identical pair is never asked
        assert judge.outcomes(OTHERS, ANSWERS)[0] == 0.0  # the other way round: a loss
    finally:
        server.shutdown()


def test_an_unreachable_judge_says_so():
    with pytest.raises(ValueError, match="cannot be reached"):
        EndpointJudge(f"http://127.0.0.1:{free_port()}", model="x").verdict("q", "a", "b")
