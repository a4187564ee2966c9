"""One generated row: its sampling options, its text assembled token by token and cut at the first stop, the
completion it ends as, and the bookkeeping of rows a batcher runs. Every path of the engine (continuous
batching, one row at a time, offline batches) turns tokens into text here, so a stop string ends an answer at
the same token, and is counted the same, everywhere.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # extra stop strings, besides the template's end-of-turn


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens generated up to the end of the answer: through the one completing a stop
    #                         string, without the end-of-turn token
    finish_reason: str  # "stop" (end-of-turn or stop string) | "length"


class IncrementalDecoder:
    """Token ids -> text pieces, one token at a time, each decoded with the token before it as context.

    Decoding a lone token is wrong for SentencePiece (its leading space) and for byte-level tokens that hold half
    a character; decoding everything again each step costs O(length). Decoding the window since the last piece,
    with one earlier token for context, is exact and constant per step (vLLM detokenises the same way).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """What is left at the end, an incomplete character included."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""  # a character is still incomplete (or the token decodes to nothing yet)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class AnswerText:
    """The text of one answer as its tokens arrive: what may be shown so far, and why and where it ends.

    `add` returns the new text that is safe to show: the tail that could be the beginning of a stop string is
    held back until it either completes the stop (the answer ends before it) or cannot (it is shown).
    """

    def __init__(self, tokenizer, stop_ids, stops, max_new_tokens: int):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_ids = set(stop_ids)
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.max_new_tokens = max_new_tokens
        self.text = ""  # decoded so far (cut at a stop once one is found)
        self.shown = 0  # characters of `text` already returned by `add`
        self.tokens = 0
        self.finish_reason: str | None = None  # set once the answer has ended

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.stop_ids:  # end-of-turn: not part of the answer, not counted
            return self._end("stop", self.decoder.flush())
        self.tokens += 1
        self.text += self.decoder.add(token)
        if self._cut_at_stop():
            return self._end("stop")
        if self.tokens >= self.max_new_tokens:
            return self._end("length", self.decoder.flush())
        upto = len(self.text) - self._held_back()
        piece, self.shown = self.text[self.shown:upto], max(self.shown, upto)
        return piece

    def end(self, reason: str = "length") -> str:
        """End the answer from outside (the generator stopped); returns the text still held back."""
        return "" if self.done else self._end(reason, self.decoder.flush())

    def _end(self, reason: str, rest: str = "") -> str:
        self.text += rest
        if rest and self._cut_at_stop():
            reason = "stop"
        self.finish_reason = reason
        piece, self.shown = self.text[self.shown:], len(self.text)
        return piece

    def _cut_at_stop(self) -> bool:
        start = max(0, self.shown - self.longest)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if not found:
            return False
        self.text = self.text[: max(min(found), self.shown)]
        return True

    def _held_back(self) -> int:
        """Length of the longest unshown tail that is the start of some stop string."""
        tail = self.text[self.shown:]
        for keep in range(min(self.longest - 1, len(tail)), 0, -1):
            if any(s.startswith(tail[-keep:]) for s in self.stops):
                return keep
        return 0

    def completion(self, prompt_tokens: int) -> Completion:
        return Completion(self.text, prompt_tokens, self.tokens, self.finish_reason or "length")


class RowListener(Protocol):
    """What a row reports, from the generation thread: keep these quick, they run between two steps."""

    def piece(self, text: str) -> None: ...

    def done(self, completion: Completion) -> None: ...

    def failed(self, error: BaseException) -> None: ...


@dataclass(eq=False)
class Row:
    key: int
    prompt: list[int]
    listener: RowListener
    answer: AnswerText
    sampling: "RowSampling"  # medgpt.serve.sampling
    seen: int = 0  # generated tokens already given to `answer`
    ended: bool = False  # done, failed or cancelled: reported once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def end(self) -> bool:
        """Mark the row ended; False when something else ended it first."""
        with self.lock:
            if self.ended:
                return False
            self.ended = True
            return True

    def completion(self) -> Completion:
        return self.answer.completion(len(self.prompt))

    def feed(self, tokens: list[int]) -> None:
        """Give the row its new tokens; the pieces of text they make go to the listener."""
        for token in tokens:
            self.seen += 1
            piece = self.answer.add(token)
            if piece:
                self.listener.piece(piece)
            if self.answer.done:
                return


class RowHandle:
    """The submitter's hold on a row: `cancel` stops it at the next step and returns what it had so far."""

    def __init__(self, batcher, row: Row):
        self.batcher, self.row = batcher, row

    def cancel(self) -> Completion | None:
        if not self.row.end():
            return None  # already over
        self.batcher.forget(self.row)
        completion = self.row.completion()
        completion.finish_reason = "cancelled"
        return completion


class RowBatcher:
    """What both batchers share: row bookkeeping, limits, and the end of a row."""

    def __init__(self, tokenizer, stop_ids: list[int], stop_strings: tuple[str, ...], max_rows: int):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, list(stop_ids), tuple(stop_strings)
        self.max_rows = max_rows
        self.capacity: int | None = None  # most tokens (prompt + answer) one row may hold; None: no limit here
        self.rows: dict[int, Row] = {}
        self.keys = itertools.count()

    @property
    def active(self) -> int:
        return len(self.rows)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if self.capacity is not None and prompt_tokens + max_new_tokens > self.capacity:
            raise ValueError(f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens do not fit in the KV "
                             f"cache of {self.capacity} tokens (raise --kv-cache-tokens)")

    def new_row(self, prompt: list[int], params: SamplingParams, listener: RowListener) -> Row:
        self.check_fits(len(prompt), params.max_new_tokens)
        answer = AnswerText(self.tokenizer, self.stop_ids, (*self.stop_strings, *params.stop), params.max_new_tokens)
        from medgpt.serve.sampling import RowSampling  # that module imports this one

        row = Row(next(self.keys), list(prompt), listener, answer, RowSampling(params))
        self.rows[row.key] = row
        return row

    def forget(self, row: Row) -> None:
        self.rows.pop(row.key, None)

    def finish(self, row: Row) -> None:
        if row.end():
            self.forget(row)
            row.listener.done(row.completion())

    def fail(self, row: Row, error: BaseException) -> None:
        if row.end():
            self.forget(row)
            row.listener.failed(error)
