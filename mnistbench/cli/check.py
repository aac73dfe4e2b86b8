"""``mnistbench check`` and ``mnistbench baseline save``: the CI gate and its baselines.

    mnistbench check stores/smoke.sqlite --thresholds ablations/thresholds.yaml \\
        --baseline ablations/smoke.baseline.json --summary "$GITHUB_STEP_SUMMARY" \\
        --junit reports/check.xml --json reports/check.json
    mnistbench baseline save stores/smoke.sqlite --out ablations/smoke.baseline.json

``check`` prints one line per check and returns 0 when every check passes, 1 when a
threshold or baseline check fails. Bad input raises a MnistbenchError, which the
top-level command turns into exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

from mnistbench.baseline import SQLITE_MAGIC, write_baseline
from mnistbench.check import FAIL, NO_BASELINE, NOISE, PASS, CheckReport, CheckResult, run_check
from mnistbench.errors import CheckInputError
from mnistbench.store import Store

TABLE_HEADER = ("STATUS", "CELL", "CHECK", "VALUE", "95% INTERVAL", "RUNS")
# Output option -> (the file it writes, the file name its error messages suggest).
OUTPUTS = {
    "--junit": ("JUnit XML", "check.xml"),
    "--summary": ("Markdown summary", "summary.md"),
    "--json": ("JSON report", "check.json"),
    "--out": ("baseline JSON", "baseline.json"),  # of baseline save
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``check`` and ``baseline`` subcommands."""
    check = subparsers.add_parser(
        "check", help="hold a store's results to thresholds and a baseline (the CI gate)",
        description="Check every cell of an ablation against the thresholds file and, "
                    "with --baseline, against earlier results. Exit status: 0 every check "
                    "passed, 1 a check failed, 2 invalid input.")
    check.add_argument("store", type=Path, metavar="STORE", help="store with the results to check")
    check.add_argument("--thresholds", type=Path, required=True, metavar="FILE",
                       help="thresholds YAML file, for example ablations/thresholds.yaml")
    check.add_argument("--baseline", type=Path, metavar="STORE_OR_JSON",
                       help="store or 'baseline save' JSON to compare against; without it "
                            "every baseline check has status NO-BASELINE")
    check.add_argument("--ablation", metavar="NAME",
                       help="ablation to check (default: the thresholds file's 'ablation' "
                            "key, else the store's only ablation)")
    check.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML here")
    check.add_argument("--summary", type=Path, metavar="PATH",
                       help="write a Markdown summary here, e.g. \"$GITHUB_STEP_SUMMARY\" "
                            "(the file is overwritten)")
    check.add_argument("--json", type=Path, metavar="PATH", help="write the checks as JSON here")
    check.set_defaults(func=run_check_command)

    baseline = subparsers.add_parser(
        "baseline", help="save results as a baseline for check",
        description="Save an ablation's per-cell results as a JSON baseline, which "
                    "`mnistbench check --baseline` compares later runs against.")
    actions = baseline.add_subparsers(dest="baseline_command", metavar="ACTION")
    actions.required = True
    save = actions.add_parser(
        "save", help="write a compact JSON baseline of a store's ablation",
        description="Write per-cell, per-seed final accuracy and outcome flags, the "
                    "criteria and a provenance digest: a file of a few KB to commit.")
    save.add_argument("store", type=Path, metavar="STORE", help="store to summarize")
    save.add_argument("--out", type=Path, required=True, metavar="FILE.json",
                      help="JSON file to write")
    save.add_argument("--ablation", metavar="NAME",
                      help="ablation to save (default: the store's only ablation)")
    save.set_defaults(func=run_baseline_save)


def run_check_command(args: argparse.Namespace) -> int:
    """Run the check, print the table, write the requested files; return 0 or 1."""
    requested = [
        ("--junit", args.junit, render_junit),
        ("--summary", args.summary, render_markdown),
        ("--json", args.json, render_json),
    ]
    outputs = [(option, path, render) for option, path, render in requested if path is not None]
    # A bad output path fails before the check runs, not after its table is printed.
    inputs = {"the store": args.store, "the --thresholds file": args.thresholds,
              "the --baseline input": args.baseline}
    for option, path, _ in outputs:
        _check_output_path(option, path, inputs)
    for (option, path, _), (other, other_path, _) in itertools.combinations(outputs, 2):
        if _same_file(path, other_path):
            raise CheckInputError(f"{option} and {other} both name {path}; expected a "
                                  "different file for each output")
    report = run_check(args.store, args.thresholds, baseline_path=args.baseline,
                       ablation=args.ablation)
    print(render_table(report))
    for option, path, render in outputs:
        _write(option, path, render(report))
    return report.exit_code


def run_baseline_save(args: argparse.Namespace) -> int:
    """Write the baseline JSON of one ablation and print what was written."""
    _check_output_path("--out", args.out, {"the store": args.store})
    with Store(args.store, readonly=True) as store:
        name = store.ablation(args.ablation)["name"]
        summary = write_baseline(store, name, args.out)
    runs = sum(len(cell["seeds"]) for cell in summary["cells"])
    print(f"wrote baseline of ablation {name} to {args.out}: {len(summary['cells'])} cells, "
          f"{runs} runs, {args.out.stat().st_size} bytes")
    return 0


def headline(report: CheckReport) -> str:
    """Return one sentence with the verdict and the number of checks per status."""
    counts = report.counts()
    verdict = "passed" if report.passed else "failed"
    return (f"mnistbench check {verdict} for ablation {report.ablation}: "
            f"{counts[FAIL]} failed, {counts[PASS]} passed, {counts[NOISE]} within noise, "
            f"{counts[NO_BASELINE]} without baseline ({len(report.checks)} checks)")


def render_table(report: CheckReport) -> str:
    """Render a fixed-width table, one line per check, then the reasons and the headline."""
    rows = [TABLE_HEADER] + [_cells_of(check) for check in report.checks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip()
             for row in rows]
    for status, title in ((FAIL, "failures"), (NOISE, "drops within noise")):
        reasons = [check.reason for check in report.checks if check.status == status]
        if reasons:
            lines += ["", f"{title}:"] + [f"  {reason}" for reason in reasons]
    lines += ["", headline(report)]
    return "\n".join(lines)


def render_markdown(report: CheckReport) -> str:
    """Render a Markdown summary for a pull request comment or ``$GITHUB_STEP_SUMMARY``."""
    lines = [f"**{headline(report)}**", ""]
    lines.append("| " + " | ".join(_markdown_escape(h) for h in TABLE_HEADER) + " |")
    lines.append("|" + "|".join("---" for _ in TABLE_HEADER) + "|")
    for check in report.checks:
        texts = list(_cells_of(check))
        texts[0] = f"**{texts[0]}**" if check.status == FAIL else texts[0]
        texts[1] = f"`{texts[1]}`"
        lines.append("| " + " | ".join(_markdown_escape(text) for text in texts) + " |")
    for status, title in ((FAIL, "Failures"), (NOISE, "Drops within noise")):
        reasons = [check.reason for check in report.checks if check.status == status]
        if reasons:
            lines += ["", f"### {title}", ""] + [f"- {_markdown_escape(r)}" for r in reasons]
    baseline = report.baseline or "none"
    lines += ["", f"Store `{report.store}`, thresholds `{report.thresholds}`, "
                  f"baseline `{baseline}`."]
    return "\n".join(lines) + "\n"


def render_junit(report: CheckReport) -> str:
    """Render JUnit XML: one testcase per check, failures and skipped (no baseline) marked."""
    counts = report.counts()
    attributes = {"tests": str(len(report.checks)), "failures": str(counts[FAIL]),
                  "errors": "0", "skipped": str(counts[NO_BASELINE])}
    root = ET.Element("testsuites", {"name": "mnistbench check", **attributes})
    suite = ET.SubElement(root, "testsuite", {"name": f"mnistbench check {report.ablation}",
                                              **attributes})
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"{report.ablation}.{check.cell_id}", "name": check.name, "time": "0"})
        if check.status == FAIL:
            failure = ET.SubElement(case, "failure", {"message": check.reason,
                                                      "type": check.kind})
            failure.text = check.reason
        elif check.status == NO_BASELINE:
            ET.SubElement(case, "skipped", {"message": check.reason})
        else:
            ET.SubElement(case, "system-out").text = f"{check.status}: {check.reason}"
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def render_json(report: CheckReport) -> str:
    """Render the report as JSON: verdict, counts per status and every check's fields."""
    data = {
        "ablation": report.ablation,
        "store": report.store,
        "thresholds": report.thresholds,
        "baseline": report.baseline,
        "passed": report.passed,
        "exit_code": report.exit_code,
        "counts": report.counts(),
        "checks": [{**asdict(check), "levels": dict(check.levels)} for check in report.checks],
    }
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def _cells_of(check: CheckResult) -> tuple[str, str, str, str, str, str]:
    if check.value is None:
        value = "-"
    elif check.kind == "baseline":
        value = f"{check.value:+.3f}"
    else:
        value = f"{check.value:.3f}"
    interval = "-" if check.lower is None else f"[{check.lower:.3f}, {check.upper:.3f}]"
    return (check.status, check.cell_id, check.name, value, interval, check.runs or "-")


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _same_file(path: Path, other: Path | None) -> bool:
    return other is not None and path.resolve() == Path(other).resolve()


def _check_output_path(option: str, path: Path, inputs: dict[str, Path | None]) -> None:
    """Raise CheckInputError before the check runs when ``path`` cannot be a file.

    An output that would overwrite one of the command's inputs, or any SQLite file,
    is rejected, so a mistyped option never destroys a store or a thresholds file.
    """
    kind, example = OUTPUTS[option]
    if path.is_dir():
        raise CheckInputError(f"{option} {path} is a directory; expected the path of a file "
                              f"to write the {kind} to, such as {path / example}")
    for name, input_path in inputs.items():
        if _same_file(path, input_path):
            raise CheckInputError(f"{option} {path} is also {name}; expected a new file, "
                                  f"such as {path.parent / example}")
    if path.is_file() and _is_sqlite(path):
        raise CheckInputError(f"{option} {path} is an SQLite file, which this would "
                              f"overwrite; expected the path of a {kind} file, such as "
                              f"{path.parent / example}")
    blocking = next((parent for parent in path.parents
                     if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CheckInputError(f"{option} {path}: {blocking} is a file, not a directory; "
                              f"expected the path of a file to write the {kind} to")


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _write(option: str, path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        kind, _ = OUTPUTS[option]
        raise CheckInputError(f"{option} {path}: cannot write the {kind}: {error.strerror}; "
                              f"expected the path of a writable file") from None
