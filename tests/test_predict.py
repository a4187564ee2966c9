"""Batch prediction: every prompt format, batched answers equal to single ones, token counts, resuming."""

from __future__ import annotations

import json

import pytest

from medgpt.cli import main
from medgpt.data.records import InvalidDataError, Message
from medgpt.serve.engine import GenerationEngine, SamplingParams
from medgpt.serve.predict import PredictionFileError, predict, read_prompts

GREEDY = SamplingParams(max_new_tokens=5, temperature=0)
TOOLS = [{"name": "lookup_drug", "description": "Drug facts", "parameters": {"type": "object"}}]


@pytest.fixture(scope="module")
def engine(learnable_model_dir):
    return GenerationEngine.load(str(learnable_model_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_jsonl(folder / "a_qa.jsonl", [{"id": "q1", "question": "What is anaemia?", "answer": "Too few red cells."},
                                        {"question": "What is a fever?", "system": "Answer briefly."}])
    write_jsonl(folder / "b_dialogues.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Is ibuprofen safe?"}, {"role": "assistant", "content": "Usually."}]},
        {"messages": [{"role": "user", "content": "Dose of paracetamol?"}, {"role": "assistant", "content": "Ask."}],
         "tools": TOOLS}])
    write_jsonl(folder / "c_mcq.jsonl", [{"question": "Normal body temperature?", "options": ["30 C", "37 C"],
                                          "answer": "B"}])
    (folder / "d_questions.txt").write_text("How do I treat a burn?\nWhat helps a cough?\n", encoding="utf-8")
    return folder


def test_every_format_becomes_a_prompt_with_its_reference(data):
    prompts = read_prompts(str(data))
    by_id = {p.id: p for p in prompts}
    assert list(by_id) == ["q1", f"{data}/a_qa.jsonl:2", f"{data}/b_dialogues.jsonl:1", f"{data}/b_dialogues.jsonl:2",
                           f"{data}/c_mcq.jsonl:1", f"{data}/d_questions.txt:1", f"{data}/d_questions.txt:2"]
    assert by_id["q1"].reference == "Too few red cells."
    assert [m.role for m in by_id[f"{data}/a_qa.jsonl:2"].messages] == ["system", "user"]
    dialogue = by_id[f"{data}/b_dialogues.jsonl:1"]
    assert [m.content for m in dialogue.messages] == ["Hi", "Hello!", "Is ibuprofen safe?"]
    assert dialogue.reference == "Usually."
    assert by_id[f"{data}/b_dialogues.jsonl:2"].tools == TOOLS
    assert "A. 30 C\nB. 37 C" in by_id[f"{data}/c_mcq.jsonl:1"].messages[0].content
    assert by_id[f"{data}/c_mcq.jsonl:1"].reference == "B"
    assert by_id[f"{data}/d_questions.txt:2"].messages == [Message("user", "What helps a cough?")]
    with_system = read_prompts(str(data / "d_questions.txt"), system="Be kind.")
    assert with_system[0].messages[0] == Message("system", "Be kind.")


def test_batched_predictions_equal_single_answers_with_token_counts(engine, data, tmp_path):
    prompts = read_prompts(str(data))
    output = tmp_path / "out.jsonl"
    summary = predict(engine, prompts, output, GREEDY, batch_size=3, progress=False)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert summary.written == len(prompts) == len(rows) and summary.skipped == 0
    for prompt, row in zip(prompts, rows):
        single = engine.generate([prompt.messages], GREEDY, prompt.tools)[0]
        assert row["id"] == prompt.id and row["output"] == single.text
        assert row["prompt_tokens"] == len(engine.chat_format.prompt_ids(prompt.messages, prompt.tools))
        assert row["completion_tokens"] == single.completion_tokens and row["finish_reason"] == single.finish_reason
        assert row["messages"] == [m.to_openai() for m in prompt.messages]
    assert rows[0]["reference"] == "Too few red cells." and rows[3]["tools"] == TOOLS
    assert summary.completion_tokens == sum(r["completion_tokens"] for r in rows)


def test_a_stopped_run_continues_without_repeating(engine, data, tmp_path):
    prompts = read_prompts(str(data))
    output = tmp_path / "out.jsonl"
    predict(engine, prompts[:3], output, GREEDY, progress=False)
    first_lines = output.read_text().splitlines()
    with output.open("a") as handle:
        handle.write('{"id": "torn by a cra')  # the run was killed mid-write
    summary = predict(engine, prompts, output, GREEDY, progress=False)
    lines = output.read_text().splitlines()
    assert summary.skipped == 3 and summary.written == len(prompts) - 3
    assert lines[:3] == first_lines
    assert [json.loads(line)["id"] for line in lines] == [p.id for p in prompts]
    again = predict(engine, prompts, output, GREEDY, progress=False)
    assert again.written == 0 and output.read_text().splitlines() == lines


def test_duplicate_ids_and_foreign_output_files_are_refused(engine, tmp_path):
    data = write_jsonl(tmp_path / "dup.jsonl", [{"id": 7, "question": "A?"}, {"id": 7, "question": "B?"}])
    with pytest.raises(InvalidDataError, match=r"dup.jsonl:2: id: duplicate id '7' \(also at .*dup.jsonl:1\)"):
        read_prompts(str(data))
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"id": "a", "output": "x"}\nplain text\n')
    with pytest.raises(PredictionFileError, match="notes.jsonl:2: not a prediction line"):
        predict(engine, read_prompts(str(write_jsonl(tmp_path / "q.jsonl", [{"question": "C?"}]))), foreign,
                GREEDY, progress=False)


def test_predict_command_writes_then_resumes(learnable_model_dir, data, tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    args = ["predict", "--model", str(learnable_model_dir), "--data", str(data), "--output", str(output),
            "--max-new-tokens", "4", "--batch-size", "4"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "7 answers written, 0 already there" in captured.out and "predict" in captured.err  # progress bar
    assert main(args) == 0
    assert "0 answers written, 7 already there" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?"}, {"question": ""}])
    assert main(["predict", "--model", str(learnable_model_dir), "--data", str(bad), "--output",
                 str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl:2: question" in capsys.readouterr().err
