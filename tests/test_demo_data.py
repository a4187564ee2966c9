"""The demo data: valid, big enough for each stage (issue 6's minimums), and evaluation sets (held-out preference
pairs included) held out from every training file, word for word and near word for word."""

from __future__ import annotations

import re
import unicodedata
from difflib import SequenceMatcher
from functools import cache

import pytest

from conftest import DEMO
from medgpt.data.readers import read_records
from medgpt.data.records import Conversation, MCQRecord, PreferencePair, QARecord, TextRecord

TRAINING_FILES = ["pretrain", "sft", "preference", "grpo"]
HELD_OUT_PAIRS = "eval/preference_heldout.jsonl"  # reward-model accuracy on pairs no stage trains on
CJK = re.compile(r"[\u4e00-\u9fff]")
NEAR_DUPLICATE = 0.8  # difflib ratio of normalised token sequences from which two questions count as one


@cache
def _records(path: str, kind: str | None = None) -> list:
    return read_records(str(DEMO / path), kinds=(kind,) if kind else ()).records


@pytest.mark.parametrize("folder, kind, minimum", [
    ("pretrain", "text", 150),
    ("sft", "conversation", 300),
    ("preference", "preference", 200),
    ("grpo", "qa", 100),
])
def test_demo_training_data_is_valid_and_large_enough(folder, kind, minimum):
    assert len(_records(folder, kind)) >= minimum


@pytest.mark.parametrize("name, minimum", [("mcq.jsonl", 100), ("open_questions.jsonl", 50)])
def test_evaluation_sets_are_large_enough_and_have_no_repeated_question(name, minimum):
    questions = [_normalise(r.question) for r in _records(f"eval/{name}")]
    assert len(questions) >= minimum
    assert len(questions) == len(set(questions))


def test_pretraining_text_is_at_least_100_kb():
    size = sum(p.stat().st_size for p in (DEMO / "pretrain").glob("*.txt"))
    assert size >= 100_000


def test_demo_data_covers_multi_turn_system_prompts_and_tools():
    records = _records("sft", "conversation")
    assert sum(len([m for m in r.messages if m.role == "assistant"]) > 1 for r in records) >= 40
    assert sum(r.messages[0].role == "system" for r in records) >= 40
    with_tools = [r for r in records if r.tools]
    assert len(with_tools) >= 10
    assert all(any(m.tool_calls for m in r.messages) for r in with_tools)
    assert {"sharegpt", "openai", "alpaca"} <= set(read_records(str(DEMO / "sft")).formats.values())


@pytest.mark.parametrize("folder, kind, share", [
    ("pretrain", "text", 0.05), ("sft", "conversation", 0.05), ("preference", "preference", 0.05),
    ("grpo", "qa", 0.05), ("eval/mcq.jsonl", "mcq", 0.03), (HELD_OUT_PAIRS, "preference", 0.05),
])
def test_every_set_is_mostly_english_with_some_chinese(folder, kind, share):
    records = _records(folder, kind)
    chinese = sum(bool(CJK.search(_record_text(r))) for r in records)
    assert share * len(records) <= chinese <= 0.25 * len(records)


def test_multiple_choice_set_has_balanced_valid_answers():
    records = _records("eval/mcq.jsonl", "mcq")
    assert all(r.answer in r.options and list(r.options) == list("ABCD") for r in records)
    counts = {letter: sum(r.answer == letter for r in records) for letter in "ABCD"}
    assert min(counts.values()) >= len(records) // 5, counts


def test_grpo_references_are_short_enough_for_an_automatic_reward():
    records = _records("grpo", "qa")
    long = [r.answer for r in records if len(r.answer.split()) > 6 or len(r.answer) > 40]
    assert not long
    questions = [_normalise(r.question) for r in records]
    assert len(questions) == len(set(questions))


@pytest.mark.parametrize("path, minimum", [("preference", 200), (HELD_OUT_PAIRS, 40)])
def test_preference_pairs_differ_and_prompts_are_not_repeated(path, minimum):
    records = _records(path, "preference")
    assert len(records) >= minimum
    assert all(_record_text(r.chosen) != _record_text(r.rejected) for r in records)
    longer = sum(len(_record_text(r.chosen)) > len(_record_text(r.rejected)) for r in records)
    assert 0.35 * len(records) <= longer <= 0.65 * len(records), "length alone would tell chosen from rejected"
    prompts = [_normalise(_record_text(r.prompt)) for r in records]
    assert len(prompts) == len(set(prompts))


def test_sft_answers_are_not_empty_or_duplicated():
    records = _records("sft", "conversation")
    replies = [m.content for r in records for m in r.messages if m.role == "assistant" and not m.tool_calls]
    assert all(reply.strip() for reply in replies)
    assert len(replies) == len(set(replies))
    assert all(isinstance(r, Conversation) for r in records)


# ------------------------------------------------------------------------------------------------ held out


def test_evaluation_questions_do_not_occur_in_training_files():
    training = _normalise(_training_text())
    leaked = [q for q in _evaluation_questions() if _normalise(q) in training]
    assert not leaked


def test_evaluation_questions_have_no_near_duplicate_among_training_prompts():
    prompts = [_normalise(p) for p in _training_prompts()]
    assert len(prompts) > 600
    near = [(q, p) for q in map(_normalise, _evaluation_questions()) for p in prompts if _similar(q, p)]
    assert not near


def test_near_duplicate_check_catches_a_lightly_edited_question():
    question = _normalise(_evaluation_questions()[0])
    edited = question.replace(" the ", " a ", 1) + " please"
    assert _similar(question, edited) and not _similar(question, _normalise(_training_prompts()[0]))


def test_held_out_pairs_ask_what_no_other_evaluation_set_asks():
    others = [_normalise(q) for q in _question_set_questions()]
    near = [(q, o) for q in map(_normalise, _held_out_pair_questions()) for o in others if _similar(q, o)]
    assert not near


@pytest.mark.parametrize("texts, minimum", [
    (lambda: [r.text for r in _records("eval/heldout_text.txt", "text")], 800),
    (lambda: [_record_text(r.chosen + r.rejected) for r in _records(HELD_OUT_PAIRS, "preference")], 1000),
], ids=["perplexity-text", "preference-answers"])
def test_held_out_text_shares_no_60_character_window_with_training_files(texts, minimum):
    training = _normalise(_training_text())
    held_out = [_normalise(text) for text in texts()]
    assert len(held_out) >= 20
    windows = {text[i:i + 60] for text in held_out for i in range(0, len(text) - 60, 20)}
    assert len(windows) > minimum
    assert not [w for w in windows if w in training]


def _normalise(text: str) -> str:
    """Case, width, punctuation and spacing folded away, so that trivial edits do not hide a repeat."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


def _similar(a: str, b: str) -> bool:
    """Word-level (character-level for Chinese) edit similarity, so that a reworded copy still counts."""
    matcher = SequenceMatcher(None, _tokens(a), _tokens(b), autojunk=False)
    return matcher.real_quick_ratio() >= NEAR_DUPLICATE and matcher.quick_ratio() >= NEAR_DUPLICATE \
        and matcher.ratio() >= NEAR_DUPLICATE


@cache
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[\u4e00-\u9fff]|[^\W\u4e00-\u9fff]+", text))


def _record_text(record) -> str:
    """All the text a record (or a message list) holds."""
    match record:
        case list():
            return "\n".join(m.content for m in record)
        case TextRecord():
            return record.text
        case QARecord():
            return record.question
        case MCQRecord():
            return " ".join([record.question, *record.options.values()])
        case Conversation():
            return _record_text(record.messages)
        case PreferencePair():
            return _record_text(record.prompt + record.chosen + record.rejected)
    raise TypeError(type(record))


@cache
def _training_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for folder in TRAINING_FILES
                     for p in sorted((DEMO / folder).rglob("*")) if p.is_file())


@cache
def _evaluation_questions() -> list[str]:
    return _question_set_questions() + _held_out_pair_questions()


@cache
def _question_set_questions() -> list[str]:
    return [r.question for name in ("mcq.jsonl", "open_questions.jsonl") for r in _records(f"eval/{name}")]


@cache
def _held_out_pair_questions() -> list[str]:
    """Every user turn of the held-out pairs' prompts (earlier turns of a conversation included)."""
    return [m.content for r in _records(HELD_OUT_PAIRS, "preference") for m in r.prompt if m.role == "user"]


@cache
def _training_prompts() -> list[str]:
    """Every user turn a training file holds (SFT, preference prompts, GRPO questions)."""
    turns = [m.content for r in _records("sft", "conversation") for m in r.messages if m.role == "user"]
    turns += [m.content for r in _records("preference", "preference") for m in r.prompt if m.role == "user"]
    return turns + [r.question for r in _records("grpo", "qa")]
