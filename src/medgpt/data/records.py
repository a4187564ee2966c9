"""Canonical record types that every file format is read into, and the error type that names file:line: field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

# Message roles after reading: ShareGPT's human/gpt/function_call/observation become user/assistant
# (with tool_calls)/tool, as in OpenAI's format.
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Source:
    """Where a record came from: a file and 1-based line (or a hub dataset and row index)."""

    path: str
    line: int  # 0 = the file as a whole
    unit: str = "line"  # "line", "item" (JSON array element) or "row" (hub dataset)

    def __str__(self) -> str:
        if self.line == 0:
            return self.path
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}:{self.unit} {self.line}"


@dataclass
class DataError:
    """One problem with one record, printed as `file:line: field: problem`."""

    source: Source
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.problem}"


class InvalidDataError(ValueError):
    """Raised when data has errors and skip_invalid_records is off; lists the first errors."""

    def __init__(self, errors: list[DataError], total: int | None = None, limit: int = 20):
        self.errors = errors
        total = total if total is not None else len(errors)
        shown = "\n".join(f"  {e}" for e in errors[:limit])
        more = f"\n  … and {total - limit} more" if total > limit else ""
        super().__init__(
            f"{total} invalid record(s):\n{shown}{more}\n"
            "Fix the data (`medgpt data check PATH` lists every problem), or set skip_invalid_records: true "
            "to drop them."
        )


@dataclass
class Message:
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None  # [{"name": str, "arguments": dict | str}]

    def to_openai(self) -> dict[str, Any]:
        """The message as transformers chat templates expect it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": call} for call in self.tool_calls]
        return out


@dataclass
class TextRecord:
    text: str
    source: Source


@dataclass
class Conversation:
    messages: list[Message]
    source: Source
    tools: list[dict[str, Any]] | None = None


@dataclass
class PreferencePair:
    prompt: list[Message]  # ends with a user (or tool) turn
    chosen: list[Message]  # assistant turn(s)
    rejected: list[Message]
    source: Source
    tools: list[dict[str, Any]] | None = None


@dataclass
class KTORecord:
    prompt: list[Message]
    completion: list[Message]
    label: bool  # True = desirable (thumbs up)
    source: Source
    tools: list[dict[str, Any]] | None = None


@dataclass
class QARecord:
    question: str
    answer: str | None
    source: Source
    system: str | None = None


@dataclass
class MCQRecord:
    question: str
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text, in order
    answer: str = ""  # a letter key of options
    source: Source | None = None


Record = Union[TextRecord, Conversation, PreferencePair, KTORecord, QARecord, MCQRecord]

# What each record kind is called in messages and which formats produce it.
KINDS = {
    "text": TextRecord,
    "conversation": Conversation,
    "preference": PreferencePair,
    "kto": KTORecord,
    "qa": QARecord,
    "mcq": MCQRecord,
}
