"""Golden tests for the named fallback chat templates, rendered the way transformers renders chat templates."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from medgpt.data.chat_templates import NAMED_TEMPLATES, NamedTemplate, get_named_template

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
NAMES = ["chatml", "qwen", "llama3", "llama2", "mistral", "alpaca", "vicuna", "chatglm3"]

CONVERSATION = [
    {"role": "system", "content": "You are a careful medical assistant."},
    {"role": "user", "content": "What is a normal resting heart rate?"},
    {"role": "assistant", "content": "For adults it is usually 60 to 100 beats per minute."},
    {"role": "user", "content": "And for children?"},
    {"role": "assistant", "content": "It is higher in children and depends on age."},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calc_bmi",
            "description": "Compute body mass index from weight and height.",
            "parameters": {
                "type": "object",
                "properties": {
                    "weight_kg": {"type": "number", "description": "Body weight in kilograms"},
                    "height_m": {"type": "number", "description": "Height in metres"},
                },
                "required": ["weight_kg", "height_m"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_reference_range",
            "description": "Look up the adult reference range of a clinical measure.",
            "parameters": {
                "type": "object",
                "properties": {"measure": {"type": "string"}},
                "required": ["measure"],
            },
        },
    },
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a careful medical assistant."},
    {"role": "user", "content": "I weigh 70 kg and I am 1.75 m tall. Is my BMI normal?"},
    {
        "role": "assistant",
        "content": "Let me calculate your BMI and look up the normal range.",
        "tool_calls": [
            # arguments as a dict ...
            {"type": "function", "function": {"name": "calc_bmi", "arguments": {"weight_kg": 70, "height_m": 1.75}}},
            # ... and as an already-encoded JSON string
            {"type": "function", "function": {"name": "get_reference_range", "arguments": '{"measure": "bmi"}'}},
        ],
    },
    {"role": "tool", "content": '{"bmi": 22.86}'},
    {"role": "tool", "content": '{"measure": "bmi", "low": 18.5, "high": 24.9}'},
    {"role": "assistant", "content": "Your BMI is about 22.9, which is within the normal adult range of 18.5 to 24.9."},
    {"role": "user", "content": "Thanks!"},
]


def render(name: str, messages, *, add_generation_prompt: bool = False, tools=None, bos_token: str | None = None):
    if bos_token is None:
        bos_token = "<|begin_of_text|>" if name == "llama3" else "<s>"
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=get_named_template(name).jinja,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token="</s>",
    )
    return rendered[0]


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")


def test_registry_has_exactly_the_documented_templates():
    assert sorted(NAMED_TEMPLATES) == sorted(NAMES)
    for name, template in NAMED_TEMPLATES.items():
        assert isinstance(template, NamedTemplate)
        assert template.name == name
        assert template.stop_strings and all(template.stop_strings)
        assert template.description
        assert template.supports_tools == (name == "qwen")


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_with_system_matches_golden(name):
    assert render(name, CONVERSATION) == fixture(name)


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_without_system_matches_golden(name):
    messages = [{"role": "user", "content": "Hello"}]
    assert render(name, messages, add_generation_prompt=True) == fixture(f"{name}_generation")


@pytest.mark.parametrize("name", NAMES)
def test_full_conversation_is_a_prefix_extension(name):
    # Rendering the first exchange alone must be a prefix of the full render (no per-turn rewriting).
    first = render(name, CONVERSATION[:3])
    assert fixture(name).startswith(first)


@pytest.mark.parametrize("name", NAMES)
def test_stop_string_ends_every_assistant_turn(name):
    text = render(name, CONVERSATION)
    stops = NAMED_TEMPLATES[name].stop_strings
    for message in CONVERSATION:
        if message["role"] == "assistant":
            after = text.split(message["content"], 1)[1]
            # chatglm3 has no end-of-turn marker: the next role tag (or end of text) is the stop.
            assert after == "" or any(after.lstrip(" ").startswith(s) for s in stops), (name, after[:30])


@pytest.mark.parametrize("name", NAMES)
def test_assistant_generation_spans_cover_replies(name):
    template = get_named_template(name).jinja
    bos = "<|begin_of_text|>" if name == "llama3" else "<s>"
    rendered, indices = render_jinja_template(
        conversations=[CONVERSATION],
        chat_template=template,
        return_assistant_tokens_mask=True,
        bos_token=bos,
        eos_token="</s>",
    )
    text, spans = rendered[0], indices[0]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for (start, end), reply in zip(spans, replies):
        assert reply in text[start:end]
        assert "user" not in text[start:end].lower().replace(reply.lower(), "")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("role", ["narrator", "tool"])
def test_unknown_role_raises(name, role):
    if name == "qwen" and role == "tool":
        pytest.skip("qwen renders tool messages natively")
    messages = [{"role": "user", "content": "Hi"}, {"role": role, "content": "x"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match=role):
        render(name, messages)


@pytest.mark.parametrize("name", ["llama2", "mistral", "alpaca", "vicuna"])
def test_paired_formats_reject_non_alternating_roles(name):
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        render(name, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chatglm3_accepts_observation_role():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "observation", "content": "42"},
    ]
    assert render("chatglm3", messages, add_generation_prompt=True) == "[gMASK]sop<|user|>\n Hi<|observation|>\n 42<|assistant|>"


def test_qwen_tools_match_golden():
    assert render("qwen", TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True) == fixture("qwen_tools")


def test_qwen_tool_call_without_content_and_default_system():
    messages = [
        {"role": "user", "content": "BMI for 70 kg, 1.75 m?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "calc_bmi", "arguments": {"weight_kg": 70}}}],
        },
        {"role": "tool", "content": "22.86"},
    ]
    text = render("qwen", messages, tools=TOOLS[:1])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n")
    assert text.endswith(
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "calc_bmi", "arguments": {"weight_kg": 70}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22.86\n</tool_response><|im_end|>\n"
    )


def test_qwen_without_tools_has_no_tool_section():
    assert "# Tools" not in render("qwen", CONVERSATION, tools=[])


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="chatml") as excinfo:
        get_named_template("chatm")
    assert "Did you mean 'chatml'" in str(excinfo.value)
    for name in NAMES:
        assert name in str(excinfo.value)


def test_name_lookup_is_case_insensitive():
    assert get_named_template(" ChatML ") is NAMED_TEMPLATES["chatml"]
