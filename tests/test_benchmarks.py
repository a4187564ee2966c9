"""Benchmark readers on hand-written files in each published schema (tests/fixtures/benchmarks): the format is
detected from the columns, answers are the right letters, categories are read, MedMCQA's two numberings are told
apart, subjects filter, parquet and datasets.load_dataset read the same rows, and a bad row names file:line:
field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from medgpt.config import ConfigError
from medgpt.data.records import InvalidDataError
from medgpt.evaluation.benchmarks import read_questions

FIXTURES = ROOT / "tests" / "fixtures" / "benchmarks"


def read(name: str, **options):
    result = read_questions(str(FIXTURES / name), **options)
    return result.questions, set(result.formats.values())


@pytest.mark.parametrize("name, fmt, answers, categories", [
    ("medqa_us_4options.jsonl", "medqa", ["A", "C", "B"], ["step1", "step2&3", "step2&3"]),
    ("medqa_mainland.jsonl", "medqa", ["A", "C"], ["卫生法规", "第一部分"]),
    ("medqa_hf.jsonl", "medqa_hf", ["A", "C"], [None, None]),
    ("medmcqa_hub.jsonl", "medmcqa", ["A", "C", "B"], ["Anatomy", "Pharmacology", "Pediatrics"]),
    ("medmcqa_original_dev.json", "medmcqa", ["A", "D"], ["Anatomy", "Biochemistry"]),
    ("pubmedqa_ori_pqal.json", "pubmedqa", ["A", "B"], [None, None]),
    ("pubmedqa_hf.jsonl", "pubmedqa", ["C"], [None]),
    ("cmexam_test.csv", "cmexam", ["C", "ABD", "A"], ["临床医学", "临床医学", "中医学"]),
    ("cmb_val.json", "cmb", ["B", "ACD"], ["执业医师", "护士执业资格"]),
    ("cmmlu", "cmmlu", ["B", "C", "B", "B"], ["anatomy", "anatomy", "chinese_history", "virology"]),
    ("mmlu", "mmlu", ["B", "C", "B"], ["anatomy", "anatomy", "astronomy"]),
    ("mmlu_cais.jsonl", "mmlu", ["B", "A", "B"], ["college_biology", "medical_genetics", "elementary_mathematics"]),
])
def test_each_published_format_is_detected_and_read_to_the_right_letters(name, fmt, answers, categories):
    questions, formats = read(name)
    assert formats == {fmt}
    assert [q.answer for q in questions] == answers
    assert [q.category for q in questions] == categories
    assert all(len(q.options) >= 2 and q.question for q in questions)


def test_sources_name_the_line_item_or_id_each_question_came_from():
    assert [str(q.source).split("/")[-1] for q in read("cmexam_test.csv")[0]] == [
        "cmexam_test.csv:2", "cmexam_test.csv:7", "cmexam_test.csv:12"]  # quoted multi-line options
    assert str(read("pubmedqa_ori_pqal.json")[0][0].source).endswith("pubmedqa_ori_pqal.json:id 10000001")
    assert str(read("cmb_val.json")[0][1].source).endswith("cmb_val.json:item 2")


def test_multi_answer_questions_keep_their_letters_and_unused_cmb_options_are_dropped():
    cmb = read("cmb_val.json")[0]
    assert [q.multi for q in cmb] == [False, True] and list(cmb[0].options) == list("ABCD")  # E was ""
    cmexam = read("cmexam_test.csv")[0]
    assert cmexam[1].multi and cmexam[1].options["C"] == "酮症酸中毒"


def test_pubmedqa_is_a_three_option_question_whose_text_carries_the_contexts():
    question = read("pubmedqa_ori_pqal.json")[0][0]
    assert question.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert "randomised 120 adults" in question.question and question.stem.startswith("Does regular walking")
    hf = read("pubmedqa_hf.jsonl")[0][0]
    assert len(hf.contexts) == 2 and hf.answer == "C"


def test_medmcqa_numbering_is_decided_by_a_zero_or_a_four_or_by_the_flag(tmp_path, caplog):
    only_middle = tmp_path / "dev.json"
    rows = [json.loads(line) for line in (FIXTURES / "medmcqa_hub.jsonl").read_text().splitlines()][1:]  # cop 2, 1
    only_middle.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [q.answer for q in read_questions(str(only_middle)).questions] == ["C", "B"]  # the hub's, warned
    assert "medmcqa_numbering: original" in caplog.text
    assert [q.answer for q in read_questions(str(only_middle), medmcqa_numbering="original").questions] == ["B", "A"]
    both = tmp_path / "both.jsonl"
    both.write_text((FIXTURES / "medmcqa_hub.jsonl").read_text() + json.dumps({**rows[0], "cop": 4}) + "\n")
    with pytest.raises(InvalidDataError, match="both 0 and 4"):
        read_questions(str(both))


def test_subjects_keep_the_medical_subsets_or_the_named_ones():
    assert [q.category for q in read("cmmlu", subjects="medical")[0]] == ["anatomy", "anatomy", "virology"]
    assert [q.category for q in read("mmlu_cais.jsonl", subjects="medical")[0]] == ["college_biology",
                                                                                  "medical_genetics"]
    assert len(read("mmlu", subjects="astronomy")[0]) == 1
    with pytest.raises(ConfigError, match="no questions of subject.*virologyy.*present: anatomy"):
        read("mmlu", subjects="virologyy")
    with pytest.raises(ConfigError, match="carry no subject"):
        read("medqa_hf.jsonl", subjects="medical")


def test_a_forced_format_overrides_detection_and_a_wrong_one_names_the_field():
    questions, formats = read("medqa_us_4options.jsonl", mcq_format="mcq")  # its `answer` text, not answer_idx
    assert formats == {"mcq"} and [q.answer for q in questions] == ["A", "C", "B"]
    with pytest.raises(InvalidDataError, match=r"medqa_hf.jsonl:1: options"):
        read("medqa_hf.jsonl", mcq_format="medqa")


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n',
     r"bad.jsonl:1: answer_idx: 'C' is not option letter"),
    ("bad.csv", "Question,Options,Answer\nQ,\"A x\nB y\",\n", r"bad.csv:2: Answer: missing"),
    ("bad.jsonl", '{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1}\n',
     r"bad.jsonl:1: cop: -1: this row has no answer"),
    ("bad.json", '[{"question": "Q", "option": {"A": "x", "B": "y"}, "answer": "", "question_type": "单项选择题"}]',
     r"bad.json:item 1: answer: missing: CMB-test ships without answers"),
    ("bad.jsonl", '{"question": "Q"}\n', r"bad.jsonl: format: no benchmark format has these columns \(question\)"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidDataError, match=message):
        read_questions(str(path))


def test_parquet_files_and_a_local_dataset_folder_through_load_dataset_read_the_same_questions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "medmcqa_hub.jsonl").read_text().splitlines()]
    repo = tmp_path / "medmcqa"  # laid out as a hub dataset repository: data/SPLIT-*.parquet
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), repo / "data" / "validation-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), repo / "data" / "train-00000-of-00001.parquet")
    from_file = read_questions(str(repo / "data" / "validation-00000-of-00001.parquet")).questions
    from_dataset = read_questions(str(repo), split="validation").questions
    expected = [q.answer for q in read("medmcqa_hub.jsonl")[0]]
    assert [q.answer for q in from_file] == [q.answer for q in from_dataset] == expected
    assert str(from_dataset[2].source).endswith("[validation]:row 3")
    assert len(read_questions(str(repo), split="train").questions) == 1  # the split chooses the files
