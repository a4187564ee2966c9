"""How a multiple-choice question is put to a model, for every scoring rule (see `medgpt.evaluation.mcq`).

Chat prompts (`mcq_prompt: chat`, the default) are the model's chat template: the question and its `A. text`
lines as the user turn (rendered as RL prompts render MCQs), solved few-shot examples as earlier turns. When the
reply is a letter (`letter`, `generate`) the turn ends with an instruction to answer with the letter(s), in
Chinese for a Chinese question; with `mcq_cot` it asks to reason first and end with "Answer: X" / "答案：X".

Plain prompts (`mcq_prompt: plain`) are lm-evaluation-harness's text formats, no chat template, so numbers are
comparable with published ones: MMLU "{question}\\nA. …\\nAnswer:" (by text: "Question: {question}\\nAnswer:") after "The following are multiple choice
questions (with answers) about {subject}."; MedQA "Question: …"; MedMCQA "Question: …\\nChoices:\\n…"; PubMedQA
"Abstract: …\\nQuestion: …\\nAnswer:"; CMMLU "…\\n答案："; the reply follows after one space. When options are
scored by their text the prompt lists no options (lm-eval's cloze form), when by letter it does.
"""

from __future__ import annotations

import itertools
import re

from medgpt.config import ConfigError
from medgpt.data.records import Message
from medgpt.evaluation.benchmarks import Question
from medgpt.rl.prompts import mcq_question

LETTER_REPLIES = ("letter", "generate")  # scorings whose reply is the letter(s), not the option text
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
MAX_SUBSET_OPTIONS = 8  # a multi-answer question is scored over all 2^n - 1 letter sets


def chinese(question: Question) -> bool:
    return bool(CJK.search(question.question))


def instruction(question: Question, cot: bool) -> str:
    if chinese(question):
        kind = "本题为多项选择题，可能有多个正确选项。" if question.multi else ""
        ask = "请逐步分析，最后以“答案：”加选项字母结尾。" if cot else "请直接给出正确选项的字母。"
        return kind + ask
    kind = "More than one option may be correct. " if question.multi else ""
    letters = "letters of all correct options" if question.multi else "letter of the correct option"
    if cot:
        return f"{kind}Think it through step by step, then end with \"Answer: \" and the {letters}."
    return f"{kind}Answer with the {letters}."


def candidates(question: Question) -> list[str]:
    """The replies scored: each option letter, or for a multi-answer question every non-empty set of letters."""
    keys = list(question.options)
    if not question.multi:
        return keys
    if len(keys) > MAX_SUBSET_OPTIONS:
        raise ConfigError(f"{question.source}: a multi-answer question with {len(keys)} options has too many "
                          f"letter sets to score by likelihood; use mcq_scoring: generate")
    return ["".join(c) for n in range(1, len(keys) + 1) for c in itertools.combinations(keys, n)]


def reply_text(question: Question, letters: str, scoring: str) -> str:
    """What the model says for a candidate: the letter(s), or the option text(s)."""
    if scoring in LETTER_REPLIES:
        return letters
    return "; ".join(question.options[letter] for letter in letters)


def solved_reply(question: Question, scoring: str) -> str:
    """A few-shot example's answer: as generation should end, or the scored reply."""
    if scoring == "generate":
        return f"答案：{question.answer}" if chinese(question) else f"Answer: {question.answer}"
    return reply_text(question, question.answer, scoring)


# ------------------------------------------------------------------------------------------------ chat


def user_turn(question: Question, scoring: str, cot: bool = False) -> str:
    text = mcq_question(question)
    return f"{text}\n\n{instruction(question, cot)}" if scoring in LETTER_REPLIES else text


def chat_messages(question: Question, shots: list[Question], scoring: str, cot: bool = False) -> list[Message]:
    """The solved examples as turns, then the question as the last user turn."""
    messages = []
    for shot in shots:
        messages += [Message("user", user_turn(shot, scoring, cot)), Message("assistant", solved_reply(shot, scoring))]
    return [*messages, Message("user", user_turn(question, scoring, cot))]


# ------------------------------------------------------------------------------------------------ plain


def _option_lines(question: Question) -> str:
    return "".join(f"{key}. {text}\n" for key, text in question.options.items())


def plain_prompt(question: Question, scoring: str) -> str:
    """One question in lm-eval's format, up to and including the answer cue ("Answer:" / "答案：")."""
    lists = scoring in LETTER_REPLIES
    options = _option_lines(question) if lists else ""
    if question.benchmark == "mmlu":  # lm-eval's mmlu (letters) and mmlu_continuation (option texts)
        return f"{question.question.strip()}\n{options}Answer:" if lists else f"Question: {question.question.strip()}\nAnswer:"
    if question.benchmark == "cmmlu":
        return f"{question.question.strip()}\n{options}答案："
    if question.benchmark == "medmcqa":
        return f"Question: {question.question}\n" + (f"Choices:\n{options}" if lists else "") + "Answer:"
    if question.benchmark == "pubmedqa":
        return "Abstract: " + "\n".join(question.contexts) + f"\nQuestion: {question.stem}\n{options}Answer:"
    if chinese(question):
        return f"{question.question}\n{options}答案："
    return f"Question: {question.question}\n{options}Answer:"


def plain_description(question: Question) -> str:
    """MMLU's line naming the subject, before the examples (lm-eval's `description`)."""
    if question.benchmark == "mmlu" and question.subject:
        return f"The following are multiple choice questions (with answers) about {question.subject.replace('_', ' ')}.\n\n"
    return ""


def plain_context(question: Question, shots: list[Question], scoring: str) -> str:
    """The description, solved examples separated by blank lines, then the question."""
    solved = "".join(f"{plain_prompt(s, scoring)} {reply_text(s, s.answer, scoring)}\n\n" for s in shots)
    return plain_description(question) + solved + plain_prompt(question, scoring)


# ------------------------------------------------------------------------------------------------ few-shot


def few_shot_examples(pool: list[Question], question: Question, k: int) -> list[Question]:
    """The first k examples of the pool (a dev file, in its order: lm-eval's `first_n`), of the question's own
    category when it has enough of them; never the question itself nor a copy of it."""
    if k <= 0:
        return []
    text = question.question.strip()
    others = [q for q in pool if q is not question and q.question.strip() != text]
    same = [q for q in others if question.category and q.category == question.category]
    taken = {id(q) for q in same}
    chosen = same[:k] if len(same) >= k else (same + [q for q in others if id(q) not in taken])[:k]
    if len(chosen) < k:
        raise ConfigError(f"few_shot={k} needs at least {k} other questions in the few-shot pool; it has {len(others)}")
    return chosen
