"""The building blocks of a report page: sections, plots on a headless canvas, and the page
rendered as HTML or Markdown.

The generic report (loopsearch/results/report.py) and the sections of fixed-arm studies (the
paper's claims, loopsearch/results/claims.py; budget sweeps, loopsearch/results/sweep.py) are
built from these, so none of them needs another's private helpers. Plots are drawn on
matplotlib's Agg canvas (pyplot's global state is left alone); matplotlib is imported when a
plot is drawn.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

FORMATS = ("html", "md")
NLL_LABEL = "val NLL (nats/token)"
OBJECTIVE_LABELS = {  # axis labels, with units, of the study objectives
    "val_nll": NLL_LABEL,
    "gen_ppl": "gen PPL (perplexity = exp(nats/token) under the reference LM)",
    "zeroshot_bpb": "zero-shot NLL bound (bits/byte)",
    "task_accuracy": "task accuracy (fraction of problems exactly right)",
}


@dataclass
class Section:
    """One part of the page: a plot (a PNG in the report directory), a table, or a note saying
    why there is nothing to show."""

    key: str
    title: str
    image: str | None = None
    caption: str = ""
    note: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    markdown: str = ""  # a ready Markdown table (the leaderboard's own), used instead of headers/rows


@dataclass
class Report:
    page: Path
    sections: list[Section]

    @property
    def images(self) -> list[Path]:
        return [self.page.parent / s.image for s in self.sections if s.image]

    @property
    def skipped(self) -> list[Section]:
        return [s for s in self.sections if not s.image and not s.rows and not s.markdown and s.note]


# ---- plots --------------------------------------------------------------------------------------------
def figure(width: float = 7.0, height: float = 4.5):
    """A matplotlib Figure on the Agg canvas (headless; pyplot's global state is untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def flop_axis(axis, what: str) -> None:
    """Tick labels with SI prefixes (e.g. '1.5 GFLOP') and the unit in the axis label."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(5))
    axis.set_major_formatter(EngFormatter(unit="FLOP", places=None))
    axis.set_label_text(f"{what} (FLOPs)")


def save(fig, out: Path, name: str) -> str:
    """Write ``fig`` as ``out/name`` (PNG); returns the name, which the page references."""
    fig.savefig(out / name, format="png")
    return name


# ---- rendering -----------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
img{max-width:100%;border:1px solid #eee}figcaption,.caption{color:#555;font-size:.9em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;display:block;max-width:100%;overflow-x:auto}\
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}nav a{margin-right:1em}"""


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "" if not any(headers) else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def md_escape(text: str) -> str:
    """Text safe to put in Markdown: no raw HTML (names and descriptions come from users)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    cell = lambda c: md_escape(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p class=\"caption\">generated {datetime.now():%Y-%m-%d %H:%M} by loopsearch; plots are the PNG files "
             f"beside this page</p>",
             "<nav>" + "".join(f"<a href=\"#{s.key}\">{esc(s.title)}</a>" for s in sections) + "</nav>"]
    for s in sections:
        parts.append(f"<section id=\"{s.key}\"><h2>{esc(s.title)}</h2>")
        if s.image:
            parts.append(f"<figure><img src=\"{esc(s.image)}\" alt=\"{esc(s.title)}\">"
                         f"<figcaption>{esc(s.caption)}</figcaption></figure>")
        elif s.caption:
            parts.append(f"<p class=\"caption\">{esc(s.caption)}</p>")
        if s.note:
            parts.append(f"<p class=\"note\">{esc(s.note)}</p>")
        if s.rows:
            parts.append(html_table(s.headers, s.rows))
        parts.append("</section>")
    return "\n".join(parts + ["</body></html>\n"])


def render_md(title: str, sections: list[Section]) -> str:
    parts = [f"# {md_escape(title)}\n", f"_generated {datetime.now():%Y-%m-%d %H:%M} by loopsearch_\n"]
    for s in sections:
        parts.append(f"## {md_escape(s.title)}\n")
        if s.image:
            parts.append(f"![{md_escape(s.title)}]({s.image})\n")
        if s.caption:
            parts.append(f"_{md_escape(s.caption)}_\n")
        if s.note:
            parts.append(f"> {md_escape(s.note)}\n")
        if s.markdown:
            parts.append(s.markdown)
        elif s.rows:
            parts.append(md_table(s.headers, s.rows))
    return "\n".join(parts)
