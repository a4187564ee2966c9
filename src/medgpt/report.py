"""Metrics on disk and as pictures: `metrics.jsonl` (every logged step), loss/reward plots (PNG), and the
pipeline's `report.md` / `report.html`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medgpt.metrics_files import METRICS_FILE, RESULTS_FILE, MetricsWriter, read_json, read_metrics

__all__ = ["plot_series", "plot_losses", "write_pipeline_report",
           "METRICS_FILE", "MetricsWriter", "read_metrics"]  # the last three live in medgpt.metrics_files


def plot_series(rows: list[dict], keys: list[str], png: str | Path, title: str, ylabel: str = "") -> Path | None:
    """Plot each key against step; rows lacking a key are skipped. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for key, points in series.items():
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel or ", ".join(series))
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    return Path(png)


def plot_losses(metrics_path: str | Path, png: str | Path, title: str = "loss") -> Path | None:
    return plot_series(read_metrics(metrics_path), ["loss", "eval_loss"], png, title, "loss")


# ------------------------------------------------------------------------------------------ pipeline report


class Document:
    """A few block kinds rendered twice, as Markdown and as standalone HTML, from one description."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", items))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        if rows:
            self.blocks.append(("table", header, [[_cell(v) for v in row] for row in rows]))

    def image(self, alt: str, src: str) -> None:
        self.blocks.append(("image", alt, src))

    def markdown(self) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append("#" * rest[0] + " " + rest[1])
            elif kind == "paragraph":
                out.append(rest[0])
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in rest[0]))
            elif kind == "table":
                header, rows = rest
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "image":
                out.append(f"![{rest[0]}]({rest[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        from html import escape

        body = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                body.append(f"<h{rest[0]}>{escape(rest[1])}</h{rest[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline_html(rest[0])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
            elif kind == "table":
                header, rows = rest
                head = "".join(f"<th>{escape(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "image":
                body.append(f'<figure><img src="{escape(rest[1])}" alt="{escape(rest[0])}"><figcaption>'
                            f"{escape(rest[0])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                 "vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
                 "figure{display:inline-block;margin:0 1em 1em 0;max-width:48%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _inline_html(text: str) -> str:
    """Markdown's **bold** and `code` in paragraphs, escaped otherwise."""
    import re
    from html import escape

    text = escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_answers(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r.get("question", ""): r.get("answer", "") for r in rows}


def write_pipeline_report(pipeline, samples: int = 4) -> Path:
    """`report.md` and `report.html` in the pipeline's output: stages, evaluations before/after, plots, answers.

    Called after every stage, so a long run can be read while it goes on; missing pieces show as pending.
    """
    import datetime

    from medgpt.outputs import DISCLAIMER
    from medgpt.pipeline import REWARD_STAGES, stage_state
    from medgpt.training.recipe import RESULTS_FILE

    out = pipeline.output_dir
    doc = Document()
    doc.heading(f"medgpt pipeline report: {pipeline.file.name}", 1)
    doc.paragraph(f"Base model `{pipeline.base_model}`; output `{out}`; written "
                  f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.")
    doc.paragraph(DISCLAIMER)

    doc.heading("Stages")
    rows, results = [], {}
    for planned in pipeline.stages:
        state = stage_state(pipeline, planned.name)
        result = results[planned.name] = _read_json(planned.output / RESULTS_FILE)
        seconds = state.get("seconds") or result.get("train_runtime")
        extra = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k not in ("train_loss", "eval_loss")
                 and any(w in k for w in ("accuracy", "reward", "margin", "perplexity", "kl"))}
        rows.append([planned.name, planned.stage.name, state.get("status", "pending"),
                     f"{seconds:.0f} s" if seconds else None, result.get("global_step"), _tokens(planned.output, result),
                     result.get("train_loss"), result.get("eval_loss"),
                     ", ".join(f"{k}={_cell(v)}" for k, v in list(extra.items())[:4]) or None])
    doc.table(["stage", "kind", "status", "time", "steps", "tokens", "train loss", "eval loss", "other"], rows)

    evaluated = ["base"] + [s.name for s in pipeline.stages if s.stage.name not in REWARD_STAGES]
    evals = {name: _read_json(out / "eval" / name / "metrics.json") for name in evaluated}
    wins = _read_json(out / "eval" / "win_rates.json")
    columns = [("perplexity", "held-out perplexity ↓"), ("mcq_accuracy", "MCQ accuracy"),
               ("reward_mean", "mean reward of answers"), ("open_n", "open answers")]
    columns = [(k, label) for k, label in columns if any(k in m for m in evals.values())]
    if columns:
        doc.heading("Evaluation before and after each stage")
        doc.table(["model", *[label for _, label in columns]],
                  [[name, *[evals[name].get(k) for k, _ in columns]] for name in evaluated if evals[name]])
    doc.heading("What moved")
    doc.bullets(_what_moved(pipeline, evals, results, wins))

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
        doc.table(["question", *shown],
                  [[q, *[_clip(answers[n].get(q, "")) for n in shown]] for q in questions])

    (out / "report.html").write_text(doc.html(f"medgpt report: {pipeline.file.name}"), encoding="utf-8")
    path = out / "report.md"
    path.write_text(doc.markdown(), encoding="utf-8")
    return path


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


def _reward_model_lines(name: str, result: dict, held_out: dict) -> list[str]:
    """Pairwise accuracy on the stage's validation split and on the evaluation's held-out pairs, against chance."""
    parts = []
    for accuracy, n, where in ((result.get("eval_accuracy"), result.get("rm_eval_pairs"), "its validation split"),
                               (held_out.get("reward_accuracy"), held_out.get("reward_n"), "held-out pairs")):
        if isinstance(accuracy, (int, float)):
            size = f"{n} " if isinstance(n, int) and n else ""
            error = f", one standard error {math.sqrt(0.25 / n):.3f}" if isinstance(n, int) and n else ""
            parts.append(f"{accuracy:.3f} on {size}{where} ({'above' if accuracy > 0.5 else 'not above'} chance 0.5"
                         f"{error})")
    return [f"Reward model `{name}`: accuracy " + "; ".join(parts) + "."] if parts else []


def _what_moved(pipeline, evals: dict, results: dict, wins: dict) -> list[str]:
    """Plain statements computed from the numbers, including when something did not move."""
    from medgpt.pipeline import REWARD_STAGES

    lines = []
    order = [n for n in evals if evals[n]]
    ppl = [(n, evals[n]["perplexity"]) for n in order if "perplexity" in evals[n]]
    if len(ppl) > 1:
        (first, a) = ppl[0]
        steps = " → ".join(f"{n} {v:.2f}" for n, v in ppl)
        changes = ", ".join(f"{first} → {n}: {(v - a) / a:+.1%}" for n, v in ppl[1:])
        lines.append(f"Held-out perplexity: {steps} ({changes}; lower is better).")
    mcq = [(n, evals[n]["mcq_accuracy"], evals[n].get("mcq_n") or 0) for n in order if "mcq_accuracy" in evals[n]]
    if mcq:
        n_items = max(n for _, _, n in mcq) or 1
        p = mcq[0][1]
        se = math.sqrt(max(p * (1 - p), 1e-9) / n_items)
        chance = evals[mcq[0][0]].get("mcq_chance")
        steps = " → ".join(f"{n} {v:.3f}" for n, v, _ in mcq)
        lines.append(f"Multiple-choice accuracy on {n_items} held-out questions: {steps}"
                     + (f" (chance {chance:.2f})" if chance else "")
                     + f"; one standard error is about {se:.3f}, so smaller differences are noise.")
    for name, result in results.items():
        if pipeline.stage(name).stage.name in REWARD_STAGES:
            lines += _reward_model_lines(name, result, _read_json(pipeline.output_dir / "eval" / name / "metrics.json"))
    for pair, w in wins.items():
        if isinstance(w, dict) and "win_rate" in w:
            means = (f"; mean reward {w['reward_mean_a']:.3f} vs {w['reward_mean_b']:.3f}"
                     if "reward_mean_a" in w and "reward_mean_b" in w else "")
            lines.append(f"Reward-model win rate {pair}: {w['win_rate']:.3f} over {w.get('n')} open questions "
                         f"(0.5 = no change; wins {w.get('wins')}, losses {w.get('losses')}, ties {w.get('ties')}){means}.")
    return lines or ["Nothing measured yet."]
