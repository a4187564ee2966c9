"""The generation engine: batching with left padding, streaming, stopping, adapters and saved templates."""

from __future__ import annotations

import shutil

import pytest
import torch

from medgpt.data.records import Message
from medgpt.serve.engine import GenerationEngine, SamplingParams, save_template_name

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
QUESTIONS = [
    [Message("user", "What is anaemia?")],
    [Message("system", "Answer briefly."), Message("user", "Name one common cause of a persistent dry cough in adults.")],
    [Message("user", "Hi")],
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return GenerationEngine.load(str(tiny_model_dir))


def test_batched_generation_equals_one_at_a_time(engine):
    batched = engine.generate(QUESTIONS, GREEDY, batch_size=3)
    single = [engine.generate([q], GREEDY)[0] for q in QUESTIONS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert [c.prompt_tokens for c in batched] == [len(engine.chat_format.prompt_ids(q)) for q in QUESTIONS]


def test_stream_yields_the_same_text_as_generate(engine):
    streamed = "".join(engine.stream(QUESTIONS[0], GREEDY))
    assert streamed.strip() == engine.generate([QUESTIONS[0]], GREEDY)[0].text


def test_length_limit_is_reported(engine):
    completion = engine.generate([QUESTIONS[0]], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert completion.finish_reason == "length"  # a random tiny model does not emit <|im_end|> in 5 greedy steps
    assert completion.completion_tokens == 5


def test_end_of_turn_token_stops_and_is_not_returned(engine, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer.encode(" rest well", add_special_tokens=False)
    completion = engine._finish(words + [im_end] + words, GREEDY)
    assert completion.text == " rest well" and completion.finish_reason == "stop"  # raw: chat answers strip
    assert completion.completion_tokens == len(words)


def test_extra_stop_strings_cut_the_text(engine, tokenizer):
    words = tokenizer.encode("Drink water. STOP and rest", add_special_tokens=False)
    completion = engine._finish(words, SamplingParams(max_new_tokens=50, stop=("STOP",)))
    assert completion.text == "Drink water. " and completion.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(engine):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=123)
    assert engine.generate([QUESTIONS[0]], params)[0].text == engine.generate([QUESTIONS[0]], params)[0].text


def test_adapter_directory_loads_its_base_underneath(tiny_model_dir, tokenizer, tmp_path):
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
    assert loaded.model.__class__.__name__ == "PeftModelForCausalLM"
    ids = torch.tensor([loaded.chat_format.prompt_ids(QUESTIONS[0])])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)


def test_template_saved_with_a_model_is_reused(tiny_model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    save_template_name(directory, "llama3")
    engine = GenerationEngine.load(str(directory))
    assert engine.chat_format.name == "llama3"
    assert "<|start_header_id|>assistant<|end_header_id|>" in engine.chat_format.render(QUESTIONS[0], add_generation_prompt=True)


@pytest.mark.slow
def test_embedded_model_answers_a_medical_question_and_stops(embedded_dir):
    engine = GenerationEngine.load("smollm2-135m")
    completion = engine.generate([[Message("user", "What is the normal human body temperature in Celsius?")]],
                                 SamplingParams(max_new_tokens=160, temperature=0))[0]
    assert completion.finish_reason == "stop", completion
    assert "37" in completion.text
    streamed = "".join(engine.stream([Message("user", "What is the normal human body temperature in Celsius?")],
                                     SamplingParams(max_new_tokens=160, temperature=0)))
    assert streamed.strip() == completion.text
