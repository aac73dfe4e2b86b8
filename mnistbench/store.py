"""The store: one SQLite file that contains ablations, runs, per-epoch metrics and provenance.

    store = Store("stores/default.sqlite")
    store.save_ablation(matrix, keyed_runs)     # before training: resolved matrix and members
    store.write_results(results)                # one transaction per finished stack
    runs = store.runs_frame("default")          # tidy pandas frame, one row per run

Tables:

- ``ablations``: name, the matrix text as given and resolved, criteria, factor levels.
- ``cells``: the cells of each ablation in declared order, with their levels.
- ``members``: which run keys (cell and seed) make up each ablation.
- ``runs``: one row per trained run, keyed by its run key, with the outcome, final
  metrics, confusion matrix and provenance. A run key hashes everything that
  determines the result, so the same run is trained once even when two ablations
  share it, and a changed setting gets a new key.
- ``epochs``: one row per run and epoch (epoch 0 is the evaluation before training).
- ``claims``: runs an ``ablate`` process is training now, so a second process on
  the same store skips them.

The file runs in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction, so a
killed process loses at most the stack it was training.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd

from mnistbench.errors import StoreError
from mnistbench.matrix import Cell, Criteria, Matrix, format_level
from mnistbench.outcome import RunResult, outcome_of_counts
from mnistbench.schema import (  # noqa: F401 - run_key and the versions are re-exported
    SCHEMA_SQL,
    NUMERICS_VERSION,
    PROVENANCE_KEYS,
    SCHEMA_VERSION,
    finite_or_none,
    now_text,
    run_row,
    run_key,
)

logger = logging.getLogger(__name__)


def check_store_path(path: Path) -> None:
    """Raise StoreError unless a store file can be created at path; create nothing.

    The path must not be a directory, and no parent of it may be a file.
    """
    if path.is_dir():
        raise StoreError(f"store path {path} is a directory; give the path of a "
                         f"store file, such as {path / 'ablation.sqlite'}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise StoreError(f"cannot create store {path}: {blocking} is a file, not a "
                         f"directory; choose another store path")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writable(directory: Path) -> bool:
    """Return whether files can be created in ``directory``; False on a read-only mount,
    even for root."""
    return os.access(directory, os.W_OK)


class Store:
    """A connection to one store file; create it with ``create=True``."""

    def __init__(self, path: str | Path, *, create: bool = True, readonly: bool = False
                 ) -> None:
        """Open a store; ``readonly=True`` opens an existing one without writing to it."""
        self.path = Path(path)
        if self.path.is_dir():
            check_store_path(self.path)  # raises, naming the directory
        if not self.path.exists():
            if not create or readonly:
                raise StoreError(
                    f"store not found: {self.path}; run 'mnistbench ablate MATRIX --store "
                    f"{self.path}' first"
                )
            check_store_path(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if readonly and self.path.stat().st_size == 0:
            raise StoreError(f"store {self.path} is empty (0 bytes); expected a store written "
                             f"by 'mnistbench ablate'")
        try:
            if readonly:
                self.connection = sqlite3.connect(self._readonly_uri(), uri=True, timeout=60.0,
                                                  isolation_level=None)
                self._check_schema_version()
                return
            self.connection = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            tables = {row[0] for row in self.connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                self.connection.close()
                raise StoreError(f"{self.path} is an SQLite file but not an mnistbench store "
                                 f"(tables: {', '.join(sorted(tables))}); choose another "
                                 f"--store path")
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=NORMAL")
            self.connection.execute("PRAGMA busy_timeout=60000")
            self._create_schema()
        except sqlite3.DatabaseError as error:
            if not readonly and not _writable(self.path.parent):
                raise StoreError(f"cannot write store {self.path}: its directory is read-only; "
                                 f"choose a --store path in a writable directory") from error
            raise StoreError(f"cannot open store {self.path}: {error}; expected an SQLite file "
                             f"written by mnistbench") from error

    def _readonly_uri(self) -> str:
        """Return the URI that opens the store for reading.

        In WAL mode even a reader needs to create the store's ``-shm`` file. No process
        can write a store in a read-only directory, so it opens as immutable, unless a
        ``-wal`` file contains changes that only a writer could fold in.
        """
        uri = f"file:{self.path.resolve()}?mode=ro"
        if _writable(self.path.parent):
            return uri
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(
                f"store {self.path} has changes in {wal.name} that SQLite cannot read in a "
                f"read-only directory; copy both files to a writable directory and read the "
                f"copy")
        return uri + "&immutable=1"

    def _check_schema_version(self) -> None:
        try:
            row = self.connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise StoreError(f"cannot read store {self.path}: {error}") from error
            row = None
        if row is None:
            raise StoreError(f"{self.path} is an SQLite file but not an mnistbench store "
                             f"(no schema version); expected a store written by "
                             f"'mnistbench ablate'")
        if int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"store {self.path} has schema version {row[0]}; this "
                             f"mnistbench reads version {SCHEMA_VERSION}")

    def _create_schema(self) -> None:
        # executescript commits on its own, so it runs outside the transaction below.
        self.connection.executescript(SCHEMA_SQL)
        with self.transaction():
            row = self.connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if row is None:
                self.connection.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {row[0]}; this mnistbench reads "
                    f"version {SCHEMA_VERSION}"
                )

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def transaction(self) -> _Transaction:
        """Return a context manager that wraps its block in ``BEGIN IMMEDIATE``/``COMMIT``."""
        return _Transaction(self.connection)

    # -- writing ---------------------------------------------------------------------

    def save_ablation(self, matrix: Matrix, keyed_cells: Sequence[tuple[Cell, int, str]]) -> None:
        """Store the resolved matrix, its cells and its members before any training.

        Args:
            matrix: the validated matrix.
            keyed_cells: ``(cell, seed, run_key)`` for every run of the matrix.
        """
        factors = {name: [format_level(level) for level in levels]
                   for name, levels in matrix.factors.items()}
        criteria = {"convergence_accuracy": matrix.criteria.convergence_accuracy,
                    "collapse_share": matrix.criteria.collapse_share}
        cells = {cell.cell_id: cell for cell, _, _ in keyed_cells}
        previous = self.connection.execute(
            "SELECT matrix_json FROM ablations WHERE name = ?", (matrix.name,)).fetchone()
        resolved = json.dumps(matrix.to_dict())
        # The file the matrix came from is not part of its definition.
        if previous is not None and ({**json.loads(previous[0]), "source": None}
                                     != {**matrix.to_dict(), "source": None}):
            logger.warning("ablation %s in %s is redefined by the new matrix; the runs of the "
                           "old definition stay in the store but no longer belong to it",
                           matrix.name, self.path)
        with self.transaction():
            self.connection.execute(
                "INSERT OR REPLACE INTO ablations VALUES (?, ?, ?, ?, ?, ?, ?)",
                (matrix.name, matrix.text, resolved, json.dumps(criteria),
                 json.dumps(factors), matrix.dataset, now_text()),
            )
            self.connection.execute("DELETE FROM cells WHERE ablation = ?", (matrix.name,))
            self.connection.execute("DELETE FROM members WHERE ablation = ?", (matrix.name,))
            self.connection.executemany(
                "INSERT INTO cells VALUES (?, ?, ?, ?, ?)",
                [(matrix.name, cell.cell_id, cell.index,
                  json.dumps({k: format_level(v) for k, v in cell.levels.items()}),
                  json.dumps(cell.settings.to_dict())) for cell in cells.values()],
            )
            self.connection.executemany(
                "INSERT INTO members VALUES (?, ?, ?, ?)",
                [(matrix.name, key, cell.cell_id, seed) for cell, seed, key in keyed_cells],
            )
        self.reclassify(matrix.name, matrix.criteria)

    def write_results(self, results: Iterable[RunResult]) -> int:
        """Insert finished runs and their epochs in one transaction; return how many were new.

        A run whose key is already stored is left as it is, so two processes that
        finish the same run never duplicate it.
        """
        written = 0
        host = socket.gethostname()
        with self.transaction():
            for result in results:
                cursor = self.connection.execute(
                    "INSERT OR IGNORE INTO runs VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    run_row(result, host),
                )
                if cursor.rowcount == 0:
                    continue
                written += 1
                self.connection.executemany(
                    "INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(result.run_key, e.epoch, finite_or_none(e.train_loss),
                      finite_or_none(e.test_accuracy), json.dumps(list(e.prediction_counts)),
                      finite_or_none(e.dead_fraction), finite_or_none(e.saturated_fraction),
                      finite_or_none(e.grad_norm), int(e.nonfinite), float(e.seconds))
                     for e in result.epochs],
                )
                self.connection.execute(
                    "DELETE FROM claims WHERE run_key = ?", (result.run_key,)
                )
        return written

    def reclassify(self, ablation: str, criteria: Criteria) -> int:
        """Recompute the outcome of an ablation's stored runs under new criteria.

        Crashed and diverged runs keep their outcome; the others are classified again
        from their final accuracy and prediction counts. Returns how many changed.
        """
        rows = self.connection.execute(
            "SELECT r.run_key, r.outcome, r.final_accuracy, r.final_prediction_counts_json "
            "FROM runs r JOIN members m ON m.run_key = r.run_key WHERE m.ablation = ? "
            "AND r.outcome NOT IN ('crashed', 'diverged')",
            (ablation,),
        ).fetchall()
        updates = []
        for key, old, accuracy, counts_json in rows:
            counts = json.loads(counts_json)
            outcome, collapse_class, _ = outcome_of_counts(counts, accuracy, False, criteria)
            if outcome != old:
                updates.append((outcome, collapse_class, key))
        if updates:
            with self.transaction():
                self.connection.executemany(
                    "UPDATE runs SET outcome = ?, collapse_class = ? WHERE run_key = ?", updates
                )
            logger.info("reclassified %d runs of ablation %s under new criteria",
                        len(updates), ablation)
        return len(updates)

    # -- claims ----------------------------------------------------------------------

    def claim(self, run_keys: Sequence[str], owner: str, *, stale_seconds: float = 86400.0
              ) -> list[str]:
        """Claim the given runs that are neither finished nor claimed by a live process.

        A claim is stale, and taken over, when its process on this host is gone or it is
        older than ``stale_seconds``. Returns the keys this owner now holds, in order.
        """
        host = socket.gethostname()
        now = time.time()
        claimed = []
        taken_over: dict[str, list] = {}  # previous owner -> [run count, why it is stale]
        with self.transaction():
            finished = {row[0] for row in self.connection.execute("SELECT run_key FROM runs")}
            current = {row[0]: row[1:] for row in self.connection.execute(
                "SELECT run_key, owner, host, pid, claimed_at FROM claims")}
            for key in run_keys:
                if key in finished:
                    continue
                holder = current.get(key)
                if holder is not None and holder[0] != owner:
                    other_owner, other_host, other_pid, claimed_at = holder
                    dead = other_host == host and not _pid_alive(other_pid)
                    if not dead and now - claimed_at < stale_seconds:
                        continue
                    if dead:
                        reason = f"process {other_pid} on {other_host} is gone"
                    else:
                        reason = (f"claimed {now - claimed_at:.0f} s ago, more than the "
                                  f"{stale_seconds:.0f} s limit")
                    taken_over.setdefault(other_owner, [0, reason])[0] += 1
                self.connection.execute(
                    "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                    (key, owner, host, os.getpid(), now),
                )
                claimed.append(key)
        if taken_over:
            # One line per call, not per run: a dead process can leave thousands of claims.
            total = sum(count for count, _ in taken_over.values())
            owners = "; ".join(f"{count} from {other_owner} ({reason})"
                               for other_owner, (count, reason) in taken_over.items())
            logger.info("took over %d stale claims: %s", total, owners)
        return claimed

    def release(self, owner: str) -> None:
        """Drop every claim that this owner still has (runs it did not finish)."""
        with self.transaction():
            self.connection.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    # -- reading ---------------------------------------------------------------------

    def finished_keys(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT run_key FROM runs")}

    def ablation_names(self) -> list[str]:
        return [row[0] for row in self.connection.execute(
            "SELECT name FROM ablations ORDER BY updated_at, name")]

    def ablation(self, name: str | None = None) -> dict:
        """Return one ablation's stored matrix: name, text, resolved dict, criteria, factors.

        With ``name=None`` the store must hold exactly one ablation.
        """
        names = self.ablation_names()
        if name is None:
            if not names:
                raise StoreError(f"store {self.path} contains no ablation yet; run "
                                 f"'mnistbench ablate MATRIX --store {self.path}' first")
            if len(names) != 1:
                raise StoreError(
                    f"store {self.path} contains {len(names)} ablations "
                    f"({', '.join(names) or 'none'}); name one with --ablation"
                )
            name = names[0]
        row = self.connection.execute(
            "SELECT name, matrix_text, matrix_json, criteria_json, factors_json, dataset, "
            "updated_at FROM ablations WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise StoreError(
                f"ablation '{name}' not found in store {self.path}; stored ablations: "
                f"{', '.join(names) or 'none'}"
            )
        return {
            "name": row[0], "text": row[1], "matrix": json.loads(row[2]),
            "criteria": json.loads(row[3]), "factors": json.loads(row[4]),
            "dataset": row[5], "updated_at": row[6],
        }

    def cells_frame(self, ablation: str) -> pd.DataFrame:
        """Return one row per cell: ``cell_index``, ``cell_id``, a level column per factor."""
        factors = list(self.ablation(ablation)["factors"])
        rows = self.connection.execute(
            "SELECT cell_index, cell_id, levels_json FROM cells WHERE ablation = ? "
            "ORDER BY cell_index", (ablation,)
        ).fetchall()
        records = [{"cell_index": i, "cell_id": c, **json.loads(levels)} for i, c, levels in rows]
        return pd.DataFrame(records, columns=["cell_index", "cell_id", *factors])

    def runs_frame(self, ablation: str) -> pd.DataFrame:
        """Return one row per finished run of the ablation, in cell then seed order.

        Columns: ``cell_index``, ``cell_id``, one per factor (level text), ``seed``,
        ``run_key``, ``outcome``, ``collapse_class``, ``final_accuracy``,
        ``final_train_loss``, ``max_class_share``, ``epochs_done``, ``error``,
        ``train_seconds``, ``device``, the provenance columns, ``host``,
        ``finished_at``, and ``confusion`` (a 10x10 list of lists or None).
        """
        cells = self.cells_frame(ablation)
        factors = [c for c in cells.columns if c not in ("cell_index", "cell_id")]
        query = (
            "SELECT m.cell_id, m.seed, r.run_key, r.outcome, r.collapse_class, "
            "r.final_accuracy, r.final_train_loss, r.max_class_share, r.epochs_done, r.error, "
            "r.train_seconds, r.device, r.package_version, r.git_commit, r.torch_version, "
            "r.dataset_md5, r.host, r.finished_at, r.confusion_json "
            "FROM members m JOIN runs r ON r.run_key = m.run_key WHERE m.ablation = ?"
        )
        frame = pd.read_sql_query(query, self.connection, params=(ablation,))
        frame["confusion"] = [json.loads(c) if isinstance(c, str) else None
                              for c in frame.pop("confusion_json")]
        frame = cells.merge(frame, on="cell_id", how="inner")
        duplicated = duplicated_runs(zip(frame["cell_id"], frame["seed"], frame["run_key"]))
        if duplicated:
            raise StoreError(
                f"store {self.path} contains duplicated runs: {describe_duplicates(duplicated)}; "
                f"every cell and seed must have one run, so train the ablation again into a "
                f"fresh store")
        frame = frame.sort_values(["cell_index", "seed"], kind="stable").reset_index(drop=True)
        frame["collapse_class"] = frame["collapse_class"].astype("Int64")
        ordered = ["cell_index", "cell_id", *factors, "seed"]
        return frame[ordered + [c for c in frame.columns if c not in ordered]]

    def epochs_frame(self, ablation: str) -> pd.DataFrame:
        """Return one row per finished run and epoch, with the run's cell and factor columns.

        Columns: ``cell_index``, ``cell_id``, factor columns, ``seed``, ``run_key``,
        ``epoch``, ``train_loss``, ``test_accuracy``, ``prediction_counts`` (list of 10),
        ``dead_fraction``, ``saturated_fraction``, ``grad_norm``, ``nonfinite`` (bool),
        ``seconds``.
        """
        cells = self.cells_frame(ablation)
        factors = [c for c in cells.columns if c not in ("cell_index", "cell_id")]
        query = (
            "SELECT m.cell_id, m.seed, e.run_key, e.epoch, e.train_loss, e.test_accuracy, "
            "e.prediction_counts_json, e.dead_fraction, e.saturated_fraction, e.grad_norm, "
            "e.nonfinite, e.seconds FROM members m JOIN epochs e ON e.run_key = m.run_key "
            "WHERE m.ablation = ?"
        )
        frame = pd.read_sql_query(query, self.connection, params=(ablation,))
        frame["prediction_counts"] = [json.loads(c) for c in frame.pop("prediction_counts_json")]
        frame["nonfinite"] = frame["nonfinite"].astype(bool)
        frame = cells.merge(frame, on="cell_id", how="inner")
        frame = frame.sort_values(["cell_index", "seed", "epoch"], kind="stable")
        ordered = ["cell_index", "cell_id", *factors, "seed"]
        frame = frame.reset_index(drop=True)
        return frame[ordered + [c for c in frame.columns if c not in ordered]]

    def member_count(self, ablation: str) -> int:
        return self.connection.execute(
            "SELECT COUNT(*) FROM members WHERE ablation = ?", (ablation,)).fetchone()[0]


def duplicated_runs(members: Iterable[tuple[str, int, str]]) -> list[tuple[str, int, list[str]]]:
    """Find the cells and seeds of an ablation that more than one stored run belongs to.

    Members are keyed by run key, so a store can map one cell and seed to two runs, for
    example after hand editing. Every statistic assumes one.

    Args:
        members: ``(cell_id, seed, run_key)`` of each member whose run is stored.

    Returns:
        ``(cell_id, seed, run keys)`` of each duplicated cell and seed, in the order of
        ``members``, with the run keys sorted.
    """
    keys: dict[tuple[str, int], list[str]] = {}
    for cell_id, seed, key in members:
        keys.setdefault((cell_id, int(seed)), []).append(key)
    return [(cell_id, seed, sorted(found)) for (cell_id, seed), found in keys.items()
            if len(found) > 1]


def describe_duplicates(duplicated: list[tuple[str, int, list[str]]],
                        describe_key: Callable[[str], str] = str) -> str:
    """Describe duplicated runs as in "cell activation=relu seed 3 has runs 0a1b..., 9f8e...".

    ``describe_key`` formats each run key, for example to add the store it came from.
    """
    return "; ".join(f"cell {cell_id} seed {seed} has runs {', '.join(map(describe_key, keys))}"
                     for cell_id, seed, keys in duplicated)


class _Transaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> sqlite3.Connection:
        self.connection.execute("BEGIN IMMEDIATE")
        return self.connection

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.connection.execute("COMMIT")
        else:
            self.connection.execute("ROLLBACK")
