"""Render conversations with one chat template and compute assistant-only loss masks for any template.

The template is the tokenizer's own unless a named fallback is chosen, so training, merging and serving
render identically. Masks do not rely on `{% generation %}` markers: each assistant turn's character span is
found by rendering the conversation up to that turn (with and without it), and tokens are assigned to spans by
their character offsets in the tokenisation of the whole render, so the ids are exactly what
`tokenizer.apply_chat_template(..., tokenize=True)` gives.

Tools, for templates that do not know them (the embedded SmolLM2 template ignores `tools` and would print a
literal `tool` role): definitions are appended to the system prompt, a function call becomes assistant text
`<tool_call>\\n{"name": …, "arguments": …}\\n</tool_call>`, and tool results become a user turn
`<tool_response>\\n…\\n</tool_response>` (the Hermes / Qwen2.5 convention, so a model trained here emits calls
that the server can parse). Templates that know tools get OpenAI-shaped messages; tool calls carry ids
`call00001`, `call00002`, … (nine alphanumerics, what Mistral's templates demand) and each tool result the id of
the call it answers, in order, since the data formats carry none.

Reasoning templates (Qwen3 and kin) print an empty `<think>\\n\\n</think>\\n\\n` before a final reply that has
no reasoning: that block is template, not reply, and is never in the mask (a real `<think>…</think>` the data
gives is).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from medgpt.data.chat_templates import get_named_template
from medgpt.data.records import Message

logger = logging.getLogger(__name__)
TEMPLATE_FILE = "chat_template.jinja"
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


class TemplateError(ValueError):
    pass


# The empty reasoning block a reasoning template writes before a reply that has none.
EMPTY_REASONING = re.compile(r"<think>\s*</think>\s*")


def with_tool_call_ids(messages: list[Message]) -> list[dict]:
    """OpenAI-shaped message dicts; each tool call gets an id `callNNNNN`, each tool result its call's id."""
    out, pending, count = [], [], 0
    for message in messages:
        entry = message.to_openai()
        for call in entry.get("tool_calls", []):
            count += 1
            call["id"] = f"call{count:05d}"
            pending.append(call["id"])
        if message.role == "tool" and pending:
            entry["tool_call_id"] = pending.pop(0)
        out.append(entry)
    return out


@dataclass
class EncodedConversation:
    input_ids: list[int]
    assistant_mask: list[bool]  # True on the tokens of assistant replies and their end-of-turn token
    turn_ends: list[int]  # token index after each assistant reply's end-of-turn (for turn-aware truncation)


def format_tool_call(call: dict) -> str:
    body = json.dumps({"name": call["name"], "arguments": call.get("arguments", {})}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


class ChatFormat:
    """One model's chat template, with the render, tokenise and mask operations built on it."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.name = template or "tokenizer"
        if template:
            named = get_named_template(template)
            self.jinja, self.native_tools = named.jinja, named.supports_tools
            extra_stops = named.stop_strings
        elif getattr(tokenizer, "chat_template", None):
            self.jinja = tokenizer.chat_template
            self.native_tools = "tools" in self.jinja and "tool_calls" in self.jinja
            extra_stops = ()
        else:
            raise TemplateError(
                "the tokenizer has no chat template (a base model?): choose one with `template: NAME` "
                "(chatml, qwen, llama3, llama2, mistral, alpaca, vicuna, chatglm3)"
            )
        self.system_in_first_user = not self._accepts_system()
        self.stop_strings = tuple(dict.fromkeys([*extra_stops, *self._end_of_turn()]))

    def _accepts_system(self) -> bool:
        """False for templates that refuse a system turn (Gemma): system text then opens the first user turn,
        where those models' documentation puts instructions."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        try:
            self.render_dicts([{"role": "system", "content": "be brief"}, *probe])
        except TemplateError:
            try:
                self.render_dicts(probe)
            except TemplateError:
                return True  # it refuses something else; nothing to work around here
            return False
        return True

    # ------------------------------------------------------------------------------------ rendering

    def to_template_messages(self, messages: list[Message], tools: list[dict] | None = None):
        """Canonical messages -> (message dicts, tools argument) for this template."""
        if self.native_tools:
            # templates take tools as OpenAI / JSON-schema entries: {"type": "function", "function": {...}}
            wrapped = [{"type": "function", "function": t} for t in tools] if tools else tools
            return self._system_placed(with_tool_call_ids(messages)), wrapped
        out: list[dict] = []
        for message in messages:
            if message.role == "tool":
                text = f"<tool_response>\n{message.content}\n</tool_response>"
                if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                    out[-1]["content"] += "\n" + text
                else:
                    out.append({"role": "user", "content": text, "_tool": True})
            elif message.tool_calls:
                calls = "\n".join(format_tool_call(c) for c in message.tool_calls)
                content = f"{message.content}\n{calls}" if message.content.strip() else calls
                out.append({"role": "assistant", "content": content})
            else:
                out.append({"role": message.role, "content": message.content})
        for m in out:
            m.pop("_tool", None)
        if tools:
            preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
            else:
                out.insert(0, {"role": "system", "content": preamble})
        return self._system_placed(out), None

    def _system_placed(self, dicts: list[dict]) -> list[dict]:
        """For templates without a system turn, the system text opens the first user turn (blank line between)."""
        if not (self.system_in_first_user and dicts and dicts[0]["role"] == "system"):
            return dicts
        system, rest = dicts[0], dicts[1:]
        if rest and rest[0]["role"] == "user":
            return [{**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]
        return [{"role": "user", "content": system["content"]}, *rest]

    def render_dicts(self, dicts: list[dict], tools=None, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(dicts, tools=tools, chat_template=self.jinja, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as err:  # raise_exception in the template: it refuses this conversation
            raise TemplateError(f"the {self.name} chat template refuses this conversation: {err} (fix the data, "
                                "or choose another template with `template: NAME`)") from None

    def render(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
        dicts, tools = self.to_template_messages(messages, tools)
        return self.render_dicts(dicts, tools, add_generation_prompt)

    def prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt ready for generation (ends with the assistant header)."""
        return self._tokenize(self.render(messages, tools, add_generation_prompt=True))["input_ids"]

    # ------------------------------------------------------------------------------------ masks

    def assistant_spans(self, dicts: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
        """The full render and the character span of each assistant reply (content + end-of-turn)."""
        full = self.render_dicts(dicts, tools)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(dicts):
            if message["role"] != "assistant":
                continue
            offset = spans[-1][1] if spans else 0
            before = self.render_dicts(dicts[:i], tools, add_generation_prompt=True)
            upto = self.render_dicts(dicts[: i + 1], tools)
            reply = upto[len(before):].rstrip() if upto.startswith(before) else None
            if reply is not None and full.startswith(upto) and len(before) >= offset:
                start, end = len(before), len(before) + len(reply)
            else:  # templates that render a turn differently later (system/tools moved, earlier reasoning dropped)
                start, end = self._locate(full, reply, message.get("content") or "", offset)
            spans.append(self._without_inserted_reasoning(full, start, end, message.get("content") or ""))
        return full, spans

    def _locate(self, full: str, reply: str | None, content: str, offset: int) -> tuple[int, int]:
        """Find a reply in the full render after `offset`: as rendered alone, without the empty reasoning block
        a last turn gets, else by its content (Qwen3 prints earlier replies without their <think> block)."""
        rendered = [reply, EMPTY_REASONING.sub("", reply, count=1)] if reply else []
        for candidate in rendered:
            start = full.find(candidate, offset)
            if start >= 0:
                return start, start + len(candidate)
        for candidate in (content, content.split("</think>")[-1].strip()):
            start = full.find(candidate, offset) if candidate else -1
            if start >= 0:
                break
        else:
            raise TemplateError("cannot find an assistant reply in the rendered conversation; choose `template: NAME`")
        end = start + len(candidate)
        tail = full[end:]
        for stop in self.stop_strings:
            if tail.lstrip(" ").startswith(stop):
                end += tail.index(stop) + len(stop)
                break
        return start, end

    @staticmethod
    def _without_inserted_reasoning(full: str, start: int, end: int, content: str) -> tuple[int, int]:
        """Leave out of the span an empty <think></think> that the template wrote, not the data."""
        inserted = EMPTY_REASONING.match(full, start, end)
        if inserted and "<think>" not in content:
            return inserted.end(), end
        return start, end

    def encode(self, messages: list[Message], tools: list[dict] | None = None,
               train_on_prompt: bool = False) -> EncodedConversation:
        dicts, tools = self.to_template_messages(messages, tools)
        full, spans = self.assistant_spans(dicts, tools)
        self._check_system_kept(messages, full)
        encoding = self._tokenize(full)
        ids, mask, ends = encoding["input_ids"], [], []
        if "offset_mapping" in encoding:
            starts = [start for start, _ in encoding["offset_mapping"]]
        else:  # slow tokenizers: token boundaries from the lengths of prefix tokenisations
            starts = [len(self.tokenizer.decode(ids[:k])) for k in range(len(ids))]
        span_index = 0
        for k, start in enumerate(starts):
            while span_index < len(spans) and start >= spans[span_index][1]:
                ends.append(k)
                span_index += 1
            inside = span_index < len(spans) and start >= spans[span_index][0]
            mask.append(inside or train_on_prompt)
        ends.extend([len(ids)] * (len(spans) - len(ends)))
        return EncodedConversation(list(ids), mask, ends)

    def _check_system_kept(self, messages: list[Message], full: str) -> None:
        """Warn (once) when the template drops a system prompt: Mistral's official templates put it into the last
        user turn only, so a conversation that ends with an assistant reply trains without it."""
        system = messages[0].content.strip() if messages and messages[0].role == "system" else ""
        if system and system not in full and not getattr(self, "_warned_system", False):
            self._warned_system = True
            logger.warning("the %s chat template drops the system prompt of this conversation (%s…): such records "
                           "train without it; put the instruction into the user turn, or choose `template: NAME`",
                           self.name, system[:40])

    def _tokenize(self, text: str) -> dict:
        # The template already writes BOS and friends, so no special tokens are added here.
        if getattr(self.tokenizer, "is_fast", False):
            return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return self.tokenizer(text, add_special_tokens=False)

    # ------------------------------------------------------------------------------------ stopping

    def _end_of_turn(self) -> list[str]:
        """The text that closes an assistant turn in this template (e.g. `<|im_end|>`), found by rendering."""
        marker = "\u2063medgpt\u2063"
        try:
            text = self.render_dicts([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        except Exception:  # noqa: BLE001 - a template that refuses this probe has no detectable end marker
            return [self.tokenizer.eos_token] if self.tokenizer.eos_token else []
        tail = text[text.index(marker) + len(marker):]
        found = [t for t in self.tokenizer.all_special_tokens if t and tail.lstrip().startswith(t)]
        found += [self.tokenizer.eos_token] if self.tokenizer.eos_token else []
        return found

    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: each stop string that is a single token, plus the tokenizer's EOS."""
        ids = []
        for text in self.stop_strings:
            token_ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(token_ids) == 1:
                ids.append(token_ids[0])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(ids))

    # ------------------------------------------------------------------------------------ saving

    def save(self, directory: str | Path) -> None:
        """Write the template next to a model so chat/serve/merge render exactly as training did."""
        self.tokenizer.chat_template = self.jinja
        Path(directory, TEMPLATE_FILE).write_text(self.jinja, encoding="utf-8")
