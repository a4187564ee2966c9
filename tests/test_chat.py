"""Terminal chat: the history keeps every answer, slash commands work, answers stream, and `medgpt chat` runs."""

from __future__ import annotations

import io

import pytest

from medgpt.cli import main
from medgpt.data.records import Message
from medgpt.serve.chat import DISCLAIMER, ChatSession, run_chat
from medgpt.serve.engine import GenerationEngine, SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def engine(learnable_model_dir):
    return GenerationEngine.load(str(learnable_model_dir))


def scripted(lines: list[str]):
    """An `input` that types these lines, then Ctrl-D."""
    pending = list(lines)

    def read(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    read.pending = pending
    return read


def answer(engine, messages: list[Message]) -> str:
    return engine.generate([messages], GREEDY)[0].text


def test_history_keeps_every_answer_and_output_streams(engine):
    session, out = ChatSession(engine, GREEDY), io.StringIO()
    writes = []
    out.write = lambda text: writes.append(text) or len(text)
    run_chat(session, scripted(["What is anaemia?", "What causes it?"]), out)
    first = answer(engine, [Message("user", "What is anaemia?")])
    second = answer(engine, [Message("user", "What is anaemia?"), Message("assistant", first),
                             Message("user", "What causes it?")])
    assert session.history == [Message("user", "What is anaemia?"), Message("assistant", first),
                               Message("user", "What causes it?"), Message("assistant", second)]
    printed = "".join(writes)
    assert DISCLAIMER in printed and first in printed and second in printed
    assert len([w for w in writes if w.strip()]) > 6  # pieces were written as they came


def test_system_prompt_reset_and_sampling_commands(engine):
    session, out = ChatSession(engine, GREEDY), io.StringIO()
    read = scripted(["/system Answer briefly.", "Hi", "/set temperature 0.5", "/set top_p many", "/set color 1",
                     "/show", "/bogus", "/exit", "never read"])
    run_chat(session, read, out)
    assert read.pending == ["never read"]
    assert session.system == "Answer briefly."
    assert session.history == [Message("user", "Hi"), Message("assistant", answer(
        engine, [Message("system", "Answer briefly."), Message("user", "Hi")]))]
    assert session.params.temperature == 0.5 and session.params.max_new_tokens == 6
    printed = out.getvalue()
    assert "top_p takes a number" in printed and "usage: /set NAME VALUE" in printed
    assert "system: Answer briefly." in printed and "unknown command /bogus" in printed
    assert session.command("/set seed none") == "(seed = None)"
    session.command("/reset")
    assert session.history == [] and session.system == "Answer briefly."
    session.command("/system")
    assert session.system is None


def test_an_answer_cut_short_stays_in_the_history(engine):
    session = ChatSession(engine, SamplingParams(max_new_tokens=50, temperature=0))
    pieces = session.reply("Tell me about the liver.")
    first = next(pieces)
    while not first.strip():
        first += next(pieces)
    pieces.close()  # what Ctrl-C does to the loop
    assert [m.role for m in session.history] == ["user", "assistant"]
    assert session.history[1].content == first.strip()


def test_chat_command_answers_questions_and_exits(learnable_model_dir, engine, capsys):
    code = main(["chat", "--model", str(learnable_model_dir), "--temperature", "0", "--max-new-tokens", "6",
                 "--ask", "What is anaemia?", "--ask", "Hi"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith(DISCLAIMER)
    assert answer(engine, [Message("user", "What is anaemia?")]) in printed
    assert answer(engine, [Message("user", "Hi")]) in printed
