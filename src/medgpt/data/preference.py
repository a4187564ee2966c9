"""Preference pairs -> token ids for RM / DPO / ORPO / KTO, rendered with the policy's chat template and
truncated sensibly: the prompt loses its oldest tokens first, replies lose their tail; nothing is dropped
silently (counts are kept).

A feature holds `prompt_ids`, `chosen_ids`, `rejected_ids` (TRL's tokenised preference format): a reply's
ids run from the end of the prompt's generation header to its end-of-turn token included.
"""

from __future__ import annotations

from medgpt.data.processors import TruncationStats
from medgpt.data.records import KTORecord, Message, PreferencePair
from medgpt.data.templates import ChatFormat


class PairStats(TruncationStats):
    DESCRIPTIONS = {
        "kept": "kept whole",
        "prompt_truncated": "with the prompt cut from the left",
        "reply_truncated": "with a reply cut at the end",
        "dropped": "dropped",
    }


def reply_ids(chat: ChatFormat, prompt: list[Message], reply: list[Message], tools, prompt_ids: list[int]) -> list[int]:
    """Token ids of `reply` as it follows `prompt` in the full render, through its last end-of-turn token."""
    encoded = chat.encode(prompt + reply, tools)
    full, end = encoded.input_ids, encoded.turn_ends[-1] if encoded.turn_ends else len(encoded.input_ids)
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    if shared < len(prompt_ids):
        raise ValueError("the chat template renders the prompt differently alone than before a reply; "
                         "choose a prefix-stable template with `template: NAME`")
    return full[shared:end]


def fit(prompt: list[int], replies: list[list[int]], max_length: int, stats: PairStats):
    """Cut the prompt from the left (keeping at least half the budget for it) and then replies from the right."""
    longest = max(len(r) for r in replies)
    status = "kept"
    if len(prompt) + longest > max_length:
        keep_prompt = max(max_length - longest, min(len(prompt), max_length // 2))
        if keep_prompt < len(prompt):
            prompt, status = prompt[len(prompt) - keep_prompt:], "prompt_truncated"
        budget = max_length - len(prompt)
        if longest > budget:
            replies, status = [r[:budget] for r in replies], "reply_truncated"
    if not prompt or any(len(r) == 0 for r in replies):
        stats.counts["dropped"] += 1
        return None
    stats.counts[status] += 1
    return prompt, replies


def encode_pair(chat: ChatFormat, pair: PreferencePair, max_length: int, stats: PairStats | None = None) -> dict | None:
    stats = stats if stats is not None else PairStats()
    prompt_ids = chat.prompt_ids(pair.prompt, pair.tools)
    chosen = reply_ids(chat, pair.prompt, pair.chosen, pair.tools, prompt_ids)
    rejected = reply_ids(chat, pair.prompt, pair.rejected, pair.tools, prompt_ids)
    fitted = fit(prompt_ids, [chosen, rejected], max_length, stats)
    if fitted is None:
        return None
    prompt_ids, (chosen, rejected) = fitted
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}


def encode_kto(chat: ChatFormat, record: KTORecord, max_length: int, stats: PairStats | None = None) -> dict | None:
    stats = stats if stats is not None else PairStats()
    prompt_ids = chat.prompt_ids(record.prompt, record.tools)
    completion = reply_ids(chat, record.prompt, record.completion, record.tools, prompt_ids)
    fitted = fit(prompt_ids, [completion], max_length, stats)
    if fitted is None:
        return None
    prompt_ids, (completion,) = fitted
    return {"prompt_ids": prompt_ids, "completion_ids": completion, "label": record.label}


def pairs_to_kto(pairs: list[PreferencePair]) -> list[KTORecord]:
    """Each pair becomes a desirable (chosen) and an undesirable (rejected) example, for KTO."""
    out = []
    for pair in pairs:
        out.append(KTORecord(pair.prompt, pair.chosen, True, pair.source, pair.tools))
        out.append(KTORecord(pair.prompt, pair.rejected, False, pair.source, pair.tools))
    return out
