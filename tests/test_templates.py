"""Golden tests for rendering and assistant-only masks: what users get burnt by when templates drift."""

from __future__ import annotations

import json

import pytest

from medgpt.data.chat_templates import NAMED_TEMPLATES
from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat, TemplateError

CONVERSATION = [
    Message("system", "You are a careful medical assistant."),
    Message("user", "What is a normal resting heart rate?"),
    Message("assistant", "For adults it is usually 60 to 100 beats per minute."),
    Message("user", "And for children? 儿童呢？"),
    Message("assistant", "It is higher in children and depends on age."),
]
TOOLS = [{"name": "bmi", "description": "Body-mass index", "parameters": {
    "type": "object", "properties": {"kg": {"type": "number"}, "m": {"type": "number"}}}}]
TOOL_CONVERSATION = [
    Message("user", "My weight is 70 kg and height 1.75 m. BMI?"),
    Message("assistant", "", [{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}]),
    Message("tool", '{"bmi": 22.9}'),
    Message("assistant", "Your BMI is 22.9, in the healthy range."),
]


def as_dicts(messages):
    return [m.to_openai() for m in messages]


def reference_chatml_mask(tokenizer, ids):
    """An independent reading of ChatML by token ids: inside `<|im_start|>assistant\\n … <|im_end|>`."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    mask, inside, i = [False] * len(ids), False, 0
    while i < len(ids):
        if ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
            i += 1 + len(header)
            inside = True
            continue
        if inside:
            mask[i] = True
            if ids[i] == end:
                inside = False
        i += 1
    return mask


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["with-system", "default-system"])
def test_rendered_prompt_equals_the_tokenizers_own_chat_template(tokenizer, messages):
    chat = ChatFormat(tokenizer)
    assert chat.render(messages) == tokenizer.apply_chat_template(as_dicts(messages), tokenize=False)
    assert chat.render(messages[:-1], add_generation_prompt=True) == tokenizer.apply_chat_template(
        as_dicts(messages[:-1]), tokenize=False, add_generation_prompt=True)


def test_encoded_ids_equal_apply_chat_template_ids(tokenizer):
    encoded = ChatFormat(tokenizer).encode(CONVERSATION)
    assert encoded.input_ids == tokenizer.apply_chat_template(as_dicts(CONVERSATION), tokenize=True)["input_ids"]


def test_assistant_mask_covers_exactly_the_assistant_tokens_and_end_of_turn(tokenizer):
    encoded = ChatFormat(tokenizer).encode(CONVERSATION)
    assert encoded.assistant_mask == reference_chatml_mask(tokenizer, encoded.input_ids)
    masked = [t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m]
    assert tokenizer.decode(masked) == (
        "For adults it is usually 60 to 100 beats per minute.<|im_end|>"
        "It is higher in children and depends on age.<|im_end|>")
    # the end-of-turn token is learned (it is also the pad token: masks must not come from ids)
    assert masked.count(tokenizer.pad_token_id) == 2


def test_turn_ends_point_after_each_assistant_end_of_turn(tokenizer):
    encoded = ChatFormat(tokenizer).encode(CONVERSATION)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(encoded.turn_ends) == 2
    for end in encoded.turn_ends:
        assert encoded.input_ids[end - 1] == im_end and encoded.assistant_mask[end - 1]


def test_train_on_prompt_masks_nothing_out(tokenizer):
    encoded = ChatFormat(tokenizer).encode(CONVERSATION, train_on_prompt=True)
    assert all(encoded.assistant_mask)


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_template_mask_matches_generation_markers(tokenizer, name):
    """Our span method (no markers needed) agrees with HF's `{% generation %}` mask on every fallback template."""
    chat = ChatFormat(tokenizer, name)
    dicts, _ = chat.to_template_messages(CONVERSATION)
    reference = tokenizer.apply_chat_template(dicts, chat_template=chat.jinja, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    encoded = chat.encode(CONVERSATION)
    assert encoded.input_ids == reference["input_ids"]
    assert encoded.assistant_mask == [bool(m) for m in reference["assistant_masks"]]
    assert any(encoded.assistant_mask) and not all(encoded.assistant_mask)


def test_tools_go_into_the_system_prompt_when_the_template_ignores_them(tokenizer):
    chat = ChatFormat(tokenizer)  # SmolLM2's template has no tool support
    assert not chat.native_tools
    text = chat.render(TOOL_CONVERSATION, TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"bmi": 22.9}\n</tool_response><|im_end|>' in text
    assert "<|im_start|>tool" not in text and "function_call" not in text


def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer):
    chat = ChatFormat(tokenizer)
    encoded = chat.encode(TOOL_CONVERSATION, TOOLS)
    masked = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m])
    assert masked == ('<tool_call>\n{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}\n</tool_call><|im_end|>'
                      "Your BMI is 22.9, in the healthy range.<|im_end|>")


def test_existing_system_prompt_keeps_its_text_and_gains_the_tools(tokenizer):
    chat = ChatFormat(tokenizer)
    text = chat.render([Message("system", "Be brief."), *TOOL_CONVERSATION], TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")


def test_native_tool_template_receives_tools_and_tool_calls(tokenizer):
    chat = ChatFormat(tokenizer, "qwen")
    assert chat.native_tools
    text = chat.render(TOOL_CONVERSATION, TOOLS)
    assert "<tools>" in text and '"name": "bmi"' in text
    assert "<tool_response>\n{\"bmi\": 22.9}\n</tool_response>" in text
    encoded = chat.encode(TOOL_CONVERSATION, TOOLS)
    masked = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m])
    assert masked.startswith("<tool_call>") and masked.endswith("healthy range.<|im_end|>")


def test_end_of_turn_is_detected_from_the_template(tokenizer):
    chat = ChatFormat(tokenizer)
    assert chat.stop_strings[0] == "<|im_end|>"
    assert chat.stop_token_ids() == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    llama3 = ChatFormat(tokenizer, "llama3")
    assert "<|eot_id|>" in llama3.stop_strings


def test_missing_template_asks_for_a_named_one(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(TemplateError, match="template: NAME"):
        ChatFormat(bare)
    assert ChatFormat(bare, "chatml").name == "chatml"


def test_saved_template_is_what_a_reloaded_tokenizer_renders(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    import copy

    own = copy.deepcopy(tokenizer)
    chat = ChatFormat(own, "llama3")
    own.save_pretrained(tmp_path)
    chat.save(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert ChatFormat(reloaded).render(CONVERSATION) == chat.render(CONVERSATION)


def test_history_rewriting_template_falls_back_to_locating_replies(tokenizer):
    """A template that drops earlier replies' reasoning is not prefix-stable; replies are still found."""
    jinja = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
             "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
             "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = jinja
    messages = [Message("user", "a?"), Message("assistant", "<think>hmm</think>A."),
                Message("user", "b?"), Message("assistant", "<think>so</think>B.")]
    encoded = ChatFormat(tok).encode(messages)
    masked = tok.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m])
    assert masked == "A.<|im_end|><think>so</think>B.<|im_end|>"
