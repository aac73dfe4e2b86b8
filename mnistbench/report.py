"""Render an ablation's report as one self-contained HTML file and a Markdown file.

    paths = write_report("stores/default.sqlite", "reports/default")
    paths.html   # reports/default/report.html, figures embedded as data URIs
    paths.markdown   # reports/default/report.md, figures in reports/default/figures/

Everything is rendered in memory first. Files are written only after every figure and
both templates rendered, each through a temporary file and ``os.replace``, so a failed
render leaves no partial report and an older report stays as it was. Values from the
store are escaped: the HTML template autoescapes, and every expression of the Markdown
template passes through :func:`escape_markdown`.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import logging
import os
import platform
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import matplotlib.pyplot as plt

from mnistbench import figures
from mnistbench.analysis import (
    Analysis,
    analyze,
    format_accuracy,
    format_number,
    format_points,
    format_rate,
    outcome_counts,
)
from mnistbench.findings import CLAIMS_NOTE, CLAIMS_TITLE, FINDINGS_NOTE, data_notes, evaluate_claims, write_findings
from mnistbench.outcome import OUTCOMES
from mnistbench.store import Store

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
SUBPLOTS_PER_ROW = 3
# Packages whose versions the provenance section lists, beside the versions stored per run.
REPORT_PACKAGES = ("mnistbench", "numpy", "pandas", "matplotlib", "seaborn", "jinja2")


@dataclass(frozen=True)
class ReportFigure:
    """One rendered figure: PNG bytes plus the text shown with it."""

    name: str  # file stem, [a-z_]+
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def path(self) -> str:
        return f"{FIGURES_DIR}/{self.name}.png"


@dataclass(frozen=True)
class ReportPaths:
    """Files that :func:`write_report` wrote."""

    html: Path
    markdown: Path
    figures: list[Path] = field(default_factory=list)


class MarkdownText(str):
    """Markdown that the Markdown template prints unescaped (figure links, code fences)."""


_MARKDOWN_ACTIVE = re.compile(r"([\\`*_<>|~&])")
_LINE_START = re.compile(r"[#\[]|[-+] ")
_ORDERED_ITEM = re.compile(r"(\d+)[.)] ")


def escape_markdown(value: object) -> str:
    """Escape a value so that GitHub-flavoured Markdown shows it as plain text in a table cell.

    Backslash-escapes the characters that start emphasis, code, HTML, strikethrough or
    end a table cell, breaks link syntax, and joins lines into one. A
    :class:`MarkdownText` passes through unchanged.
    """
    if isinstance(value, MarkdownText):
        return str(value)
    text = "" if value is None else str(value)
    text = " ".join(text.splitlines())
    text = _MARKDOWN_ACTIVE.sub(r"\\\1", text)
    text = text.replace("](", "]\\(").replace("][", "]\\[")
    # At the start of a line these would open a heading, a list or a link definition.
    if _LINE_START.match(text):
        text = "\\" + text
    ordered = _ORDERED_ITEM.match(text)
    if ordered:
        text = ordered.group(1) + "\\" + text[len(ordered.group(1)):]
    return text


def code_fence(text: str) -> MarkdownText:
    """Wrap text in a fenced code block whose fence is longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return MarkdownText(f"{fence}\n{text.rstrip()}\n{fence}")


def _environment(markdown: bool) -> jinja2.Environment:
    loader = jinja2.PackageLoader("mnistbench", "templates")
    if markdown:
        return jinja2.Environment(loader=loader, autoescape=False, finalize=escape_markdown,
                                  undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)


@contextlib.contextmanager
def _subplot_grid(count: int, width: float = 4.2, height: float = 3.3):
    """Yield a figure and ``count`` axes, at most SUBPLOTS_PER_ROW per row; close it on exit."""
    columns = min(count, SUBPLOTS_PER_ROW)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                                squeeze=False, layout="constrained")
    for extra in axes.flat[count:]:
        extra.set_axis_off()
    try:
        yield figure, list(axes.flat[:count])
    finally:
        plt.close(figure)


def build_figures(analysis: Analysis) -> list[ReportFigure]:
    """Render the report's figures to PNG: rates, accuracy, learning curves, collapse."""
    factors = analysis.factors or {"cell_id": list(analysis.cells["cell_id"])}
    palette = figures.level_palette(factors)
    varying = [name for name, levels in factors.items() if len(levels) > 1] or list(factors)
    rows = varying[0]
    columns = varying[1] if len(varying) > 1 else None
    rendered = []

    with _subplot_grid(2, width=5.0, height=0.6 * len(factors[rows]) + 2.2) as (figure, axes):
        figures.plot_rate_heatmap(analysis.runs, rows, columns, factors, "converged", ax=axes[0])
        figures.plot_rate_heatmap(analysis.runs, rows, columns, factors, "collapsed", ax=axes[1])
        rendered.append(ReportFigure(
            "rates", "Convergence and collapse rates",
            f"Share of runs per {rows}" + (f" and {columns}" if columns else "")
            + ", other factors pooled. Hatched grey: no stored runs.",
            figures.figure_png(figure)))

    with _subplot_grid(len(factors)) as (figure, axes):
        for ax, (factor, levels) in zip(axes, factors.items()):
            figures.plot_accuracy_by_level(analysis.runs, factor, levels, palette, ax=ax)
        rendered.append(ReportFigure(
            "accuracy", "Final accuracy by level",
            "Boxes show quartiles and dots show runs. Diverged and crashed runs have no "
            "accuracy and are counted under each level as \"without\".",
            figures.figure_png(figure)))

    with _subplot_grid(len(factors)) as (figure, axes):
        for ax, (factor, levels) in zip(axes, factors.items()):
            figures.plot_learning_curves(analysis.epochs, factor, levels, palette, ax=ax)
        rendered.append(ReportFigure(
            "learning_curves", "Learning curves",
            "Median test accuracy per epoch with the interquartile band. Epoch 0 is before "
            "training.", figures.figure_png(figure)))

    with _subplot_grid(2, width=5.0, height=4.0) as (figure, axes):
        figures.plot_collapse_anatomy(analysis.runs, rows, palette, ax=axes[0])
        figures.plot_collapse_confusion(analysis.runs, ax=axes[1])
        rendered.append(ReportFigure(
            "collapse", "Collapse anatomy",
            f"Left: the class each collapsed run predicts and the epoch from which its top "
            f"class share stayed at or above {analysis.collapse_share:.2f}. Right: confusion "
            f"matrix summed over collapsed runs.", figures.figure_png(figure)))
    return rendered


def _methods(frame, columns: dict[str, str]) -> list[str]:
    """Return "label: method" for each Estimate column, listing every distinct method once."""
    lines = []
    for column, label in columns.items():
        methods = sorted({e.method for e in frame[column] if e.n > 0}) if len(frame) else []
        if methods:
            lines.append(f"{label}: {'; '.join(methods)}")
    return lines


def _outcome_text(row: dict) -> str:
    parts = [f"{row[f'n_{outcome}']} {outcome}" for outcome in OUTCOMES if row[f"n_{outcome}"]]
    return ", ".join(parts) or "none"


def _epochs_text(row: dict) -> str:
    if row["stored"] == 0:
        return "n/a"
    reached = row["reached_rate"]
    return (f"{format_number(row['epochs_to_converge_median'], 0)} "
            f"({round(reached.value * reached.n)} of {reached.n} reached)")


def cells_table(analysis: Analysis) -> dict:
    """Return the per-cell table: header, rows of strings and the methods of its numbers."""
    factors = list(analysis.factors) or ["cell_id"]  # a matrix without factors has one cell
    header = [*factors, "runs stored / expected", "outcomes", "accuracy median",
              "accuracy IQM", "accuracy mean", "convergence rate", "collapse rate",
              "divergence rate", "epochs to converge (median)", "collapse classes"]
    rows = []
    for row in analysis.cells.to_dict("records"):
        accuracy_note = f" over {row['finite']} runs" if row["excluded"] and row["finite"] else ""
        rows.append([
            *(row[factor] for factor in factors),
            f"{row['stored']} / {row['expected']}", _outcome_text(row),
            format_accuracy(row["accuracy_median"]) + accuracy_note,
            format_accuracy(row["accuracy_iqm"]), format_accuracy(row["accuracy_mean"]),
            format_rate(row["convergence_rate"]), format_rate(row["collapse_rate"]),
            format_rate(row["divergence_rate"]), _epochs_text(row), row["collapse_text"],
        ])
    methods = _methods(analysis.cells, {
        "accuracy_median": "accuracy median", "accuracy_iqm": "accuracy IQM",
        "accuracy_mean": "accuracy mean", "convergence_rate": "rates"})
    methods.append(f"epochs to converge: the first epoch with test accuracy >= "
                   f"{analysis.convergence_accuracy:.2f}; runs that never reach it count as "
                   f"never (infinite), so the median is never when at least half do not")
    return {"title": "Cells", "header": header, "rows": rows, "methods": methods}


def levels_table(analysis: Analysis) -> dict:
    """Return the per-level table (marginal over the other factors)."""
    header = ["factor", "level", "runs", "accuracy median", "accuracy mean",
              "convergence rate", "collapse rate", "divergence rate", "collapse classes"]
    rows = [[row["factor"], row["level"], str(row["stored"]),
             format_accuracy(row["accuracy_median"]), format_accuracy(row["accuracy_mean"]),
             format_rate(row["convergence_rate"]), format_rate(row["collapse_rate"]),
             format_rate(row["divergence_rate"]), row["collapse_text"]]
            for row in analysis.levels.to_dict("records")]
    methods = _methods(analysis.levels, {"accuracy_median": "accuracy median",
                                         "accuracy_mean": "accuracy mean",
                                         "convergence_rate": "rates"})
    return {"title": "Levels", "header": header, "rows": rows, "methods": methods}


def differences_table(analysis: Analysis) -> dict:
    """Return the table of level differences, one row per factor, level pair and metric."""
    header = ["factor", "treatment", "control", "metric", "difference (points)", "runs",
              "method"]
    rows = []
    for row in analysis.differences.to_dict("records"):
        if row["paired"]:
            runs = f"{row['estimate'].n} pairs"
        else:
            runs = f"{row['treatment_used']} vs {row['control_used']} unpaired"
        if row["dropped"]:
            runs += f"; {row['dropped']} without accuracy left out"
        rows.append([row["factor"], row["treatment"], row["control"], row["metric"],
                     format_points(row["estimate"]), runs, row["estimate"].method])
    methods = ["difference: treatment minus control; accuracy in percentage points, "
               "converged, collapsed and diverged as differences of rates in percentage "
               "points; runs pair up when they share the seed and every other factor's level"]
    return {"title": "Level differences", "header": header, "rows": rows, "methods": methods}


def summary_lines(analysis: Analysis) -> list[str]:
    """Return the report's opening facts: cells, runs, outcomes and criteria."""
    counts = outcome_counts(analysis.runs)
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
    return [
        f"{len(analysis.cells)} cells; {len(analysis.runs)} of {analysis.expected_runs} "
        f"expected runs stored ({outcomes}).",
        f"A run converged when its final test accuracy is at least "
        f"{analysis.convergence_accuracy:.1%}; it collapsed when at least "
        f"{analysis.collapse_share:.0%} of its final test predictions fall into one class.",
    ]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def provenance(analysis: Analysis) -> list[tuple[str, str]]:
    """Return (label, value) rows: versions, devices, dataset, commits, counts, time, store."""
    runs = analysis.runs

    def distinct(column: str) -> str:
        values = sorted({str(v) for v in runs[column].dropna()}) if len(runs) else []
        return ", ".join(values) or "none stored"

    seconds = float(runs["train_seconds"].sum()) if len(runs) else 0.0
    counts = ", ".join(f"{outcome} {count}" for outcome, count in outcome_counts(runs).items())
    return [
        ("store", analysis.store_path),
        ("ablation", f"{analysis.name} (dataset {analysis.ablation['dataset']}, saved "
                     f"{analysis.ablation['updated_at']})"),
        ("runs by outcome", counts),
        ("train time, summed over workers", f"{seconds / 3600:.2f} h ({seconds:.0f} s)"),
        ("mnistbench versions of the runs", distinct("package_version")),
        ("torch versions of the runs", distinct("torch_version")),
        ("devices", distinct("device")),
        ("dataset MD5", distinct("dataset_md5")),
        ("git commits", distinct("git_commit")),
        ("report rendered with", f"Python {platform.python_version()}, " + ", ".join(
            f"{package} {_version(package)}" for package in REPORT_PACKAGES)),
    ]


def build_context(analysis: Analysis, report_figures: list[ReportFigure]) -> dict:
    """Collect everything the templates print, as plain strings, lists and dicts."""
    findings = write_findings(analysis)
    claims = evaluate_claims(analysis)
    return {
        "name": analysis.name,
        "summary": summary_lines(analysis),
        "findings": [{"text": f.text, "method": f.estimate.method} for f in findings],
        "notes": data_notes(analysis),
        "claims_title": CLAIMS_TITLE,
        "claims_note": CLAIMS_NOTE,
        "findings_note": FINDINGS_NOTE,
        "claims": [{"key": r.claim.key, "statement": r.claim.statement, "verdict": r.verdict,
                    "detail": r.detail, "rule": r.claim.rule_text} for r in claims],
        "figures": report_figures,
        "tables": [cells_table(analysis), levels_table(analysis),
                   differences_table(analysis)],
        "provenance": provenance(analysis),
        "matrix_text": analysis.ablation["text"],
        "matrix_code": code_fence(analysis.ablation["text"]),
        "figure_links": [MarkdownText(f"![{f.title}]({f.path})") for f in report_figures],
    }


def render_html(context: dict) -> str:
    """Render report.html from the context of :func:`build_context`."""
    return _environment(markdown=False).get_template("report.html.j2").render(context)


def render_markdown(context: dict) -> str:
    """Render report.md from the context of :func:`build_context`."""
    return _environment(markdown=True).get_template("report.md.j2").render(context)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 lets the umask set the permissions, as for any new file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def render_report(analysis: Analysis) -> tuple[str, str, list[ReportFigure]]:
    """Render the HTML text, the Markdown text and the figures of one analysis, in memory."""
    report_figures = build_figures(analysis)
    context = build_context(analysis, report_figures)
    return render_html(context), render_markdown(context), report_figures


def write_report(store_path: str | Path, out_dir: str | Path,
                 ablation: str | None = None) -> ReportPaths:
    """Analyse one ablation of a store and write report.html, report.md and figures/*.png.

    Args:
        store_path: an existing store file.
        out_dir: the output directory, created when missing.
        ablation: the ablation name; None when the store contains exactly one.

    Raises:
        StoreError: the store is missing or unreadable, or the ablation is not in it.
    """
    with Store(store_path, readonly=True) as store:
        analysis = analyze(store, ablation)
    html, markdown, report_figures = render_report(analysis)

    out = Path(out_dir)
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    figure_paths = []
    for report_figure in report_figures:
        path = out / report_figure.path
        write_atomic(path, report_figure.png)
        figure_paths.append(path)
    markdown_path = out / "report.md"
    html_path = out / "report.html"
    write_atomic(markdown_path, markdown.encode("utf-8"))
    write_atomic(html_path, html.encode("utf-8"))
    logger.info("wrote report of ablation %s (%d runs) to %s", analysis.name,
                len(analysis.runs), out)
    return ReportPaths(html=html_path, markdown=markdown_path, figures=figure_paths)
