"""Metrics as pictures and documents: loss/reward plots (PNG) from `metrics.jsonl`, and `Document`, the few block
kinds the pipeline's report (`medgpt.pipeline_report`) renders as Markdown and as HTML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from medgpt.metrics_files import METRICS_FILE, MetricsWriter, read_metrics

__all__ = ["plot_series", "plot_losses", "Document",
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
            self.blocks.append(("table", header, [[cell(v) for v in row] for row in rows]))

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


def cell(value: Any) -> str:
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
