"""Multiple-choice benchmarks read as they are published, into one `Question` each.

| format     | published as                                         | fields read                                              | category        |
|------------|------------------------------------------------------|----------------------------------------------------------|-----------------|
| `medqa`    | jind11/MedQA US / Mainland / Taiwan jsonl (4 or 5)   | `question`, `options{A..E}`, `answer_idx` (the letter)   | `meta_info`     |
| `medqa_hf` | GBaker/MedQA-USMLE-4-options-hf (lm-eval's copy)     | `sent1`, `ending0..3`, integer `label`                   | –               |
| `medmcqa`  | medmcqa jsonl (original) / openlifescienceai/medmcqa | `question`, `opa..opd`, `cop` (see numbering below)      | `subject_name`  |
| `pubmedqa` | pubmedqa `ori_pqal.json` (keyed by PMID) / HF rows   | `QUESTION`/`question`, `CONTEXTS`/`context.contexts`, `final_decision` | –  |
| `cmexam`   | CMExam CSV                                           | `Question`, `Options` ("A xxx" lines), `Answer` (letters) | discipline     |
| `cmb`      | CMB-Exam json (val; test answers are not public)     | `question`, `option{A..E}`, `answer`, `question_type`    | `exam_class`    |
| `cmmlu`    | CMMLU CSV, one file per subject                      | `Question`, `A..D`, `Answer`                             | subject (file)  |
| `mmlu`     | cais/mmlu rows, or hendrycks/test headerless CSVs    | `question`, `choices` list, integer `answer`             | `subject`       |
| `mcq`      | medgpt's own                                         | `question`, `options` (dict or list), `answer` (letter(s) or text) | `category` |

MedMCQA's `cop` has two numberings: the hub dataset's is a 0-based class index (lm-eval reads it so), the
original release's 1-based. A file holding a 0 is 0-based, one holding a 4 is 1-based; a file with only 1..3
is read as the hub's, with a warning — `medmcqa_numbering: original` (or `hub`) decides instead.

PubMedQA becomes a three-option question (yes / no / maybe) whose text carries the abstract's contexts.
A multi-answer question (CMB 多项选择题, a CMExam answer of several letters, an `mcq` answer list) keeps its
letters in order ("ABD") and is marked `multi`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

from medgpt.config import ConfigError
from medgpt.data.formats import RecordError
from medgpt.data.records import DataError, InvalidDataError, Source
from medgpt.evaluation.benchmark_files import Row, benchmark_rows

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")  # MultiMedQA's MMLU subsets
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medical_statistics", "college_medicine", "genetics",
                 "nutrition", "professional_medicine", "traditional_chinese_medicine", "virology")
NUMBERINGS = ("auto", "hub", "original")


@dataclass
class Question:
    question: str  # what is asked (PubMedQA: the contexts, then the question)
    options: dict[str, str]  # letter -> option text, in order
    answer: str  # the right letter(s), in order: "B", or "ABD" when several are right
    source: Source | None = None
    category: str | None = None  # per-category accuracy (MedQA meta_info, CMB exam_class, MMLU subject …)
    multi: bool = False  # several options may be right: the reply names a set of letters
    subject: str | None = None  # MMLU / CMMLU subject (also the category), for prompts that name it
    contexts: tuple[str, ...] = ()  # PubMedQA's abstract, for prompts that place it themselves
    stem: str = ""  # the question without contexts
    benchmark: str = "mcq"  # the format it was read from: picks the plain (lm-eval style) prompt


# ------------------------------------------------------------------------------------------------ parsing


def _text(values: dict, *names: str, required: bool = True) -> str:
    for name in names:
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    if required:
        raise RecordError(names[0], "missing or empty")
    return ""


def _letters(answer: Any, options: dict[str, str], field: str) -> str:
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError(field, f"expected the right option letter(s), got {answer!r}")
    letters = re.sub(r"[\s,，、;；]", "", answer.strip().upper())
    wrong = [c for c in letters if c not in options]
    if wrong or not letters:
        raise RecordError(field, f"{answer!r} is not option letter(s) of this question ({', '.join(options)})")
    return "".join(sorted(set(letters)))


def _index(answer: Any, options: dict[str, str], field: str, base: int = 0) -> str:
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
        answer = int(answer)
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise RecordError(field, f"expected an option number, got {answer!r}")
    if answer < 0:
        raise RecordError(field, f"{answer}: this row has no answer (an unlabelled test split?); use a labelled split")
    keys = list(options)
    if not base <= answer < base + len(keys):
        raise RecordError(field, f"{answer} is outside {base}..{base + len(keys) - 1}")
    return keys[answer - base]


def _options(values: list[Any], field: str) -> dict[str, str]:
    options = {}
    for letter, text in zip(LETTERS, values):
        if not isinstance(text, (str, int, float)) or not str(text).strip():
            raise RecordError(f"{field}.{letter}", "expected a non-empty option text")
        options[letter] = str(text).strip()
    if len(options) < 2:
        raise RecordError(field, "expected at least two options")
    return options


def parse_medqa(values: dict, subject: str | None) -> Question:
    raw = values.get("options")
    if not isinstance(raw, dict):
        raise RecordError("options", "expected {\"A\": text, …}")
    options = dict(zip(raw, _options(list(raw.values()), "options").values()))
    answer = _letters(values.get("answer_idx"), options, "answer_idx")
    return Question(_text(values, "question"), options, answer, category=_text(values, "meta_info", required=False) or None)


def parse_medqa_hf(values: dict, subject: str | None) -> Question:
    options = _options([values.get(f"ending{i}") for i in range(10) if f"ending{i}" in values], "ending")
    return Question(_text(values, "sent1"), options, _index(values.get("label"), options, "label"))


def parse_medmcqa(values: dict, subject: str | None, base: int = 0) -> Question:
    options = _options([values.get(k) for k in ("opa", "opb", "opc", "opd")], "op")
    category = _text(values, "subject_name", required=False) or None
    return Question(_text(values, "question"), options, _index(values.get("cop"), options, "cop", base),
                    category=category)


def parse_pubmedqa(values: dict, subject: str | None) -> Question:
    contexts = values.get("CONTEXTS")
    if contexts is None and isinstance(values.get("context"), dict):
        contexts = values["context"].get("contexts")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise RecordError("CONTEXTS", "expected the abstract's contexts as a list of strings")
    stem = _text(values, "QUESTION", "question")
    options = {"A": "yes", "B": "no", "C": "maybe"}
    decision = _text(values, "final_decision").lower()
    if decision not in options.values():
        raise RecordError("final_decision", f"expected yes, no or maybe, got {decision!r}")
    text = "Context: " + " ".join(c.strip() for c in contexts) + f"\n\nQuestion: {stem}"
    answer = next(k for k, v in options.items() if v == decision)
    return Question(text, options, answer, contexts=tuple(c.strip() for c in contexts), stem=stem)


CMEXAM_CATEGORY = ("Medical Discipline", "Discipline", "一级标签", "Clinical Department", "Subject")


def parse_cmexam(values: dict, subject: str | None) -> Question:
    options = {}
    for line in _text(values, "Options", "选项").splitlines():
        match = re.match(r"\s*([A-J])[\s.．、:：]+(.*\S)", line)
        if not match:
            raise RecordError("Options", f"expected lines like 'A 选项', got {line.strip()!r}")
        options[match.group(1)] = match.group(2).strip()
    if len(options) < 2:
        raise RecordError("Options", "expected at least two 'A 选项' lines")
    answer = _letters(_text(values, "Answer", "答案"), options, "Answer")
    category = next((values[c].strip() for c in CMEXAM_CATEGORY if isinstance(values.get(c), str) and values[c].strip()), None)
    return Question(_text(values, "Question", "题目", "标题"), options, answer, category=category, multi=len(answer) > 1)


def parse_cmb(values: dict, subject: str | None) -> Question:
    options = values.get("option")
    if not isinstance(options, dict):
        raise RecordError("option", "expected {\"A\": text, …}")
    options = {k: str(v).strip() for k, v in options.items() if str(v or "").strip()}  # unused letters are ""
    if len(options) < 2:
        raise RecordError("option", "expected at least two options")
    if not values.get("answer"):
        raise RecordError("answer", "missing: CMB-test ships without answers (they are scored by its authors); "
                                    "evaluate CMB-val, or join the published answers into the file")
    multi = _text(values, "question_type", required=False) == "多项选择题"
    answer = _letters(values.get("answer"), options, "answer")
    return Question(_text(values, "question"), options, answer, category=_text(values, "exam_class", required=False) or None,
                    multi=multi or len(answer) > 1)


def parse_cmmlu(values: dict, subject: str | None) -> Question:
    options = _options([values.get(k) for k in "ABCD"], "")
    return Question(_text(values, "Question"), options, _letters(values.get("Answer"), options, "Answer"),
                    category=subject, subject=subject)


def parse_mmlu(values: dict, subject: str | None) -> Question:
    choices = values.get("choices")
    if choices is None and "A" in values:  # hendrycks/test's headerless CSV
        choices = [values.get(k) for k in "ABCD"]
    if not isinstance(choices, list):
        raise RecordError("choices", "expected a list of option texts")
    options = _options(choices, "choices")
    answer = values.get("answer")
    letter = _letters(answer, options, "answer") if isinstance(answer, str) and answer.strip() in options \
        else _index(answer, options, "answer")
    subject = _text(values, "subject", required=False) or subject
    return Question(_text(values, "question"), options, letter, category=subject, subject=subject)


def parse_mcq(values: dict, subject: str | None) -> Question:
    options = values.get("options")
    if isinstance(options, list):
        options = dict(zip(LETTERS, options))
    if not isinstance(options, dict) or len(options) < 2:
        raise RecordError("options", "expected at least two options, as {\"A\": …} or a list")
    for key, text in options.items():
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"options.{key}", "expected a non-empty string")
    answer = values.get("answer")
    if isinstance(answer, list):
        answer = "".join(str(a) for a in answer)
    if isinstance(answer, str) and answer in options.values() and answer not in options:
        answer = next(k for k, v in options.items() if v == answer)
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError("answer", f"{answer!r} is neither an option key ({', '.join(options)}) nor an option text")
    try:
        letters = _letters(answer, options, "answer")
    except RecordError:
        raise RecordError("answer", f"{answer!r} is neither an option key ({', '.join(options)}) nor an option text") from None
    category = _text(values, "category", required=False) or None
    return Question(_text(values, "question"), {str(k): v for k, v in options.items()}, letters, category=category,
                    multi=len(letters) > 1 or isinstance(values.get("answer"), list))


PARSERS: dict[str, Callable[..., Question]] = {
    "medqa": parse_medqa, "medqa_hf": parse_medqa_hf, "medmcqa": parse_medmcqa, "pubmedqa": parse_pubmedqa,
    "cmexam": parse_cmexam, "cmb": parse_cmb, "cmmlu": parse_cmmlu, "mmlu": parse_mmlu, "mcq": parse_mcq,
}
FORMATS = ("auto", *PARSERS)


def detect_format(values: dict) -> str | None:
    """The format a row's columns say, or None."""
    keys = set(values)
    if {"opa", "opb", "cop"} <= keys:
        return "medmcqa"
    if {"sent1", "ending0", "label"} <= keys:
        return "medqa_hf"
    if "final_decision" in keys and ({"QUESTION", "CONTEXTS"} <= keys or {"question", "context"} <= keys):
        return "pubmedqa"
    if {"question", "options", "answer_idx"} <= keys:
        return "medqa"
    if {"question", "option", "answer"} <= keys or {"question", "option", "question_type"} <= keys:
        return "cmb"
    if ({"Question", "Options"} <= keys) or ({"选项"} <= keys):
        return "cmexam"
    if {"Question", "A", "B", "Answer"} <= keys:
        return "cmmlu"
    if {"question", "choices", "answer"} <= keys or {"question", "A", "B", "C", "D", "answer"} <= keys:
        return "mmlu"
    if {"question", "options"} <= keys:
        return "mcq"
    return None


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class ReadQuestions:
    questions: list[Question]
    formats: dict[str, str]  # file (or dataset) -> format read


def read_questions(spec: str, mcq_format: str = "auto", split: str | None = None, subset: str | None = None,
                   medmcqa_numbering: str = "auto", subjects: str | None = None) -> ReadQuestions:
    """Every question `spec` names, checked; InvalidDataError lists bad rows as file:line: field: problem."""
    if mcq_format not in FORMATS:
        raise ConfigError(f"mcq_format '{mcq_format}' is not one of {', '.join(FORMATS)}")
    if medmcqa_numbering not in NUMBERINGS:
        raise ConfigError(f"medmcqa_numbering '{medmcqa_numbering}' is not one of {', '.join(NUMBERINGS)}")
    by_file: dict[str, list[Row]] = {}
    for row in benchmark_rows(spec, split, subset):
        by_file.setdefault(row.source.path, []).append(row)
    questions, errors, formats = [], [], {}
    for name, rows in by_file.items():
        good = [r for r in rows if not isinstance(r.values, DataError)]
        errors += [r.values for r in rows if isinstance(r.values, DataError)]
        fmt = mcq_format if mcq_format != "auto" else next(filter(None, (detect_format(r.values) for r in good)), None)
        if fmt is None:
            columns = ", ".join(sorted(good[0].values)) if good else "none"
            errors.append(DataError(Source(name, 0), "format", f"no benchmark format has these columns ({columns}); "
                                    f"give mcq_format ({', '.join(PARSERS)})"))
            continue
        formats[name] = fmt
        extra = {"base": _medmcqa_base(name, good, medmcqa_numbering)} if fmt == "medmcqa" else {}
        for row in good:
            try:
                question = PARSERS[fmt](row.values, row.subject, **extra)
            except RecordError as err:
                errors.append(DataError(row.source, err.field, err.problem))
                continue
            question.source = row.source
            question.stem = question.stem or question.question
            question.benchmark = fmt
            questions.append(question)
    if errors:
        raise InvalidDataError(errors)
    if not questions:
        raise InvalidDataError([DataError(Source(spec, 0), "records", "no questions")])
    return ReadQuestions(select_subjects(questions, subjects, spec), formats)


def _medmcqa_base(name: str, rows: list[Row], numbering: str) -> int:
    """0 for the hub's class indices, 1 for the original release's option numbers (see the module docstring)."""
    if numbering != "auto":
        return 0 if numbering == "hub" else 1
    cops = set()
    for row in rows:
        try:
            cops.add(int(row.values.get("cop")))
        except (TypeError, ValueError):
            continue  # reported by the parser with its line
    if 0 in cops and 4 in cops:
        raise InvalidDataError([DataError(Source(name, 0), "cop", "holds both 0 and 4: neither numbering fits; "
                                          "fix the file or set medmcqa_numbering")])
    if 4 in cops:
        return 1
    if 0 not in cops:
        logger.warning("%s: MedMCQA cop values are all 1..3, read as the hub's 0-based class index; set "
                       "medmcqa_numbering: original if the file is the original release (1 = opa)", name)
    return 0


def select_subjects(questions: list[Question], subjects: str | None, spec: str) -> list[Question]:
    """Keep the questions of the named categories; `medical` names MMLU's and CMMLU's medical subjects."""
    if not subjects:
        return questions
    wanted = set()
    for name in (s.strip() for s in subjects.split(",") if s.strip()):
        wanted |= set(MMLU_MEDICAL + CMMLU_MEDICAL) if name == "medical" else {name}
    present = sorted({q.category for q in questions if q.category})
    if not present:
        raise ConfigError(f"{spec}: subjects given, but its questions carry no subject or category")
    unknown = sorted(w for w in wanted if w not in present and w not in MMLU_MEDICAL + CMMLU_MEDICAL)
    if unknown:
        raise ConfigError(f"{spec}: no questions of subject(s) {', '.join(unknown)} (present: {', '.join(present)})")
    kept = [q for q in questions if q.category in wanted]
    if not kept:
        raise ConfigError(f"{spec}: none of the subjects {subjects} is present (present: {', '.join(present)})")
    logger.info("%s: %d of %d questions in subjects %s", spec, len(kept), len(questions),
                ", ".join(sorted({q.category for q in kept})))
    return kept
