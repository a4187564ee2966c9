"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from medgpt.cli import main
from medgpt.data.records import Message
from medgpt.serve import check_api_exposure, protocol
from medgpt.serve.api import ServerSettings, create_app
from medgpt.serve.engine import GenerationEngine, SamplingParams
from medgpt.serve.protocol import safe_prefix_length, split_tool_calls
from medgpt.serve.vllm_server import vllm_lora_rank
from taught_model import TAUGHT, taught, teach_by_heart  # noqa: F401 - `taught` is a fixture

MODEL = "tiny"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@contextlib.contextmanager
def running(app):
    """A real uvicorn server on 127.0.0.1 and a free port, in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def client(base: str, key: str = "unused", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=retries, timeout=120)


@pytest.fixture(scope="module")
def engine(learnable_model_dir):
    # the large-init tiny model: its greedy answers differ from prompt to prompt (the small-init one says "\n"s)
    engine = GenerationEngine.load(str(learnable_model_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base_url(engine):
    with running(create_app(engine, ServerSettings(MODEL, max_tokens_limit=64))) as url:
        yield url


def greedy(engine, question: str, tokens: int = 8) -> str:
    return engine.generate([[Message("user", question)]], SamplingParams(max_new_tokens=tokens, temperature=0))[0].text


# ------------------------------------------------------------------------------------------- answers


def test_chat_completion_is_the_engine_answer_with_usage(engine, base_url):
    reply = client(base_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is anaemia?"}], temperature=0, max_tokens=8)
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.content == greedy(engine, "What is anaemia?")
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(engine.chat_format.prompt_ids([Message("user", "What is anaemia?")]))
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_streamed_chat_sends_the_same_answer_then_done(engine, base_url):
    chunks = list(client(base_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is anaemia?"}], temperature=0, max_tokens=8,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert text.strip() == greedy(engine, "What is anaemia?")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    raw = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")
    two = list(client(base_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is anaemia?"}], temperature=0, max_tokens=8,
        stream=True, n=2))
    for index in (0, 1):
        pieces = [c.choices[0].delta.content or "" for c in two if c.choices and c.choices[0].index == index]
        assert "".join(pieces).strip() == greedy(engine, "What is anaemia?")


def test_text_completions_continue_the_raw_prompt(engine, base_url):
    expected = engine.generate_ids([engine.text_prompt_ids("The heart pumps")],
                                   SamplingParams(max_new_tokens=6, temperature=0))[0]
    reply = client(base_url).completions.create(model=MODEL, prompt="The heart pumps", max_tokens=6, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == len(engine.text_prompt_ids("The heart pumps"))
    streamed = client(base_url).completions.create(model=MODEL, prompt="The heart pumps", max_tokens=6,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_a_raw_continuation_keeps_its_spaces_and_a_chat_answer_is_stripped(engine):
    ids = engine.tokenizer.encode(" blood through the body\n", add_special_tokens=False)
    completion = engine.completion_of(ids, SamplingParams())
    assert completion.text == " blood through the body\n"  # "pumps" + " blood"
    answer = protocol.chat_choice(0, completion, tools_offered=False)
    assert answer["message"]["content"] == "blood through the body"
    continued = protocol.chat_choice(0, completion, tools_offered=False, prefill=True)
    assert continued["message"]["content"] == " blood through the body"  # appended to the prefill as it is


def test_n_seed_and_stop(engine, base_url):
    api = client(base_url)
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name a vitamin."}], max_tokens=10)
    first = api.chat.completions.create(**ask, n=3, temperature=1.0, seed=7)
    again = api.chat.completions.create(**ask, n=3, temperature=1.0, seed=7)
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == sum(10 for _ in first.choices)
    words = greedy(engine, "Name a vitamin.", 10).split()
    stop = words[len(words) // 2]
    cut = api.chat.completions.create(**ask, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].message.content
    assert greedy(engine, "Name a vitamin.", 10).startswith(cut.choices[0].message.content)


def test_eight_concurrent_clients_each_get_their_own_answer(engine, base_url):
    questions = [f"Question {i}: what helps a {topic}?" for i, topic in enumerate(
        ["headache", "cough", "burn", "fever", "rash", "sprain", "cold", "bruise"])]
    expected = {q: greedy(engine, q, 6) for q in questions}
    assert len(set(expected.values())) == len(questions)  # distinct answers, so a mix-up would show

    def ask_three_times(question: str) -> list[str]:
        api = client(base_url)
        return [api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=6).choices[0].message.content
                for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(questions, pool.map(ask_three_times, questions)))
    assert all(answers[q] == [expected[q]] * 3 for q in questions), answers


# ------------------------------------------------------------------------------------------- tool calls


@pytest.fixture(scope="module")
def tool_calling_engine(tmp_path_factory, tokenizer):
    """A tiny model taught (by heart) to answer one question with a get_weather call in the template's format."""
    from conftest import make_tiny_model

    engine = GenerationEngine.load(str(make_tiny_model(tmp_path_factory.mktemp("tool-model"), tokenizer, hidden=64)),
                                   torch_dtype="fp32")  # taught in place: Adam's small steps need fp32 weights
    tools = [WEATHER_TOOL["function"]]
    prompt = engine.chat_format.prompt_ids([Message("user", "Weather in Paris?")], tools)
    answer = tokenizer.encode(WEATHER_CALL + "<|im_end|>", add_special_tokens=False)
    teach_by_heart(engine.model, tokenizer, [(prompt, answer)], margin=0.0)  # served in fp32, as taught
    yield engine
    engine.close()


def test_tool_calls_come_back_in_openai_shape(tool_calling_engine):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
               temperature=0, max_tokens=40)
    with running(create_app(tool_calling_engine, ServerSettings(MODEL))) as url:
        api = client(url)
        reply = api.chat.completions.create(**ask)
        chunks = list(api.chat.completions.create(**ask, stream=True))
        plain = api.chat.completions.create(**{**ask, "tool_choice": "none"})
        call = reply.choices[0].message.tool_calls[0]
        result = [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
        follow_up = api.chat.completions.create(**{**ask, "messages": ask["messages"] + result, "max_tokens": 3})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    streamed_calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in streamed_calls] == [
        ("get_weather", {"city": "Paris"})]
    assert not any("<tool_call>" in (c.choices[0].delta.content or "") for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert plain.choices[0].message.tool_calls is None  # tools withheld: the model's text is plain content
    assert follow_up.usage.prompt_tokens > reply.usage.prompt_tokens  # the call and its result went back in


def test_tool_call_text_parsing():
    content, calls = split_tool_calls(f"Let me check.\n{WEATHER_CALL}")
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert split_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    assert split_tool_calls("no call here") == ("no call here", [])
    assert safe_prefix_length("Sure <tool_") == len("Sure ")  # may be the start of a call: held back
    assert safe_prefix_length("Sure <b>") == len("Sure <b>")


# ------------------------------------------------------------------------------------------- safety


def test_api_key_is_required_when_set(engine):
    with running(create_app(engine, ServerSettings(MODEL, api_key="s3cret"))) as url:
        with pytest.raises(openai.AuthenticationError) as denied:
            client(url, key="wrong").models.list()
        assert denied.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert [m.id for m in client(url, key="s3cret").models.list()] == [MODEL]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # probes need no key


def test_listening_beyond_loopback_needs_a_key(tiny_model_dir, capsys):
    check_api_exposure("127.0.0.1", None)
    check_api_exposure("::1", None)
    with pytest.raises(ValueError, match="--api-key"):
        check_api_exposure("0.0.0.0", None)
    check_api_exposure("0.0.0.0", "key")
    assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 2
    assert "API key" in capsys.readouterr().err


def test_bad_requests_get_openai_errors(base_url):
    api = client(base_url)
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as too_many:
        api.chat.completions.create(model=MODEL, messages=user, max_tokens=65)
    assert "limit of 64" in too_many.value.body["message"] and too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="gpt-4", messages=user)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as order:
        api.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "Hello"}, *user])
    assert order.value.body["param"] == "messages[0]"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        api.chat.completions.create(model=MODEL, messages=user, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        api.chat.completions.create(model=MODEL, messages=user, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert api.chat.completions.create(model=MODEL, messages=user, max_tokens=2,
                                       response_format={"type": "text"}).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as unsupported:
        api.chat.completions.create(model=MODEL, messages=user, presence_penalty=1.0)
    assert "presence_penalty" in unsupported.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long_prompt:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert long_prompt.value.body["code"] == "context_length_exceeded"
    huge = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_100_000}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="token ids must be below"):
        api.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    missing = httpx.get(f"{base_url}/v1/nothing")
    assert missing.status_code == 404 and "message" in missing.json()["error"]


def test_full_queue_answers_503_and_a_closed_stream_frees_it(engine):
    user = [{"role": "user", "content": "Tell me everything about the liver."}]
    with running(create_app(engine, ServerSettings(MODEL, max_pending=1))) as url:
        api = client(url)
        stream = api.chat.completions.create(model=MODEL, messages=user, max_tokens=400, temperature=0, stream=True)
        next(iter(stream))  # the request holds the only slot now
        with pytest.raises(openai.InternalServerError) as busy:
            api.chat.completions.create(model=MODEL, messages=user, max_tokens=2)
        assert busy.value.status_code == 503 and busy.value.body["code"] == "server_overloaded"
        stream.close()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.chat.completions.create(model=MODEL, messages=user, max_tokens=2).choices[0].message.content


@contextlib.contextmanager
def slow_steps(engine, seconds: float):
    """Every forward pass (one generation step) takes at least `seconds`: long answers take a known while."""
    handle = engine.model.register_forward_pre_hook(lambda *args: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def wait_until_idle(url: str, within: float) -> float:
    """Seconds until /health shows nothing waiting or generating; fails after `within`."""
    start = time.monotonic()
    while True:
        health = httpx.get(f"{url}/health").json()
        if not health["pending"] and not health["generating"]:
            return time.monotonic() - start
        assert time.monotonic() - start < within, health
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_cancels_its_job(engine, stream):
    # 400 steps of at least 20 ms: 8 s of generation; the client leaves after about 1 s
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything about the liver."}],
           "max_tokens": 400, "temperature": 0, "stream": stream}
    with running(create_app(engine, ServerSettings(MODEL))) as url, slow_steps(engine, 0.02):
        with httpx.Client(timeout=60) as http:
            if stream:
                with http.stream("POST", f"{url}/v1/chat/completions", json=ask) as response:
                    events = (line for line in response.iter_lines() if line.startswith("data:"))
                    next(events), next(events)  # the role chunk, then the first token: hang up
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post(f"{url}/v1/chat/completions", json=ask, timeout=1.0)
        assert httpx.get(f"{url}/health").json()["pending"] <= 1
        assert wait_until_idle(url, within=4.0) < 4.0  # cancelled at a step, not after the 400 tokens


def test_two_concurrent_streams_overlap_in_time(engine):
    arrivals: dict[str, list[float]] = {"A": [], "B": []}

    def stream(name: str, question: str) -> None:
        for chunk in client(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30,
                stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals[name].append(time.monotonic())

    with running(create_app(engine, ServerSettings(MODEL))) as url, slow_steps(engine, 0.01):
        first = threading.Thread(target=stream, args=("A", "What does the liver do?"))
        first.start()
        while not arrivals["A"]:
            time.sleep(0.01)
        second = threading.Thread(target=stream, args=("B", "What does the kidney do?"))
        second.start()
        first.join()
        second.join()
    a, b = arrivals["A"], arrivals["B"]
    assert len(a) > 10 and len(b) > 10
    # B joined the running batch: its tokens came while A was still generating (one at a time, B would start
    # after A's last token)
    assert b[0] < a[-1] and sum(t < a[-1] for t in b) >= 5, (a, b)

# ------------------------------------------------------------------------------------------- stops, prefill, limits


@pytest.fixture(scope="module")
def taught_url(taught):
    with running(create_app(taught, ServerSettings(MODEL, max_prompts=3, max_request_tokens=200))) as url:
        yield url


def usage_of_stream(chunks) -> tuple[str, str, int]:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("stop", [",", "\n", "oranges, pep", ["nothing", "C, f"]])
def test_stop_strings_end_answers_and_usage_counts_the_tokens_returned(taught, taught_url, stop):
    answer = TAUGHT["Name a vitamin."]  # "Vitamin C, found in oranges, peppers and broccoli."
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name a vitamin."}], temperature=0, max_tokens=40,
               stop=stop)
    api = client(taught_url)
    reply = api.chat.completions.create(**ask)
    streamed = usage_of_stream(list(api.chat.completions.create(**ask, stream=True,
                                                                 stream_options={"include_usage": True})))
    stops = [stop] if isinstance(stop, str) else stop
    hit = min((answer.index(s) for s in stops if s in answer), default=None)
    expected = answer if hit is None else answer[:hit]
    tokens = taught.tokenizer.encode(answer, add_special_tokens=False)
    # counted: the tokens through the one in which a stop string is complete (all of them when none appears)
    counted = next((k for k in range(1, len(tokens) + 1)
                    if any(s in taught.tokenizer.decode(tokens[:k]) for s in stops)), len(tokens))
    assert reply.choices[0].message.content == expected.strip() == streamed[0].strip()
    assert reply.choices[0].finish_reason == streamed[1] == "stop"
    assert reply.usage.completion_tokens == streamed[2] == counted
    assert (hit is None) == (counted == len(tokens))


def test_completions_stop_and_length(taught, taught_url):
    prompt = taught.tokenizer.decode(taught.chat_format.prompt_ids([Message("user", "What helps a burn?")]))
    api = client(taught_url)
    whole = api.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0)
    assert whole.choices[0].text == TAUGHT["What helps a burn?"] and whole.choices[0].finish_reason == "stop"
    cut = api.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=[" minutes"])
    assert cut.choices[0].text == "Cool running water for twenty" and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < whole.usage.completion_tokens
    short = api.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_a_prefilled_assistant_message_is_continued(taught_url):
    api = client(taught_url)
    messages = [{"role": "user", "content": "What is anaemia?"}, {"role": "assistant", "content": "Too few"}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == " red blood cells."  # "Too few" + the continuation
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " red blood cells."
    with pytest.raises(openai.BadRequestError, match="tool calls"):
        api.chat.completions.create(model=MODEL, max_tokens=2, messages=[messages[0], {
            "role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "f", "arguments": "{}"}}]}])


def test_prompts_per_request_and_the_generation_budget_are_limited(taught_url):
    api = client(taught_url)
    with pytest.raises(openai.BadRequestError, match="--max-prompts"):
        api.completions.create(model=MODEL, prompt=["a", "b", "c", "d"], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="budget of 200"):
        api.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=51)  # 2 x 2 x 51 = 204
    assert len(api.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=50).choices) == 4
    with pytest.raises(openai.BadRequestError, match="budget"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=5, max_tokens=41)


def test_tokenising_a_prompt_does_not_block_the_server(taught):
    tokenising, release = threading.Event(), threading.Event()

    def slow_tokenize(text):
        tokenising.set()
        release.wait(30)
        return taught.tokenizer.encode(text)

    with running(create_app(taught, ServerSettings(MODEL))) as url:
        server_side = threading.Thread(target=lambda: client(url).completions.create(
            model=MODEL, prompt="a long prompt", max_tokens=2))
        original, taught.text_prompt_ids = taught.text_prompt_ids, slow_tokenize
        try:
            server_side.start()
            assert tokenising.wait(30)
            assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"  # answered meanwhile
        finally:
            release.set()
            server_side.join()
            taught.text_prompt_ids = original


def test_cors_origin_lets_a_browser_page_call_the_api(taught):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with running(create_app(taught, ServerSettings(MODEL, cors_origins=("http://localhost:3000",)))) as url:
        allowed = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        other = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in other.headers
    with running(create_app(taught, ServerSettings(MODEL))) as url:
        assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/chat/completions",
                                                                  headers=preflight).headers


def test_omitted_sampling_options_take_openais_defaults_as_v1_models_says(taught, taught_url):
    [model] = httpx.get(f"{taught_url}/v1/models").json()["data"]
    assert model["medgpt"]["defaults"]["temperature"] == 1.0 and model["medgpt"]["defaults"]["top_p"] == 1.0
    assert model["medgpt"]["limits"]["prompts"] == 3 and model["medgpt"]["limits"]["kv_cache_tokens"] > 0
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, seed=11)
    api = client(taught_url)
    omitted = api.chat.completions.create(**ask).choices[0].message.content
    assert omitted == api.chat.completions.create(**ask, temperature=1.0, top_p=1.0).choices[0].message.content
    assert omitted != api.chat.completions.create(**ask, temperature=0.2, top_p=0.5).choices[0].message.content


def test_vllm_lora_rank_is_rounded_up_to_an_accepted_one():
    assert [vllm_lora_rank(r) for r in (1, 2, 4, 8, 12, 24, 64, 300, 512)] == [1, 8, 8, 8, 16, 32, 64, 320, 512]
    with pytest.raises(ValueError, match="merge the adapter"):
        vllm_lora_rank(1024)


# ------------------------------------------------------------------------------------------- vLLM


def fake_python(path, with_vllm: bool):
    """An interpreter stand-in: answers the vLLM probe, and records the server command and its API key."""
    probe = 'echo 0.33.0' if with_vllm else "echo \"ModuleNotFoundError: No module named 'vllm'\" >&2; exit 1"
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then {probe}; exit 0; fi\n'
                    f'printf "%s\\n" "$@" > "{path}.args"\necho "$VLLM_API_KEY" > "{path}.key"\n')
    path.chmod(0o755)
    return path


def test_vllm_engine_serves_base_plus_adapter_with_the_trained_template(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.data.templates import ChatFormat

    adapter = tmp_path / "sft"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_model.save_pretrained(adapter)
    ChatFormat(tokenizer).save(adapter)
    python = fake_python(tmp_path / "python", with_vllm=True)
    assert main(["serve", "--engine", "vllm", "--vllm-python", str(python), "--model", str(adapter),
                 "--host", "0.0.0.0", "--port", "8011", "--api-key", "k3y", "--vllm-args", "--max-model-len 2048"]) == 0
    args = (tmp_path / "python.args").read_text().splitlines()
    assert args[:6] == ["-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8011"]
    assert args[args.index("--model") + 1] == str(tiny_model_dir)
    assert args[args.index("--lora-modules") + 1] == f"sft={adapter}" and "--enable-lora" in args
    assert args[args.index("--max-lora-rank") + 1] == "8"  # r=4 rounded up to a rank vLLM accepts
    assert args[args.index("--chat-template") + 1] == str(adapter / "chat_template.jinja")
    assert args[-2:] == ["--max-model-len", "2048"]
    assert "k3y" not in args and (tmp_path / "python.key").read_text().strip() == "k3y"  # by environment


def test_vllm_engine_explains_a_missing_vllm(tiny_model_dir, tmp_path, capsys):
    python = fake_python(tmp_path / "python", with_vllm=False)
    assert main(["serve", "--engine", "vllm", "--vllm-python", str(python), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "cannot import vllm (ModuleNotFoundError: No module named 'vllm')" in err and "pip install vllm" in err
    assert main(["serve", "--engine", "vllm", "--vllm-python", str(tmp_path / "nope"), "--model", "x"]) == 2
    assert "no such Python interpreter" in capsys.readouterr().err
    assert not (tmp_path / "python.args").exists()


@pytest.mark.slow
def test_embedded_model_answers_a_medical_question_over_the_api(embedded_dir):
    question = [{"role": "user", "content": "What is the normal human body temperature in Celsius?"}]
    with running(create_app(GenerationEngine.load("smollm2-135m"), ServerSettings("smollm2-135m"))) as url:
        chunks = list(client(url).chat.completions.create(model="smollm2-135m", messages=question, temperature=0,
                                                          max_tokens=160, stream=True))
    assert "37" in "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"  # the model's end-of-turn, not the token limit


def test_serve_load_benchmark_runs_in_its_tiny_mode():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "serve_load.py"), "--tiny", "--clients", "3",
                          "--max-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"clients=3 ttft_p50_s=[\d.]+ ttft_p95_s=[\d.]+ total_tokens_per_s=[\d.]+ vs_serial=[\d.]+",
                        last), last
