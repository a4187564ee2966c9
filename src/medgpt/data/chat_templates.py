"""Named fallback chat templates (Jinja, Hugging Face `apply_chat_template` compatible) for models without their own."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    jinja: str  # the Jinja chat template
    stop_strings: tuple[str, ...]  # strings that end an assistant turn (used to stop generation)
    supports_tools: bool = False
    description: str = ""  # one line: which model families use it


# Notes that apply to every template below:
# - Transformers compiles templates with trim_blocks/lstrip_blocks; we also use `{%- -%}` everywhere so the
#   layout of the Jinja source never leaks whitespace into the render.
# - The part of each assistant turn that the model must learn to produce is wrapped in `{% generation %}`,
#   so `return_assistant_tokens_mask=True` (and TRL's assistant-only loss) work. It does not change the text.
# - Unknown roles raise; only `qwen` understands `tool` messages (callers turn tool turns into text first).

_CHATML = r"""
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('chatml template: unsupported role "' ~ message.role ~ '"; expected system, user or assistant (convert tool messages to plain text first)') -}}
    {%- endif -%}
    {{- '<|im_start|>' + message.role + '\n' -}}
    {%- if message.role == 'assistant' -%}
        {%- generation -%}
            {{- (message.content or '') + '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- (message.content or '') + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Qwen2/Qwen2.5: ChatML with a default system turn, and Hermes-style tools. The tool list and the calling
# instructions are appended to the system turn; tool results go back as a *user* turn, with consecutive tool
# messages sharing one turn. Tool call arguments given as a JSON string are emitted verbatim (not re-encoded).
_QWEN = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = messages[0].content or '' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = 'You are a helpful assistant.' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_message -}}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n' -}}
    {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in loop_messages -%}
    {%- if message.role in ['system', 'user'] -%}
        {{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
            {{- message.content or '' -}}
            {%- for call in (message.tool_calls or []) -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if message.content or not loop.first -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
                {%- if fn.arguments is string -%}
                    {{- fn.arguments -}}
                {%- else -%}
                    {{- fn.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
            {{- '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + (message.content or '') + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('qwen template: unsupported role "' ~ message.role ~ '"; expected system, user, assistant or tool') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Llama 3: bos once at the start, header tokens around the role, a blank line, and stripped content.
# There is no default system prompt.
_LLAMA3 = r"""
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('llama3 template: unsupported role "' ~ message.role ~ '"; expected system, user or assistant (convert tool messages to plain text first)') -}}
    {%- endif -%}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' -}}
    {%- if message.role == 'assistant' -%}
        {%- generation -%}
            {{- ((message.content or '') | trim) + '<|eot_id|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- ((message.content or '') | trim) + '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# Llama 2 chat: every user turn opens with bos + "[INST] ", the system prompt is folded into the first user
# turn inside <<SYS>> markers, and each answer is " {answer} </s>" (Meta strips both sides). The prompt
# already ends with "[/INST]", so add_generation_prompt adds nothing.
_LLAMA2 = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = messages[0].content or '' -%}
    {%- set loop_messages = messages[1:] -%}
    {%- if not loop_messages -%}
        {{- raise_exception('llama2 template: the system message must be followed by a user message') -}}
    {%- endif -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('llama2 template: unsupported role "' ~ message.role ~ '"; expected system, user or assistant (convert tool messages to plain text first)') -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('llama2 template: a system message is only supported as the first message') -}}
    {%- elif (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('llama2 template: after the optional system message, roles must alternate user/assistant/user/...') -}}
    {%- endif -%}
    {%- if message.role == 'user' -%}
        {%- if loop.first and system_message is not none -%}
            {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + (message.content or '') -%}
        {%- else -%}
            {%- set content = message.content or '' -%}
        {%- endif -%}
        {{- bos_token + '[INST] ' + (content | trim) + ' [/INST]' -}}
    {%- else -%}
        {%- generation -%}
            {{- ' ' + ((message.content or '') | trim) + ' ' + eos_token -}}
        {%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
"""

# Mistral-7B-Instruct v0.1/v0.2: a single bos, "[INST] {user} [/INST]" with the answer glued directly after
# it and closed by eos. Mistral has no system role; a system message is prepended to the first user message,
# separated by a blank line. The prompt already ends with "[/INST]", so add_generation_prompt adds nothing.
_MISTRAL = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = messages[0].content or '' -%}
    {%- set loop_messages = messages[1:] -%}
    {%- if not loop_messages -%}
        {{- raise_exception('mistral template: the system message must be followed by a user message') -}}
    {%- endif -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('mistral template: unsupported role "' ~ message.role ~ '"; expected system, user or assistant (convert tool messages to plain text first)') -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('mistral template: a system message is only supported as the first message') -}}
    {%- elif (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('mistral template: after the optional system message, roles must alternate user/assistant/user/...') -}}
    {%- endif -%}
    {%- if message.role == 'user' -%}
        {%- if loop.first and system_message is not none -%}
            {{- '[INST] ' + system_message + '\n\n' + (message.content or '') + ' [/INST]' -}}
        {%- else -%}
            {{- '[INST] ' + (message.content or '') + ' [/INST]' -}}
        {%- endif -%}
    {%- else -%}
        {%- generation -%}
            {{- (message.content or '') + eos_token -}}
        {%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
"""

# Alpaca: a preamble (the system prompt, or Alpaca's stock sentence), then "### Instruction:" /
# "### Response:" blocks separated by blank lines; each answer ends with eos followed by a blank line.
_ALPACA = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = messages[0].content or '' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if system_message -%}
    {{- system_message + '\n\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('alpaca template: unsupported role "' ~ message.role ~ '"; expected system, user or assistant (convert tool messages to plain text first)') -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('alpaca template: a system message is only supported as the first message') -}}
    {%- elif (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('alpaca template: after the optional system message, roles must alternate user/assistant/user/...') -}}
    {%- endif -%}
    {%- if message.role == 'user' -%}
        {{- '### Instruction:\n' + (message.content or '') + '\n\n' -}}
    {%- else -%}
        {{- '### Response:\n' -}}
        {%- generation -%}
            {{- (message.content or '') + eos_token -}}
        {%- endgeneration -%}
        {{- '\n\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '### Response:\n' -}}
{%- endif -%}
"""

# Vicuna v1.1 (FastChat "vicuna_v1.1"): "{system} USER: {user} ASSISTANT: {answer}</s>USER: ...". A user
# turn is followed by a space, an answer by eos with no space; the generation prompt "ASSISTANT:" has no
# trailing space (the model produces it). An empty system prompt drops the system text and its space.
_VICUNA = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = messages[0].content or '' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions." -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if system_message -%}
    {{- system_message + ' ' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('vicuna template: unsupported role "' ~ message.role ~ '"; expected system, user or assistant (convert tool messages to plain text first)') -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('vicuna template: a system message is only supported as the first message') -}}
    {%- elif (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('vicuna template: after the optional system message, roles must alternate user/assistant/user/...') -}}
    {%- endif -%}
    {%- if message.role == 'user' -%}
        {{- 'USER: ' + (message.content or '') + ' ' -}}
    {%- else -%}
        {{- 'ASSISTANT:' -}}
        {%- generation -%}
            {{- ' ' + (message.content or '') + eos_token -}}
        {%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""

# ChatGLM3-6B: "[gMASK]sop" once, then "<|role|>" + "\n " + content per message (the space after the newline
# is how the official template spells the tokenizer's "{metadata}\n" line followed by SentencePiece's leading
# space). No eos between turns: the model stops by emitting the next role tag (<|user|> or <|observation|>).
# "observation" is ChatGLM3's own role for tool results; a generic "tool" role is rejected like elsewhere.
_CHATGLM3 = r"""
{{- '[gMASK]sop' -}}
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant', 'observation'] -%}
        {{- raise_exception('chatglm3 template: unsupported role "' ~ message.role ~ '"; expected system, user, assistant or observation (convert tool messages to plain text first)') -}}
    {%- endif -%}
    {{- '<|' + message.role + '|>' -}}
    {%- if message.role == 'assistant' -%}
        {%- generation -%}
            {{- '\n ' + (message.content or '') -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- '\n ' + (message.content or '') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""


def _clean(jinja: str) -> str:
    # The raw strings above start and end with a newline for readability; trim them off the stored template.
    return jinja.strip("\n")


NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    t.name: t
    for t in (
        NamedTemplate(
            name="chatml",
            jinja=_clean(_CHATML),
            stop_strings=("<|im_end|>",),
            description="Generic ChatML (OpenHermes, Yi, SmolLM and many fine-tunes); no default system prompt.",
        ),
        NamedTemplate(
            name="qwen",
            jinja=_clean(_QWEN),
            stop_strings=("<|im_end|>", "<|endoftext|>"),
            supports_tools=True,
            description="Qwen2 / Qwen2.5 base and Instruct models (ChatML, default system prompt, Hermes-style tools).",
        ),
        NamedTemplate(
            name="llama3",
            jinja=_clean(_LLAMA3),
            stop_strings=("<|eot_id|>", "<|end_of_text|>"),
            description="Llama 3 / 3.1 / 3.2 / 3.3 base and Instruct models.",
        ),
        NamedTemplate(
            name="llama2",
            jinja=_clean(_LLAMA2),
            stop_strings=("</s>",),
            description="Llama 2 Chat and Llama 2 based fine-tunes (e.g. CodeLlama-Instruct).",
        ),
        NamedTemplate(
            name="mistral",
            jinja=_clean(_MISTRAL),
            stop_strings=("</s>",),
            description="Mistral-7B-Instruct v0.1/v0.2 and Mixtral-8x7B-Instruct.",
        ),
        NamedTemplate(
            name="alpaca",
            jinja=_clean(_ALPACA),
            stop_strings=("</s>",),
            description="Stanford Alpaca instruction format and its fine-tunes.",
        ),
        NamedTemplate(
            name="vicuna",
            jinja=_clean(_VICUNA),
            stop_strings=("</s>",),
            description="Vicuna v1.1 / v1.3 / v1.5 (FastChat vicuna_v1.1).",
        ),
        NamedTemplate(
            name="chatglm3",
            jinja=_clean(_CHATGLM3),
            stop_strings=("<|user|>", "<|observation|>", "</s>"),
            description="ChatGLM3-6B (THUDM).",
        ),
    )
}


def get_named_template(name: str) -> NamedTemplate:
    """Return the named template; raise ValueError (with a "did you mean") for an unknown name."""
    key = name.strip().lower()
    if key in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[key]
    valid = sorted(NAMED_TEMPLATES)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown chat template {name!r}.{hint} Valid names: {', '.join(valid)}.")
