"""`medgpt data check`: per-file format and counts, every error as `file:line: field: problem`, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.cli import main


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def turn(role, text):
    return {"from": role, "value": text}


GOOD_SFT = [
    {"conversations": [turn("human", "What is a fever?"), turn("gpt", "A body temperature above 38C.")]},
    {"system": "Be brief.", "conversations": [turn("human", "Aspirin dose?"), turn("gpt", "Ask your doctor."),
                                              turn("human", "Why?"), turn("gpt", "It depends on you.")]},
]
PREFERENCE = [{"conversations": [turn("human", "Is fever dangerous?")], "chosen": "Rarely; above 40C see a doctor.",
               "rejected": "No."}]


def check(capsys, *args: str) -> tuple[int, str]:
    """Run `medgpt data check ARGS` in-process; return the exit code and stdout."""
    code = main(["data", "check", *args])
    return code, capsys.readouterr().out


@pytest.fixture
def sft_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", GOOD_SFT)


@pytest.fixture
def bad_sft_file(tmp_path) -> Path:
    """One good record, an empty assistant turn (line 2), two user turns (line 3), broken JSON (line 4)."""
    path = tmp_path / "bad_sft.jsonl"
    path.write_text(
        json.dumps(GOOD_SFT[0]) + "\n"
        + json.dumps({"conversations": [turn("human", "q"), turn("gpt", "  ")]}) + "\n"
        + json.dumps({"conversations": [turn("human", "q"), turn("human", "again"), turn("gpt", "a")]}) + "\n"
        + '{"conversations": [\n', "utf-8")
    return path


# ------------------------------------------------------------------------------------------------ in-process


def test_valid_file_reports_format_and_count_and_exits_0(capsys, sft_file):
    code, out = check(capsys, str(sft_file))
    assert code == 0
    assert f"{sft_file}: sharegpt, 2 valid record(s), ok" in out
    assert out.rstrip().endswith("1 file(s), 2 valid record(s), 0 error(s)")


def test_invalid_record_exits_1_and_lists_file_line_field_problem(capsys, bad_sft_file):
    path = bad_sft_file
    code, out = check(capsys, str(path))
    assert code == 1
    lines = out.splitlines()
    assert f"{path}: sharegpt, 1 valid record(s), 3 error(s)" in lines
    assert f"  {path}:2: conversations[1]: empty assistant turn" in lines
    assert f"  {path}:3: conversations[1]: user turn after a user turn (roles must alternate)" in lines
    assert any(line.startswith(f"  {path}:4: json: not valid JSON") for line in lines)
    assert lines[-1] == "1 file(s), 1 valid record(s), 3 error(s)"


def test_missing_path_exits_1_naming_the_path(capsys, tmp_path, sft_file):
    missing = tmp_path / "nowhere.jsonl"
    code, out = check(capsys, str(sft_file), str(missing))
    assert code == 1
    assert f"{missing}: path: no such file, folder or pattern" in out
    assert f"{sft_file}: sharegpt, 2 valid record(s), ok" in out  # the good file is still checked


def test_folder_and_glob_are_checked_file_by_file(capsys, tmp_path, sft_file):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "notes.md").write_text("not data", "utf-8")
    code, out = check(capsys, str(tmp_path))
    assert code == 0
    assert f"{tmp_path / 'qa.jsonl'}: qa, 1 valid record(s), ok" in out
    assert "notes.md" not in out
    assert out.rstrip().endswith("2 file(s), 3 valid record(s), 0 error(s)")
    code, out = check(capsys, str(tmp_path / "*.jsonl"))
    assert code == 0 and "2 file(s)" in out


def test_stage_sft_on_a_preference_file_fails_with_a_format_error(capsys, tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", PREFERENCE)
    code, out = check(capsys, str(path), "--stage", "sft")
    assert code == 1
    assert f"{path}: format: holds preference (preference) records, but conversation records are needed here" in out
    code, out = check(capsys, str(path), "--stage", "dpo")
    assert code == 0
    assert f"{path}: preference, 1 valid record(s), ok" in out


def test_unknown_stage_is_an_argparse_error(capsys, sft_file):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(sft_file), "--stage", "pretrain"])
    assert info.value.code == 2
    assert "invalid choice: 'pretrain'" in capsys.readouterr().err


def test_text_separator_blank_line_counts_paragraphs(capsys, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Para one, line one.\nPara one, line two.\n\nPara two.\n\n\nPara three.\n", "utf-8")
    code, out = check(capsys, str(path))
    assert code == 0 and f"{path}: text, 4 valid record(s), ok" in out
    code, out = check(capsys, str(path), "--text-separator", "blank_line")
    assert code == 0 and f"{path}: text, 3 valid record(s), ok" in out


def test_forced_format_reports_records_that_do_not_fit(capsys, sft_file):
    code, out = check(capsys, str(sft_file), "--format", "openai")
    assert code == 1
    assert f"{sft_file}:1: messages: expected a non-empty list of turns" in out


def test_max_errors_limits_the_errors_shown_per_file(capsys, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [turn("gpt", f"a{i}")]} for i in range(4)])
    code, out = check(capsys, str(path), "--max-errors", "1")
    assert code == 1
    assert f"  {path}:1: conversations[0]: assistant turn after nothing" in out
    assert f"{path}:2:" not in out
    assert "… and 4 more" in out  # the three other records and "no valid record" for the file


def test_non_utf8_file_reports_the_encoding_hint(capsys, tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("fine\n".encode() + "发热\n".encode("gbk"))
    code, out = check(capsys, str(path))
    assert code == 1
    assert f"  {path}:2: encoding: not UTF-8" in out and "iconv -f GBK -t UTF-8" in out


def test_unknown_format_is_reported_not_a_traceback(capsys, sft_file):
    try:
        code = main(["data", "check", str(sft_file), "--format", "bogus"])
    except SystemExit as exit_:  # an argparse `choices` error would also be fine
        code = exit_.code
    assert code != 0
    assert "bogus" in capsys.readouterr().err


def test_model_prints_token_statistics(capsys, tmp_path, embedded_dir, tokenizer):
    text = tmp_path / "docs.txt"
    docs = ["Fever is a raised body temperature.", "Paracetamol lowers fever.", "Rest."]
    text.write_text("\n".join(docs) + "\n", "utf-8")
    sft = write_jsonl(tmp_path / "sft.jsonl", GOOD_SFT)
    code, out = check(capsys, str(text), str(sft), "--model", str(embedded_dir))
    assert code == 0, out
    # text documents: their tokens plus one end-of-text token
    lengths = sorted(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in docs)
    assert (f"  tokens: min {lengths[0]}, median {lengths[1]}, p95 {lengths[2]}, max {lengths[2]}, "
            f"total {sum(lengths)}") in out
    stats = [line for line in out.splitlines() if line.startswith("  tokens:")]
    assert len(stats) == 2
    match = re.fullmatch(r"  tokens: min (\d+), median (\d+), p95 (\d+), max (\d+), total (\d+)", stats[1])
    low, median, p95, high, total = map(int, match.groups())
    assert 0 < low <= median <= p95 <= high and total >= low + high  # two conversations


# ------------------------------------------------------------------------------------------------ help


def test_help_lists_data_chat_and_train(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "chat", "train"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out


def test_data_check_help_describes_its_flags(capsys):
    with pytest.raises(SystemExit):
        main(["data", "check", "--help"])
    out = capsys.readouterr().out
    for flag in ("--stage", "--model", "--format", "--text-separator", "--max-errors"):
        assert flag in out


# ------------------------------------------------------------------------------------------------ subprocess


def medgpt_command() -> list[str]:
    script = Path(sys.executable).parent / "medgpt"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medgpt.cli"]


def test_command_line_exit_codes_and_report(tmp_path, sft_file, bad_sft_file):
    ok = subprocess.run([*medgpt_command(), "data", "check", str(sft_file)], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert f"{sft_file}: sharegpt, 2 valid record(s), ok" in ok.stdout

    bad = subprocess.run([*medgpt_command(), "data", "check", str(bad_sft_file), "missing.jsonl"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert f"{bad_sft_file}:2: conversations[1]: empty assistant turn" in bad.stdout
    assert "missing.jsonl: path: no such file, folder or pattern" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_command_line_help_lists_subcommands(tmp_path):
    result = subprocess.run([*medgpt_command(), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0
    for command in ("data", "chat", "train"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE)


# ------------------------------------------------------------------------------------------------ empty, mixed


def test_empty_file_is_an_error_not_zero_valid_records_ok(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", "utf-8")
    code, out = check(capsys, str(empty), "--stage", "sft")
    assert code == 1
    assert f"{empty}: unknown, 0 valid record(s), 1 error(s)" in out
    assert f"  {empty}: records: no records: the file is empty (or holds only blank lines)" in out


def test_file_without_a_valid_record_is_an_error_naming_the_file(capsys, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [turn("gpt", "a")]}] * 2)
    code, out = check(capsys, str(path))
    assert code == 1
    assert f"  {path}: records: no valid record: all 2 failed validation (see above)" in out


def as_openai(row: dict) -> dict:
    roles = {"human": "user", "gpt": "assistant"}
    return {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]}


def as_alpaca(row: dict) -> dict:
    first, reply = row["conversations"][:2]
    return {"instruction": first["value"], "input": "", "output": reply["value"]}


@pytest.mark.skipif(not (Path(__file__).parents[2] / "shared/fixtures/medicalgpt").is_dir(), reason="no fixtures")
def test_medicalgpt_files_concatenated_in_three_formats_check_record_by_record(capsys, tmp_path):
    # MedicalGPT's SFT file and its tool-call file, rows re-written as OpenAI messages and Alpaca: one file
    from conftest import FIXTURES

    sft = [json.loads(line) for line in (FIXTURES / "medical_sft_1K_format.jsonl").open(encoding="utf-8")][:30]
    tools = [json.loads(line) for line in (FIXTURES / "glaive_toolcall_zh_demo.jsonl").open(encoding="utf-8")][:10]
    single = [row for row in sft if len(row["conversations"]) == 2]
    rows = sft[:10] + [as_openai(r) for r in single[10:20]] + [as_alpaca(r) for r in single[:10]] + tools
    path = write_jsonl(tmp_path / "concatenated.jsonl", rows)
    code, out = check(capsys, str(path), "--stage", "sft")
    assert code == 0, out
    assert f"{path}: alpaca+openai+sharegpt, {len(rows)} valid record(s), ok" in out


def test_python_dash_m_medgpt_is_the_medgpt_command(tmp_path, sft_file):
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "medgpt", "data", "check", str(sft_file)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{sft_file}: sharegpt, 2 valid record(s), ok" in done.stdout
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert subprocess.run([sys.executable, "-m", "medgpt", "data", "check", str(empty)], capture_output=True,
                          env=env, timeout=120).returncode == 1
