"""Batch prediction: answer every prompt of a data file in batches and append one JSON line per prompt, resumably.

Any conversation or question format is read (`medgpt.data.readers`) and turned into a prompt as for RL
rollouts (`medgpt.rl.prompts`): a conversation's last reply, a QA answer, an MCQ key or a preference pair's
chosen reply becomes the `reference` next to the model's `output`; a line of text is asked as a question.
A record's id is its `id` field, else `file:line`; ids already in the output file are skipped, so a run that
was stopped continues where it was.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from medgpt.data.readers import ReadOptions, ReadResult, RecordReader, collect, finish, raw_items, resolve_many
from medgpt.data.records import DataError, InvalidDataError, Message, Record, Source, TextRecord
from medgpt.rl.prompts import PROMPT_KINDS as RECORD_PROMPT_KINDS
from medgpt.rl.prompts import record_prompt
from medgpt.serve.engine import Completion, GenerationEngine, SamplingParams

logger = logging.getLogger(__name__)
P = TypeVar("P")  # a prompt with `messages` and `tools`: this module's, or `medgpt.rl.prompts.Prompt`

# Record kinds a prompt can be taken from (text: a .txt line or `text` field is asked as a question).
PROMPT_KINDS = (*RECORD_PROMPT_KINDS, "text")


class PredictionFileError(ValueError):
    """The output file holds something other than prediction lines, so resuming cannot trust it."""


@dataclass
class Prompt:
    id: str
    source: str
    messages: list[Message]
    tools: list[dict] | None = None
    reference: str | None = None


# ------------------------------------------------------------------------------------------- reading


def read_prompts(specs: str | Iterable[str], options: ReadOptions = ReadOptions(),
                 system: str | None = None) -> list[Prompt]:
    """Every record of the files as a prompt with its id; `system` is added where a prompt has none."""
    ids: dict[Source, str] = {}
    result = ReadResult()
    for path in resolve_many(specs):
        items = _remember_ids(raw_items(path, options), ids)
        collect(RecordReader(items, options, text_file=path.suffix.lower() == ".txt"), str(path), PROMPT_KINDS, result)
    finish(result, skip_invalid=False)
    prompts, seen = [], {}
    for record in result.records:
        key = ids.get(record.source, str(record.source))
        if key in seen:
            raise InvalidDataError([DataError(record.source, "id", f"duplicate id {key!r} (also at {seen[key]})")])
        seen[key] = record.source
        messages, reference = prompt_of(record)
        if system and messages[0].role != "system":
            messages = [Message("system", system), *messages]
        prompts.append(Prompt(key, str(record.source), messages, getattr(record, "tools", None), reference))
    return prompts


def _remember_ids(items: Iterator[tuple[Source, Any]], ids: dict[Source, str]) -> Iterator[tuple[Source, Any]]:
    for source, item in items:
        if isinstance(item, dict) and item.get("id") not in (None, ""):
            ids[source] = str(item["id"])
        yield source, item


def prompt_of(record: Record) -> tuple[list[Message], str | None]:
    """The messages to answer and the reference answer, if the record has one (text: a bare question)."""
    if isinstance(record, TextRecord):
        return [Message("user", record.text)], None
    prompt = record_prompt(record)
    return prompt.messages, prompt.reference


# ------------------------------------------------------------------------------------------- resuming


def written_ids(output: Path) -> set[str]:
    """Ids already in the output; a last line cut off by a crash is removed so the run can append cleanly."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] and not _is_json(lines[-1]):  # torn final write
        logger.warning("%s: dropping an incomplete last line left by an interrupted run", output)
        with output.open("r+b") as handle:
            handle.truncate(len(data) - len(lines[-1]))
        lines = lines[:-1]
    done = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = json.loads(line) if _is_json(line) else None
        if not isinstance(row, dict) or "id" not in row:
            raise PredictionFileError(f"{output}:{number}: not a prediction line (JSON with an `id`); "
                                      "choose another --output, or remove the file to start over")
        done.add(str(row["id"]))
    return done


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------- predicting


@dataclass
class PredictSummary:
    written: int
    skipped: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def row_of(prompt: Prompt, completion: Completion) -> dict:
    row = {"id": prompt.id, "source": prompt.source, "messages": [m.to_openai() for m in prompt.messages]}
    if prompt.tools:
        row["tools"] = prompt.tools
    if prompt.reference is not None:
        row["reference"] = prompt.reference
    row.update(output=completion.text, finish_reason=completion.finish_reason,
               prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
    return row


def predict(engine: GenerationEngine, prompts: list[Prompt], output: str | Path,
            params: SamplingParams | None = None, batch_size: int = 8, progress: bool = True) -> PredictSummary:
    """Answer the prompts not yet in `output`, a batch at a time; each batch is on disk before the next starts."""
    from tqdm.auto import tqdm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = written_ids(output)
    todo = [p for p in prompts if p.id not in done]
    if done:
        logger.info("%s: %d of %d prompts already answered; continuing with %d", output,
                    len(prompts) - len(todo), len(prompts), len(todo))
    summary = PredictSummary(0, len(prompts) - len(todo), 0, 0, 0.0)
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=summary.skipped, unit="prompt", desc="predict", disable=not progress)
    with output.open("a", encoding="utf-8") as handle, bar:
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin:begin + batch_size]
            rows = [row_of(p, c) for p, c in zip(batch, _answer(engine, batch, params, batch_size))]
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
            summary.written += len(rows)
            summary.prompt_tokens += sum(r["prompt_tokens"] for r in rows)
            summary.completion_tokens += sum(r["completion_tokens"] for r in rows)
            bar.update(len(rows))
    summary.seconds = time.perf_counter() - start
    return summary


def _answer(engine: GenerationEngine, batch: list[Prompt], params: SamplingParams | None,
            batch_size: int) -> list[Completion]:
    completions = []
    for run in tool_runs(batch):
        completions += engine.generate([p.messages for p in run], params, run[0].tools, batch_size)
    return completions


def tool_runs(prompts: Iterable[P]) -> Iterator[list[P]]:
    """The prompts in order, cut into runs that share one tool list: one `GenerationEngine.generate` call takes
    one tool list, so each run goes to the engine together."""
    for _, run in itertools.groupby(prompts, key=lambda p: json.dumps(p.tools, sort_keys=True)):
        yield list(run)
