"""Tests of the rendered report: escaping, tables, atomic writes and the command line."""

from __future__ import annotations

import html.parser
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import Planned, build_store
from mnistbench import figures
from mnistbench.errors import StoreError
from mnistbench.report import (
    code_fence,
    escape_markdown,
    write_atomic,
    write_report,
)
from mnistbench.store import Store

HOSTILE = "<script>alert(1)</script>|a|b"
MATRIX = {"name": "hostile", "seeds": 4,
          "factors": {"activation": ["relu", "sigmoid"], "width": [80, 100]}}


def plan(cell, seed):
    """relu/80: never trained; sigmoid/80: every run diverges; the rest converge."""
    settings = cell.settings
    if settings.width == 80 and settings.activation == "relu":
        return None
    if settings.width == 80:
        return Planned(diverged_at=2)
    if settings.activation == "relu" and seed == 0:
        return Planned(accuracy=0.3, collapse_class=7)
    return Planned(accuracy=0.9 + 0.01 * seed)


def rename_level(path: Path, factor: str, old: str, new: str) -> None:
    """Rename a level inside a stored ablation, as a store from another writer could hold it."""
    with Store(path, create=False) as store:
        connection = store.connection
        rows = connection.execute("SELECT cell_id, levels_json FROM cells").fetchall()
        with store.transaction():
            for cell_id, levels_json in rows:
                levels = json.loads(levels_json)
                if levels.get(factor) != old:
                    continue
                levels[factor] = new
                new_id = ",".join(f"{k}={v}" for k, v in levels.items())
                connection.execute("UPDATE cells SET cell_id = ?, levels_json = ? "
                                   "WHERE cell_id = ?", (new_id, json.dumps(levels), cell_id))
                connection.execute("UPDATE members SET cell_id = ? WHERE cell_id = ?",
                                   (new_id, cell_id))
            factors = json.loads(connection.execute(
                "SELECT factors_json FROM ablations").fetchone()[0])
            factors[factor] = [new if level == old else level for level in factors[factor]]
            connection.execute("UPDATE ablations SET factors_json = ?, matrix_text = ?",
                               (json.dumps(factors), f"name: hostile  # {new}\n```\n"))


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "hostile.sqlite"
    build_store(path, MATRIX, plan).close()
    rename_level(path, "activation", "relu", HOSTILE)
    return path


@pytest.fixture(scope="module")
def hostile_report(hostile_store: Path, tmp_path_factory):
    """The report of the hostile store, rendered once for the tests that only read it."""
    return write_report(hostile_store, tmp_path_factory.mktemp("report"))


class PageParser(html.parser.HTMLParser):
    """Collect start tags, image sources, link targets and the decoded text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[str] = []
        self.references: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src", ""))
        for name in ("href", "src", "action"):
            if name in values and tag != "img":
                self.references.append(values[name])

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def split_row(line: str) -> list[str]:
    """Split a Markdown table row on its unescaped pipes, without the outer ones."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    return cells[1:-1]


def markdown_table(text: str, title: str) -> list[list[str]]:
    """Return the rows (header first, separator dropped) of the table under '## title'."""
    section = text.split(f"## {title}\n", 1)[1]
    block = []
    for line in section.splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    return [split_row(line) for index, line in enumerate(block) if index != 1]


# -- HTML -------------------------------------------------------------------------------


def test_html_escapes_level_names(hostile_report):
    page = parse_page(hostile_report.html)
    assert "script" not in page.tags
    text = "".join(page.text)
    assert HOSTILE in text
    raw = hostile_report.html.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;|a|b" in raw
    assert "<script>" not in raw


def test_html_is_self_contained(hostile_report):
    page = parse_page(hostile_report.html)
    assert len(page.images) == 4
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
    assert page.references == []
    raw = hostile_report.html.read_text(encoding="utf-8")
    assert "http://" not in raw
    assert "https://" not in raw
    assert "<link" not in raw


def test_html_reports_missing_and_diverged_cells(hostile_report):
    text = " ".join(parse_page(hostile_report.html).text)
    assert f"cell activation={HOSTILE},width=80: 0 of 4 expected runs are stored." in text
    assert ("cell activation=sigmoid,width=80: 4 of 4 runs have no finite final accuracy "
            "(4 diverged, 0 crashed)") in text
    assert "n/a (no finite accuracy)" in text
    assert "Claims from the original hand-tuned experiments" in text
    assert "not tested by this matrix" in text


# -- Markdown ---------------------------------------------------------------------------


def test_markdown_rows_keep_column_count(hostile_report):
    text = hostile_report.markdown.read_text(encoding="utf-8")
    for title in ("Cells", "Levels", "Level differences", "Provenance"):
        rows = markdown_table(text, title)
        header = rows[0]
        assert len(rows) > 1, title
        for row in rows[1:]:
            assert len(row) == len(header), (title, row)
    cells = markdown_table(text, "Cells")
    hostile_rows = [row for row in cells if "alert(1)" in row[0]]
    assert len(hostile_rows) == 2
    assert hostile_rows[0][0].strip() == r"\<script\>alert(1)\</script\>\|a\|b"


def test_markdown_cells_show_missing_and_diverged(hostile_report):
    text = hostile_report.markdown.read_text(encoding="utf-8")
    rows = {(row[0].strip(), row[1].strip()): row for row in markdown_table(text, "Cells")[1:]}
    missing = rows[(r"\<script\>alert(1)\</script\>\|a\|b", "80")]
    assert missing[2].strip() == "0 / 4"
    assert missing[4].strip() == "n/a (no finite accuracy)"
    diverged = rows[("sigmoid", "80")]
    assert diverged[3].strip() == "4 diverged"
    assert diverged[9].strip() == "100% [51%, 100%]"
    assert diverged[10].strip() == "never (0 of 4 reached)"


def test_markdown_differences_count_pairs_used(hostile_report):
    text = hostile_report.markdown.read_text(encoding="utf-8")
    rows = {(row[0].strip(), row[3].strip()): row
            for row in markdown_table(text, "Level differences")[1:]}
    # Every width=80 run that is stored diverged, so no width pair has two accuracies.
    assert rows[("width", "accuracy")][5].strip() == "0 pairs; 4 without accuracy left out"
    assert rows[("width", "converged")][5].strip() == "4 pairs"


def test_markdown_links_figures_beside_it(hostile_report):
    text = hostile_report.markdown.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["figures/rates.png", "figures/accuracy.png",
                     "figures/learning_curves.png", "figures/collapse.png"]
    for link in links:
        data = (hostile_report.markdown.parent / link).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in hostile_report.figures] == [Path(link).name for link in links]


def test_markdown_matrix_in_longer_fence(hostile_report):
    text = hostile_report.markdown.read_text(encoding="utf-8")
    assert f"````\nname: hostile  # {HOSTILE}\n```\n````" in text


@pytest.mark.parametrize("value, expected", [
    pytest.param("a|b", r"a\|b", id="pipe"),
    pytest.param("<script>", r"\<script\>", id="html"),
    pytest.param("large_normal", r"large\_normal", id="underscore"),
    pytest.param("*x* `y` ~z~", r"\*x\* \`y\` \~z\~", id="emphasis-code"),
    pytest.param("[x](http://h)", r"\[x]\(http://h)", id="link"),
    pytest.param("# title", r"\# title", id="heading"),
    pytest.param("- item", r"\- item", id="bullet"),
    pytest.param("12. item", r"12\. item", id="ordered"),
    pytest.param("-6.9 points", "-6.9 points", id="negative-number"),
    pytest.param("a\\b", r"a\\b", id="backslash"),
    pytest.param("two\nlines", "two lines", id="newline"),
    pytest.param("92.3% [91.8%, 92.9%]", "92.3% [91.8%, 92.9%]", id="interval-unchanged"),
])
def test_escape_markdown(value, expected):
    assert escape_markdown(value) == expected


def test_code_fence_outgrows_backticks():
    assert code_fence("a ``` b") == "````\na ``` b\n````"
    assert code_fence("plain\n") == "```\nplain\n```"


@pytest.mark.parametrize("matrix, run_plan, expected", [
    pytest.param({"name": "base", "seeds": 3}, lambda c, s: Planned(accuracy=0.9 + 0.01 * s),
                 "| base | 3 / 3 | 3 converged | 91.0% [90.0%, 92.0%] |", id="no-factors"),
    pytest.param({"name": "crash", "seeds": 3, "factors": {"activation": ["relu", "sigmoid"]}},
                 lambda c, s: Planned(error="boom"),
                 "| relu | 3 / 3 | 3 crashed | n/a (no finite accuracy) |", id="all-crashed"),
    pytest.param({"name": "none", "seeds": 3, "factors": {"activation": ["relu", "sigmoid"]}},
                 lambda c, s: None, "| relu | 0 / 3 | none | n/a (no finite accuracy) |",
                 id="nothing-stored"),
])
def test_sparse_stores_render(tmp_path, matrix, run_plan, expected):
    build_store(tmp_path / "s.sqlite", matrix, run_plan).close()
    paths = write_report(tmp_path / "s.sqlite", tmp_path / "out")
    text = paths.markdown.read_text(encoding="utf-8")
    assert expected in text
    assert len(parse_page(paths.html).images) == 4


def test_claims_table_names_pooled_factors(tmp_path):
    matrix = {"name": "lr", "seeds": 3, "factors": {"lr": [0.5, 1e6]}}
    build_store(tmp_path / "s.sqlite", matrix,
                lambda cell, seed: Planned(accuracy=0.92 if cell.settings.lr < 1 else 0.1)
                ).close()
    paths = write_report(tmp_path / "s.sqlite", tmp_path / "out")
    text = paths.markdown.read_text(encoding="utf-8")
    claims = markdown_table(text, "Claims from the original hand-tuned experiments")
    assert [cell.strip() for cell in claims[0]] == ["claim", "verdict", "numbers", "rule"]
    plain = next(row for row in claims if "784-100-10" in row[0])
    assert "over 6 runs with " in plain[2]
    assert "pooled over lr (0.5, 1000000.0)" in plain[2]
    page = " ".join(parse_page(paths.html).text)
    assert "init in (default, uniform), pooled over lr (0.5, 1000000.0)" in page


# -- writing ----------------------------------------------------------------------------


def test_failed_render_writes_nothing(hostile_store, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figures, "plot_learning_curves", broken)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="figure failed"):
        write_report(hostile_store, out)
    assert not (out / "report.html").exists()
    assert not (out / "report.md").exists()


def test_failed_render_keeps_old_report(hostile_store, hostile_report, tmp_path, monkeypatch):
    out = tmp_path / "kept"
    shutil.copytree(hostile_report.html.parent, out)
    html_before = (out / "report.html").read_bytes()
    markdown_before = (out / "report.md").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figures, "plot_collapse_confusion", broken)
    with pytest.raises(RuntimeError):
        write_report(hostile_store, out)
    assert (out / "report.html").read_bytes() == html_before
    assert (out / "report.md").read_bytes() == markdown_before
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html", "report.md"]


def test_write_atomic_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    assert target.stat().st_mode & 0o044 == 0o044


def test_report_is_reproducible(hostile_store, hostile_report, tmp_path):
    again = write_report(hostile_store, tmp_path / "again")
    assert again.markdown.read_text() == hostile_report.markdown.read_text()
    assert again.html.read_text() == hostile_report.html.read_text()


def test_missing_store_raises(tmp_path):
    with pytest.raises(StoreError, match="store not found: .*absent.sqlite"):
        write_report(tmp_path / "absent.sqlite", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "absent.sqlite").exists()


def test_templates_are_package_data():
    templates = importlib.resources.files("mnistbench") / "templates"
    assert (templates / "report.html.j2").is_file()
    assert (templates / "report.md.j2").is_file()


# -- command line -----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnistbench", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_writes_report(tmp_path):
    store = tmp_path / "s.sqlite"
    build_store(store, MATRIX, plan).close()
    out = tmp_path / "report"
    result = run_cli("report", str(store), "--out", str(out), "--ablation", "hostile")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert printed[:2] == [str(out / "report.html"), str(out / "report.md")]
    assert len(printed) == 6
    for line in printed:
        assert Path(line).stat().st_size > 1000
    text = (out / "report.md").read_text(encoding="utf-8")
    assert text.startswith("# mnistbench report: hostile\n")
    assert "## Claims from the original hand-tuned experiments" in text


@pytest.mark.slow
def test_cli_missing_store_exits_2(tmp_path):
    result = run_cli("report", str(tmp_path / "absent.sqlite"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: store not found: {tmp_path / 'absent.sqlite'}")
    assert result.stdout == ""


@pytest.mark.slow
def test_cli_unknown_ablation_exits_2(tmp_path):
    store = tmp_path / "s.sqlite"
    build_store(store, MATRIX, plan).close()
    result = run_cli("report", str(store), "--out", str(tmp_path / "o"), "--ablation", "nope")
    assert result.returncode == 2
    assert "error: ablation 'nope' not found in store" in result.stderr
    assert "stored ablations: hostile" in result.stderr


def test_report_out_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    store = build_store(tmp_path / "s.sqlite", {"name": "t", "seeds": 2,
                                                "factors": {"activation": ["relu", "sigmoid"]}},
                        lambda cell, seed: Planned())
    store.close()
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    status = main(["report", str(tmp_path / "s.sqlite"), "--out", str(blocker / "sub")])
    assert status == 2
    assert re.search(r"--out .*blocker/sub: .*blocker is a file, not a directory",
                     capsys.readouterr().err)


def test_report_out_that_cannot_be_created_exits_2(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    store = build_store(tmp_path / "s.sqlite", {"name": "t", "seeds": 2,
                                                "factors": {"activation": ["relu", "sigmoid"]}},
                        lambda cell, seed: Planned())
    store.close()
    status = main(["report", str(tmp_path / "s.sqlite"), "--out", "/proc/mnistbench-report"])
    assert status == 2
    assert re.search(r"^error: --out /proc/mnistbench-report: cannot create "
                     r"/proc/mnistbench-report.*: No such file or directory; choose another "
                     r"output directory", capsys.readouterr().err, re.MULTILINE)


@pytest.mark.parametrize("out", ["", "  "])
def test_report_rejects_an_empty_out(tmp_path: Path, out: str,
                                     capsys: pytest.CaptureFixture) -> None:
    from mnistbench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "s.sqlite"), "--out", out])
    assert exit_info.value.code == 2
    assert re.search(r"argument --out: is empty; give an output directory, such as "
                     r"reports/default", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("obstacle, message", [
    pytest.param("report.html", r"report\.html is a directory", id="html-is-directory"),
    pytest.param("figures", r"figures is a file, not a directory", id="figures-is-file"),
])
def test_report_output_obstacles_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        obstacle: str, message: str) -> None:
    from mnistbench.cli import main

    build_store(tmp_path / "s.sqlite", {"name": "t", "seeds": 2,
                                        "factors": {"activation": ["relu", "sigmoid"]}},
                lambda cell, seed: Planned()).close()
    out = tmp_path / "out"
    out.mkdir()
    if obstacle == "figures":
        (out / obstacle).write_text("a file")
    else:
        (out / obstacle).mkdir()
    assert main(["report", str(tmp_path / "s.sqlite"), "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "report.md").exists()
