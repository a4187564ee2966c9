"""Multiple-choice accuracy, by one of these scoring rules (`mcq_scoring`):

| rule       | the model picks the candidate with the highest …                | use it when                                   |
|------------|------------------------------------------------------------------|-----------------------------------------------|
| `mean`     | log-likelihood per token of the option text (end-of-turn incl.)  | default; small or base models (no letter bias) |
| `sum`      | summed log-likelihood of the option text (lm-eval's `acc`)       | comparing with lm-eval `acc` on cloze tasks    |
| `char`     | summed log-likelihood / characters of the text (lm-eval `acc_norm`) | comparing with lm-eval `acc_norm`          |
| `byte`     | summed log-likelihood / UTF-8 bytes of the text (lm-eval `acc_bytes`) | Chinese text, where characters ≠ bytes    |
| `letter`   | log-likelihood of the letter alone as the reply                  | instruction-tuned models that answer "B"; MMLU-style published numbers |
| `generate` | nothing scored: the model answers greedily (optionally reasoning, `mcq_cot`) and the letter(s) are read by `medgpt.evaluation.choices` | chat models judged as users see them; required for CoT |

Nothing is sampled, so every rule is deterministic. A multi-answer question (CMB 多项选择题, …) is scored over
every non-empty set of its letters (in order, "ABD"; for text rules the texts joined by "; ") and counts as right
only for the exact set; partial credit (no wrong letter: the share of the right letters chosen) is reported
apart. `mean` is the default because it measured best on the demo set (benchmarks/mcq_scoring.py, README);
an earlier measurement found the embedded SmolLM2-135M choosing the last option on 70 of the 117 demo questions
when replies started with the letter: a small model's letter bias decides before the content does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medgpt.config import ConfigError
from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat
from medgpt.evaluation.benchmarks import Question
from medgpt.evaluation.intervals import bootstrap_mean, wilson
from medgpt.evaluation.likelihood import Continuation, LogLikelihood, continuation_logprobs, shared_prompts_logprobs
from medgpt.evaluation.mcq_prompts import candidates, chat_messages, plain_context, reply_text

SCORINGS = ("mean", "sum", "char", "byte", "letter", "generate")
PROMPTS = ("chat", "plain")


@dataclass
class MCQItem:
    question: Question
    shots: list[Question] = field(default_factory=list)  # solved examples shown first


def normalised(score: LogLikelihood, text: str, scoring: str) -> float:
    """One candidate's score under the rule (text: the reply, without delimiter or end-of-turn)."""
    if scoring == "mean":
        return score.mean
    if scoring == "char":
        return score.logprob / max(1, len(text))
    if scoring == "byte":
        return score.logprob / max(1, len(text.encode("utf-8")))
    return score.logprob  # sum, and letter (one or a few tokens, the same for every candidate)


# ------------------------------------------------------------------------------------------------ candidates


def chat_candidate(chat_format: ChatFormat, item: MCQItem, reply: str, scoring: str,
                   max_length: int) -> tuple[Continuation, bool]:
    """The rendered conversation with only its last reply scored; too long -> the oldest tokens go (truncated)."""
    messages = chat_messages(item.question, item.shots, scoring) + [Message("assistant", reply)]
    encoded = chat_format.encode(messages)
    end = encoded.turn_ends[-1]
    previous = encoded.turn_ends[-2] if len(encoded.turn_ends) > 1 else 0
    start = next(i for i in range(previous, end) if encoded.assistant_mask[i])
    ids = encoded.input_ids[:end]
    cut = max(0, len(ids) - max_length)
    return Continuation(ids[cut:], max(1, start - cut)), cut > 0


def plain_candidate(tokenizer, context: str, reply: str, max_length: int) -> tuple[Continuation, bool]:
    """lm-eval's split of context and continuation: the reply follows one space (trailing spaces of the
    context move to the reply), `whole = encode(context + reply)`, the context's tokens are encode(context) and
    the continuation is whatever `whole` has past them; no special tokens; too long -> the oldest tokens go."""
    continuation = " " + reply
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    ids = context_ids + whole[len(context_ids):]
    cut = max(0, len(ids) - max_length)
    return Continuation(ids[cut:], max(1, len(context_ids) - cut)), cut > 0


def build_candidates(items: list[MCQItem], scoring: str, prompt: str, chat_format: ChatFormat | None, tokenizer,
                     max_length: int) -> list[list[tuple[str, str, Continuation, bool]]]:
    """Per item: (letters, reply text, continuation, truncated) for each candidate."""
    built = []
    for item in items:
        rows = []
        context = plain_context(item.question, item.shots, scoring) if prompt == "plain" else None
        for letters in candidates(item.question):
            reply = reply_text(item.question, letters, scoring)
            if prompt == "plain":
                scored, cut = plain_candidate(tokenizer, context, reply, max_length)
            else:
                scored, cut = chat_candidate(chat_format, item, reply, scoring, max_length)
            rows.append((letters, reply, scored, cut))
        built.append(rows)
    return built


def option_logprobs(model, groups: list[list[Continuation]], pad_id: int, batch_size: int) -> list[list[LogLikelihood]]:
    """Scores of each question's candidates. When a question's candidates share their prompt (the usual case; a
    truncated prompt may differ per candidate, then each is scored whole) the prompt runs once and its KV cache
    serves every candidate; up to `batch_size` questions of similar prompt length run together (at most
    4 x batch_size candidate rows at a time)."""
    from tqdm.auto import tqdm

    scores: list[list[LogLikelihood] | None] = [None] * len(groups)
    shared, whole = [], []
    for at, group in enumerate(groups):
        (shared if len({tuple(c.ids[:c.start]) for c in group}) == 1 else whole).append(at)
    shared.sort(key=lambda at: groups[at][0].start)
    with tqdm(total=len(groups), desc="multiple choice", unit="question", leave=False) as bar:
        begin = 0
        while begin < len(shared):
            end, rows = begin, 0
            while end < len(shared) and end - begin < batch_size and (end == begin or rows + len(groups[shared[end]]) <= 4 * batch_size):
                rows += len(groups[shared[end]])
                end += 1
            batch = shared[begin:end]
            prompts = [groups[at][0].ids[:groups[at][0].start] for at in batch]
            tails = [[c.ids[c.start:] for c in groups[at]] for at in batch]
            for at, result in zip(batch, shared_prompts_logprobs(model, prompts, tails, pad_id)):
                scores[at] = result
            bar.update(len(batch))
            begin = end
        for at in whole:
            scores[at] = continuation_logprobs(model, groups[at], pad_id, batch_size, desc="multiple choice")
            bar.update(1)
    return scores


def likelihood_rows(model, items: list[MCQItem], scoring: str, prompt: str, chat_format: ChatFormat | None,
                    tokenizer, max_length: int, batch_size: int) -> tuple[list[dict], int]:
    """(one row per question, how many prompts were truncated)."""
    built = build_candidates(items, scoring, prompt, chat_format, tokenizer, max_length)
    scores = option_logprobs(model, [[c for _, _, c, _ in rows] for rows in built], tokenizer.pad_token_id, batch_size)
    out = []
    for item, rows, group in zip(items, built, scores):
        by_letters = {letters: normalised(score, reply, scoring) for (letters, reply, _, _), score in zip(rows, group)}
        predicted = max(by_letters, key=by_letters.get)
        out.append(result_row(item.question, predicted, {"scores": by_letters}))
    return out, sum(cut for rows in built for *_, cut in rows)


# ------------------------------------------------------------------------------------------------ results


def partial_credit(predicted: str | None, answer: str) -> float:
    """Exam-style credit for a multi-answer question: 0 when a wrong letter is chosen, else the share of the
    right letters chosen (the exact set scores 1)."""
    chosen, right = set(predicted or ""), set(answer)
    if not chosen or chosen - right:
        return 0.0
    return len(chosen) / len(right)


def result_row(question: Question, predicted: str | None, extra: dict) -> dict:
    row = {"source": str(question.source), "question": question.question, "category": question.category,
           "answer": question.answer, "predicted": predicted, "correct": predicted == question.answer}
    if question.multi:
        row.update(multi=True, partial=partial_credit(predicted, question.answer))
    return {**row, **extra}


def mcq_metrics(items: list[MCQItem], rows: list[dict], seed: int = 0) -> dict:
    """Accuracy (exact match) with its Wilson interval, chance, per-category accuracy, and for multi-answer
    questions exact and partial credit apart."""
    n, right = len(rows), sum(r["correct"] for r in rows)
    metrics = {"mcq_accuracy": right / n, "mcq_accuracy_ci": wilson(right, n), "mcq_n": n,
               "mcq_chance": sum(1 / len(candidates(item.question)) for item in items) / n}
    multi = [r for r in rows if r.get("multi")]
    if multi:
        exact = sum(r["correct"] for r in multi)
        partial = [r["partial"] for r in multi]
        metrics.update(mcq_multi_n=len(multi), mcq_multi_accuracy=exact / len(multi),
                       mcq_multi_accuracy_ci=wilson(exact, len(multi)),
                       mcq_multi_partial=sum(partial) / len(partial), mcq_multi_partial_ci=bootstrap_mean(partial, seed))
    categories: dict[str, list[bool]] = {}
    for row in rows:
        if row.get("category"):
            categories.setdefault(row["category"], []).append(row["correct"])
    if len(categories) > 1 or (categories and len(next(iter(categories.values()))) < n):
        metrics["mcq_by_category"] = {name: {"accuracy": sum(v) / len(v), "accuracy_ci": wilson(sum(v), len(v)),
                                             "n": len(v)} for name, v in sorted(categories.items())}
    return metrics


def check_scoring(scoring: str, prompt: str, cot: bool) -> None:
    if scoring not in SCORINGS:
        raise ConfigError(f"mcq_scoring '{scoring}' is not one of {', '.join(SCORINGS)}")
    if prompt not in PROMPTS:
        raise ConfigError(f"mcq_prompt '{prompt}' is not one of {', '.join(PROMPTS)}")
    if cot and scoring != "generate":
        raise ConfigError("mcq_cot (reason before answering) needs mcq_scoring: generate")
    if cot and prompt == "plain":
        raise ConfigError("mcq_cot needs an instruction to reason: use mcq_prompt: chat")
