"""Prompts for RL rollouts from any conversation, question/answer, multiple-choice or preference file: the
messages before the last assistant turn, so SFT and RM data can be reused as they are.

| record       | prompt                                   | reference (for rule rewards)         |
|--------------|------------------------------------------|--------------------------------------|
| conversation | every turn before the last assistant one | that last assistant reply            |
| qa           | [system] + the question as a user turn   | the answer (None when absent)        |
| mcq          | the question with its lettered options   | the answer's letter (kind "choice")  |
| preference   | the pair's prompt                        | the chosen reply                     |
| kto          | the prompt                               | the completion if desirable, or None |

Reading goes through `medgpt.data.readers`, so a bad record fails with its file:line: field.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Iterable

from medgpt.data.readers import ReadOptions, read_records
from medgpt.data.records import (
    Conversation,
    KTORecord,
    MCQRecord,
    Message,
    PreferencePair,
    QARecord,
    Record,
    Source,
)

PROMPT_KINDS = ("conversation", "qa", "mcq", "preference", "kto")


@dataclass
class Prompt:
    """A conversation to answer (ends with a user or tool turn) and, when the data has one, a reference."""

    messages: list[Message]
    source: Source
    tools: list[dict[str, Any]] | None = None
    reference: str | None = None
    reference_kind: str = "text"  # "text", "choice" (an MCQ option letter) or "none" (no reference)

    def __post_init__(self):
        if self.reference is None:
            self.reference_kind = "none"

    def to_openai(self) -> list[dict[str, Any]]:
        """The messages as chat-template dicts (TRL's conversational prompt format)."""
        return [m.to_openai() for m in self.messages]


def mcq_question(record: MCQRecord) -> str:
    """The question followed by one `A. option` line per option."""
    options = "\n".join(f"{key}. {text}" for key, text in record.options.items())
    return f"{record.question}\n{options}"


def _reply_text(messages: list[Message]) -> str:
    return "\n".join(m.content for m in messages if m.role == "assistant" and m.content.strip())


def record_prompt(record: Record) -> Prompt:
    """One record -> its prompt; readers have already checked that each prompt ends with a user/tool turn."""
    if isinstance(record, Conversation):
        last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
        return Prompt(record.messages[:last], record.source, record.tools, record.messages[last].content)
    if isinstance(record, QARecord):
        system = [Message("system", record.system)] if record.system else []
        return Prompt([*system, Message("user", record.question)], record.source, None, record.answer)
    if isinstance(record, MCQRecord):
        return Prompt([Message("user", mcq_question(record))], record.source, None, record.answer, "choice")
    if isinstance(record, PreferencePair):
        return Prompt(record.prompt, record.source, record.tools, _reply_text(record.chosen))
    if isinstance(record, KTORecord):
        return Prompt(record.prompt, record.source, record.tools,
                      _reply_text(record.completion) if record.label else None)
    raise TypeError(f"{getattr(record, 'source', '?')}: {type(record).__name__} records hold no prompt "
                    f"(use {', '.join(PROMPT_KINDS)} data)")


def records_to_prompts(records: Iterable[Record]) -> list[Prompt]:
    return [record_prompt(r) for r in records]


def read_prompts(specs: str | Iterable[str], options: ReadOptions = ReadOptions(), skip_invalid: bool = False,
                 limit: int | None = None) -> list[Prompt]:
    """Prompts from files, folders or globs; InvalidDataError (file:line: field) on bad records."""
    return records_to_prompts(read_records(specs, PROMPT_KINDS, options, skip_invalid, limit).records)


def load_prompts(data_args, seed: int = 42) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts of a stage from its DataArguments (files and/or a hub dataset, split and
    capped as every stage does), validated before any model loads."""
    from medgpt.data.loading import load_stage_data

    data = load_stage_data(data_args, PROMPT_KINDS, seed)
    return records_to_prompts(data.train), records_to_prompts(data.eval)


def prompt_batches(prompts: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    """The prompts of one pass in a seeded order (epoch e reshuffles with seed + e), as full batches; the
    remainder of a pass is dropped so every step sees `batch_size` prompts."""
    order = list(range(len(prompts)))
    random.Random(seed + epoch).shuffle(order)
    return [[prompts[i] for i in order[s:s + batch_size]] for s in range(0, len(order) - batch_size + 1, batch_size)]


def fit_prompt(chat, prompt: Prompt, limit: int) -> tuple[list[int], str | None]:
    """The prompt's ids in at most `limit` tokens, and how it was cut (None, "turns" or "question").

    First the oldest turns go (a system turn stays, and the rest still starts with a user turn); if the last
    question alone is too long, its text loses its beginning while the template's header (system turn, role
    tags, tool definitions) and the assistant header stay: cutting raw ids from the left would drop the header
    and leave a prompt the model never saw in training.
    """
    messages, tools = prompt.messages, prompt.tools
    ids = chat.prompt_ids(messages, tools)
    if len(ids) <= limit:
        return ids, None
    system = messages[:1] if messages[0].role == "system" else []
    rest = messages[len(system):]
    while len(rest) > 1:
        rest = rest[1:]
        while len(rest) > 1 and rest[0].role != "user":
            rest = rest[1:]
        ids = chat.prompt_ids(system + rest, tools)
        if len(ids) <= limit:
            return ids, "turns"
    marker = "\u2063medgpt-question\u2063"
    last = rest[-1]
    text = chat.render([*system, *rest[:-1], Message(last.role, marker)], tools, add_generation_prompt=True)
    before, _, after = text.partition(marker)
    encode = functools.partial(chat.tokenizer.encode, add_special_tokens=False)
    head, tail, question = encode(before), encode(after), encode(last.content)
    budget = limit - len(head) - len(tail)
    if budget <= 0:
        raise ValueError(f"{prompt.source}: max_prompt_length {limit} leaves no room for the question after the "
                         f"template's header and system turn ({len(head) + len(tail)} tokens): raise it")
    return head + question[-budget:] + tail, "question"
