"""Multiple-choice accuracy by option log-likelihood (MedQA / CMExam / MedMCQA-style question, options, answer).

The question and its lettered options are the user turn (rendered as RL prompts render MCQs), and every option
is a candidate assistant reply, rendered by the model's chat template through its end-of-turn token. The model
picks the candidate with the highest log-likelihood per reply token (the end-of-turn token included):
normalising by length keeps long options from losing just for being long. Nothing is generated, so the score is
deterministic and cheap, and it works for base and chat models alike.

The reply is the option's text by default (`reply="text"`); `reply="letter"` scores `"B. option text"`. The
letter carries a position bias that small models cannot overcome: the embedded SmolLM2-135M put the last option
first on 70 of the 117 demo questions with letters (accuracy 0.29, chance 0.25) and chose evenly without them
(accuracy 0.42). Larger models that have learnt to answer with letters may do better with `letter`.

Few-shot: k other questions of the same file, solved the same way, come first as earlier turns; the item itself
(and any record with the same question text) is never one of its own examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from medgpt.config import ConfigError
from medgpt.data.records import MCQRecord, Message
from medgpt.data.templates import ChatFormat
from medgpt.evaluation.likelihood import Continuation, continuation_logprobs, shared_prompt_logprobs
from medgpt.rl.prompts import mcq_question


REPLIES = ("text", "letter")


@dataclass
class MCQItem:
    record: MCQRecord
    shots: list[MCQRecord]  # solved examples shown first
    reply: str = "text"  # how an option is said: its text, or "B. its text"


def option_reply(record: MCQRecord, key: str, reply: str = "text") -> str:
    return record.options[key] if reply == "text" else f"{key}. {record.options[key]}"


def few_shot_examples(records: list[MCQRecord], index: int, k: int, seed: int = 0) -> list[MCQRecord]:
    """k examples for item `index`, drawn from the other questions of the file: fixed per item and seed, so
    every model is evaluated on the same prompts."""
    if k <= 0:
        return []
    question = records[index].question.strip()
    pool = [r for i, r in enumerate(records) if i != index and r.question.strip() != question]
    if len(pool) < k:
        raise ConfigError(f"few_shot={k} needs at least {k} other questions in the file; it has {len(pool)}")
    return random.Random(f"mcq-shots-{seed}-{index}").sample(pool, k)


def conversation(item: MCQItem, key: str) -> list[Message]:
    """The examples as solved turns, then the question with option `key` as the reply to score."""
    messages = []
    for shot in item.shots:
        messages += [Message("user", mcq_question(shot)),
                     Message("assistant", option_reply(shot, shot.answer, item.reply))]
    return [*messages, Message("user", mcq_question(item.record)),
            Message("assistant", option_reply(item.record, key, item.reply))]


def candidate(chat_format: ChatFormat, item: MCQItem, key: str, max_length: int) -> tuple[Continuation, bool]:
    """The rendered conversation with only its last reply scored; too long -> the oldest tokens go (truncated)."""
    encoded = chat_format.encode(conversation(item, key))
    end = encoded.turn_ends[-1]
    previous = encoded.turn_ends[-2] if len(encoded.turn_ends) > 1 else 0
    start = next(i for i in range(previous, end) if encoded.assistant_mask[i])
    ids = encoded.input_ids[:end]
    cut = max(0, len(ids) - max_length)
    return Continuation(ids[cut:], max(1, start - cut)), cut > 0


def option_logprobs(model, candidates: list[Continuation], sizes: list[int], pad_id: int, batch_size: int) -> list:
    """Scores of each question's options: its prompt runs once when the options share it (the usual case;
    a truncated prompt may differ per option, then each option is scored whole)."""
    from tqdm.auto import tqdm

    scores, begin, whole = [], 0, []
    for size in tqdm(sizes, desc="multiple choice", unit="question", leave=False):
        group = candidates[begin:begin + size]
        begin += size
        prompts = {tuple(c.ids[:c.start]) for c in group}
        if len(prompts) == 1:
            scores += shared_prompt_logprobs(model, list(prompts.pop()), [c.ids[c.start:] for c in group], pad_id)
        else:
            whole.append((len(scores), group))
            scores += [None] * size
    for at, group in whole:
        scores[at:at + len(group)] = continuation_logprobs(model, group, pad_id, batch_size, desc="multiple choice")
    return scores


def mcq_accuracy(model, chat_format: ChatFormat, records: list[MCQRecord], evaluate: int | None = None,
                 few_shot: int = 0, max_length: int = 1024, batch_size: int = 8,
                 seed: int = 0, reply: str = "text") -> tuple[dict, list[dict]]:
    """(metrics, one row per question). The first `evaluate` records are asked; examples may come from all."""
    items = [MCQItem(r, few_shot_examples(records, i, few_shot, seed), reply)
             for i, r in enumerate(records[:evaluate])]
    built = [candidate(chat_format, item, key, max_length) for item in items for key in item.record.options]
    scores = option_logprobs(model, [c for c, _ in built], [len(item.record.options) for item in items],
                             chat_format.tokenizer.pad_token_id, batch_size)
    in_order = iter(scores)  # candidates were listed item by item, option by option
    rows = []
    for item in items:
        option_scores = {key: next(in_order).mean for key in item.record.options}
        predicted = max(option_scores, key=option_scores.get)
        rows.append({"source": str(item.record.source), "question": item.record.question,
                     "answer": item.record.answer, "predicted": predicted,
                     "correct": predicted == item.record.answer, "scores": option_scores})
    metrics = {
        "mcq_accuracy": sum(r["correct"] for r in rows) / len(rows),
        "mcq_chance": sum(1 / len(item.record.options) for item in items) / len(items),
        "mcq_n": len(rows),
        "mcq_few_shot": few_shot,
        "mcq_truncated": sum(truncated for _, truncated in built),
    }
    return metrics, rows
