"""Our MCQ scorer against lm-evaluation-harness (lm-eval 0.4.x) on the same local file and model: the same
log-likelihood per option and the same accuracy, so `medgpt eval --mcq-prompt plain` numbers compare with
published lm-eval ones.

The questions (default: the 117 demo MCQs) are written once as cais/mmlu rows (`question`, `choices`, integer
`answer`) to a temporary JSON-lines file. lm-eval reads it through two tasks that `include` its own MMLU templates
(`mmlu/default`: options listed, the letter scored -> `acc`; `mmlu/continuation`: the option text scored ->
`acc`, `acc_norm` per character, `acc_bytes` per byte), with only the dataset pointed at the local file. medgpt
reads the same file (`mcq_format: mmlu`, `mcq_prompt: plain`) with the scorings `letter`, `sum`, `char` and
`byte`. Both run the model in float32 on the CPU, zero-shot. Printed per rule: both accuracies, how many
questions picked differently, and the largest per-option difference of the score. The last line is

  parity=ok|FAILED questions=N max_abs_score_difference=D

    .venv/bin/python benchmarks/lm_eval_parity.py                     # embedded smollm2-135m, all 117 demo MCQs
    .venv/bin/python benchmarks/lm_eval_parity.py --tiny              # seconds: a tiny random model, 8 questions
    .venv/bin/python benchmarks/lm_eval_parity.py --model DIR --file my_benchmark.jsonl --limit 200

Needs the `bench` extra (`pip install -e '.[bench]'`: lm-eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from harness import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
RULES = {"letter": ("letters", "acc"), "sum": ("cloze", "acc"), "char": ("cloze", "acc_norm"),
         "byte": ("cloze", "acc_bytes")}  # our scoring -> (lm-eval task, its metric)
TOLERANCE = 1e-3  # per-option log-likelihood, float32 on one machine


def write_rows(questions, path: Path) -> None:
    rows = [{"question": q.question, "choices": list(q.options.values()), "answer": list(q.options).index(q.answer)}
            for q in questions]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_tasks(directory: Path, data: Path) -> None:
    import lm_eval

    templates = Path(lm_eval.__file__).parent / "tasks" / "mmlu"
    for task, include, metrics in (("letters", "default/_default_template_yaml", ["acc"]),
                                   ("cloze", "continuation/_continuation_template_yaml", ["acc", "acc_norm", "acc_bytes"])):
        lines = [f"include: {templates / include}", f"task: medgpt_parity_{task}", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    test: {data}", "test_split: test",
                 "fewshot_split: test", "metric_list:"]
        lines += [f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in metrics]
        (directory / f"medgpt_parity_{task}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_lm_eval(model: Path, tasks: Path, batch_size: int) -> dict:
    """{task: (metrics, {doc_id: [log-likelihood per option]})}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), device="cpu", dtype="float32", batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=["medgpt_parity_letters", "medgpt_parity_cloze"], num_fewshot=0,
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True, bootstrap_iters=0)
    results = {}
    for task in ("letters", "cloze"):
        name = f"medgpt_parity_{task}"
        metrics = {k.split(",")[0]: v for k, v in out["results"][name].items() if "," in k}
        per_doc = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"][name]}
        results[task] = (metrics, per_doc)
    return results


def run_medgpt(model: Path, data: Path, batch_size: int) -> dict:
    """{scoring: (accuracy, [{letter: score} per question])}."""
    from medgpt.evaluation import EvalSpec, evaluate_model

    results = {}
    for scoring in RULES:
        with tempfile.TemporaryDirectory() as out:
            metrics = evaluate_model(str(model), EvalSpec(mcq_file=str(data), mcq_format="mmlu", mcq_prompt="plain",
                                                          mcq_scoring=scoring, torch_dtype="fp32",
                                                          batch_size=batch_size, max_length=2048), out)
            rows = [json.loads(line) for line in Path(out, "mcq.jsonl").read_text().splitlines()]
        results[scoring] = (metrics["mcq_accuracy"], [r["scores"] for r in rows])
    return results


def compare(ours: dict, theirs: dict, questions) -> list[dict]:
    report = []
    for scoring, (task, metric) in RULES.items():
        accuracy, scores = ours[scoring]
        their_metrics, per_doc = theirs[task]
        differing, worst = 0, 0.0
        for index, (question, mine) in enumerate(zip(questions, scores)):
            texts = list(question.options.values())
            lengths = {"char": [len(t) for t in texts], "byte": [len(t.encode()) for t in texts]}.get(scoring)
            lls = per_doc[index]
            normalised = [ll / n for ll, n in zip(lls, lengths)] if lengths else lls
            worst = max(worst, max(abs(a - b) for a, b in zip(mine.values(), normalised)))
            differing += max(mine, key=mine.get) != list(mine)[max(range(len(normalised)), key=normalised.__getitem__)]
        report.append({"scoring": scoring, "lm_eval": f"{task}:{metric}", "medgpt_accuracy": accuracy,
                       "lm_eval_accuracy": their_metrics[metric], "questions_picked_differently": differing,
                       "max_abs_score_difference": worst})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model dir or alias (default: the embedded model)")
    parser.add_argument("--file", default=str(ROOT / "data" / "demo" / "eval" / "mcq.jsonl"),
                        help="multiple-choice questions with four options, any format medgpt reads")
    parser.add_argument("--limit", type=int, help="first N questions")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and 8 questions: checks the script")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from medgpt.evaluation.benchmarks import read_questions
    from medgpt.models.load import resolve_model_path

    questions = [q for q in read_questions(args.file).questions if len(q.options) == 4 and not q.multi]
    questions = questions[: 8 if args.tiny else args.limit]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = make_tiny_model(scratch / "tiny") if args.tiny else Path(resolve_model_path(args.model))
        data = scratch / "questions.jsonl"
        write_rows(questions, data)
        write_tasks(scratch, data)
        theirs = run_lm_eval(model, scratch, args.batch_size)
        ours = run_medgpt(model, data, args.batch_size)
    report = compare(ours, theirs, questions)
    for row in report:
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    worst = max(r["max_abs_score_difference"] for r in report)
    same = all(r["questions_picked_differently"] == 0 and abs(r["medgpt_accuracy"] - r["lm_eval_accuracy"]) < 1e-9
               for r in report) and worst < TOLERANCE
    if args.output:
        Path(args.output).write_text(json.dumps({"model": args.model if not args.tiny else "tiny", "file": args.file,
                                                 "questions": len(questions), "rules": report}, indent=2))
    print(f"parity={'ok' if same else 'FAILED'} questions={len(questions)} max_abs_score_difference={worst:.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
