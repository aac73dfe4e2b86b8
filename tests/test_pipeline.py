"""The whole pipeline on real MNIST: fetch, ablate, report and check, as CI runs them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mnist, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CANONICAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def mnistbench(*args: str, cwd: Path, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnistbench", *args], capture_output=True,
                          text=True, timeout=900, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("smoke")
    store = directory / "smoke.sqlite"
    result = mnistbench("ablate", str(REPO / "ablations/smoke.yaml"), "--store", str(store),
                        cwd=directory)
    assert result.returncode == 0, result.stderr
    return store


def test_empty_cache_fetches_canonical_mnist(tmp_path: Path) -> None:
    """With no cache and no reachable mirror, the package-index route yields exact MNIST."""
    env = {**os.environ, "MNISTBENCH_DATA_DIR": str(tmp_path / "cache")}
    result = mnistbench("data", "fetch", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for name, md5 in CANONICAL_MD5.items():
        path = tmp_path / "cache" / "mnist" / name
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5, name
    verify = mnistbench("data", "verify", cwd=tmp_path, env=env)
    assert verify.returncode == 0, verify.stderr
    assert "980" in verify.stdout
    assert "1135" in verify.stdout


def test_report_of_real_store_has_findings_and_figures(smoke_store: Path,
                                                       tmp_path: Path) -> None:
    result = mnistbench("report", str(smoke_store), "--out", str(tmp_path / "report"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "12 of 12 expected runs stored" in markdown
    assert "## Findings" in markdown
    assert "init=large\\_normal vs init=default lowers final accuracy" in markdown
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert len(list((tmp_path / "report" / "figures").glob("*.png"))) >= 4


def test_gate_passes_on_smoke_store(smoke_store: Path, tmp_path: Path) -> None:
    result = mnistbench("check", str(smoke_store), "--thresholds",
                        str(REPO / "ablations/thresholds.yaml"), "--baseline",
                        str(REPO / "ablations/baseline-smoke.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_gate_fails_when_learning_rate_cut_100x(tmp_path: Path) -> None:
    store = tmp_path / "worse.sqlite"
    trained = mnistbench("ablate", str(REPO / "ablations/smoke.yaml"), "--store", str(store),
                         "--set", "lr=0.005", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = mnistbench("check", str(store), "--thresholds",
                        str(REPO / "ablations/thresholds.yaml"), "--baseline",
                        str(REPO / "ablations/baseline-smoke.json"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL    activation=sigmoid,init=default" in result.stdout
    assert "median accuracy >= 0.850" in result.stdout
