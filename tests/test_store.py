"""Tests of the SQLite store: run keys, idempotent writes, claims, read-only access."""

from __future__ import annotations

import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from builders import Planned, build_store, synthetic_result
from mnistbench.errors import StoreError
from mnistbench.matrix import Criteria, Settings, parse_matrix
from mnistbench import store as store_module
from mnistbench.store import Store, run_key

MATRIX = {"name": "t", "seeds": 2, "factors": {"activation": ["relu", "sigmoid"]}}


def test_run_key_is_stable_and_sensitive() -> None:
    settings = Settings().to_dict()
    key = run_key(settings, 0, "md5", "cpu")
    assert key == run_key(dict(settings), 0, "md5", "cpu")
    assert len(key) == 16
    changed = {**settings, "lr": settings["lr"] * 2}
    assert len({key, run_key(changed, 0, "md5", "cpu"), run_key(settings, 1, "md5", "cpu"),
                run_key(settings, 0, "other", "cpu"), run_key(settings, 0, "md5", "cuda"),
                run_key(settings, 0, "md5", "cpu", "native"),
                run_key(settings, 0, "md5", "cpu", "torch")}) == 7


def test_frames_hold_one_row_per_run_and_epoch(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s.sqlite", MATRIX,
                        lambda cell, seed: Planned(accuracy=0.9 + 0.01 * seed, epochs=2))
    runs = store.runs_frame("t")
    assert list(runs["activation"]) == ["relu", "relu", "sigmoid", "sigmoid"]
    assert list(runs["seed"]) == [0, 1, 0, 1]
    assert runs["final_accuracy"].tolist() == pytest.approx([0.9, 0.91, 0.9, 0.91])
    assert set(runs["outcome"]) == {"converged"}
    assert runs["confusion"].iloc[0][3][3] == 1000
    epochs = store.epochs_frame("t")
    assert len(epochs) == 4 * 3
    assert epochs["prediction_counts"].iloc[0] == [1000] * 10


def test_writing_a_run_twice_keeps_one_row(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s.sqlite", MATRIX, lambda cell, seed: Planned())
    matrix = parse_matrix(MATRIX)
    cell = matrix.cells()[0]
    key = store.runs_frame("t")["run_key"].iloc[0]
    again = synthetic_result(cell, 0, key, Planned(accuracy=0.5), Criteria())
    assert store.write_results([again]) == 0
    assert store.runs_frame("t")["final_accuracy"].iloc[0] == pytest.approx(0.95)
    assert store.connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 4


def test_missing_runs_leave_their_cell_without_rows(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s.sqlite", MATRIX,
                        lambda cell, seed: None if cell.levels["activation"] == "relu"
                        else Planned())
    assert set(store.runs_frame("t")["activation"]) == {"sigmoid"}
    assert list(store.cells_frame("t")["activation"]) == ["relu", "sigmoid"]
    assert store.member_count("t") == 4


def test_new_criteria_reclassify_stored_runs(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s.sqlite", MATRIX, lambda cell, seed: Planned(accuracy=0.8))
    assert set(store.runs_frame("t")["outcome"]) == {"stalled"}
    assert store.reclassify("t", Criteria(convergence_accuracy=0.75)) == 4
    assert set(store.runs_frame("t")["outcome"]) == {"converged"}


def test_claims_take_over_dead_owners(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    assert store.claim(["a", "b"], "first") == ["a", "b"]
    assert store.claim(["a", "b", "c"], "second") == ["c"]
    # A claim whose process is gone is stale and taken over.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    store.connection.execute("UPDATE claims SET pid = ? WHERE run_key = 'a'", (dead_pid,))
    assert store.claim(["a", "b"], "second") == ["a"]
    store.release("first")
    assert store.claim(["b"], "second") == ["b"]


def test_stale_claims_logged_once_per_call(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "s.sqlite")
    keys = [f"run-{index}" for index in range(5)]
    store.claim(keys, "dead-owner")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    store.connection.execute("UPDATE claims SET pid = ?", (dead_pid,))
    host = socket.gethostname()

    with caplog.at_level(logging.INFO, logger="mnistbench.store"):
        assert store.claim(keys, "second") == keys

    messages = [record.getMessage() for record in caplog.records
                if record.name == "mnistbench.store"]
    assert messages == [f"took over 5 stale claims: 5 from dead-owner "
                        f"(process {dead_pid} on {host} is gone)"]

    # Claims of a live process are stale once they are older than the limit.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mnistbench.store"):
        assert store.claim(keys[:3], "third", stale_seconds=0.0) == keys[:3]

    messages = [record.getMessage() for record in caplog.records
                if record.name == "mnistbench.store"]
    assert len(messages) == 1
    assert re.fullmatch(r"took over 3 stale claims: 3 from second \(claimed \d+ s ago, "
                        r"more than the 0 s limit\)", messages[0]), messages[0]


def test_readonly_store_is_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    build_store(path, MATRIX, lambda cell, seed: Planned()).close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    before = path.read_bytes()
    os.chmod(path, 0o444)
    with Store(path, readonly=True) as store:
        assert len(store.runs_frame("t")) == 4
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.connection.execute("DELETE FROM runs")
    assert path.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    pytest.param(None, r"store not found: .*missing\.sqlite; run 'mnistbench ablate", id="missing"),
    pytest.param(b"hello, not a database" * 100, r"cannot open store .*file is not a database",
                 id="not-sqlite"),
    pytest.param(b"", r"store .*missing\.sqlite is empty \(0 bytes\); expected a store "
                      r"written by 'mnistbench ablate'", id="empty"),
])
def test_bad_store_files_are_rejected(tmp_path: Path, content: bytes | None,
                                      message: str) -> None:
    path = tmp_path / "missing.sqlite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StoreError, match=message):
        Store(path, readonly=True)


def test_sqlite_file_of_another_program_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match=r"not an mnistbench store"):
        Store(path, readonly=True)


def test_newer_schema_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match=r"schema version 99; this mnistbench reads version 1"):
        Store(path)


def test_ablation_lookup_names_the_stored_ones(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s.sqlite", MATRIX, lambda cell, seed: Planned())
    assert store.ablation()["name"] == "t"
    with pytest.raises(StoreError, match=r"ablation 'other' not found in store .*; stored "
                                         r"ablations: t"):
        store.ablation("other")
    build_store(tmp_path / "s.sqlite", {**MATRIX, "name": "u"}, lambda cell, seed: Planned())
    with pytest.raises(StoreError, match=r"contains 2 ablations \(t, u\); name one with --ablation"):
        store.ablation()


def test_settings_round_trip_through_the_store(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s.sqlite", {**MATRIX, "train": {"lr": 0.25}},
                        lambda cell, seed: Planned())
    stored = store.connection.execute("SELECT settings_json FROM runs LIMIT 1").fetchone()[0]
    assert '"lr": 0.25' in stored
    assert replace(Settings(), lr=0.25).lr == 0.25


def test_store_refuses_to_add_tables_to_another_database(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match=r"not an mnistbench store \(tables: notes\); choose "
                                         r"another --store path"):
        Store(path)
    connection = sqlite3.connect(path)
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    connection.close()
    assert tables == ["notes"]


def test_directory_as_store_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"store path .* is a directory; give the path of a "
                                         r"store file"):
        Store(tmp_path)


def test_store_without_ablation_says_to_run_ablate(tmp_path: Path) -> None:
    store = Store(tmp_path / "new.sqlite")
    with pytest.raises(StoreError, match=r"contains no ablation yet; run 'mnistbench ablate "
                                         r"MATRIX --store .*new\.sqlite' first"):
        store.ablation()


def test_store_under_a_file_is_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(StoreError, match=r"cannot create store .*blocker/x\.sqlite: .*blocker "
                                         r"is a file, not a directory"):
        Store(blocker / "x.sqlite")


def test_store_in_read_only_directory_opens_for_reading(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """In WAL mode a reader needs to create the -shm file, which a read-only mount forbids."""
    path = tmp_path / "s.sqlite"
    build_store(path, MATRIX, lambda cell, seed: Planned(accuracy=0.9)).close()
    assert not path.with_name("s.sqlite-wal").exists()  # folded in on close
    monkeypatch.setattr(store_module, "_writable", lambda directory: False)
    with Store(path, readonly=True) as store:
        assert len(store.runs_frame("t")) == 4


def test_store_in_read_only_directory_with_pending_wal(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    build_store(path, MATRIX, lambda cell, seed: Planned(accuracy=0.9)).close()
    path.with_name("s.sqlite-wal").write_bytes(b"\0" * 32)
    monkeypatch.setattr(store_module, "_writable", lambda directory: False)
    with pytest.raises(StoreError, match=r"has changes in s.sqlite-wal that SQLite cannot "
                                         r"read in a read-only directory; copy both files"):
        Store(path, readonly=True)


def test_store_that_cannot_be_written_names_the_directory(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(store_module, "_writable", lambda directory: False)
    with pytest.raises(StoreError, match=r"cannot write store /proc/s.sqlite: its directory "
                                         r"is read-only; choose a --store path"):
        Store("/proc/s.sqlite")
