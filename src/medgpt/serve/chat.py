"""Terminal chat: a multi-turn session whose history keeps every answer, with slash commands and streaming."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from medgpt.data.records import Message
from medgpt.serve.engine import GenerationEngine, SamplingParams

DISCLAIMER = ("medgpt models are research software, not medical devices: answers can be wrong. "
              "Always consult a qualified clinician; in an emergency call your local emergency number.")

HELP = """Commands:
  /system TEXT      set the system prompt and start a new conversation (/system alone removes it)
  /reset            forget the conversation (the system prompt stays)
  /set NAME VALUE   change sampling: temperature (0 = greedy), top_p, top_k, max_new_tokens,
                    repetition_penalty, seed (none = random)
  /show             the system prompt, sampling options and number of turns
  /help             this list
  /exit             quit (Ctrl-D too); Ctrl-C stops an answer early"""

# Sampling options /set may change, with the type each is parsed as.
SETTABLE = {f.name: f for f in dataclasses.fields(SamplingParams) if f.name != "stop"}


class EndChat(Exception):
    """Raised by /exit."""


@dataclass
class ChatSession:
    """A conversation with one model: the system prompt, the turns so far and the sampling options."""

    engine: GenerationEngine
    params: SamplingParams
    system: str | None = None
    history: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the answer joins the history even when cut short by Ctrl-C."""
        self.history.append(Message("user", text))
        answer = ""
        try:
            for piece in self.engine.stream(self.messages(), self.params):
                answer += piece
                yield piece
        finally:
            if answer.strip():
                self.history.append(Message("assistant", answer.strip()))
            else:  # nothing was said: drop the question too, so roles keep alternating
                self.history.pop()

    def command(self, line: str) -> str:
        """Run a slash command and return what to tell the user."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            raise EndChat
        if name == "/reset":
            self.history = []
            return "(conversation cleared)"
        if name == "/system":
            self.system, self.history = rest or None, []
            return f"(system prompt set: {rest}; conversation cleared)" if rest else "(system prompt removed)"
        if name == "/set":
            return self._set(rest)
        if name == "/show":
            options = ", ".join(f"{k}={getattr(self.params, k)}" for k in SETTABLE)
            return f"system: {self.system or '(none)'}\nsampling: {options}\nturns: {len(self.history)}"
        if name == "/help":
            return HELP
        return f"unknown command {name}; /help lists them"

    def _set(self, rest: str) -> str:
        name, _, value = rest.partition(" ")
        if name not in SETTABLE or not value.strip():
            return f"usage: /set NAME VALUE with NAME one of {', '.join(SETTABLE)}"
        kind = float if SETTABLE[name].type in ("float", float) else int
        try:
            parsed = None if name == "seed" and value.strip().lower() == "none" else kind(value)
        except ValueError:
            return f"{name} takes a number, not {value.strip()!r}"
        self.params = dataclasses.replace(self.params, **{name: parsed})
        return f"({name} = {parsed})"


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None,
             questions: list[str] | None = None) -> None:
    """The terminal loop: `questions` are answered one by one (each on its own) instead of asking the user."""
    import sys

    out = out or sys.stdout

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    def say_answer(question: str) -> None:
        started = False
        for piece in session.reply(question):
            piece = piece if started else piece.lstrip()  # the answer's first token often starts with a space
            started = started or bool(piece)
            say(piece, end="")

    say(DISCLAIMER)
    if questions:
        for question in questions:
            say(f"\n>>> {question}\n")
            session.history = []
            say_answer(question)
            say()
        return
    say("Type a message; /help lists the commands.")
    while True:
        try:
            line = read("\nyou> ").strip()
        except EOFError:
            return
        if line.startswith("/"):
            try:
                say(session.command(line))
            except EndChat:
                return
            continue
        if not line:
            continue
        say("medgpt> ", end="")
        try:
            say_answer(line)
        except KeyboardInterrupt:
            say(" [stopped]", end="")
        say()
