"""The pipeline's `report.md` / `report.html`: stages, evaluations before and after each stage with their 95%
intervals, what moved (paired comparisons; a change is called real only when its interval excludes zero), win
rates per judge (marked when the judge is the reward model a compared stage trained against), plots, answers.

It reads the files the runs left (`medgpt.metrics_files`, the evaluations' outputs) and works on the `Pipeline`
object it is given; it imports nothing of the pipeline."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from medgpt.evaluation.compare import compare_mcq, compare_perplexity, compare_rewards
from medgpt.metrics_files import METRICS_FILE, RESULTS_FILE, read_json, read_metrics
from medgpt.report import Document, cell


def _interval(value, interval, digits: int = 3) -> str | None:
    if not isinstance(value, (int, float)):
        return None
    shown = f"{value:.{digits}f}"
    return f"{shown} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else shown


def _read_answers(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r.get("question", ""): r.get("answer", "") for r in rows}


def write_pipeline_report(pipeline, samples: int = 4) -> Path:
    """Written after every stage, so a long run can be read while it goes on; missing pieces show as pending."""
    from medgpt.outputs import DISCLAIMER

    out = pipeline.output_dir
    doc = Document()
    doc.heading(f"medgpt pipeline report: {pipeline.file.name}", 1)
    doc.paragraph(f"Base model `{pipeline.base_model}`; output `{out}`; written "
                  f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.")
    doc.paragraph(DISCLAIMER)
    results = _stages(doc, pipeline)

    evaluated = ["base"] + [s.name for s in pipeline.stages if not s.is_reward_model]
    evals = {name: read_json(out / "eval" / name / "metrics.json") for name in evaluated}
    _evaluations(doc, evaluated, evals)
    doc.heading("What moved")
    doc.paragraph("Each model against the one it was trained from, on the same items; 95% intervals; a change is "
                  "called real only when its interval excludes zero.")
    doc.bullets(_what_moved(pipeline, evals, results))

    pictures = [(f"{s.name}: {png.stem}", f"{s.name}/{png.name}") for s in pipeline.stages
                for png in sorted(s.output.glob("*.png"))]
    if pictures:
        doc.heading("Plots")
        for alt, src in pictures:
            doc.image(alt, src)
    answers = {name: _read_answers(out / "eval" / name / "answers.jsonl") for name in evaluated}
    shown = [name for name in evaluated if answers[name]]
    if shown:
        doc.heading("Sample answers")
        questions = list(answers[shown[0]])[:samples]
        doc.table(["question", *shown], [[q, *[_clip(answers[n].get(q, "")) for n in shown]] for q in questions])

    (out / "report.html").write_text(doc.html(f"medgpt report: {pipeline.file.name}"), encoding="utf-8")
    path = out / "report.md"
    path.write_text(doc.markdown(), encoding="utf-8")
    return path


def _stages(doc: Document, pipeline) -> dict[str, dict]:
    doc.heading("Stages")
    rows, results = [], {}
    for planned in pipeline.stages:
        state = pipeline.state(planned.name)
        result = results[planned.name] = read_json(planned.output / RESULTS_FILE)
        seconds = state.get("seconds") or result.get("train_runtime")
        extra = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k not in ("train_loss", "eval_loss")
                 and any(w in k for w in ("accuracy", "reward", "margin", "perplexity", "kl"))}
        rows.append([planned.name, planned.stage.name, state.get("status", "pending"),
                     f"{seconds:.0f} s" if seconds else None, result.get("global_step"), _tokens(planned.output, result),
                     result.get("train_loss"), result.get("eval_loss"),
                     ", ".join(f"{k}={cell(v)}" for k, v in list(extra.items())[:4]) or None])
    doc.table(["stage", "kind", "status", "time", "steps", "tokens", "train loss", "eval loss", "other"], rows)
    return results


def _evaluations(doc: Document, evaluated: list[str], evals: dict[str, dict]) -> None:
    columns = [("perplexity", "held-out perplexity ↓"), ("mcq_accuracy", "MCQ accuracy [95% CI]"),
               ("reward_mean", "mean reward of answers"), ("open_n", "open answers")]
    columns = [(k, label) for k, label in columns if any(k in m for m in evals.values())]
    shown = [name for name in evaluated if evals[name]]
    if not columns or not shown:
        return
    doc.heading("Evaluation before and after each stage")
    doc.table(["model", *[label for _, label in columns]],
              [[name, *[_interval(evals[name].get(k), evals[name].get(f"{k}_ci")) if k == "mcq_accuracy"
                        else evals[name].get(k) for k, _ in columns]] for name in shown])
    categories = sorted({c for name in shown for c in evals[name].get("mcq_by_category", {})})
    if categories:
        doc.heading("MCQ accuracy per category", 3)
        doc.table(["category", *shown],
                  [[c, *[_interval(evals[n].get("mcq_by_category", {}).get(c, {}).get("accuracy"),
                                   evals[n].get("mcq_by_category", {}).get(c, {}).get("accuracy_ci"), 2)
                         for n in shown]] for c in categories])


def _tokens(output: Path, result: dict) -> int | None:
    """Tokens trained on, where the stage logs them (TRL's num_tokens, or our counters)."""
    for key in ("num_input_tokens_seen", "train_tokens", "tokens"):
        if isinstance(result.get(key), (int, float)):
            return int(result[key])
    rows = [r for r in read_metrics(output / METRICS_FILE) if isinstance(r.get("num_tokens"), (int, float))]
    return int(rows[-1]["num_tokens"]) if rows else None


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------ what moved


def _reference(pipeline, name: str, evaluated: set[str]) -> str:
    """The model a stage was trained from, among the evaluated ones (else the base model)."""
    return next((n for n in pipeline.stage(name).inputs if n in evaluated), "base")


def _verdict(real: bool) -> str:
    return "a real change" if real else "within noise (the interval includes 0)"


def _what_moved(pipeline, evals: dict[str, dict], results: dict[str, dict]) -> list[str]:
    lines = []
    directory = pipeline.output_dir / "eval"
    seed = pipeline.evaluation.get("seed", 0)
    done = {n for n, m in evals.items() if m}
    for name in [s.name for s in pipeline.stages if s.name in done]:
        before = _reference(pipeline, name, done)
        if before not in done:
            continue
        ppl = compare_perplexity(directory / name, directory / before, seed)
        if ppl:
            lines.append(f"Held-out perplexity {before} → {name}: {evals[before]['perplexity']:.2f} → "
                         f"{evals[name]['perplexity']:.2f} ({ppl['change']:+.1%} [{ppl['change_ci'][0]:+.1%}, "
                         f"{ppl['change_ci'][1]:+.1%}] over {ppl['n']} documents; lower is better): {_verdict(ppl['real'])}.")
        mcq = compare_mcq(directory / name, directory / before, seed)
        if mcq:
            ci = mcq["difference_ci"]
            lines.append(f"MCQ accuracy {before} → {name}: {evals[before]['mcq_accuracy']:.3f} → "
                         f"{evals[name]['mcq_accuracy']:.3f} ({mcq['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
                         f"on {mcq['n']} questions; McNemar p = {mcq['p_value']:.2g}, {mcq['only_a']} right only "
                         f"after, {mcq['only_b']} only before): {_verdict(mcq['real'])}.")
        rewards = compare_rewards(directory / name, directory / before, seed)
        if rewards:
            ci = rewards["difference_ci"]
            lines.append(f"Mean reward of the open answers {before} → {name}: {rewards['difference']:+.3f} "
                         f"[{ci[0]:+.3f}, {ci[1]:+.3f}] on {rewards['n']} questions: {_verdict(rewards['real'])}.")
    for planned in pipeline.stages:
        if planned.is_reward_model:
            lines += _reward_model_lines(planned.name, results.get(planned.name, {}),
                                         read_json(directory / planned.name / "metrics.json"))
        lines += _kl_lines(planned.name, results.get(planned.name, {}))
    lines += _win_rate_lines(read_json(directory / "win_rates.json"))
    return lines or ["Nothing measured yet."]


def _reward_model_lines(name: str, result: dict, held_out: dict) -> list[str]:
    """Pairwise accuracy on the stage's validation split and on the evaluation's held-out pairs, with intervals."""
    from medgpt.evaluation.intervals import wilson

    parts = []
    for accuracy, n, where in ((result.get("eval_accuracy"), result.get("rm_eval_pairs"), "its validation split"),
                               (held_out.get("reward_accuracy"), held_out.get("reward_n"), "held-out pairs")):
        if isinstance(accuracy, (int, float)):
            interval = wilson(round(accuracy * n), n) if isinstance(n, int) and n else None
            low = interval[0] if interval else None
            verdict = "above chance 0.5" if low is not None and low > 0.5 else "not shown above chance 0.5"
            parts.append(f"{_interval(accuracy, interval)} on {f'{n} ' if n else ''}{where} ({verdict})")
    return [f"Reward model `{name}`: accuracy " + "; ".join(parts) + "."] if parts else []


def _kl_lines(name: str, result: dict) -> list[str]:
    """An RL stage's KL to its reference policy on its last rollouts (nats summed over a reply), against target_kl."""
    kl, target = result.get("final_kl"), result.get("target_kl")
    if not isinstance(kl, (int, float)):
        return []
    if not isinstance(target, (int, float)):
        judged = " (no target_kl set)"
    else:
        judged = f" (target_kl {target:g}): " + ("below the target" if kl < target
                                                else "**above the target**: the policy moved further than asked")
    return [f"KL of {name} to its reference policy on its last rollouts: {kl:.2f} nats per reply{judged}."]


def _win_rate_lines(wins: dict) -> list[str]:
    lines = []
    for key, w in wins.items():
        if not isinstance(w, dict) or "win_rate" not in w:
            continue
        low, high = w.get("win_rate_ci", [0, 1])
        verdict = "a real preference" if low > 0.5 or high < 0.5 else "no real preference (the interval includes 0.5)"
        against = w.get("trained_against") or []
        mark = (f" — **not independent**: {', '.join(against)} trained against this judge, so the number measures "
                "how well it learnt to please it") if against else ""
        lines.append(f"Win rate {w.get('a', key)} vs {w.get('b', '')} judged by `{w.get('judge')}`: "
                     f"{_interval(w['win_rate'], w.get('win_rate_ci'))} over {w.get('win_n')} open questions "
                     f"(0.5 = no change; wins {w.get('wins')}, losses {w.get('losses')}, ties {w.get('ties')}): "
                     f"{verdict}{mark}.")
    return lines + _judge_agreement_lines(wins)


def _direction(w: dict) -> str:
    low, high = w.get("win_rate_ci", [0, 1])
    return "better" if low > 0.5 else "worse" if high < 0.5 else "no real change"


def _judge_agreement_lines(wins: dict) -> list[str]:
    """Where a pair was judged both by a judge it trained against and by an independent one: do they agree?
    A stage that pleases its own reward model but not an independent one may have learnt that model's quirks
    (reward hacking): a finding the report states, not hides."""
    pairs: dict[tuple, list[dict]] = {}
    for w in wins.values():
        if isinstance(w, dict) and "win_rate" in w:
            pairs.setdefault((w.get("a"), w.get("b")), []).append(w)
    lines = []
    for (a, b), judged in pairs.items():
        own = [w for w in judged if w.get("trained_against")]
        independent = [w for w in judged if not w.get("trained_against")]
        if not own or not independent:
            continue
        said = "; ".join(f"`{w.get('judge')}` ({'trained against' if w.get('trained_against') else 'independent'}): "
                         f"{_direction(w)}" for w in own + independent)
        if len({_direction(w) for w in judged}) == 1:
            lines.append(f"Judges agree on {a} vs {b} ({said}).")
        else:
            lines.append(f"**Judges disagree** on {a} vs {b} ({said}): what pleases the reward model {a} trained "
                         "against does not carry over to an independent one, a sign of reward hacking or of noise.")
    return lines
