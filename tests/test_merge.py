"""Shards of a matrix and ``mnistbench merge``: stores built in the test, plus one real pair."""

from __future__ import annotations

import math
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from builders import PROVENANCE, Planned, TINY_MATRIX, build_store

from mnistbench.cli import main
from mnistbench.distributed import Shard, parse_shard, shard_of
from mnistbench.errors import MnistbenchError, StoreError
from mnistbench.matrix import parse_matrix
from mnistbench.merge import merge_stores
from mnistbench.store import Store, run_key

MATRIX = {"name": "t", "seeds": 4, "train": {"lr": 0.5},
          "factors": {"activation": ["relu", "sigmoid"]}}
# Columns that record when and where a copy of a run was written, not what it produced.
WRITE_COLUMNS = ["host", "finished_at"]


def seeds(*planned_seeds: int) -> Callable:
    """Plan the runs of the given seeds, at an accuracy that differs per seed."""
    return lambda cell, seed: (Planned(accuracy=0.9 + 0.01 * seed) if seed in planned_seeds
                               else None)


def build(path: Path, plan: Callable, matrix: dict = MATRIX) -> Path:
    build_store(path, matrix, plan).close()
    return path


def execute(path: Path, statement: str, *parameters: object) -> None:
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(statement, parameters)
    connection.close()


def count(path: Path, table: str) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        connection.close()


def frames(path: Path, ablation: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the runs and epochs frames, without the columns that differ between copies."""
    with Store(path, create=False) as store:
        runs = store.runs_frame(ablation).drop(columns=WRITE_COLUMNS)
        epochs = store.epochs_frame(ablation)
    return runs, epochs


@pytest.fixture()
def halves(tmp_path: Path) -> tuple[Path, Path]:
    """Two stores of MATRIX: seeds 0 and 1 in the first, seeds 2 and 3 in the second."""
    return build(tmp_path / "a.sqlite", seeds(0, 1)), build(tmp_path / "b.sqlite", seeds(2, 3))


# -- shards ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, shards, expected", [
    pytest.param("0000000000000000", 3, 1, id="zero"),
    pytest.param("0000000000000005", 4, 2, id="five-of-four"),
    pytest.param("ffffffffffffffff", 2, 2, id="odd"),
    pytest.param("3a7bd3e2360a3d29", 1, 1, id="one-shard"),
])
def test_shard_of_is_key_modulo_count(key: str, shards: int, expected: int) -> None:
    assert shard_of(key, shards) == expected


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7, 16])
def test_shards_cover_every_run_once(shards: int) -> None:
    matrix = parse_matrix({"name": "wide", "seeds": 10, "factors": {
        "activation": ["relu", "sigmoid", "tanh", "gelu"], "width": [16, 32, 64, 128, 256],
        "dropout": [0.0, 0.2, 0.5, 0.8, 0.9]}})
    keys = [run_key(cell.settings.to_dict(), seed, "md5", "cpu") for cell, seed in matrix.runs()]
    assert len(set(keys)) == 1000
    parts = [Shard(index, shards) for index in range(1, shards + 1)]
    for key in keys:
        assert sum(part.contains(key) for part in parts) == 1, key
    sizes = [sum(part.contains(key) for key in keys) for part in parts]
    assert sum(sizes) == 1000
    # SHA-256 keys spread like independent draws: no shard is more than four standard
    # deviations of a binomial count from its share.
    share = 1000 / shards
    spread = 4 * math.sqrt(share * (1 - 1 / shards))
    assert share - spread <= min(sizes) <= max(sizes) <= share + spread, sizes


@pytest.mark.parametrize("text, expected", [
    pytest.param("2/4", Shard(2, 4), id="middle"),
    pytest.param("1/1", Shard(1, 1), id="single"),
    pytest.param(" 4 / 4 ", Shard(4, 4), id="spaces"),
])
def test_parse_shard_accepts_k_of_n(text: str, expected: Shard) -> None:
    assert parse_shard(text) == expected
    assert str(parse_shard(text)) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize("text, message", [
    pytest.param("2-4", r"invalid --shard '2-4'; expected K/N with 1 <= K <= N, e\.g\. "
                        r"--shard 2/4", id="dash"),
    pytest.param("2", r"invalid --shard '2'; expected K/N", id="no-count"),
    pytest.param("a/b", r"invalid --shard 'a/b'; expected K/N", id="letters"),
    pytest.param("-1/4", r"invalid --shard '-1/4'; expected K/N", id="negative"),
    pytest.param("0/4", r"invalid --shard '0/4': shard 0 is out of range 1 to 4; shards count "
                        r"from 1, so submit a Slurm array as --array=1-4", id="zero"),
    pytest.param("5/4", r"invalid --shard '5/4': shard 5 is out of range 1 to 4", id="above"),
    pytest.param("1/0", r"invalid --shard '1/0': the shard count must be at least 1",
                 id="no-shards"),
])
def test_parse_shard_rejects(text: str, message: str) -> None:
    with pytest.raises(MnistbenchError, match=message):
        parse_shard(text)


@pytest.mark.mnist
@pytest.mark.slow
def test_merged_shards_equal_local_store(tmp_path: Path) -> None:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY_MATRIX)
    stores = {name: tmp_path / f"{name}.sqlite" for name in ("part-1", "part-2", "local")}
    options = {"part-1": ["--shard", "1/2"], "part-2": ["--shard", "2/2"], "local": []}
    outputs = {}
    for name, path in stores.items():
        command = [sys.executable, "-m", "mnistbench", "ablate", str(matrix), "--store",
                   str(path), "--device", "cpu", "--workers", "1", *options[name]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout
    shard_runs = [count(stores["part-1"], "runs"), count(stores["part-2"], "runs")]
    assert sum(shard_runs) == 16
    assert all(runs > 0 for runs in shard_runs), shard_runs
    assert f"16 runs ({shard_runs[0]} in shard 1/2), 0 already in" in outputs["part-1"]
    assert f"trained {shard_runs[1]} runs" in outputs["part-2"]
    # Each shard's store describes the whole matrix, so a merged report includes every cell.
    assert count(stores["part-1"], "members") == count(stores["part-2"], "members") == 16

    merged = tmp_path / "merged.sqlite"
    report = merge_stores(merged, [stores["part-1"], stores["part-2"]])
    assert report.runs_added == 16
    assert report.stored == {"tiny": (16, 16)}
    merged_runs, merged_epochs = frames(merged, "tiny")
    local_runs, local_epochs = frames(stores["local"], "tiny")
    assert list(merged_runs["run_key"]) == list(local_runs["run_key"])
    assert list(merged_runs["outcome"]) == list(local_runs["outcome"])
    # Shards train smaller stacks than the local run, so the matmuls have other shapes.
    # The numbers were bit-identical on torch 2.13 CPU, and the bound allows 1e-6.
    accuracy = (merged_runs["final_accuracy"] - local_runs["final_accuracy"]).abs()
    assert accuracy.max() <= 1e-6
    loss = (merged_runs["final_train_loss"] - local_runs["final_train_loss"]).abs()
    assert loss.max() <= 1e-6
    epoch_accuracy = (merged_epochs["test_accuracy"] - local_epochs["test_accuracy"]).abs()
    assert epoch_accuracy.max() <= 1e-6


# -- merging --------------------------------------------------------------------------


def test_merged_halves_equal_full_store(halves: tuple[Path, Path], tmp_path: Path) -> None:
    full = build(tmp_path / "full.sqlite", seeds(0, 1, 2, 3))
    out = tmp_path / "out.sqlite"
    report = merge_stores(out, halves)
    assert report.runs_added == 8
    assert report.runs_already_present == 0
    assert report.stored == {"t": (8, 8)}
    assert report.notes == ()
    merged_runs, merged_epochs = frames(out, "t")
    full_runs, full_epochs = frames(full, "t")
    pd.testing.assert_frame_equal(merged_runs, full_runs)
    pd.testing.assert_frame_equal(merged_epochs, full_epochs)
    with Store(out, create=False) as store:
        assert store.cells_frame("t")["cell_id"].tolist() == ["activation=relu",
                                                              "activation=sigmoid"]
        assert store.member_count("t") == 8


def test_merge_into_existing_store(halves: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = halves
    out = tmp_path / "out.sqlite"
    assert merge_stores(out, [first]).stored == {"t": (4, 8)}
    report = merge_stores(out, [second])
    assert report.runs_added == 4
    assert report.stored == {"t": (8, 8)}
    again = merge_stores(out, [first])
    assert again.runs_added == 0
    assert again.runs_already_present == 4
    assert count(out, "runs") == 8
    assert count(out, "epochs") == 8 * 4
    assert count(out, "members") == 8


def test_identical_run_in_two_inputs_kept_once(halves: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    first, _ = halves
    copy = tmp_path / "copy.sqlite"
    shutil.copy(first, copy)
    # A copy trained elsewhere differs in timing and host, which are not its result.
    execute(copy, "UPDATE runs SET host = 'node-7', train_seconds = 9.0, git_commit = 'abc'")
    execute(copy, "UPDATE epochs SET seconds = 3.0")
    report = merge_stores(tmp_path / "out.sqlite", [first, copy])
    assert report.runs_added == 4
    assert report.runs_already_present == 4
    assert count(tmp_path / "out.sqlite", "runs") == 4
    assert count(tmp_path / "out.sqlite", "epochs") == 4 * 4


@pytest.mark.parametrize("statement, message", [
    pytest.param("UPDATE runs SET final_accuracy = 0.5 WHERE seed = 1",
                 r"run (\w+) has final_accuracy 0\.91 in \S+a\.sqlite but 0\.5 in "
                 r"\S+copy\.sqlite; one run key must give one result", id="accuracy"),
    pytest.param("UPDATE runs SET outcome = 'stalled' WHERE seed = 0",
                 r"run \w+ has outcome 'converged' in \S+a\.sqlite but 'stalled' in", id="outcome"),
    pytest.param("UPDATE epochs SET test_accuracy = 0.2 WHERE epoch = 1",
                 r"run \w+ has epoch 1 test_accuracy 0\.\d+ in \S+a\.sqlite but 0\.2 in",
                 id="epoch"),
    pytest.param("DELETE FROM epochs WHERE epoch = 3",
                 r"run \w+ has epoch count 4 in \S+a\.sqlite but 3 in", id="epoch-count"),
])
def test_conflicting_run_rejected(halves: tuple[Path, Path], tmp_path: Path, statement: str,
                                  message: str) -> None:
    first, _ = halves
    copy = tmp_path / "copy.sqlite"
    shutil.copy(first, copy)
    execute(copy, statement)
    out = tmp_path / "out.sqlite"
    with pytest.raises(StoreError, match=message):
        merge_stores(out, [first, copy])
    assert not out.exists()


def test_float_noise_within_tolerance_merges(halves: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    first, _ = halves
    copy = tmp_path / "copy.sqlite"
    shutil.copy(first, copy)
    execute(copy, "UPDATE runs SET final_train_loss = final_train_loss + 1e-9")
    assert merge_stores(tmp_path / "out.sqlite", [first, copy]).runs_already_present == 4


@pytest.mark.parametrize("column, value, meaning", [
    pytest.param("dataset_md5", "f00d", "dataset", id="dataset"),
    pytest.param("package_version", "0.2.0", "mnistbench version", id="version"),
])
def test_provenance_mismatch_rejected(halves: tuple[Path, Path], tmp_path: Path, column: str,
                                      value: str, meaning: str) -> None:
    first, second = halves
    execute(second, f"UPDATE runs SET {column} = ?", value)
    out = tmp_path / "out.sqlite"
    expected = PROVENANCE[column]
    message = (rf"^ablation 't' mixes {column} values: '{expected}' in \S+a\.sqlite \(4 runs\); "
               rf"'{value}' in \S+b\.sqlite \(4 runs\)\. Runs of another {meaning} are not "
               rf"comparable, so merge rejects them; pass --allow-mismatch to merge them anyway$")
    with pytest.raises(StoreError, match=message):
        merge_stores(out, [first, second])
    assert not out.exists()

    report = merge_stores(out, [first, second], allow_mismatch=True)
    assert report.runs_added == 8
    assert len(report.notes) == 1
    assert report.notes[0].startswith(f"ablation 't' mixes {column} values: '{expected}'")


@pytest.mark.parametrize("column", ["git_commit", "torch_version"])
def test_commit_and_torch_differences_noted(halves: tuple[Path, Path], tmp_path: Path,
                                            column: str) -> None:
    first, second = halves
    execute(second, f"UPDATE runs SET {column} = 'other'")
    report = merge_stores(tmp_path / "out.sqlite", [first, second])
    assert report.runs_added == 8
    assert len(report.notes) == 1
    assert re.fullmatch(rf"ablation 't' mixes {column} values: '{PROVENANCE[column]}' in "
                        rf"\S+a\.sqlite \(4 runs\); 'other' in \S+b\.sqlite \(4 runs\)",
                        report.notes[0]), report.notes[0]


def test_refused_merge_leaves_output_unchanged(halves: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    first, second = halves
    out = tmp_path / "out.sqlite"
    merge_stores(out, [first])
    before = frames(out, "t")
    execute(second, "UPDATE runs SET package_version = '9.9.9'")
    with pytest.raises(StoreError, match=r"mixes package_version values"):
        merge_stores(out, [second])
    after = frames(out, "t")
    pd.testing.assert_frame_equal(after[0], before[0])
    pd.testing.assert_frame_equal(after[1], before[1])


def test_other_matrix_same_name_rejected(tmp_path: Path) -> None:
    first = build(tmp_path / "a.sqlite", seeds(0, 1))
    other = {**MATRIX, "train": {"lr": 0.25}}
    second = build(tmp_path / "b.sqlite", seeds(2, 3), other)
    with pytest.raises(StoreError, match=r"^ablation 't' comes from different matrices: train\.lr "
                                         r"is 0\.5 in \S+a\.sqlite but 0\.25 in \S+b\.sqlite; "
                                         r"merge only stores of one matrix"):
        merge_stores(tmp_path / "out.sqlite", [first, second])


def test_other_run_keys_rejected(halves: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = halves
    # Keys of another device type or dataset: every member key differs.
    execute(second, "UPDATE members SET run_key = 'f' || substr(run_key, 2)")
    execute(second, "UPDATE runs SET run_key = 'f' || substr(run_key, 2)")
    execute(second, "UPDATE epochs SET run_key = 'f' || substr(run_key, 2)")
    execute(first, "UPDATE members SET run_key = '0' || substr(run_key, 2)")
    execute(first, "UPDATE runs SET run_key = '0' || substr(run_key, 2)")
    execute(first, "UPDATE epochs SET run_key = '0' || substr(run_key, 2)")
    with pytest.raises(StoreError, match=r"^ablation 't' has 8 runs in \S+b\.sqlite that "
                                         r"\S+a\.sqlite lacks, and 8 the other way; run keys "
                                         r"include the dataset MD5, the device type and, "
                                         r"for convolution runs on the CPU, the build of the "
                                         r"compiled kernels.*with one \$CC"):
        merge_stores(tmp_path / "out.sqlite", [first, second])


def test_output_among_inputs_rejected(halves: tuple[Path, Path]) -> None:
    first, second = halves
    with pytest.raises(MnistbenchError, match=r"the output store \S+a\.sqlite is also an input"):
        merge_stores(first, [second, first])


def test_missing_input_rejected(halves: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"store not found: \S+missing\.sqlite"):
        merge_stores(tmp_path / "out.sqlite", [halves[0], tmp_path / "missing.sqlite"])
    assert not (tmp_path / "out.sqlite").exists()


def test_orphan_runs_copied(halves: tuple[Path, Path], tmp_path: Path) -> None:
    first, _ = halves
    # A run whose matrix changed since keeps its row, without members.
    execute(first, "DELETE FROM members WHERE seed = 0")
    out = tmp_path / "out.sqlite"
    report = merge_stores(out, [first])
    assert report.runs_added == 4
    assert report.stored == {"t": (2, 6)}
    assert count(out, "runs") == 4


def test_claimed_input_noted(halves: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = halves
    execute(second, "INSERT INTO claims VALUES ('abc', 'owner', 'host', 1, 0.0)")
    report = merge_stores(tmp_path / "out.sqlite", [first, second])
    assert report.notes == (f"{second} has 1 claimed runs: an ablate may still be training "
                            f"into it, so merge again after it finishes",)
    assert count(tmp_path / "out.sqlite", "claims") == 0


def test_merge_command_prints_counts(halves: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    first, second = halves
    out = tmp_path / "out.sqlite"
    assert main(["merge", str(out), str(first)]) == 0
    printed = capsys.readouterr().out
    assert f"merged 1 stores into {out}: 4 runs added, 0 already present" in printed
    assert (f"ablation t: 4 of 8 runs stored; run 'mnistbench ablate MATRIX --store {out}' "
            f"to train the 4 missing") in printed
    assert main(["merge", str(out), str(first), str(second)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs added, 4 already present" in printed
    assert "ablation t: 8 of 8 runs stored\n" in printed


def test_merge_command_mismatch_exits_2(halves: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    first, second = halves
    execute(second, "UPDATE runs SET dataset_md5 = 'f00d'")
    out = tmp_path / "out.sqlite"
    assert main(["merge", str(out), str(first), str(second)]) == 2
    assert re.search(r"^error: ablation 't' mixes dataset_md5 values: 'synthetic'",
                     capsys.readouterr().err)
    assert main(["merge", str(out), str(first), str(second), "--allow-mismatch"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("note: ablation 't' mixes dataset_md5 values")
    assert "8 runs added" in printed



def add_duplicate(source: Path, target: Path, seed: int, key: str) -> tuple[str, str]:
    """Copy the first cell's run of ``seed`` from ``source`` into ``target`` under ``key``.

    Both stores list ``key`` as a second member of that cell and seed, so together they
    contain two runs of it. Returns the cell id and the key of the run in ``source``.
    """
    connection = sqlite3.connect(source)
    original, cell_id = connection.execute(
        "SELECT run_key, cell_id FROM members WHERE seed = ? ORDER BY cell_id", (seed,)
    ).fetchone()
    row = list(connection.execute("SELECT * FROM runs WHERE run_key = ?",
                                  (original,)).fetchone())
    connection.close()
    row[0] = key
    execute(target, f"INSERT INTO runs VALUES ({', '.join('?' * len(row))})", *row)
    for path in {source, target}:
        execute(path, "INSERT INTO members VALUES ('t', ?, ?, ?)", key, cell_id, seed)
    return cell_id, original


def test_duplicated_run_rejected_before_writing(halves: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    first, second = halves
    out = build(tmp_path / "out.sqlite", seeds(0, 1),
                {**MATRIX, "name": "other", "train": {"lr": 0.25}})
    before = frames(out, "other")
    cell_id, original = add_duplicate(second, first, 2, "ffffffffffffffff")
    message = (rf"^ablation 't' would contain duplicated runs: cell {cell_id} seed 2 has runs "
               rf"{original} \(in \S+b\.sqlite\), ffffffffffffffff \(in \S+a\.sqlite\); "
               rf"every cell and seed must have one run")
    with pytest.raises(StoreError, match=message):
        merge_stores(out, [first, second])

    after = frames(out, "other")
    pd.testing.assert_frame_equal(after[0], before[0])
    pd.testing.assert_frame_equal(after[1], before[1])
    assert count(out, "runs") == 4
    assert count(out, "ablations") == 1


def test_duplicated_run_rejected_for_new_output(halves: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    first, _ = halves
    cell_id, original = add_duplicate(first, first, 1, "ffffffffffffffff")
    out = tmp_path / "out.sqlite"
    message = (rf"cell {cell_id} seed 1 has runs {original} \(in \S+a\.sqlite\), "
               rf"ffffffffffffffff \(in \S+a\.sqlite\)")
    with pytest.raises(StoreError, match=message):
        merge_stores(out, [first])
    assert not out.exists()


def test_merge_command_duplicate_exits_2(halves: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    first, second = halves
    cell_id, original = add_duplicate(first, second, 0, "ffffffffffffffff")
    out = tmp_path / "out.sqlite"
    assert main(["merge", str(out), str(first), str(second)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: ablation 't' would contain duplicated runs: cell {cell_id} "
                            f"seed 0 has runs {original} (in {first}), ffffffffffffffff "
                            f"(in {second})")
    assert not out.exists()
