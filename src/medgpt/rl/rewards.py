"""Rule rewards of the RL stages (ppo, grpo, rloo), each with TRL's signature `f(prompts, completions, completion_ids,
**columns) -> list[float | None]`, combined by TRL as the weighted sum `reward_weights` · rewards.

| name             | what it scores                                                                      | range  |
|------------------|-------------------------------------------------------------------------------------|--------|
| `answer_f1`      | key-term F1 of the answer against a free-text reference; MCQ rows: letter match     | 0 … 1  |
| `answer_recall`  | share of the reference's key terms the answer mentions; MCQ rows: letter match      | 0 … 1  |
| `choice_match`   | the option letter the answer picks equals the reference letter (MCQ rows only)      | 0 or 1 |
| `format_reward`  | the whole completion matches `format_pattern` (default <think>…</think><answer>…)   | 0 or 1 |
| `length_penalty` | 0 up to `length_penalty_start` tokens, then down linearly to -1 at the length limit | -1 … 0 |
| `reward_model`   | the trained reward model's score of prompt + reply (`medgpt.rl.reward_adapter`)     | any    |

Negation: a term after "not", "no", "never", "without", 不, 没, 无 … (to the end of its clause) counts as a different
term, so "not the liver" scores 0 against "the liver" instead of 0.67.

Why key terms: MedicalGPT's sample GRPO data has free-text medical answers ("The liver", "60 to 100 beats per
minute") while its accuracy reward parses LaTeX math, so almost every completion scores 0 and GRPO has nothing to
learn from. Here both texts are cut into key terms — lower-cased latin words and numbers without common function
words, a final plural "s" dropped, and each Chinese character a term of its own — and compared as bags of terms.
F1 also punishes padding the answer with unrelated words; recall only asks that the reference's terms be
mentioned (pair it with `length_penalty`). When a completion has an `<answer>…</answer>` block (or a closing
`</think>`), only the answer part is scored.

A reward returns None for a row it does not apply to (no reference, or a free-text row for `choice_match`): the RL
loop leaves it out of that function's mean, and a row for which every function says None does not train.
Rows carry the dataset's columns (`reference`, `reference_kind`, `conversation`, see `medgpt.rl.trl_prompts`).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable

from medgpt.evaluation.choices import answer_letters

DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
# Function words that carry no medical content. Negations ("no", "not") are not among them: they flip a medical
# answer, so they mark the terms that follow (see key_terms).
STOPWORDS = frozenset("""a an the of and or is are was were be been being to in on at for with by from as it its
this that these those which what who whom whose when where how why than then there their they them he she his her
you your we our i me my do does did can could may might should would will shall also very per about into over
under such any each other more most some usually often typically""".split())
CHINESE_FUNCTION_CHARACTERS = frozenset("的了是和在与及或也就都而其之吗呢吧啊")
PIECE = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff]|[,.;:!?，。；：！？、\n]")  # terms and clause marks
NEGATIONS = frozenset("not no never without neither nor".split()) | frozenset("不没无未勿非")
CLAUSE_BREAKS = frozenset(",.;:!?，。；：！？、\n") | frozenset("but however although though yet 但 而 却".split())
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# ------------------------------------------------------------------------------------------------ text


def completion_text(completion) -> str:
    """The text of a completion: TRL passes strings, or [{"role": "assistant", "content": …}] for chat prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def answer_part(text: str) -> str:
    """The part of a completion that answers: its <answer> block, else what follows </think>, else all of it."""
    block = ANSWER_BLOCK.search(text)
    if block:
        return block.group(1).strip()
    return text.split("</think>")[-1].strip()


def key_terms(text: str) -> list[str]:
    """Lower-cased content words and numbers (a final plural s dropped) and single Chinese characters; a term in
    the scope of a negation (from "not", "no", "never", "without", 不, 没, 无 … to the end of its clause) is
    marked "¬term", so "not the liver" shares no term with "the liver"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"n't\b", " not", text).replace("cannot", "can not").replace("非常", "")  # 非常 = "very"
    terms: list[str] = []
    negated = cue_only = False
    for piece in PIECE.findall(text):
        if piece in CLAUSE_BREAKS:
            if cue_only:  # a bare negation ("No." / "not") still says something
                terms.append("not")
            negated = cue_only = False
            continue
        if piece in NEGATIONS:
            negated = cue_only = True
            continue
        if piece in STOPWORDS or piece in CHINESE_FUNCTION_CHARACTERS:
            continue
        if len(piece) > 3 and piece.endswith("s") and not piece.endswith("ss"):
            piece = piece[:-1]
        terms.append("¬" + piece if negated else piece)
        cue_only = False
    if cue_only:
        terms.append("not")
    return terms


def term_f1(answer: str, reference: str) -> float:
    """F1 of the two bags of key terms (SQuAD-style token F1 on key terms)."""
    predicted, wanted = Counter(key_terms(answer)), Counter(key_terms(reference))
    if not wanted:  # a reference of function words only: fall back to exact match
        return float(answer.strip().lower() == reference.strip().lower())
    common = sum((predicted & wanted).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(predicted.values()), common / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)


def term_recall(answer: str, reference: str) -> float:
    """Share of the reference's distinct key terms that the answer mentions."""
    wanted = set(key_terms(reference))
    if not wanted:
        return float(answer.strip().lower() == reference.strip().lower())
    return len(wanted & set(key_terms(answer))) / len(wanted)


def choice_score(answer: str, reference: str) -> float:
    """1 when the letter(s) the answer states (read by the evaluation's one extractor, `answer_letters`) are
    exactly the reference's; naming extra letters to hedge scores 0."""
    wanted = "".join(sorted(set(reference.strip().upper())))
    return float(answer_letters(answer) == wanted)


# ------------------------------------------------------------------------------------------------ rewards


def _score_references(completions, reference, reference_kind, text_score: Callable[[str, str], float]):
    scores: list[float | None] = []
    for completion, ref, kind in zip(completions, reference, reference_kind, strict=True):
        answer = answer_part(completion_text(completion))
        if ref is None or kind == "none":
            scores.append(None)
        elif kind == "choice":
            scores.append(choice_score(answer, ref))
        else:
            scores.append(text_score(answer, ref))
    return scores


def answer_f1(completions, reference, reference_kind, **kwargs) -> list[float | None]:
    """Key-term F1 of each answer against its free-text reference; option-letter match on MCQ rows."""
    return _score_references(completions, reference, reference_kind, term_f1)


def answer_recall(completions, reference, reference_kind, **kwargs) -> list[float | None]:
    """Share of the reference's key terms each answer mentions; option-letter match on MCQ rows."""
    return _score_references(completions, reference, reference_kind, term_recall)


def choice_match(completions, reference, reference_kind, **kwargs) -> list[float | None]:
    """1 when the answer picks the reference option letter, 0 when it picks another or none; None off MCQ rows."""
    return [choice_score(answer_part(completion_text(c)), ref) if kind == "choice" else None
            for c, ref, kind in zip(completions, reference, reference_kind, strict=True)]


def format_reward(completions, pattern: str = DEFAULT_FORMAT_PATTERN, **kwargs) -> list[float]:
    """1 when the whole completion (outer whitespace aside) matches `pattern`, else 0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def length_penalty(completion_ids, start: int, limit: int, **kwargs) -> list[float]:
    """0 for completions of at most `start` tokens, then falling linearly to -1 at `limit` tokens."""
    span = max(limit - start, 1)
    return [-min(1.0, max(0, len(ids) - start) / span) for ids in completion_ids]


# ------------------------------------------------------------------------------------------------ choosing


BUILT_IN = {f.__name__: f for f in (answer_f1, answer_recall, choice_match, format_reward, length_penalty)}


def load_user_function(spec: str) -> Callable:
    """`package.module:function` (importable) or `path/to/file.py:function`. This imports and runs that code."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward function '{spec}' is not a built-in ({', '.join(BUILT_IN)}, reward_model) "
                         "nor module:function / file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ValueError(f"reward function '{spec}': no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"medgpt_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward function '{spec}': {module_name} has no function {function_name}")
    return function
