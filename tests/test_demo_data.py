"""The demo data: valid, big enough for each stage, and evaluation sets held out from every training file."""

from __future__ import annotations

import pytest

from conftest import DEMO
from medgpt.data.readers import read_records
from medgpt.data.records import Conversation

TRAINING_FILES = ["pretrain", "sft", "preference", "grpo"]


@pytest.mark.parametrize("folder, kind, minimum", [
    ("pretrain", "text", 60),
    ("sft", "conversation", 100),
    ("preference", "preference", 60),
    ("grpo", "qa", 40),
])
def test_demo_training_data_is_valid_and_large_enough(folder, kind, minimum):
    result = read_records(str(DEMO / folder), kinds=(kind,))
    assert len(result.records) >= minimum


def test_demo_data_covers_multi_turn_system_prompts_and_tools():
    records = read_records(str(DEMO / "sft"), kinds=("conversation",)).records
    assert sum(len([m for m in r.messages if m.role == "assistant"]) > 1 for r in records) >= 10
    assert sum(r.messages[0].role == "system" for r in records) >= 10
    with_tools = [r for r in records if r.tools]
    assert len(with_tools) >= 3
    assert all(any(m.tool_calls for m in r.messages) for r in with_tools)
    assert {"sharegpt", "openai", "alpaca"} <= set(read_records(str(DEMO / "sft")).formats.values())


def test_pretraining_text_is_at_least_30_kb():
    size = sum(p.stat().st_size for p in (DEMO / "pretrain").glob("*.txt"))
    assert size >= 30_000


def test_multiple_choice_set_has_balanced_valid_answers():
    records = read_records(str(DEMO / "eval" / "mcq.jsonl"), kinds=("mcq",)).records
    assert len(records) >= 40
    assert all(r.answer in r.options for r in records)
    counts = {letter: sum(r.answer == letter for r in records) for letter in "ABCD"}
    assert min(counts.values()) >= len(records) // 6, counts


def _training_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for folder in TRAINING_FILES
                     for p in sorted((DEMO / folder).rglob("*")) if p.is_file())


def test_evaluation_questions_do_not_occur_in_training_files():
    training = _training_text()
    questions = [r.question for name in ("mcq.jsonl", "open_questions.jsonl")
                 for r in read_records(str(DEMO / "eval" / name)).records]
    assert len(questions) >= 60
    leaked = [q for q in questions if q in training]
    assert not leaked


def test_held_out_text_shares_no_60_character_window_with_training_files():
    training = _training_text()
    held_out = (DEMO / "eval" / "heldout_text.txt").read_text(encoding="utf-8")
    windows = {held_out[i:i + 60] for i in range(0, len(held_out) - 60, 20) if "\n" not in held_out[i:i + 60]}
    assert len(windows) > 100
    assert not [w for w in windows if w in training]


def test_sft_answers_are_not_empty_or_duplicated():
    records = read_records(str(DEMO / "sft"), kinds=("conversation",)).records
    replies = [m.content for r in records for m in r.messages if m.role == "assistant" and not m.tool_calls]
    assert len(replies) == len(set(replies))
    assert all(isinstance(r, Conversation) for r in records)
