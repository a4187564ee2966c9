"""Answers to open questions: generated greedily by the generation engine, saved one JSON line per question
(`id`, `question`, `messages`, `answer`, …), and read back (also `medgpt predict` output) to be compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medgpt.data.formats import RecordError, check_prompt, turns_to_messages
from medgpt.data.readers import ReadOptions, raw_items
from medgpt.data.records import DataError, InvalidDataError, Message, Source
from medgpt.rl.prompts import Prompt
from medgpt.serve.engine import GenerationEngine, SamplingParams
from medgpt.serve.predict import tool_runs


def last_user_text(messages: list[Message]) -> str:
    return next(m.content for m in reversed(messages) if m.role == "user")


def generate_answers(engine: GenerationEngine, prompts: list[Prompt], max_new_tokens: int,
                     batch_size: int = 8) -> list[dict]:
    """One row per prompt, in order. Greedy (temperature 0), so two runs of one model give the same answers."""
    from tqdm.auto import tqdm

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    rows = []
    with tqdm(total=len(prompts), desc="open answers", unit="question", leave=False) as bar:
        for group in tool_runs(prompts):
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                completions = engine.generate([p.messages for p in batch], params, batch[0].tools, batch_size)
                rows += [answer_row(p, c.text, c.finish_reason, c.completion_tokens)
                         for p, c in zip(batch, completions)]
                bar.update(len(batch))
    return rows


def answer_row(prompt: Prompt, answer: str, finish_reason: str, completion_tokens: int) -> dict:
    row = {"id": str(prompt.source), "question": last_user_text(prompt.messages),
           "messages": [m.to_openai() for m in prompt.messages], "answer": answer,
           "finish_reason": finish_reason, "completion_tokens": completion_tokens}
    if prompt.tools:
        row["tools"] = prompt.tools
    if prompt.reference is not None:
        row["reference"] = prompt.reference
    return row


def prompt_messages(row: dict) -> list[Message]:
    """The conversation a row answers (its `messages`, or its question as the one user turn)."""
    if row.get("messages"):
        return turns_to_messages(row["messages"], "messages")
    return [Message("user", row["question"])]


# ------------------------------------------------------------------------------------------- reading


def answer_rows(answers: str | Path | list[dict]) -> list[dict]:
    """Rows of an answers file (or rows already in memory), each checked: `question` (or `messages` ending with
    the user turn) and `answer` (or `output`, as `medgpt predict` writes), no question twice.
    InvalidDataError names file:line: field."""
    if isinstance(answers, (str, Path)):
        items = raw_items(Path(answers), ReadOptions())
    else:
        items = ((Source("answers", number, "item"), item) for number, item in enumerate(answers, start=1))
    rows, errors, seen = [], [], {}
    for source, item in items:
        try:
            if isinstance(item, DataError):
                raise RecordError(item.field, item.problem)
            row = _answer_item(item)
            key = row["question"].strip()
            if key in seen:
                raise RecordError("question", f"asked twice (also at {seen[key]}): answers are matched by question")
            seen[key] = source
            rows.append(row)
        except RecordError as err:
            errors.append(DataError(source, err.field, err.problem))
    if errors:
        raise InvalidDataError(errors)
    if not rows:
        name = str(answers) if isinstance(answers, (str, Path)) else "answers"
        raise InvalidDataError([DataError(Source(name, 0), "records", "no answers")])
    return rows


def _answer_item(item: Any) -> dict:
    if not isinstance(item, dict):
        raise RecordError("record", f"expected a JSON object, got {type(item).__name__}")
    row = dict(item)
    if "answer" not in row and "output" in row:
        row["answer"] = row["output"]
    if not isinstance(row.get("answer"), str):
        raise RecordError("answer", "expected the answer as a string (`answer`, or `output` from medgpt predict)")
    if row.get("messages"):
        messages = turns_to_messages(row["messages"], "messages")
        check_prompt(messages, "messages")
        row.setdefault("question", last_user_text(messages))
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise RecordError("question", "expected the question as a non-empty string (or `messages`)")
    return row


def match_by_question(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of rows answering the same question (stripped text), in A's order."""
    by_question = {row["question"].strip(): row for row in b}
    pairs = [(row, by_question[row["question"].strip()]) for row in a if row["question"].strip() in by_question]
    if not pairs:
        raise ValueError("the two sets of answers share no question: compare answers to the same questions")
    return pairs
