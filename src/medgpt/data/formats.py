"""Parsers from one raw JSON object per format to a canonical record; each error names the field at fault.

| format      | keys                                                     | record         |
|-------------|----------------------------------------------------------|----------------|
| text        | `text` (or a line / paragraph of a .txt file)            | TextRecord     |
| sharegpt    | `conversations[{from, value}]`, optional `system`, `tools` | Conversation |
| openai      | `messages[{role, content, tool_calls?}]`, optional `tools` | Conversation |
| alpaca      | `instruction`, `input`, `output`, optional `history`, `system` | Conversation |
| preference  | prompt as `conversations`/`messages`/`prompt`, `chosen`, `rejected`; or MedicalGPT's reward
|             | format `question`, `response_chosen`, `response_rejected`, optional `history`, `system` | PreferencePair |
| kto         | `prompt`, `completion`, `label`                          | KTORecord      |
| qa          | `question`, optional `answer`, `system`                  | QARecord       |
| mcq         | `question`, `options` (dict or list), `answer`           | MCQRecord      |
"""

from __future__ import annotations

import json
from typing import Any, Callable

from medgpt.data.records import (
    Conversation,
    KTORecord,
    MCQRecord,
    Message,
    PreferencePair,
    QARecord,
    Source,
    TextRecord,
)

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # a tool call: content becomes tool_calls
    "observation": "tool",
    "tool": "tool",
}


class RecordError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def detect_format(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise RecordError("record", f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    rules = [
        ({"chosen", "rejected"}, "preference"),
        ({"response_chosen", "response_rejected"}, "preference"),
        ({"completion", "label"}, "kto"),
        ({"question", "options"}, "mcq"),
        ({"question"}, "qa"),
        ({"conversations"}, "sharegpt"),
        ({"messages"}, "openai"),
        ({"instruction"}, "alpaca"),
        ({"text"}, "text"),
    ]
    for needed, name in rules:
        if needed <= keys:
            return name
    raise RecordError(
        "record",
        f"cannot tell the format from keys {sorted(keys)}: expected conversations, messages, instruction/output, "
        "chosen/rejected, prompt/completion/label, question/answer, question/options/answer or text",
    )


# ------------------------------------------------------------------------------------------------ helpers


def _string(obj: dict, key: str, field: str | None = None, required: bool = True, allow_empty: bool = False) -> str:
    field = field or key
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError(field, "missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(field, f"expected a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise RecordError(field, "empty")
    return value


def _tools(obj: dict) -> list[dict] | None:
    tools = obj.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise RecordError("tools", f"not valid JSON: {err.msg}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("tools", "expected a list of function definitions")
    # OpenAI wraps definitions as {"type": "function", "function": {...}}; keep the inner definition.
    tools = [t["function"] if isinstance(t.get("function"), dict) else t for t in tools]
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str):
            raise RecordError(f"tools[{i}].name", "missing")
    return tools


def _tool_calls(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(field, f"a function call must be JSON {{name, arguments}}: {err.msg}") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]  # OpenAI shape
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RecordError(field, "a function call needs a 'name'")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # keep the string: some models emit non-JSON arguments, templates print it as is
        out.append({"name": call["name"], "arguments": arguments})
    return out


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(p.get("text", "") for p in value)  # OpenAI content parts, text only
    raise RecordError(field, f"expected a string, got {type(value).__name__}")


def _sharegpt_turn(turn: dict, where: str) -> Message:
    role = turn.get("from")
    if role not in SHAREGPT_ROLES:
        raise RecordError(f"{where}.from", f"unknown role {role!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
    if role == "function_call":
        return Message("assistant", "", _tool_calls(turn.get("value"), f"{where}.value"))
    return Message(SHAREGPT_ROLES[role], _content(turn.get("value"), f"{where}.value"))


def _openai_turn(turn: dict, where: str) -> Message:
    role = turn.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        raise RecordError(f"{where}.role", f"unknown role {role!r} (expected system, user, assistant or tool)")
    calls = _tool_calls(turn["tool_calls"], f"{where}.tool_calls") if turn.get("tool_calls") else None
    content = turn.get("content")
    content = "" if content is None and calls else _content(content, f"{where}.content")
    return Message(role, content, calls)


def turns_to_messages(turns: Any, field: str) -> list[Message]:
    """A list of turns, each ShareGPT-shaped ({from, value}) or OpenAI-shaped ({role, content})."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(field, "expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, "expected an object with 'from'/'value' or 'role'/'content'")
        messages.append(_sharegpt_turn(turn, where) if "from" in turn or "role" not in turn else _openai_turn(turn, where))
    return messages


def check_conversation(messages: list[Message], field: str, needs_reply: bool = True, offset: int = 0) -> None:
    """Roles in a valid order: [system] user assistant (user assistant)*, with tool calls answered by tools.

    `offset` maps message positions back to the file's turn numbers (-1 when a top-level `system` was added).
    """
    previous = None
    for i, message in enumerate(messages):
        where = f"{field}[{i + offset}]" if i + offset >= 0 else "system"
        role = message.role
        if role == "system":
            if i != 0:
                raise RecordError(where, "a system turn may only come first")
        elif role == "user":
            if previous not in (None, "system", "assistant", "tool"):
                raise RecordError(where, f"user turn after a {previous} turn (roles must alternate)")
        elif role == "assistant":
            if previous not in ("user", "tool"):
                raise RecordError(where, f"assistant turn after {previous or 'nothing'} (expected a user turn first)")
            if not message.tool_calls and not message.content.strip():
                raise RecordError(where, "empty assistant turn")
        elif role == "tool":
            if previous not in ("assistant", "tool") or (previous == "assistant" and not messages[i - 1].tool_calls):
                after = "an assistant text reply" if previous == "assistant" else (previous or "nothing")
                raise RecordError(where, f"a tool result (observation) must follow a function call, not {after}")
        if role != "assistant" and role != "tool" and not message.content.strip():
            raise RecordError(where, f"empty {role} turn")
        previous = "assistant_call" if role == "assistant" and message.tool_calls else role
        previous = "assistant" if previous == "assistant_call" else previous
    if needs_reply and (messages[-1].role != "assistant" or messages[-1].tool_calls and len(messages) < 2):
        raise RecordError(field, "the conversation does not end with an assistant reply (nothing to learn)")


def check_prompt(messages: list[Message], field: str) -> None:
    check_conversation(messages, field, needs_reply=False)
    if messages[-1].role not in ("user", "tool"):
        raise RecordError(field, f"a prompt must end with a user or tool turn, not {messages[-1].role}")


def _with_system(obj: dict, messages: list[Message]) -> tuple[list[Message], int]:
    """Prepend a top-level `system` string; also return the turn-number offset this causes."""
    system = _string(obj, "system", required=False)
    if system.strip() and not (messages and messages[0].role == "system"):
        return [Message("system", system), *messages], -1
    return messages, 0


# ------------------------------------------------------------------------------------------------ parsers


def parse_text(obj: Any, source: Source) -> TextRecord:
    if isinstance(obj, str):
        return TextRecord(obj, source)
    return TextRecord(_string(obj, "text"), source)


def parse_sharegpt(obj: dict, source: Source) -> Conversation:
    messages, offset = _with_system(obj, turns_to_messages(obj.get("conversations"), "conversations"))
    check_conversation(messages, "conversations", offset=offset)
    return Conversation(messages, source, _tools(obj))


def parse_openai(obj: dict, source: Source) -> Conversation:
    messages, offset = _with_system(obj, turns_to_messages(obj.get("messages"), "messages"))
    check_conversation(messages, "messages", offset=offset)
    return Conversation(messages, source, _tools(obj))


def parse_alpaca(obj: dict, source: Source) -> Conversation:
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", required=False)
    output = _string(obj, "output")
    messages: list[Message] = []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", "expected a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RecordError(f"history[{i}]", "expected [question, answer] strings")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages, _ = _with_system(obj, [*messages, Message("user", user), Message("assistant", output)])
    check_conversation(messages, "history/instruction/output")
    return Conversation(messages, source, _tools(obj))


def _messages_any(value: Any, field: str, default_role: str) -> list[Message]:
    """A string (one turn of default_role) or a list of ShareGPT / OpenAI turns."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(field, "empty")
        return [Message(default_role, value)]
    if isinstance(value, list):
        return turns_to_messages(value, field)
    if isinstance(value, dict):
        return _messages_any([value], field, default_role)
    raise RecordError(field, f"expected a string or a list of messages, got {type(value).__name__}")


def _prompt(obj: dict) -> list[Message]:
    for key in ("conversations", "messages", "prompt"):
        if key in obj:
            return _with_system(obj, _messages_any(obj[key], key, "user"))[0]
    raise RecordError("prompt", "missing (give conversations, messages or prompt)")


def _medicalgpt_reward_record(obj: dict) -> dict:
    """MedicalGPT's reward format: system, history [[q, a]…], question, response_chosen, response_rejected."""
    turns = []
    for i, pair in enumerate(obj.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "expected [question, answer]")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    turns.append({"role": "user", "content": _string(obj, "question")})
    return {"messages": turns, "system": obj.get("system"), "tools": obj.get("tools"),
            "chosen": obj.get("response_chosen"), "rejected": obj.get("response_rejected")}


def _reply(obj: dict, key: str, prompt: list[Message]) -> list[Message]:
    reply = _messages_any(obj.get(key), key, "assistant")
    # TRL's implicit-prompt form repeats the prompt inside chosen/rejected: keep only what follows it.
    if len(reply) > len(prompt) and [m.content for m in reply[: len(prompt)]] == [m.content for m in prompt]:
        reply = reply[len(prompt):]
    if reply[0].role != "assistant":
        raise RecordError(key, f"must be the assistant's reply, starts with a {reply[0].role} turn")
    if not any(m.content.strip() or m.tool_calls for m in reply if m.role == "assistant"):
        raise RecordError(key, "empty")
    return reply


def parse_preference(obj: dict, source: Source) -> PreferencePair:
    if "response_chosen" in obj:
        obj = _medicalgpt_reward_record(obj)
    if "conversations" not in obj and "messages" not in obj and "prompt" not in obj:
        chosen = _messages_any(obj.get("chosen"), "chosen", "assistant")
        rejected = _messages_any(obj.get("rejected"), "rejected", "assistant")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        prompt = _with_system(obj, prompt)[0] if prompt else prompt
        if not prompt:
            raise RecordError("prompt", "missing (give conversations, messages or prompt)")
    else:
        prompt = _prompt(obj)
        chosen, rejected = _reply(obj, "chosen", prompt), _reply(obj, "rejected", prompt)
    check_prompt(prompt, "prompt")
    check_conversation(prompt + chosen, "chosen")
    check_conversation(prompt + rejected, "rejected")
    return PreferencePair(prompt, chosen, rejected, source, _tools(obj))


def parse_kto(obj: dict, source: Source) -> KTORecord:
    prompt = _prompt(obj)
    check_prompt(prompt, "prompt")
    completion = _reply(obj, "completion", prompt)
    label = obj.get("label")
    if not isinstance(label, bool):
        if label in (0, 1):
            label = bool(label)
        else:
            raise RecordError("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    check_conversation(prompt + completion, "completion")
    return KTORecord(prompt, completion, label, source, _tools(obj))


def parse_qa(obj: dict, source: Source) -> QARecord:
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RecordError("answer", f"expected a string, got {type(answer).__name__}")
    return QARecord(_string(obj, "question"), None if answer is None else str(answer), source,
                    _string(obj, "system", required=False) or None)


def parse_mcq(obj: dict, source: Source) -> MCQRecord:
    question = _string(obj, "question")
    options = obj.get("options")
    if isinstance(options, list):
        options = {chr(ord("A") + i): o for i, o in enumerate(options)}
    if not isinstance(options, dict) or len(options) < 2:
        raise RecordError("options", "expected at least two options, as {\"A\": …} or a list")
    for key, text in options.items():
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"options.{key}", "expected a non-empty string")
    answer = obj.get("answer")
    if isinstance(answer, str) and answer.strip().upper() in {k.upper() for k in options}:
        answer = next(k for k in options if k.upper() == answer.strip().upper())
    elif isinstance(answer, str) and answer in options.values():
        answer = next(k for k, v in options.items() if v == answer)
    else:
        raise RecordError("answer", f"{answer!r} is neither an option key ({', '.join(options)}) nor an option text")
    return MCQRecord(question, {str(k): v for k, v in options.items()}, str(answer), source)


PARSERS: dict[str, Callable[[Any, Source], Any]] = {
    "text": parse_text,
    "sharegpt": parse_sharegpt,
    "openai": parse_openai,
    "alpaca": parse_alpaca,
    "preference": parse_preference,
    "kto": parse_kto,
    "qa": parse_qa,
    "mcq": parse_mcq,
}
FORMAT_KIND = {
    "text": "text",
    "sharegpt": "conversation",
    "openai": "conversation",
    "alpaca": "conversation",
    "preference": "preference",
    "kto": "kto",
    "qa": "qa",
    "mcq": "mcq",
}
