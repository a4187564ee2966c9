"""RL prompts from every record kind that has one: the turns before the last assistant reply, with the
reference answer rule rewards compare against; bad files fail with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DEMO
from medgpt.arguments import DataArguments
from medgpt.data.records import InvalidDataError
from medgpt.rl.prompts import load_prompts, prompt_batches, read_prompts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_multi_turn_conversation_gives_every_turn_before_its_last_reply(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is a fever?"},
        {"from": "gpt", "value": "A raised temperature."}, {"from": "human", "value": "When is it dangerous?"},
        {"from": "gpt", "value": "Above 40 C, or in infants."}]}])
    (prompt,) = read_prompts(str(data))
    assert [(m.role, m.content) for m in prompt.messages] == [
        ("system", "Be brief."), ("user", "What is a fever?"), ("assistant", "A raised temperature."),
        ("user", "When is it dangerous?")]
    assert prompt.reference == "Above 40 C, or in infants." and prompt.reference_kind == "text"
    assert str(prompt.source) == f"{data}:1"


def test_a_tool_conversation_keeps_the_call_and_its_result_in_the_prompt(tmp_path):
    data = write_jsonl(tmp_path / "tools.jsonl", [{"conversations": [
        {"from": "human", "value": "BMI for 70 kg, 1.75 m?"},
        {"from": "function_call", "value": json.dumps({"name": "calculate_bmi", "arguments": {"kg": 70, "m": 1.75}})},
        {"from": "observation", "value": "{\"bmi\": 22.9}"}, {"from": "gpt", "value": "Your BMI is 22.9."}],
        "tools": json.dumps([{"name": "calculate_bmi", "parameters": {}}])}])
    (prompt,) = read_prompts(str(data))
    assert [m.role for m in prompt.messages] == ["user", "assistant", "tool"]
    assert prompt.messages[1].tool_calls[0]["name"] == "calculate_bmi"
    assert prompt.tools[0]["name"] == "calculate_bmi" and prompt.reference == "Your BMI is 22.9."
    assert prompt.to_openai()[1]["tool_calls"][0]["function"]["name"] == "calculate_bmi"


def test_qa_mcq_preference_and_kto_records_all_give_prompts_with_their_references(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Which organ makes bile?", "answer": "The liver",
                                              "system": "Answer in two words."}, {"question": "Open question?"}])
    mcq = write_jsonl(tmp_path / "mcq.jsonl", [{"question": "Largest bone?", "options": ["Femur", "Tibia"],
                                                "answer": "A"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Is aspirin safe for children?",
                                                    "chosen": "No: Reye syndrome.", "rejected": "Yes."}])
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi?", "completion": "Hello.", "label": True},
                                               {"prompt": "Hi?", "completion": "Go away.", "label": False}])
    with_system, open_question = read_prompts(str(qa))
    assert [(m.role, m.content) for m in with_system.messages] == [("system", "Answer in two words."),
                                                                   ("user", "Which organ makes bile?")]
    assert with_system.reference == "The liver"
    assert open_question.reference is None and open_question.reference_kind == "none"
    (choice,) = read_prompts(str(mcq))
    assert choice.messages[0].content == "Largest bone?\nA. Femur\nB. Tibia"
    assert (choice.reference, choice.reference_kind) == ("A", "choice")
    (pair,) = read_prompts(str(pairs))
    assert pair.messages[-1].content == "Is aspirin safe for children?" and pair.reference == "No: Reye syndrome."
    good, bad = read_prompts(str(kto))
    assert good.reference == "Hello." and bad.reference is None


def test_every_demo_file_with_prompts_reads_and_each_prompt_ends_with_a_user_or_tool_turn():
    for spec in ("sft", "preference", "grpo", "eval/mcq.jsonl", "eval/open_questions.jsonl"):
        prompts = read_prompts(str(DEMO / spec))
        assert prompts, spec
        assert all(p.messages[-1].role in ("user", "tool") for p in prompts), spec


def test_a_text_file_is_refused_with_the_kinds_that_have_prompts():
    with pytest.raises(InvalidDataError, match="text.*conversation or qa or mcq or preference or kto"):
        read_prompts(str(DEMO / "eval" / "heldout_text.txt"))


def test_a_bad_record_names_its_file_line_and_field(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Fine?", "answer": "Yes"}, {"question": ""}])
    with pytest.raises(InvalidDataError, match=r"bad\.jsonl:2: question: empty"):
        read_prompts(str(data))


def test_stage_prompts_are_split_and_capped_like_every_stage(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Question {i}?", "answer": str(i)} for i in range(20)])
    train, held = load_prompts(DataArguments(train_file_dir=str(data), validation_split_percentage=10,
                                             max_train_samples=15), seed=3)
    assert len(train) == 15 and len(held) == 2
    assert not {p.messages[-1].content for p in train} & {p.messages[-1].content for p in held}


def test_prompt_batches_are_full_seeded_and_reshuffled_each_pass():
    items = list(range(10))
    first = prompt_batches(items, 4, seed=1, epoch=0)
    assert [len(b) for b in first] == [4, 4]  # the remainder of a pass is dropped
    assert first == prompt_batches(items, 4, seed=1, epoch=0)
    assert first != prompt_batches(items, 4, seed=1, epoch=1)
    assert len({i for b in first for i in b}) == 8


def test_long_prompts_lose_old_turns_then_the_question_start_but_keep_the_template_header(tokenizer):
    from medgpt.data.records import Message, Source
    from medgpt.data.templates import ChatFormat
    from medgpt.rl.prompts import Prompt, fit_prompt

    chat = ChatFormat(tokenizer)
    system = Message("system", "You are a careful medical assistant.")
    question = Message("user", "Patient history: " + "fever and cough for days, " * 30 + "what now?")
    history = [Message("user", "Hello " * 40), Message("assistant", "Hi " * 40)]
    prompt = Prompt([system, *history, question], Source("t.jsonl", 1))
    whole, short = chat.prompt_ids(prompt.messages), chat.prompt_ids([system, question])
    header = next(whole[:i] for i in range(len(whole)) if whole[i] != short[i])  # system turn + user tag
    assert len(header) > 5 and len(short) < 240 < len(whole)

    ids, cut = fit_prompt(chat, prompt, 240)  # the history goes, the question fits
    assert cut == "turns" and ids == chat.prompt_ids([system, question])

    ids, cut = fit_prompt(chat, prompt, 120)  # the question alone is too long: its start goes
    assert cut == "question" and len(ids) <= 120
    assert ids[:len(header)] == header  # left-cutting raw ids would have dropped this
    assert ids[-8:] == whole[-8:]  # the end of the question and the assistant header
    assert "what now?" in tokenizer.decode(ids) and "Hello" not in tokenizer.decode(ids)
    assert fit_prompt(chat, prompt, 10_000) == (whole, None)
    with pytest.raises(ValueError, match="leaves no room for the question"):
        fit_prompt(chat, prompt, 12)
