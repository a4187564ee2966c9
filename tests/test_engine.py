"""The generation engine: offline batches and continuous batching give each prompt its own answer, stops end an
answer at the token they appear in, seeds reproduce, adapters and saved templates load."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from medgpt.data.records import Message
from medgpt.serve.batching import SerialBatcher, start_batcher
from medgpt.serve.engine import GenerationEngine, SamplingParams, save_template_name
from medgpt.serve.rows import AnswerText
from medgpt.serve.sampling import RowSampling
from taught_model import TAUGHT, taught, taught_model_dir  # noqa: F401 - `taught` is a fixture

GREEDY = SamplingParams(max_new_tokens=40, temperature=0)
QUESTIONS = [[Message("user", q)] for q in TAUGHT]
ANSWERS = list(TAUGHT.values())


@pytest.fixture(scope="module")
def random_engine(learnable_model_dir):
    """A large-init random model: greedy and sampled answers differ from prompt to prompt, and it never stops."""
    engine = GenerationEngine.load(str(learnable_model_dir))
    yield engine
    engine.close()


class Collect:
    """A row listener that keeps the pieces and the completion."""

    def __init__(self):
        self.pieces, self.completion, self.error = [], None, None
        self.finished = threading.Event()

    def piece(self, text):
        self.pieces.append(text)

    def done(self, completion):
        self.completion = completion
        self.finished.set()

    def failed(self, error):
        self.error = error
        self.finished.set()

    def wait(self):
        assert self.finished.wait(120), "the row did not finish"
        assert self.error is None, self.error
        return "".join(self.pieces), self.completion


def run_rows(engine, rows: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, object]]:
    """Submit the rows together (they share the running batch) and wait for all of them."""
    listeners = [Collect() for _ in rows]
    for (prompt, params), listener in zip(rows, listeners):
        engine.submit(prompt, params, listener)
    return [listener.wait() for listener in listeners]


# ------------------------------------------------------------------------------------------- offline batches


def test_batched_generation_equals_one_at_a_time(taught):
    batched = taught.generate(QUESTIONS, GREEDY, batch_size=4)
    single = [taught.generate([q], GREEDY)[0] for q in QUESTIONS]
    assert [c.text for c in batched] == [c.text for c in single] == ANSWERS
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert len({c.completion_tokens for c in batched}) == len(ANSWERS)  # rows end at different steps
    assert [c.finish_reason for c in batched] == ["stop"] * len(ANSWERS)
    assert [c.prompt_tokens for c in batched] == [len(taught.chat_format.prompt_ids(q)) for q in QUESTIONS]


def test_length_limit_is_reported(taught):
    completion = taught.generate([QUESTIONS[3]], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert completion.finish_reason == "length" and completion.completion_tokens == 5
    assert ANSWERS[3].startswith(completion.text)


def test_end_of_turn_token_stops_and_is_not_returned(taught, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer.encode(" rest well", add_special_tokens=False)
    completion = taught.completion_of(words + [im_end] + words, GREEDY)
    assert completion.text == " rest well" and completion.finish_reason == "stop"  # raw: chat answers strip
    assert completion.completion_tokens == len(words)


def test_seed_makes_offline_sampling_reproducible(random_engine):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=123)
    first = random_engine.generate([QUESTIONS[0]], params)[0].text
    assert first == random_engine.generate([QUESTIONS[0]], params)[0].text
    assert first != random_engine.generate([QUESTIONS[0]], SamplingParams(max_new_tokens=8, temperature=1.0,
                                                                           seed=124))[0].text


# ------------------------------------------------------------------------------------------- stops


def test_a_stop_string_ends_the_answer_where_it_appears(tokenizer):
    ids = tokenizer.encode("Drink water. Then rest.\n\nSee a doctor", add_special_tokens=False)
    for stop, text in [(".", "Drink water"), ("\n\n", "Drink water. Then rest."), ("water. Th", "Drink "),
                       ("r", "D")]:
        answer = AnswerText(tokenizer, [], [stop], max_new_tokens=100)
        shown = "".join(answer.add(t) for t in ids if not answer.done)
        assert shown == answer.text == text and answer.finish_reason == "stop"
        # counted: the tokens up to and including the one that completed the stop string
        assert tokenizer.decode(ids[: answer.tokens - 1]).find(stop) < 0 <= tokenizer.decode(ids[: answer.tokens]).find(stop)


def test_the_start_of_a_stop_string_is_held_back_until_it_is_known(tokenizer):
    answer = AnswerText(tokenizer, [], ["\n\n"], max_new_tokens=100)
    first = answer.add(tokenizer.encode("Rest", add_special_tokens=False)[0])
    newline = answer.add(tokenizer.encode("\n", add_special_tokens=False)[0])
    assert (first, newline) == ("Rest", "")  # "\n" may begin "\n\n": not shown yet
    assert answer.add(tokenizer.encode("Now", add_special_tokens=False)[0]) == "\nNow"


@pytest.mark.parametrize("stop", [",", "oranges, pep"])  # one token, several tokens
def test_stops_end_generation_at_their_step_on_both_paths(taught, tokenizer, stop):
    prompt = taught.chat_format.prompt_ids(QUESTIONS[2])  # "Vitamin C, found in oranges, peppers and broccoli."
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=(stop,))
    offline = taught.generate_ids([prompt], params)[0]
    [(streamed, online)] = run_rows(taught, [(prompt, params)])
    expected = ANSWERS[2][: ANSWERS[2].index(stop)]
    assert offline.text.strip() == streamed.strip() == online.text.strip() == expected.strip()
    assert offline.finish_reason == online.finish_reason == "stop"
    whole = tokenizer.encode(ANSWERS[2], add_special_tokens=False)
    assert offline.completion_tokens == online.completion_tokens < len(whole)
    assert len(taught.generate_rows([prompt], params)[0]) == offline.completion_tokens  # generate stopped there


# ------------------------------------------------------------------------------------------- continuous batching


def test_rows_joining_a_running_batch_get_their_own_answers(taught):
    prompts = [taught.chat_format.prompt_ids(q) for q in QUESTIONS]
    alone = [run_rows(taught, [(p, GREEDY)])[0] for p in prompts]
    assert [text.strip() for text, _ in alone] == ANSWERS
    together = run_rows(taught, [(p, GREEDY) for p in prompts] * 2)  # 8 rows, ending at 4 different steps
    assert [text for text, _ in together] == [text for text, _ in alone] * 2
    assert [c.completion_tokens for _, c in together] == [c.completion_tokens for _, c in alone] * 2
    assert taught.batcher.active == 0 and not taught.batcher.sampling


def test_rows_that_do_not_all_fit_in_the_kv_cache_wait_and_still_get_their_answers(taught):
    prompts = [taught.chat_format.prompt_ids(q) for q in QUESTIONS]
    small = start_batcher(taught.model, taught.tokenizer, taught.chat_format.stop_token_ids(),
                          taught.chat_format.stop_strings, max_rows=8, kv_cache_tokens=192)
    try:
        assert small.capacity == 192  # three pages of 64 tokens: about two rows at a time
        listeners = [Collect() for _ in range(8)]
        for prompt, listener in zip(prompts * 2, listeners):
            small.submit(prompt, GREEDY, listener)
        assert [listener.wait()[0].strip() for listener in listeners] == ANSWERS * 2
        with pytest.raises(ValueError, match="--kv-cache-tokens"):
            small.submit(prompts[0], SamplingParams(max_new_tokens=190), Collect())
    finally:
        small.close()


def test_stream_yields_the_same_text_as_generate(taught):
    for question, answer in zip(QUESTIONS, ANSWERS):
        finished = []
        streamed = list(taught.stream(question, GREEDY, on_finish=finished.append))
        assert len(streamed) > 1 and "".join(streamed).strip() == taught.generate([question], GREEDY)[0].text == answer
        assert finished[0].finish_reason == "stop"


def test_generate_while_a_stream_runs_answers_as_it_does_alone(learnable_model_dir):
    """The batching loop owns the model while it runs: `model.generate` beside it gave other greedy answers (the
    web UI's compare tab and a library caller share one engine), so generate joins the loop."""
    engine = GenerationEngine.load(str(learnable_model_dir), torch_dtype="fp32")
    params = SamplingParams(max_new_tokens=24, temperature=0)
    try:
        alone = [c.text for c in engine.generate(QUESTIONS, params)]
        for _ in range(3):
            pieces = engine.stream(QUESTIONS[0], SamplingParams(max_new_tokens=200, temperature=0))
            next(pieces)  # a row is in the running batch
            assert [c.text for c in engine.generate(QUESTIONS, params)] == alone
            assert engine.batcher.active == 1
            pieces.close()
    finally:
        engine.close()
    assert len(set(alone)) == len(alone)


def test_rows_with_different_options_share_a_batch(random_engine):
    prompt = random_engine.chat_format.prompt_ids(QUESTIONS[0])
    other = random_engine.chat_format.prompt_ids(QUESTIONS[1])
    options = [SamplingParams(max_new_tokens=12, temperature=0),
               SamplingParams(max_new_tokens=12, temperature=1.0, seed=7),
               SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.3, seed=7),
               SamplingParams(max_new_tokens=12, temperature=1.0, seed=8)]
    rows = [(prompt, o) for o in options] + [(other, o) for o in options]
    alone = [run_rows(random_engine, [row])[0][0] for row in rows]
    together = [text for text, _ in run_rows(random_engine, rows)]
    assert together == alone
    assert len(set(alone)) == len(alone)  # every option (and prompt) changed the answer: a mix-up would show


def test_closing_a_stream_drops_its_row(random_engine):
    finished = []
    pieces = random_engine.stream(QUESTIONS[0], SamplingParams(max_new_tokens=400, temperature=0),
                                  on_finish=finished.append)
    next(pieces)
    pieces.close()
    assert finished[0].finish_reason == "cancelled" and finished[0].completion_tokens < 400
    assert random_engine.batcher.active == 0


def test_logits_are_sampled_in_fp32_whatever_the_model_dtype():
    logits = torch.randn(1000) * 3
    fp32 = RowSampling(SamplingParams(temperature=0.9, top_p=0.95, seed=3)).choose(logits)
    bf16 = RowSampling(SamplingParams(temperature=0.9, top_p=0.95, seed=3)).choose(logits.bfloat16())
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.argmax() == bf16.argmax()


def test_a_bf16_model_runs_under_continuous_batching(tmp_path_factory, tokenizer):
    engine = GenerationEngine.load(str(taught_model_dir(tmp_path_factory, tokenizer)), torch_dtype="bf16")
    try:
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        text = "".join(engine.stream(QUESTIONS[0], SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)))
        assert engine.batcher.__class__.__name__ == "ContinuousBatcher" and text
    finally:
        engine.close()


def test_models_continuous_batching_cannot_run_are_served_one_row_at_a_time(taught, monkeypatch, caplog):
    prompts = [taught.chat_format.prompt_ids(q) for q in QUESTIONS]

    def refuse(*args, **kwargs):
        raise ValueError("this architecture has its own attention")

    monkeypatch.setattr(taught.model, "init_continuous_batching", refuse, raising=False)
    serial = start_batcher(taught.model, taught.tokenizer, taught.chat_format.stop_token_ids(),
                           taught.chat_format.stop_strings)
    try:
        assert isinstance(serial, SerialBatcher) and "one request at a time" in caplog.text
        listeners = [Collect() for _ in prompts]
        for prompt, listener in zip(prompts, listeners):
            serial.submit(prompt, GREEDY, listener)
        assert [listener.wait()[0].strip() for listener in listeners] == ANSWERS
        sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, stop=(",",))
        one = Collect()
        serial.submit(prompts[2], sampled, one)
        assert one.wait()[0] == run_rows(taught, [(prompts[2], sampled)])[0][0]  # same sampler, same draws
    finally:
        serial.close()


# ------------------------------------------------------------------------------------------- loading


def test_adapter_directory_loads_its_base_underneath_with_the_adapter_merged(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero adapter, so loading it changes outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded = GenerationEngine.load(str(tmp_path / "adapter"), torch_dtype="fp32")  # exact: auto is bf16 on bf16 CPUs
    assert loaded.model.__class__.__name__ == "LlamaForCausalLM"  # merged: no LoRA side path per token
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    ids = torch.tensor([loaded.chat_format.prompt_ids(QUESTIONS[0])])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    try:  # continuous batching runs the adapter too
        assert "".join(loaded.stream(QUESTIONS[0], params)) == loaded.generate_ids(ids.tolist(), params)[0].text
        without = GenerationEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, loaded.chat_format)
        assert without.generate_ids(ids.tolist(), params)[0].text != loaded.generate_ids(ids.tolist(), params)[0].text
    finally:
        loaded.close()


def test_template_saved_with_a_model_is_reused(tiny_model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    save_template_name(directory, "llama3")
    engine = GenerationEngine.load(str(directory))
    assert engine.chat_format.name == "llama3"
    assert "<|start_header_id|>assistant<|end_header_id|>" in engine.chat_format.render(QUESTIONS[0], add_generation_prompt=True)


@pytest.mark.slow
def test_embedded_model_answers_a_medical_question_and_stops(embedded_dir):
    # fp32: greedy streaming must equal greedy batch generation token for token; in bf16 the two kernels' rounding
    # differs and long greedy answers may part after a hundred tokens.
    engine = GenerationEngine.load("smollm2-135m", torch_dtype="fp32")
    question = [Message("user", "What is the normal human body temperature in Celsius?")]
    completion = engine.generate([question], SamplingParams(max_new_tokens=160, temperature=0))[0]
    assert completion.finish_reason == "stop", completion
    assert "37" in completion.text
    try:
        streamed = "".join(engine.stream(question, SamplingParams(max_new_tokens=160, temperature=0)))
        assert streamed.strip() == completion.text
    finally:
        engine.close()
