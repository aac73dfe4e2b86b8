"""The store's schema, run keys and row encoding: what a store file contains.

    key = run_key(settings.to_dict(), seed=0, dataset_md5=dataset.md5, device_type="cpu")

:class:`mnistbench.store.Store` creates these tables and reads and writes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from mnistbench.outcome import RunResult

SCHEMA_VERSION = 1

# Bump when a change to the engine changes the numbers a run produces: old runs then
# get new keys and train again instead of being mixed with new ones.
NUMERICS_VERSION = 8

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ablations (
    name TEXT PRIMARY KEY,
    matrix_text TEXT NOT NULL,
    matrix_json TEXT NOT NULL,
    criteria_json TEXT NOT NULL,
    factors_json TEXT NOT NULL,
    dataset TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    ablation TEXT NOT NULL,
    cell_id TEXT NOT NULL,
    cell_index INTEGER NOT NULL,
    levels_json TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    PRIMARY KEY (ablation, cell_id)
);
CREATE TABLE IF NOT EXISTS members (
    ablation TEXT NOT NULL,
    run_key TEXT NOT NULL,
    cell_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    PRIMARY KEY (ablation, run_key)
);
CREATE TABLE IF NOT EXISTS runs (
    run_key TEXT PRIMARY KEY,
    settings_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    collapse_class INTEGER,
    final_accuracy REAL,
    final_train_loss REAL,
    max_class_share REAL,
    final_prediction_counts_json TEXT,
    epochs_done INTEGER NOT NULL,
    confusion_json TEXT,
    error TEXT,
    train_seconds REAL NOT NULL,
    device TEXT NOT NULL,
    package_version TEXT NOT NULL,
    git_commit TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    dataset_md5 TEXT NOT NULL,
    host TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_key TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    train_loss REAL,
    test_accuracy REAL,
    prediction_counts_json TEXT NOT NULL,
    dead_fraction REAL,
    saturated_fraction REAL,
    grad_norm REAL,
    nonfinite INTEGER NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (run_key, epoch)
);
CREATE TABLE IF NOT EXISTS claims (
    run_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    claimed_at REAL NOT NULL
);
"""

PROVENANCE_KEYS = ("package_version", "git_commit", "torch_version", "dataset_md5")


def run_key(settings: dict, seed: int, dataset_md5: str, device_type: str,
            front_kernels: str | None = None) -> str:
    """Hash everything that determines a run's result into a 16-hex-digit key.

    Args:
        settings: the run's settings as plain data (``Settings.to_dict()``).
        seed: the seed index.
        dataset_md5: the dataset checksum (``Dataset.md5``).
        device_type: ``"cpu"`` or ``"cuda"``; the two do not give bit-identical numbers.
        front_kernels: for a run with the convolution front on the CPU, ``"native-"``
            and the build hash of the compiled kernels that train it
            (:func:`mnistbench.native.kernels_id`), or ``"torch"`` when torch's
            operations do. Each gives different numbers. None leaves it out of the key.
    """
    payload = {
        "settings": settings,
        "seed": seed,
        "dataset_md5": dataset_md5,
        "device_type": device_type,
        "numerics_version": NUMERICS_VERSION,
    }
    if front_kernels is not None:
        payload["front_kernels"] = front_kernels
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_row(result: RunResult, host: str) -> tuple:
    provenance = result.provenance
    missing = [k for k in PROVENANCE_KEYS if k not in provenance]
    assert not missing, f"run {result.run_key} lacks provenance {missing}"
    counts = result.epochs[-1].prediction_counts if result.epochs else None
    return (
        result.run_key, json.dumps(result.settings), result.seed, result.outcome,
        result.collapse_class, finite_or_none(result.final_accuracy),
        finite_or_none(result.final_train_loss), finite_or_none(result.max_class_share),
        json.dumps(list(counts)) if counts is not None else None,
        max((e.epoch for e in result.epochs), default=0),
        json.dumps([list(r) for r in result.confusion]) if result.confusion else None,
        result.error, float(result.train_seconds), result.device,
        provenance["package_version"], provenance["git_commit"], provenance["torch_version"],
        provenance["dataset_md5"], host, now_text(),
    )
