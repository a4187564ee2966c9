"""Generative multiple choice (`mcq_scoring: generate`): the model answers each question greedily, as a user would
see it (optionally reasoning first, `mcq_cot`), and the letter(s) it states are read by the one extractor shared
with the RL `choice_match` reward (`medgpt.evaluation.choices`). An answer stating no option counts as wrong and
is counted in `mcq_unanswered`."""

from __future__ import annotations

from medgpt.evaluation.choices import answer_letters
from medgpt.evaluation.mcq import MCQItem, result_row
from medgpt.evaluation.mcq_prompts import chat_messages, plain_context

PLAIN_STOPS = ("\n\n", "\nQuestion:")  # a plain prompt's answer ends where the next example would begin


def default_max_new_tokens(cot: bool) -> int:
    return 512 if cot else 16


def generation_rows(engine, items: list[MCQItem], prompt: str, cot: bool, max_new_tokens: int | None,
                    max_length: int, batch_size: int) -> tuple[list[dict], int]:
    """(one row per question with the model's answer, how many prompts were truncated)."""
    from medgpt.serve.engine import SamplingParams

    budget = max_new_tokens or default_max_new_tokens(cot)
    params = SamplingParams(max_new_tokens=budget, temperature=0, stop=PLAIN_STOPS if prompt == "plain" else ())
    prompts, truncated = [], 0
    for item in items:
        if prompt == "plain":
            ids = engine.tokenizer.encode(plain_context(item.question, item.shots, "generate"), add_special_tokens=False)
        else:
            ids = engine.chat_format.prompt_ids(chat_messages(item.question, item.shots, "generate", cot))
        room = max(1, max_length - budget)
        truncated += len(ids) > room
        prompts.append(ids[-room:])
    completions = engine.generate_ids(prompts, params, batch_size)
    rows = []
    for item, completion in zip(items, completions):
        text = completion.text.strip()
        predicted = answer_letters(text, "".join(item.question.options))
        rows.append(result_row(item.question, predicted, {"completion": text, "finish_reason": completion.finish_reason}))
    return rows, truncated
