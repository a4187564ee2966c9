"""Golden tests on the chat templates of the models people train (Qwen2.5, Qwen3, Llama 3.2, Mistral Nemo,
Gemma 2), as published (tests/fixtures/chat_templates, sources and licences in SOURCES.md): the ids medgpt
trains on equal `apply_chat_template`'s, and the mask covers exactly the assistant tokens — never a system or
user token, never the empty `<think></think>` block Qwen3 writes before a reply without reasoning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat, TemplateError

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# template file, named special tokens, further special tokens, plain added tokens (as in the real tokenizers)
TEMPLATES = {
    "qwen2.5": ("Qwen2.5-7B-Instruct.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                ["<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "qwen3": ("Qwen3-0.6B.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              ["<|im_start|>", "<|im_end|>"],
              ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]),
    "llama3.2": ("Llama-3.2-3B-Instruct.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                 ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"], []),
    "mistral-nemo": ("Mistral-Nemo-Instruct-2407.jinja", {"bos_token": "<s>", "eos_token": "</s>"},
                     ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                      "[/TOOL_RESULTS]"], []),
    "gemma2": ("gemma-2-2b-it.jinja", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
               ["<start_of_turn>", "<end_of_turn>"], []),
}

SYSTEM = "You are a careful medical assistant."
Q1, A1 = "What is a normal resting heart rate?", "For adults it is 60 to 100 beats per minute."
Q2, A2 = "And for children?", "It is higher and depends on age."
CHAT = [Message("system", SYSTEM), Message("user", Q1), Message("assistant", A1), Message("user", Q2),
        Message("assistant", A2)]
TOOLS = [{"name": "bmi", "description": "Body-mass index from weight and height",
          "parameters": {"type": "object", "properties": {"kg": {"type": "number"}, "m": {"type": "number"}},
                         "required": ["kg", "m"]}}]
ASK, RESULT, ANSWER = "I weigh 70 kg and I am 1.75 m tall. What is my BMI?", '{"bmi": 22.9}', \
    "Your BMI is 22.9, in the healthy range."
TOOL_CHAT = [Message("user", ASK), Message("assistant", "", [{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}]),
             Message("tool", RESULT), Message("assistant", ANSWER)]
THOUGHT = "<think>\nAbove 38 C counts as fever.\n</think>\n\nYes, 38.5 C is a fever."
LATER = "See a doctor if it lasts more than three days."
REASONING = [Message("user", "Is 38.5 C a fever?"), Message("assistant", THOUGHT),
             Message("user", "Should I see a doctor?"), Message("assistant", LATER)]
CASES = {"system-multi-turn": (CHAT, None), "multi-turn": (CHAT[1:], None), "tool-call": (TOOL_CHAT, TOOLS),
         "reasoning": (REASONING, None), "reasoning-last": (REASONING[:2], None)}

# What the template is given, written out (OpenAI shape; tool calls carry medgpt's ids).
CALL = {"type": "function", "function": {"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}, "id": "call00001"}
NATIVE = {
    "system-multi-turn": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                          {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                          {"role": "assistant", "content": A2}],
    "tool-call": [{"role": "user", "content": ASK}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "content": RESULT, "tool_call_id": "call00001"},
                  {"role": "assistant", "content": ANSWER}],
    "reasoning": [{"role": "user", "content": "Is 38.5 C a fever?"}, {"role": "assistant", "content": THOUGHT},
                  {"role": "user", "content": "Should I see a doctor?"}, {"role": "assistant", "content": LATER}],
}
NATIVE["multi-turn"] = NATIVE["system-multi-turn"][1:]
NATIVE["reasoning-last"] = NATIVE["reasoning"][:2]
# Gemma has no system turn and no tools: the system text opens the first user turn; calls and results are text.
GEMMA_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
               "function signatures within <tools></tools> XML tags:\n<tools>\n" + __import__("json").dumps(TOOLS[0])
               + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")
CALL_TEXT = '<tool_call>\n{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}\n</tool_call>'
GEMMA = {**NATIVE,
         "system-multi-turn": [{"role": "user", "content": f"{SYSTEM}\n\n{Q1}"}, *NATIVE["system-multi-turn"][2:]],
         "tool-call": [{"role": "user", "content": f"{GEMMA_TOOLS}\n\n{ASK}"},
                       {"role": "assistant", "content": CALL_TEXT},
                       {"role": "user", "content": f"<tool_response>\n{RESULT}\n</tool_response>"},
                       {"role": "assistant", "content": ANSWER}]}

# The trained text, golden: each assistant reply with its end-of-turn marker, nothing else.
END = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.2": "<|eot_id|>", "mistral-nemo": "</s>",
       "gemma2": "<end_of_turn>"}
QWEN_CALL = CALL_TEXT
TRAINED_CALL = {"qwen2.5": QWEN_CALL, "qwen3": QWEN_CALL, "gemma2": CALL_TEXT,
                "llama3.2": '{"name": "bmi", "parameters": {"kg": 70, "m": 1.75}}',
                "mistral-nemo": '[TOOL_CALLS][{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}, "id": "call00001"}]'}


def expected_mask_text(name: str, case: str) -> str:
    end = END[name]
    if case in ("system-multi-turn", "multi-turn"):
        return f"{A1}{end}{A2}{end}"
    if case == "tool-call":
        return f"{TRAINED_CALL[name]}{end}{ANSWER}{end}"
    if case == "reasoning":  # Qwen3 prints a reply before the last question without its reasoning
        return f"{THOUGHT.split('</think>')[-1].strip() if name == 'qwen3' else THOUGHT}{end}{LATER}{end}"
    return f"{THOUGHT}{end}"  # reasoning-last: the data's own <think> block is trained


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def published(request, embedded_dir):
    """(name, tokenizer carrying the published template)."""
    from transformers import AutoTokenizer

    file, named, special, plain = TEMPLATES[request.param]
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    tokenizer.add_special_tokens({**named, "additional_special_tokens": special})
    if plain:
        tokenizer.add_tokens(plain)
    tokenizer.chat_template = (FIXTURES / file).read_text(encoding="utf-8")
    return request.param, tokenizer


def runs(mask: list[bool]) -> int:
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_apply_chat_template_and_the_mask_is_exactly_the_replies(published, case):
    name, tokenizer = published
    messages, tools = CASES[case]
    chat = ChatFormat(tokenizer)
    encoded = chat.encode(messages, tools)
    dicts = (GEMMA if name == "gemma2" else NATIVE)[case]
    template_tools = None if name == "gemma2" or not tools else [{"type": "function", "function": t} for t in tools]
    reference = tokenizer.apply_chat_template(dicts, tools=template_tools, tokenize=True)["input_ids"]
    assert encoded.input_ids == reference
    masked = [t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m]
    assert tokenizer.decode(masked) == expected_mask_text(name, case)
    assert runs(encoded.assistant_mask) == sum(m.role == "assistant" for m in messages)  # one run per reply
    assert len(encoded.turn_ends) == runs(encoded.assistant_mask)


def test_qwen3_empty_think_block_is_rendered_but_never_trained(published):
    name, tokenizer = published
    if name != "qwen3":
        pytest.skip("the empty reasoning block is Qwen3's")
    encoded = ChatFormat(tokenizer).encode(CHAT)
    text = tokenizer.decode(encoded.input_ids)
    assert text.endswith(f"<|im_start|>assistant\n<think>\n\n</think>\n\n{A2}<|im_end|>\n")  # the template's
    think = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
    assert not any(m for t, m in zip(encoded.input_ids, encoded.assistant_mask) if t in think)


def test_generation_prompt_renders_as_the_template_does(published):
    name, tokenizer = published
    chat = ChatFormat(tokenizer)
    prompt = CHAT[1:2] if name != "gemma2" else CHAT[1:2]
    dicts = [{"role": "user", "content": Q1}]
    assert chat.prompt_ids(prompt) == tokenizer.apply_chat_template(dicts, tokenize=True,
                                                                     add_generation_prompt=True)["input_ids"]
    assert END[name] in chat.stop_strings


def test_mistral_template_dropping_the_system_prompt_is_said(published, caplog):
    name, tokenizer = published
    if name != "mistral-nemo":
        pytest.skip("Mistral's templates put the system prompt into the last user turn only")
    caplog.set_level(logging.WARNING)
    encoded = ChatFormat(tokenizer).encode(CHAT)
    assert SYSTEM not in tokenizer.decode(encoded.input_ids)  # what the published template does in training
    assert "drops the system prompt" in caplog.text


def test_a_template_refusal_names_the_template_and_the_fix(published):
    name, tokenizer = published
    if name != "llama3.2":
        pytest.skip("Llama 3.2's template refuses several tool calls in one turn")
    two_calls = [Message("user", ASK), Message("assistant", "", [{"name": "bmi", "arguments": {"kg": 70}}] * 2),
                 Message("tool", RESULT), Message("tool", RESULT), Message("assistant", ANSWER)]
    with pytest.raises(TemplateError, match="refuses this conversation: This model only supports single tool-calls"):
        ChatFormat(tokenizer).encode(two_calls, TOOLS)
    from medgpt.data.records import Conversation, Source
    from medgpt.stages.sft import sft_features

    record = Conversation(two_calls, Source("calls.jsonl", 7), TOOLS)
    with pytest.raises(TemplateError, match=r"^calls.jsonl:7: the tokenizer chat template refuses"):
        sft_features(ChatFormat(tokenizer), [record], 512, False)


def test_every_fixture_names_its_source_and_licence():
    sources = (FIXTURES / "SOURCES.md").read_text(encoding="utf-8")
    for file, *_ in TEMPLATES.values():
        row = next(line for line in sources.splitlines() if f"`{file}`" in line)
        assert "llama.cpp" in row and len(row.split("|")[3].strip()) > 5  # repository and licence given
