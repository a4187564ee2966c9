"""A bounded soak of the server: 8 clients x 6 requests, three rounds, streaming or not, stops, seeded sampling,
n > 1, several prompts, clients that hang up and bad requests, all at once. Every answer must equal the same request
served alone, nothing may be lost or land at another client, and the server must hold nothing (and grow no
memory) between rounds."""

from __future__ import annotations

import gc
import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from medgpt.serve.api import ServerSettings, create_app
from taught_model import TAUGHT, taught  # noqa: F401 - `taught` is a fixture
from test_server import running, wait_until_idle

MODEL = "tiny"
CLIENTS, REQUESTS, ROUNDS = 8, 6, 3
QUESTIONS = list(TAUGHT)


def plan(client: int, request: int) -> tuple[str, str, dict]:
    """(kind, path, body) of one client's request; the kinds rotate so that every round mixes all of them."""
    own = f"Client {client}, request {request}: what helps a cough?"
    kind = ("greedy", "sampled_stream", "stop_n", "prompts", "hang_up", "bad")[(client + request) % 6]
    chat = "/v1/chat/completions"
    if kind == "greedy":  # a taught answer: ends with <|im_end|> at its own step
        return kind, chat, {"messages": [{"role": "user", "content": QUESTIONS[(client + request) % 4]}],
                            "temperature": 0, "max_tokens": 30}
    if kind == "sampled_stream":
        return kind, chat, {"messages": [{"role": "user", "content": own}], "temperature": 0.9, "top_p": 0.95,
                            "seed": 100 * client + request, "max_tokens": 12, "stream": True,
                            "stream_options": {"include_usage": True}}
    if kind == "stop_n":
        return kind, chat, {"messages": [{"role": "user", "content": own}], "temperature": 0.8, "n": 2,
                            "seed": 7 * client + request, "max_tokens": 10, "stop": ["e", "a"]}
    if kind == "prompts":
        return kind, "/v1/completions", {"prompt": [f"Client {client}: the heart", f"Request {request}: the lungs"],
                                         "temperature": 0, "max_tokens": 8}
    if kind == "hang_up":
        return kind, chat, {"messages": [{"role": "user", "content": own}], "temperature": 0, "max_tokens": 200,
                            "stream": True}
    bad = [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10_000},
           {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}},
           {"messages": []}, {"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"1": 5}}]
    return kind, chat, bad[client % len(bad)]


def ask(http: httpx.Client, url: str, client: int, request: int):
    """What the client got: the texts, finish reasons and usage of each choice, or the error's status."""
    kind, path, body = plan(client, request)
    body = {"model": MODEL, **body}
    if kind == "hang_up":
        with http.stream("POST", url + path, json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data:"))
            next(events), next(events)  # the role chunk and a first token, then the client leaves
        return None
    if not body.get("stream"):
        response = http.post(url + path, json=body)
        if response.status_code != 200:
            return response.status_code, response.json()["error"]["type"]
        reply = response.json()
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in reply["choices"]]
        return texts, [c["finish_reason"] for c in reply["choices"]], reply["usage"]["completion_tokens"]
    text, finish, usage = "", None, None
    with http.stream("POST", url + path, json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return [text.strip()], [finish], usage


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_eight_clients_mixed_requests_get_their_own_answers_round_after_round(taught):
    settings = ServerSettings(MODEL, max_tokens_limit=256, max_batch=8, max_pending=64)
    with running(create_app(taught, settings)) as url, httpx.Client(timeout=120) as http:
        alone = {(c, r): ask(http, url, c, r) for c in range(CLIENTS) for r in range(REQUESTS)}
        own = [alone[key] for key in alone if plan(*key)[0] in ("sampled_stream", "stop_n")]
        assert len({json.dumps(answer) for answer in own}) == len(own)  # each client's answer is its own
        assert {plan(*key)[0]: alone[key] for key in alone}["bad"][0] == 400
        assert any(f == ["stop"] for _, f, _ in (a for a in alone.values() if a and a[0] != 400)), "no stop seen"

        def client(c: int) -> list:
            with httpx.Client(timeout=120) as own_http:
                return [ask(own_http, url, c, r) for r in range(REQUESTS)]

        sizes = []
        for _ in range(ROUNDS):
            with ThreadPoolExecutor(CLIENTS) as pool:
                rounds = dict(zip(range(CLIENTS), pool.map(client, range(CLIENTS))))
            for c in range(CLIENTS):
                for r in range(REQUESTS):
                    assert rounds[c][r] == alone[(c, r)], (plan(c, r), rounds[c][r], alone[(c, r)])
            wait_until_idle(url, within=10.0)  # the hung-up streams' rows are dropped at their next step
            gc.collect()
            sizes.append(rss_mb())
        batcher = taught.batcher
        assert not batcher.rows and not batcher.sampling
        scheduler = batcher.manager.batch_processor.scheduler
        assert not scheduler.active_requests and not scheduler.waiting_requests
        assert sizes[-1] - sizes[0] < 40, f"server memory grew across rounds: {sizes} MB"
