"""Records -> training features for causal-LM stages: PT blocks packed by document, SFT samples with
assistant-only labels and turn-aware truncation.

A feature is `{"input_ids", "labels", "position_ids"}` (lists of ints). `position_ids` restart at 0 where a
document starts, which is how the attention kernels (SDPA block-diagonal mask, flash-attention varlen) keep
packed documents from attending to each other; a label of -100 is not trained on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Iterator

from medgpt.data.records import Conversation, TextRecord
from medgpt.data.templates import ChatFormat

IGNORE = -100


# ------------------------------------------------------------------------------------------------ PT


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer itself puts before a text (Llama, Mistral, Gemma), or None where it puts none
    (Qwen, SmolLM2: their bos_token, if any, is not added to plain text)."""
    if tokenizer.bos_token_id is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None


def document_ids(records: Iterable[TextRecord], tokenizer, bos: int | None = None) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, so the model learns where documents end, and preceded by
    `bos` when given (`leading_bos`: as MedicalGPT's `tokenizer(text)` does for tokenizers that add one)."""
    eos = tokenizer.eos_token_id
    prefix = [] if bos is None else [bos]
    for record in records:
        ids = tokenizer(record.text, add_special_tokens=False)["input_ids"]
        if ids:
            yield prefix + ids + [eos]


def pack_documents(documents: Iterable[list[int]], block_size: int) -> Iterator[dict]:
    """Concatenate documents into blocks of exactly `block_size` tokens (the last block may be shorter).

    A document that crosses a block boundary continues in the next block, where its position ids restart at
    0 (a fresh context). Nothing is dropped: the short final block is kept, and padding-free batches do not
    need equal lengths.
    """
    ids: list[int] = []
    positions: list[int] = []
    for doc in documents:
        start = 0
        while start < len(doc):
            take = min(block_size - len(ids), len(doc) - start)
            ids += doc[start:start + take]
            positions += range(take)
            start += take
            if len(ids) == block_size:
                yield _block(ids, positions)
                ids, positions = [], []
    if ids:
        yield _block(ids, positions)


def _block(ids: list[int], positions: list[int]) -> dict:
    # A token that starts a document is not predicted from the previous document.
    labels = [IGNORE if p == 0 else t for t, p in zip(ids, positions)]
    return {"input_ids": list(ids), "labels": labels, "position_ids": list(positions)}


# ------------------------------------------------------------------------------------------------ SFT


@dataclass
class TruncationStats:
    """What truncation did to the data, logged and saved so nothing is lost silently."""

    counts: Counter = field(default_factory=Counter)
    DESCRIPTIONS: ClassVar[dict[str, str]] = {}

    def line(self) -> str:
        return ", ".join(f"{self.counts[key]} {text}" for key, text in self.DESCRIPTIONS.items())


class SFTStats(TruncationStats):
    DESCRIPTIONS = {
        "kept": "kept whole",
        "truncated_at_turn": "cut after a complete reply",
        "truncated_in_reply": "cut inside their first reply",
        "dropped": "dropped (prompt alone longer than max_length: nothing left to learn)",
    }


def encode_sft(chat: ChatFormat, record: Conversation, max_length: int, train_on_prompt: bool = False,
               stats: SFTStats | None = None) -> dict | None:
    """One conversation -> feature with labels on assistant replies only (or everything with train_on_prompt).

    Truncation keeps whole turns: the sample ends after the last assistant reply (with its end-of-turn token)
    that fits. When even the first reply does not fit, it is cut at max_length and no end-of-turn is invented,
    so the model is never taught to stop mid-sentence. A record whose prompt alone fills max_length is dropped.
    """
    stats = stats if stats is not None else SFTStats()
    encoded = chat.encode(record.messages, record.tools, train_on_prompt)
    ids, mask = encoded.input_ids, encoded.assistant_mask
    status = "kept"
    if len(ids) > max_length:
        fitting = [end for end in encoded.turn_ends if end <= max_length]
        cut, status = (fitting[-1], "truncated_at_turn") if fitting else (max_length, "truncated_in_reply")
        ids, mask = ids[:cut], mask[:cut]
        if status == "truncated_in_reply" and not any(mask[1:]):
            stats.counts["dropped"] += 1
            return None
    stats.counts[status] += 1
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    labels[0] = IGNORE  # the first token has nothing before it to be predicted from
    return {"input_ids": list(ids), "labels": labels, "position_ids": list(range(len(ids)))}
