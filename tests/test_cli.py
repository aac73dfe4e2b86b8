"""The top-level command line: start-up cost, exit statuses and output handling."""

from __future__ import annotations

import subprocess
import sys

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
