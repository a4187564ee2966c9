"""The OpenAI wire format: request models, response and chunk builders, errors, and tool-call parsing.

A model trained here writes a function call as `<tool_call>\\n{"name": …, "arguments": …}\\n</tool_call>` (the
Hermes / Qwen2.5 convention that `medgpt.data.templates` renders tools with); the server turns that text back
into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medgpt.serve.engine import Completion

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALL_OPEN = "<tool_call>"


class OpenAIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    # vLLM's extensions, for clients that send them
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    # Accepted only at their neutral values: anything else would be silently ignored, so it is refused.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    response_format: dict | None = None  # only {"type": "text"}: no constrained decoding here

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name in ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs"):
            if getattr(self, name):
                raise ValueError(f"`{name}` is not supported by this server")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise ValueError(f"`response_format` {kind!r} is not supported by this server (no constrained "
                             "decoding): ask for JSON in the prompt and parse the reply")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("`stop` takes at most 4 sequences")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None

    @model_validator(mode="after")
    def _supported_tool_choice(self):
        if self.tool_choice not in (None, "auto", "none"):
            raise ValueError("`tool_choice` may be \"auto\" or \"none\" here (the model decides when to call)")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def tool_definitions(self) -> list[dict] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.function.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self):
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise ValueError("`echo`, `suffix` and `best_of` are not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): text, or token ids as OpenAI allows."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ValueError("`prompt` is empty")
        return list(prompt)


# ------------------------------------------------------------------------------------------- tool calls


def split_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Model text -> (content before the calls or None, OpenAI tool_calls); text without calls stays content."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []  # not a well-formed call: show the text as the model wrote it
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
    if not calls:
        return text, []
    content = text[: text.index(TOOL_CALL_OPEN)].strip()
    return content or None, calls


def safe_prefix_length(text: str) -> int:
    """How much of streamed text can be sent without sending the start of a `<tool_call>` block."""
    if TOOL_CALL_OPEN in text:
        return text.index(TOOL_CALL_OPEN)
    for keep in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


# ------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_choice(index: int, completion: Completion, tools_offered: bool, prefill: bool = False) -> dict:
    # A chat answer is stripped (/v1/completions keeps the raw continuation); the continuation of a prefilled
    # assistant message keeps its leading space, so that prefill + content reads right.
    text = completion.text.rstrip() if prefill else completion.text.strip()
    content, calls = split_tool_calls(text) if tools_offered else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls else completion.finish_reason
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}


def chat_completion(model: str, completions: list[Completion], prompt_tokens: int, tools_offered: bool,
                    prefill: bool = False) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [chat_choice(i, c, tools_offered, prefill) for i, c in enumerate(completions)],
            "usage": usage(prompt_tokens, completions)}


def chat_chunk(ident: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None = None) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def text_completion(model: str, completions: list[Completion], prompt_tokens: int) -> dict:
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
               for i, c in enumerate(completions)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completions)}


def text_chunk(ident: str, model: str, created: int, index: int, text: str,
               finish_reason: str | None = None) -> dict:
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(ident: str, model: str, created: int, obj: str, prompt_tokens: int,
                completions: list[Completion]) -> dict:
    return {"id": ident, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completions)}


def sse(payload: dict | str) -> str:
    """One server-sent event line as OpenAI streams them."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
