"""Readers: files, folders and globs -> canonical records, every problem reported as `file:line: field: problem`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURES
from medgpt.data.readers import ReadOptions, ReadResult, collect, file_reader, read_records, resolve_many
from medgpt.data.records import (
    Conversation,
    DataError,
    InvalidDataError,
    KTORecord,
    MCQRecord,
    Message,
    PreferencePair,
    QARecord,
    TextRecord,
)

# ------------------------------------------------------------------------------------------------ helpers


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_file(path: Path, **options) -> list:
    """Every record and DataError of one file, in order."""
    return list(file_reader(path, ReadOptions(**options)))


def read_rows(tmp_path: Path, rows: list, name: str = "data.jsonl", **options) -> tuple[Path, list]:
    path = write_jsonl(tmp_path / name, rows)
    return path, read_file(path, **options)


def read_one(tmp_path: Path, row, **options):
    """The single record (or DataError) one JSON line gives."""
    _, items = read_rows(tmp_path, [row], **options)
    assert len(items) == 1, items
    return items[0]


def error_of(tmp_path: Path, row, **options) -> tuple[Path, DataError]:
    path, items = read_rows(tmp_path, [row], **options)
    assert len(items) == 1 and isinstance(items[0], DataError), items
    return path, items[0]


def roles(messages: list[Message]) -> list[str]:
    return [m.role for m in messages]


def user(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def errors_of(items: list) -> list[DataError]:
    return [i for i in items if isinstance(i, DataError)]


def records_of(items: list) -> list:
    return [i for i in items if not isinstance(i, DataError)]


# ------------------------------------------------------------------------------------------------ text


def test_txt_file_gives_one_document_per_nonblank_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Fever is a raised temperature.\n\n  Aspirin lowers fever.  \n\nLast line without newline", "utf-8")
    items = read_file(path)
    assert all(isinstance(i, TextRecord) for i in items)
    assert [r.text for r in items] == ["Fever is a raised temperature.", "Aspirin lowers fever.",
                                       "Last line without newline"]
    assert [r.source.line for r in items] == [1, 3, 5]
    assert str(items[1].source) == f"{path}:3"


def test_txt_blank_line_separator_keeps_linebreaks_inside_a_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First para line one\nline two\n\n\nSecond para\n   \nThird\nand more\n", "utf-8")
    items = read_file(path, text_separator="blank_line")
    assert [r.text for r in items] == ["First para line one\nline two", "Second para", "Third\nand more"]
    assert [r.source.line for r in items] == [1, 5, 7]


def test_txt_blank_line_separator_without_linebreaks_joins_with_spaces(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First para line one\nline two\n\nSecond para\n", "utf-8")
    items = read_file(path, text_separator="blank_line", keep_linebreaks=False)
    assert [r.text for r in items] == ["First para line one line two", "Second para"]


def test_jsonl_with_text_key_gives_text_records(tmp_path):
    path, items = read_rows(tmp_path, [{"text": "Doc one."}, {"text": "Doc two.", "meta": 1}])
    assert [type(i) for i in items] == [TextRecord, TextRecord]
    assert [i.text for i in items] == ["Doc one.", "Doc two."]
    assert items[1].source.path == str(path) and items[1].source.line == 2


def test_text_record_with_empty_text_names_the_field(tmp_path):
    path, err = error_of(tmp_path, {"text": "   "})
    assert str(err) == f"{path}:1: text: empty"


# ------------------------------------------------------------------------------------------------ sharegpt


def test_sharegpt_multi_turn_with_system_turn(tmp_path):
    record = read_one(tmp_path, {"conversations": [
        {"from": "system", "value": "You are a doctor."},
        user("I have a fever."), gpt("How high is it?"),
        {"from": "user", "value": "39 degrees."}, {"from": "assistant", "value": "Drink fluids and rest."},
    ]})
    assert isinstance(record, Conversation)
    assert roles(record.messages) == ["system", "user", "assistant", "user", "assistant"]
    assert [m.content for m in record.messages] == ["You are a doctor.", "I have a fever.", "How high is it?",
                                                    "39 degrees.", "Drink fluids and rest."]
    assert record.tools is None


def test_sharegpt_top_level_system_key_becomes_first_turn(tmp_path):
    record = read_one(tmp_path, {"system": "Be brief.", "conversations": [user("Hi"), gpt("Hello")]})
    assert roles(record.messages) == ["system", "user", "assistant"]
    assert record.messages[0].content == "Be brief."


def test_sharegpt_top_level_system_does_not_duplicate_an_existing_system_turn(tmp_path):
    record = read_one(tmp_path, {"system": "Other.", "conversations": [
        {"from": "system", "value": "Inline."}, user("Hi"), gpt("Hello")]})
    assert roles(record.messages) == ["system", "user", "assistant"]
    assert record.messages[0].content == "Inline."


TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.mark.parametrize("tools", [json.dumps([TOOL]), [TOOL], [{"type": "function", "function": TOOL}]],
                         ids=["json-string", "list", "openai-wrapped-list"])
def test_sharegpt_function_call_and_observation_become_tool_calls_and_tool(tmp_path, tools):
    record = read_one(tmp_path, {"tools": tools, "conversations": [
        user("Weather in Beijing?"),
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Beijing"}})},
        {"from": "observation", "value": '{"temp": 28}'},
        gpt("It is 28 degrees."),
    ]})
    assert isinstance(record, Conversation)
    assert roles(record.messages) == ["user", "assistant", "tool", "assistant"]
    call = record.messages[1]
    assert call.content == "" and call.tool_calls == [{"name": "get_weather", "arguments": {"city": "Beijing"}}]
    assert record.messages[2].content == '{"temp": 28}'
    assert record.tools == [TOOL]


def test_sharegpt_tools_that_are_not_json_name_the_tools_field(tmp_path):
    path, err = error_of(tmp_path, {"tools": "[{not json", "conversations": [user("q"), gpt("a")]})
    assert str(err).startswith(f"{path}:1: tools: not valid JSON")


def test_sharegpt_function_call_that_is_not_json_names_the_turn(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), {"from": "function_call", "value": "get_weather("}]})
    assert str(err).startswith(f"{path}:1: conversations[1].value: a function call must be JSON")


# ------------------------------------------------------------------------------------------------ openai


def test_openai_messages_with_tool_calls_and_json_string_arguments(tmp_path):
    record = read_one(tmp_path, {
        "tools": [{"type": "function", "function": TOOL}],
        "messages": [
            {"role": "system", "content": "Helpful."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "assistant", "content": "18 degrees."},
        ]})
    assert isinstance(record, Conversation)
    assert roles(record.messages) == ["system", "user", "assistant", "tool", "assistant"]
    assert record.messages[2].tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert record.messages[2].content == ""
    assert record.tools == [TOOL]


def test_openai_content_parts_are_joined_into_text(tmp_path):
    record = read_one(tmp_path, {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": "Answer."},
    ]})
    assert record.messages[0].content == "Part one. Part two."


def test_openai_image_content_part_is_rejected_with_the_field(tmp_path):
    path, err = error_of(tmp_path, {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "a"}]})
    assert str(err) == f"{path}:1: messages[0].content: expected a string, got list"


def test_openai_tool_call_arguments_that_are_not_json_stay_a_string(tmp_path):
    record = read_one(tmp_path, {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "done"}]})
    assert record.messages[1].tool_calls == [{"name": "f", "arguments": "not json"}]


# ------------------------------------------------------------------------------------------------ alpaca


def test_alpaca_instruction_and_input_make_one_user_turn(tmp_path):
    record = read_one(tmp_path, {"instruction": "Translate to English", "input": "发烧", "output": "Fever"})
    assert isinstance(record, Conversation)
    assert [(m.role, m.content) for m in record.messages] == [
        ("user", "Translate to English\n发烧"), ("assistant", "Fever")]


def test_alpaca_history_and_system_come_before_the_instruction(tmp_path):
    record = read_one(tmp_path, {
        "system": "You are a doctor.", "instruction": "And the dose?", "input": "", "output": "500 mg.",
        "history": [["What treats a headache?", "Paracetamol."]],
    })
    assert [(m.role, m.content) for m in record.messages] == [
        ("system", "You are a doctor."),
        ("user", "What treats a headache?"), ("assistant", "Paracetamol."),
        ("user", "And the dose?"), ("assistant", "500 mg."),
    ]


def test_alpaca_missing_output_names_the_field(tmp_path):
    path, err = error_of(tmp_path, {"instruction": "Say hi", "input": ""})
    assert str(err) == f"{path}:1: output: missing"


def test_alpaca_bad_history_pair_names_its_index(tmp_path):
    path, err = error_of(tmp_path, {"instruction": "q", "output": "a", "history": [["ok", "fine"], ["only one"]]})
    assert str(err).startswith(f"{path}:1: history[1]: expected [question, answer]")


# ------------------------------------------------------------------------------------------------ preference


def test_preference_with_conversations_prompt_and_string_answers(tmp_path):
    record = read_one(tmp_path, {"system": "Be kind.", "conversations": [user("Is fever dangerous?")],
                                 "chosen": "Usually not, but see a doctor above 40C.", "rejected": "No."})
    assert isinstance(record, PreferencePair)
    assert [(m.role, m.content) for m in record.prompt] == [("system", "Be kind."), ("user", "Is fever dangerous?")]
    assert [(m.role, m.content) for m in record.chosen] == [("assistant", "Usually not, but see a doctor above 40C.")]
    assert [(m.role, m.content) for m in record.rejected] == [("assistant", "No.")]


def test_preference_with_prompt_string(tmp_path):
    record = read_one(tmp_path, {"prompt": "What is BMI?", "chosen": "Body mass index.", "rejected": "A bank."})
    assert [(m.role, m.content) for m in record.prompt] == [("user", "What is BMI?")]
    assert record.chosen[0].content == "Body mass index." and record.rejected[0].content == "A bank."


def test_preference_with_message_list_answers(tmp_path):
    record = read_one(tmp_path, {
        "messages": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"from": "gpt", "value": "bad"}],
    })
    assert [(m.role, m.content) for m in record.chosen] == [("assistant", "good")]
    assert [(m.role, m.content) for m in record.rejected] == [("assistant", "bad")]


def test_preference_trl_implicit_prompt_is_the_shared_prefix(tmp_path):
    shared = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    record = read_one(tmp_path, {"chosen": [*shared, {"role": "assistant", "content": "good"}],
                                 "rejected": [*shared, {"role": "assistant", "content": "bad"}]})
    assert isinstance(record, PreferencePair)
    assert [m.content for m in record.prompt] == ["S", "q1", "a1", "q2"]
    assert [(m.role, m.content) for m in record.chosen] == [("assistant", "good")]
    assert [(m.role, m.content) for m in record.rejected] == [("assistant", "bad")]


def test_preference_explicit_prompt_repeated_inside_chosen_is_stripped(tmp_path):
    record = read_one(tmp_path, {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    })
    assert [m.content for m in record.prompt] == ["q"]
    assert [m.content for m in record.chosen] == ["good"] and [m.content for m in record.rejected] == ["bad"]


def test_preference_string_answers_without_prompt_say_prompt_missing(tmp_path):
    path, err = error_of(tmp_path, {"chosen": "good", "rejected": "bad"})
    assert str(err).startswith(f"{path}:1: prompt: missing")


def test_preference_empty_rejected_names_the_field(tmp_path):
    path, err = error_of(tmp_path, {"prompt": "q", "chosen": "good", "rejected": "  "})
    assert str(err) == f"{path}:1: rejected: empty"


def test_preference_prompt_ending_with_assistant_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), gpt("a")], "chosen": "x", "rejected": "y"})
    assert str(err) == f"{path}:1: prompt: a prompt must end with a user or tool turn, not assistant"


def test_preference_chosen_starting_with_a_user_turn_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"prompt": "q", "chosen": [{"role": "user", "content": "other"},
                                                              {"role": "assistant", "content": "a"}],
                                    "rejected": "b"})
    assert str(err) == f"{path}:1: chosen: must be the assistant's reply, starts with a user turn"


# ------------------------------------------------------------------------------------------------ kto


@pytest.mark.parametrize("label, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_kto_label_accepts_bools_and_zero_one(tmp_path, label, expected):
    record = read_one(tmp_path, {"prompt": "Dose of aspirin?", "completion": "Ask your doctor.", "label": label})
    assert isinstance(record, KTORecord)
    assert record.label is expected
    assert [(m.role, m.content) for m in record.prompt] == [("user", "Dose of aspirin?")]
    assert [(m.role, m.content) for m in record.completion] == [("assistant", "Ask your doctor.")]


@pytest.mark.parametrize("label", ["yes", "true", 2, None])
def test_kto_label_that_is_not_a_bool_names_the_label_field(tmp_path, label):
    path, err = error_of(tmp_path, {"prompt": "q", "completion": "a", "label": label})
    assert str(err).startswith(f"{path}:1: label: expected true (desirable) or false (undesirable), got ")
    assert repr(label) in err.problem


def test_kto_with_conversation_prompt(tmp_path):
    record = read_one(tmp_path, {"messages": [{"role": "user", "content": "q"}],
                                 "completion": [{"role": "assistant", "content": "a"}], "label": False})
    assert isinstance(record, KTORecord) and record.label is False
    assert [m.content for m in record.completion] == ["a"]


# ------------------------------------------------------------------------------------------------ qa / mcq


def test_qa_with_and_without_answer(tmp_path):
    path, items = read_rows(tmp_path, [{"question": "What is fever?", "answer": "A high temperature."},
                                       {"question": "Why?"},
                                       {"question": "Score?", "answer": 42, "system": "Be exact."}])
    assert all(isinstance(i, QARecord) for i in items)
    assert [(i.question, i.answer) for i in items] == [("What is fever?", "A high temperature."), ("Why?", None),
                                                       ("Score?", "42")]
    assert items[2].system == "Be exact."


def test_qa_missing_question_is_not_detected_as_qa(tmp_path):
    path, err = error_of(tmp_path, {"answer": "only an answer"})
    assert str(err).startswith(f"{path}:1: record: cannot tell the format from keys ['answer']")


def test_qa_answer_that_is_a_list_names_the_answer_field(tmp_path):
    path, err = error_of(tmp_path, {"question": "q", "answer": ["a", "b"]})
    assert str(err) == f"{path}:1: answer: expected a string, got list"


def test_mcq_with_dict_options_and_lower_case_letter_answer(tmp_path):
    record = read_one(tmp_path, {"question": "Normal temperature?",
                                 "options": {"A": "35C", "B": "37C", "C": "39C", "D": "41C"}, "answer": " b "})
    assert isinstance(record, MCQRecord)
    assert record.options == {"A": "35C", "B": "37C", "C": "39C", "D": "41C"}
    assert record.answer == "B"


def test_mcq_with_list_options_and_answer_given_as_option_text(tmp_path):
    record = read_one(tmp_path, {"question": "Which is an antipyretic?",
                                 "options": ["Insulin", "Paracetamol", "Heparin"], "answer": "Paracetamol"})
    assert record.options == {"A": "Insulin", "B": "Paracetamol", "C": "Heparin"}
    assert record.answer == "B"


def test_mcq_answer_that_is_neither_key_nor_text_names_the_answer_field(tmp_path):
    path, err = error_of(tmp_path, {"question": "q", "options": ["x", "y"], "answer": "E"})
    assert str(err) == f"{path}:1: answer: 'E' is neither an option key (A, B) nor an option text"


def test_mcq_needs_two_options(tmp_path):
    path, err = error_of(tmp_path, {"question": "q", "options": ["only"], "answer": "A"})
    assert str(err).startswith(f"{path}:1: options: expected at least two options")


def test_mcq_empty_option_names_its_key(tmp_path):
    path, err = error_of(tmp_path, {"question": "q", "options": {"A": "x", "B": ""}, "answer": "A"})
    assert str(err) == f"{path}:1: options.B: expected a non-empty string"


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("row, kind", [
    ({"text": "t"}, TextRecord),
    ({"conversations": [user("q"), gpt("a")]}, Conversation),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, Conversation),
    ({"instruction": "q", "output": "a"}, Conversation),
    ({"conversations": [user("q")], "chosen": "a", "rejected": "b"}, PreferencePair),
    ({"prompt": "q", "completion": "a", "label": True}, KTORecord),
    ({"question": "q", "answer": "a"}, QARecord),
    ({"question": "q", "options": ["a", "b"], "answer": "A"}, MCQRecord),
], ids=["text", "sharegpt", "openai", "alpaca", "preference", "kto", "qa", "mcq"])
def test_format_is_detected_from_the_first_record(tmp_path, row, kind):
    assert isinstance(read_one(tmp_path, row), kind)


def test_each_file_gets_its_own_format(tmp_path):
    sft = write_jsonl(tmp_path / "a_sft.jsonl", [{"conversations": [user("q"), gpt("a")]}])
    qa = write_jsonl(tmp_path / "b_qa.jsonl", [{"question": "q", "answer": "a"}])
    result = read_records([str(sft), str(qa)])
    assert result.formats == {str(sft): "sharegpt", str(qa): "qa"}
    assert result.counts == {str(sft): 1, str(qa): 1}
    assert [type(r) for r in result.records] == [Conversation, QARecord]


def test_unrecognised_keys_say_which_keys_were_expected(tmp_path):
    path, err = error_of(tmp_path, {"foo": 1, "bar": 2})
    assert str(err).startswith(f"{path}:1: record: cannot tell the format from keys ['bar', 'foo']")
    assert "conversations" in err.problem and "messages" in err.problem


def test_forced_format_parses_records_that_detection_would_read_otherwise(tmp_path):
    # `question` alone is detected as qa; forced to text the same line is a text record with a missing key
    path, items = read_rows(tmp_path, [{"question": "q", "text": "the document"}], data_format="text")
    assert isinstance(items[0], TextRecord) and items[0].text == "the document"
    path, items = read_rows(tmp_path, [{"question": "q"}], data_format="sharegpt")
    assert str(items[0]) == (f"{path}:1: conversations: expected a non-empty list of turns (data_format is "
                             "sharegpt, but this record's keys are qa's: use data_format: auto to read each record "
                             "as its own format)")


def test_forced_text_format_accepts_plain_json_strings(tmp_path):
    path, items = read_rows(tmp_path, ["a plain string document"], data_format="text")
    assert [i.text for i in items] == ["a plain string document"]


def test_a_file_mixing_conversation_formats_is_read_record_by_record(tmp_path):
    # two sources concatenated: ShareGPT, Alpaca and OpenAI rows, each read by its own keys
    path, items = read_rows(tmp_path, [
        {"conversations": [user("q"), gpt("a")]},
        {"instruction": "q", "input": "more", "output": "a"},
        {"conversations": [user("q2"), gpt("a2")]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    assert [type(i) for i in items] == [Conversation] * 4
    assert items[1].messages[0].content == "q\nmore" and items[3].messages[1].content == "a"
    result = read_records(str(path), kinds=("conversation",))
    assert result.formats[str(path)] == "alpaca+openai+sharegpt" and result.counts[str(path)] == 4


def test_forced_format_still_parses_every_record_as_that_format(tmp_path):
    path, items = read_rows(tmp_path, [
        {"conversations": [user("q"), gpt("a")]},
        {"instruction": "q", "output": "a"},
    ], data_format="sharegpt")
    assert isinstance(items[0], Conversation)
    assert str(items[1]).startswith(f"{path}:2: conversations: expected a non-empty list of turns (data_format is "
                                    "sharegpt, but this record's keys are alpaca's")


def test_a_record_of_another_kind_inside_a_file_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"conversations": [user("q"), gpt("a")]},
                                                   {"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(InvalidDataError) as info:
        read_records(str(path), kinds=("conversation",))
    assert [str(e) for e in info.value.errors] == [
        f"{path}: format: holds preference (preference) records (from {path}:2), but conversation records are "
        "needed here"]


def test_detection_skips_bad_first_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"broken\n{"foo": 1}\n{"question": "q"}\n{"question": "r", "answer": "a"}\n', "utf-8")
    items = read_file(path)
    assert [type(i) for i in items] == [DataError, DataError, QARecord, QARecord]
    assert str(items[0]).startswith(f"{path}:1: json: not valid JSON")
    assert str(items[1]).startswith(f"{path}:2: record: cannot tell the format")


# ------------------------------------------------------------------------------------------------ errors


def test_bad_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "unterminated}\n{"text": "also ok"}\n', "utf-8")
    items = read_file(path)
    assert [type(i) for i in items] == [TextRecord, DataError, TextRecord]
    assert str(items[1]).startswith(f"{path}:2: json: not valid JSON: Unterminated string")
    assert "(column " in str(items[1])


def test_missing_key_names_the_field(tmp_path):
    path, err = error_of(tmp_path, {"instruction": "q", "output": None, "input": ""})
    assert str(err) == f"{path}:1: output: missing"


def test_empty_assistant_turn_names_file_line_and_field(tmp_path):
    path, items = read_rows(tmp_path, [
        {"conversations": [user("q"), gpt("a")]},
        {"conversations": [user("q"), gpt("a"), user("q2"), gpt("   ")]},
    ])
    assert isinstance(items[0], Conversation)
    assert str(items[1]) == f"{path}:2: conversations[3]: empty assistant turn"


def test_empty_user_turn_names_the_turn(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user(""), gpt("a")]})
    assert str(err) == f"{path}:1: conversations[0]: empty user turn"


def test_two_user_turns_in_a_row_break_the_role_order(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), user("q again"), gpt("a")]})
    assert str(err) == f"{path}:1: conversations[1]: user turn after a user turn (roles must alternate)"


def test_assistant_first_breaks_the_role_order(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [gpt("hello"), user("q"), gpt("a")]})
    assert str(err) == f"{path}:1: conversations[0]: assistant turn after nothing (expected a user turn first)"


def test_two_assistant_turns_in_a_row_break_the_role_order(tmp_path):
    path, err = error_of(tmp_path, {"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"},
                                                 {"role": "assistant", "content": "b"}]})
    assert str(err).startswith(f"{path}:1: messages[2]: assistant turn after assistant")


def test_system_turn_after_the_start_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), {"from": "system", "value": "s"}, gpt("a")]})
    assert str(err) == f"{path}:1: conversations[1]: a system turn may only come first"


def test_non_string_content_names_the_value_field(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), {"from": "gpt", "value": 42}]})
    assert str(err) == f"{path}:1: conversations[1].value: expected a string, got int"


def test_non_string_openai_content_names_the_content_field(tmp_path):
    path, err = error_of(tmp_path, {"messages": [{"role": "user", "content": {"text": "q"}},
                                                 {"role": "assistant", "content": "a"}]})
    assert str(err) == f"{path}:1: messages[0].content: expected a string, got dict"


def test_unknown_sharegpt_role_names_the_from_field(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), {"from": "bot", "value": "a"}]})
    assert str(err).startswith(f"{path}:1: conversations[1].from: unknown role 'bot' (expected one of ")
    assert "human" in err.problem and "observation" in err.problem


def test_unknown_openai_role_names_the_role_field(tmp_path):
    path, err = error_of(tmp_path, {"messages": [{"role": "user", "content": "q"},
                                                 {"role": "model", "content": "a"}]})
    assert str(err) == (f"{path}:1: messages[1].role: unknown role 'model' "
                        "(expected system, user, assistant or tool)")


def test_tool_result_after_a_plain_assistant_reply_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), gpt("let me look"),
                                                      {"from": "observation", "value": "{}"}, gpt("done")]})
    assert str(err) == (f"{path}:1: conversations[2]: a tool result (observation) must follow a function call, "
                        "not an assistant text reply")


def test_tool_result_after_a_user_turn_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), {"from": "observation", "value": "{}"},
                                                      gpt("done")]})
    assert str(err) == (f"{path}:1: conversations[1]: a tool result (observation) must follow a function call, "
                        "not user")


def test_conversation_not_ending_with_assistant_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [user("q"), gpt("a"), user("and?")]})
    assert str(err) == (f"{path}:1: conversations: the conversation does not end with an assistant reply "
                        "(nothing to learn)")


def test_empty_conversation_list_is_rejected(tmp_path):
    path, err = error_of(tmp_path, {"conversations": []})
    assert str(err) == f"{path}:1: conversations: expected a non-empty list of turns"


def test_json_array_file_sources_say_item_n(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([
        {"instruction": "q1", "output": "a1"},
        {"instruction": "q2", "output": ""},
        {"instruction": "q3", "input": "ctx", "output": "a3"},
    ], indent=2, ensure_ascii=False), "utf-8")
    items = read_file(path)
    assert [type(i) for i in items] == [Conversation, DataError, Conversation]
    assert str(items[0].source) == f"{path}:item 1"
    assert str(items[1]) == f"{path}:item 2: output: empty"
    assert items[2].messages[0].content == "q3\nctx"


def test_json_array_file_with_bad_json_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', "utf-8")
    items = read_file(path)
    assert len(items) == 1 and isinstance(items[0], DataError)
    assert str(items[0]).startswith(f"{path}:3: json: not valid JSON")


def test_single_line_json_object_file_is_read(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"question": "q", "answer": "a"}), "utf-8")
    items = read_file(path)
    assert [(type(i), i.question) for i in items] == [(QARecord, "q")]


# ------------------------------------------------------------------------------------------------ file handling


def test_utf8_bom_at_start_is_ignored(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q"}).encode() + b"\n")
    assert [type(i) for i in read_file(jsonl)] == [QARecord]
    txt = tmp_path / "bom.txt"
    txt.write_bytes("\ufeffFirst doc\nSecond doc\n".encode("utf-8"))
    assert [r.text for r in read_file(txt)] == ["First doc", "Second doc"]
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "x"}]).encode())
    assert [r.text for r in read_file(array)] == ["x"]


def test_crlf_line_endings_are_stripped(tmp_path):
    txt = tmp_path / "crlf.txt"
    txt.write_bytes(b"First doc\r\nSecond doc\r\n\r\nThird\r\n")
    assert [r.text for r in read_file(txt)] == ["First doc", "Second doc", "Third"]
    assert [r.text for r in read_file(txt, text_separator="blank_line")] == ["First doc\nSecond doc", "Third"]
    jsonl = tmp_path / "crlf.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    items = read_file(jsonl)
    assert [r.text for r in items] == ["a", "b"] and [r.source.line for r in items] == [1, 2]


def test_blank_lines_are_skipped_but_line_numbers_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\n{"text": "b"}\n\n', "utf-8")
    items = read_file(path)
    assert [(r.text, r.source.line) for r in items] == [("a", 2), ("b", 5)]


def test_huge_single_line_is_read_whole(tmp_path):
    big = "发热" * 1_300_000 + "x" * 1_000_000  # ~8.8 MB as UTF-8
    path = tmp_path / "big.txt"
    path.write_text(f"short\n{big}\nend\n", "utf-8")
    items = read_file(path)
    assert [len(r.text) for r in items] == [5, len(big), 3]
    assert items[1].text == big
    jsonl = write_jsonl(tmp_path / "big.jsonl", [{"text": big}])
    assert read_file(jsonl)[0].text == big


def test_non_utf8_line_gives_an_encoding_error_and_other_lines_still_read(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("UTF-8 line\n".encode() + "发热是常见症状\n".encode("gbk") + "好的\n".encode())
    items = read_file(path)
    assert [type(i) for i in items] == [TextRecord, DataError, TextRecord]
    assert [r.text for r in records_of(items)] == ["UTF-8 line", "好的"]
    err = items[1]
    assert str(err).startswith(f"{path}:2: encoding: not UTF-8 (byte 0x")
    assert "iconv -f GBK -t UTF-8" in err.problem


def test_non_utf8_jsonl_line_gives_an_encoding_error(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n"
                     + json.dumps({"text": "发热"}, ensure_ascii=False).encode("gbk") + b"\n"
                     + json.dumps({"text": "ok2"}).encode() + b"\n")
    items = read_file(path)
    assert [type(i) for i in items] == [TextRecord, DataError, TextRecord]
    assert str(items[1]).startswith(f"{path}:2: encoding: not UTF-8")


def test_non_utf8_line_in_blank_line_mode_is_reported(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes(b"para one\n\n" + "坏".encode("gbk") + b"\n\npara two\n")
    items = read_file(path, text_separator="blank_line")
    assert [str(i).split(": ")[0:2] for i in errors_of(items)] == [[f"{path}:3", "encoding"]]
    assert [r.text for r in records_of(items)] == ["para one", "para two"]


def test_unsupported_suffix_is_a_file_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answer\nq,a\n", "utf-8")
    items = read_file(path)
    assert len(items) == 1
    assert str(items[0]) == f"{path}: file: unsupported file type '.csv' (use .txt, .json or .jsonl)"


def test_upper_case_suffixes_are_recognised(tmp_path):
    path = write_jsonl(tmp_path / "DATA.JSONL", [{"text": "a"}])
    assert [r.text for r in read_file(path)] == ["a"]


# ------------------------------------------------------------------------------------------------ sources


def test_folder_is_read_recursively_data_files_only_sorted(tmp_path):
    root = tmp_path / "data"
    write_jsonl(root / "b.jsonl", [{"text": "b"}])
    write_jsonl(root / "sub" / "deeper" / "c.json", [{"text": "c"}])
    (root / "a.txt").write_text("a\n", "utf-8")
    (root / "z.txt").write_text("z\n", "utf-8")
    (root / "notes.md").write_text("ignored\n", "utf-8")
    (root / "table.csv").write_text("ignored\n", "utf-8")
    files = resolve_many(str(root))
    assert files == [root / "a.txt", root / "b.jsonl", root / "sub" / "deeper" / "c.json", root / "z.txt"]
    result = read_records(str(root))
    assert [r.text for r in result.records] == ["a", "b", "c", "z"]


def test_empty_folder_is_file_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x", "utf-8")
    with pytest.raises(FileNotFoundError, match="folder holds no"):
        resolve_many(str(tmp_path / "empty"))


def test_glob_selects_matching_files(tmp_path):
    write_jsonl(tmp_path / "train_1.jsonl", [{"text": "1"}])
    write_jsonl(tmp_path / "train_2.jsonl", [{"text": "2"}])
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "v"}])
    write_jsonl(tmp_path / "nested" / "train_3.jsonl", [{"text": "3"}])
    assert [r.text for r in read_records(str(tmp_path / "train_*.jsonl")).records] == ["1", "2"]
    # `**` recurses; files come sorted by path (nested/… sorts before train_…)
    assert [r.text for r in read_records(str(tmp_path / "**" / "train_*.jsonl")).records] == ["3", "1", "2"]


def test_glob_matching_nothing_is_file_not_found(tmp_path):
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(FileNotFoundError, match="matches no files") as info:
        read_records(pattern)
    assert pattern in str(info.value)


def test_comma_separated_sources_are_read_in_order_once_each(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    b = tmp_path / "b.txt"
    b.write_text("b\n", "utf-8")
    result = read_records(f"{b}, {a},{b}")
    assert [r.text for r in result.records] == ["b", "a"]
    assert list(result.formats) == [str(b), str(a)]


def test_list_of_sources_is_accepted(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    assert [r.text for r in read_records([str(a), str(b)]).records] == ["a", "b"]


def test_missing_path_is_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        read_records(str(missing))
    assert str(missing) in str(info.value)
    assert "no such file" in str(info.value)


# ------------------------------------------------------------------------------------------------ read_records


def mixed_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [user("q1"), gpt("a1")]},
        {"conversations": [user("q2"), gpt("")]},
        {"conversations": [user("q3"), gpt("a3")]},
        {"conversations": [gpt("a4")]},
    ])


def test_read_records_raises_listing_every_error_and_the_skip_option(tmp_path):
    path = mixed_file(tmp_path)
    with pytest.raises(InvalidDataError) as info:
        read_records(str(path))
    message = str(info.value)
    assert message.startswith("2 invalid record(s):")
    assert f"{path}:2: conversations[1]: empty assistant turn" in message
    assert f"{path}:4: conversations[0]: assistant turn after nothing" in message
    assert "skip_invalid_records" in message
    assert [str(e).split(": ")[0] for e in info.value.errors] == [f"{path}:2", f"{path}:4"]


def test_read_records_skip_invalid_keeps_the_valid_records(tmp_path, caplog):
    path = mixed_file(tmp_path)
    result = read_records(str(path), skip_invalid=True)
    assert [r.messages[0].content for r in result.records] == ["q1", "q3"]
    assert len(result.errors) == 2
    assert result.counts == {str(path): 2} and result.formats == {str(path): "sharegpt"}
    assert "skipped 2 invalid record(s)" in caplog.text


def test_read_records_all_invalid_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [gpt("a")]}])
    with pytest.raises(InvalidDataError, match="bad.jsonl: records: no valid record: all 1 failed validation"):
        read_records(str(path), skip_invalid=True)


def test_an_empty_file_is_an_error_even_among_good_ones(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"conversations": [user("q"), gpt("a")]}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", "utf-8")
    for skip in (False, True):
        with pytest.raises(InvalidDataError, match="empty.jsonl: records: no records: the file is empty"):
            read_records([str(good), str(empty)], skip_invalid=skip)


def test_read_records_wrong_kind_is_a_format_error_naming_the_needed_kind(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3)
    with pytest.raises(InvalidDataError) as info:
        read_records(str(path), kinds=("conversation",))
    errors = info.value.errors
    assert [str(e) for e in errors] == [
        f"{path}: format: holds preference (preference) records, but conversation records are needed here"]
    # skipping invalid records does not hide a file of the wrong kind
    with pytest.raises(InvalidDataError, match="conversation records are needed here"):
        read_records(str(path), kinds=("conversation",), skip_invalid=True)


def test_read_records_accepts_any_of_several_kinds(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert len(read_records(str(path), kinds=("qa", "conversation")).records) == 1


def test_read_records_unknown_kind_is_a_value_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match="unknown record kind 'chat'"):
        read_records(str(path), kinds=("chat",))


def test_read_records_limit(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(5)])
    assert [r.text for r in read_records(str(a), limit=3).records] == ["a0", "a1", "a2"]
    result = read_records([str(a), str(b)], limit=7)
    assert [r.text for r in result.records] == [*(f"a{i}" for i in range(5)), "b0", "b1"]
    assert [r.text for r in read_records([str(a), str(b)], limit=5).records] == [f"a{i}" for i in range(5)]


def test_read_records_passes_text_options(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("one\ntwo\n\nthree\n", "utf-8")
    result = read_records(str(path), options=ReadOptions(text_separator="blank_line", keep_linebreaks=False))
    assert [r.text for r in result.records] == ["one two", "three"]


# ------------------------------------------------------------------------------------------------ bugs (strict xfail)


@pytest.mark.parametrize("first, odd", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, [1, 2]),
    ({"text": "a"}, 5),
    ({"question": "q"}, "just a string"),
], ids=["sharegpt-then-list", "text-then-number", "qa-then-string"])
def test_a_later_line_that_is_not_an_object_is_a_record_error_not_a_crash(tmp_path, first, odd):
    path, items = read_rows(tmp_path, [first, odd, first])
    assert [type(i) for i in items] == [type(items[0]), DataError, type(items[0])]
    assert str(items[1]).startswith(f"{path}:2: record: expected a JSON object")


def test_forced_format_with_a_non_object_line_is_a_record_error(tmp_path):
    path, items = read_rows(tmp_path, ["a string"], data_format="sharegpt")
    assert str(items[0]).startswith(f"{path}:1: record: expected a JSON object")


def test_unknown_forced_format_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="bogus"):
        read_file(path, data_format="bogus")


@pytest.mark.parametrize("row, field", [
    ({"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "conversations[1]"),
    ({"system": "S", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "messages[1]"),
], ids=["sharegpt", "openai"])
def test_error_index_with_top_level_system_points_at_the_turn_in_the_file(tmp_path, row, field):
    path, err = error_of(tmp_path, row)
    assert str(err) == f"{path}:1: {field}: empty assistant turn"


def test_error_index_of_an_openai_shaped_turn_inside_sharegpt_conversations(tmp_path):
    path, err = error_of(tmp_path, {"conversations": [{"from": "human", "value": "q"},
                                                      {"role": "model", "content": "a"}]})
    assert str(err).startswith(f"{path}:1: conversations[1].role: unknown role 'model'")


def test_trl_implicit_prompt_keeps_a_top_level_system(tmp_path):
    record = read_one(tmp_path, {
        "system": "You are a doctor.",
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    })
    assert [(m.role, m.content) for m in record.prompt] == [("system", "You are a doctor."), ("user", "q")]


# ------------------------------------------------------------------------------------------------ MedicalGPT files


def medicalgpt(name: str) -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"MedicalGPT fixture files not present at {FIXTURES}")
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def read_whole(path: Path) -> ReadResult:
    result = ReadResult()
    collect(file_reader(path, ReadOptions()), str(path), (), result)
    return result


@pytest.mark.parametrize("name, fmt, count, kind", [
    ("fever.txt", "text", 985, TextRecord),
    ("medical_sft_1K_format.jsonl", "sharegpt", 1000, Conversation),
    ("dpo_zh_500.jsonl", "preference", 500, PreferencePair),
    ("toolcall_dpo_zh_demo.jsonl", "preference", 11, PreferencePair),
    ("sample.jsonl", "qa", 32, QARecord),
])
def test_medicalgpt_file_reads_cleanly(name, fmt, count, kind):
    path = medicalgpt(name)
    result = read_whole(path)
    assert result.errors == []
    assert result.formats == {str(path): fmt}
    assert len(result.records) == count == result.counts[str(path)]
    assert all(isinstance(r, kind) for r in result.records)


def test_medicalgpt_glaive_toolcall_has_two_observations_after_plain_assistant_text():
    path = medicalgpt("glaive_toolcall_zh_demo.jsonl")
    result = read_whole(path)
    assert result.formats == {str(path): "sharegpt"}
    assert len(result.records) == 298
    assert [str(e) for e in result.errors] == [
        f"{path}:{line}: conversations[2]: a tool result (observation) must follow a function call, "
        "not an assistant text reply" for line in (198, 294)]
    # the records really are like that: a gpt text turn directly followed by an observation
    lines = path.read_text("utf-8").splitlines()
    for line in (198, 294):
        turns = json.loads(lines[line - 1])["conversations"]
        assert [t["from"] for t in turns[1:3]] == ["gpt", "observation"]
    calls = [m for r in result.records for m in r.messages if m.tool_calls]
    assert calls and all(isinstance(c.tool_calls[0]["name"], str) for c in calls)
    assert any(r.tools for r in result.records)


def test_medicalgpt_dpo_has_system_turns_in_some_prompts():
    path = medicalgpt("dpo_zh_500.jsonl")
    records = read_whole(path).records
    assert sum(1 for r in records if r.prompt[0].role == "system") == 84
    assert all(r.prompt[-1].role in ("user", "tool") for r in records)
    assert all(r.chosen[0].role == "assistant" and r.rejected[0].role == "assistant" for r in records)


def test_medicalgpt_toolcall_dpo_pairs_carry_their_tools():
    path = medicalgpt("toolcall_dpo_zh_demo.jsonl")
    records = read_whole(path).records
    assert all(r.tools and all(isinstance(t["name"], str) for t in r.tools) for r in records)
    assert any(m.role == "tool" for r in records for m in r.prompt)


def test_medicalgpt_files_read_together_as_a_folder_filtered_by_kind():
    medicalgpt("dpo_zh_500.jsonl")
    with pytest.raises(InvalidDataError, match="records are needed here"):
        read_records(str(FIXTURES), kinds=("conversation",))
    result = read_records(f"{FIXTURES / 'dpo_zh_500.jsonl'},{FIXTURES / 'toolcall_dpo_zh_demo.jsonl'}",
                          kinds=("preference",))
    assert len(result.records) == 511
