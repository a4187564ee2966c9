"""`medgpt data check`: per file the detected format, record count, every error, and token-length statistics."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from medgpt.data.readers import ReadOptions, ReadResult, collect, file_reader, resolve_files
from medgpt.data.records import Conversation, DataError, KTORecord, MCQRecord, PreferencePair, QARecord, Source, TextRecord

# Record kinds each stage reads (prompt-only stages accept anything a prompt can be taken from).
STAGE_KINDS = {
    "pt": ("text",),
    "sft": ("conversation",),
    "rm": ("preference",),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("kto", "preference"),
    # prompt stages take the part before the last assistant turn of anything (medgpt.rl.prompts.PROMPT_KINDS)
    "ppo": ("conversation", "qa", "mcq", "preference", "kto"),
    "grpo": ("conversation", "qa", "mcq", "preference", "kto"),
    "rloo": ("conversation", "qa", "mcq", "preference", "kto"),
    "distill": ("conversation", "qa", "mcq", "preference", "kto"),
    "eval": ("mcq", "qa", "text", "preference"),
}


@dataclass
class FileCheck:
    path: str
    format: str
    records: int
    errors: list[DataError] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def check_paths(paths: list[str], stage: str | None = None, options: ReadOptions = ReadOptions(),
                chat_format=None) -> list[FileCheck]:
    kinds = STAGE_KINDS[stage] if stage else ()
    checks = []
    files: list = []
    for spec in paths:
        try:
            files += [p for p in resolve_files(spec) if p not in files]
        except FileNotFoundError as err:
            checks.append(FileCheck(spec, "-", 0, [DataError(Source(spec, 0), "path", str(err).split(": ", 1)[-1])]))
    for path in files:
        result = ReadResult()
        collect(file_reader(path, options), str(path), kinds, result)
        lengths = [token_length(r, chat_format) for r in result.records] if chat_format else []
        checks.append(FileCheck(str(path), result.formats[str(path)], len(result.records), result.errors, lengths))
    return checks


def token_length(record, chat_format) -> int:
    """Tokens the record takes as training input (longest side for preference pairs)."""
    encode = chat_format.tokenizer.encode
    if isinstance(record, TextRecord):
        return len(encode(record.text, add_special_tokens=False)) + 1
    if isinstance(record, Conversation):
        return len(encode(chat_format.render(record.messages, record.tools), add_special_tokens=False))
    if isinstance(record, PreferencePair):
        return max(len(encode(chat_format.render(record.prompt + side, record.tools), add_special_tokens=False))
                   for side in (record.chosen, record.rejected))
    if isinstance(record, KTORecord):
        return len(encode(chat_format.render(record.prompt + record.completion, record.tools), add_special_tokens=False))
    if isinstance(record, QARecord):
        return len(encode(record.question + " " + (record.answer or ""), add_special_tokens=False))
    if isinstance(record, MCQRecord):
        return len(encode(record.question + " " + " ".join(record.options.values()), add_special_tokens=False))
    raise TypeError(type(record))


def format_report(checks: list[FileCheck], max_errors: int = 50) -> str:
    lines = []
    for check in checks:
        status = "ok" if not check.errors else f"{len(check.errors)} error(s)"
        lines.append(f"{check.path}: {check.format}, {check.records} valid record(s), {status}")
        if check.lengths:
            lengths = sorted(check.lengths)
            p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
            lines.append(f"  tokens: min {lengths[0]}, median {int(statistics.median(lengths))}, p95 {p95}, "
                         f"max {lengths[-1]}, total {sum(lengths)}")
        for error in check.errors[:max_errors]:
            lines.append(f"  {error}")
        if len(check.errors) > max_errors:
            lines.append(f"  … and {len(check.errors) - max_errors} more")
    bad = sum(len(c.errors) for c in checks)
    lines.append(f"{len(checks)} file(s), {sum(c.records for c in checks)} valid record(s), {bad} error(s)")
    return "\n".join(lines)
