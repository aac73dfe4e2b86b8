"""The command line without real MNIST: start-up cost, exit statuses, output and files left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# A script that parses its argv[1:] like the `mnistbench` command, without running the
# subcommand, and prints whether torch was imported.
PARSE_ONLY = """\
import sys
from mnistbench.cli import build_parser
try:
    build_parser().parse_args(sys.argv[1:])
except SystemExit:
    pass
print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    pytest.param([], id="no-arguments"),
    pytest.param(["--help"], id="help"),
    pytest.param(["ablate", "--help"], id="ablate-help"),
    pytest.param(["data", "verify", "--help"], id="data-verify-help"),
    pytest.param(["ablate", "matrix.yaml", "--dry-run"], id="ablate-arguments"),
])
def test_parser_does_not_import_torch(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", PARSE_ONLY, *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "torch not imported", result.stdout


# `ablate` failures that need no real MNIST, and the files they leave behind

SMALL_MATRIX = """\
name: small
seeds: 2
train: {epochs: 1, train_subset: 200}
factors:
  activation: [relu, tanh]
"""


def mnistbench(*args: str, cwd: Path, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnistbench", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--dry-run"]], ids=["ablate", "dry-run"])
def test_missing_dataset_directory_exits_2(tmp_path: Path, extra: list[str]) -> None:
    matrix = tmp_path / "kmnist.yaml"
    matrix.write_text(SMALL_MATRIX + "dataset: ./kmnist\n")

    result = mnistbench("ablate", str(matrix), *extra, cwd=tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    expected = (rf"^error: {re.escape(str(matrix))}: dataset: dataset directory './kmnist' "
                rf"\(resolved to {re.escape(str(tmp_path / 'kmnist'))}\) not found; expected "
                r"mnist or fashion-mnist, or an existing directory that contains the four IDX "
                r"files train-images-idx3-ubyte, ")
    assert re.search(expected, result.stderr), result.stderr
    assert "unknown dataset" not in result.stderr
    assert not (tmp_path / "stores").exists()
