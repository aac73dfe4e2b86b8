"""Shared pytest fixtures."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mnistbench import idx
from mnistbench.data import FILE_NAMES


@dataclass(frozen=True)
class TinyDataset:
    """Four small IDX files in MNIST's layout, written uncompressed to one directory."""

    directory: Path
    arrays: dict[str, np.ndarray]  # uint8 images (count, 4, 3) or labels (count,), by file name
    contents: dict[str, bytes]  # the uncompressed IDX bytes, by file name
    md5: dict[str, str]  # MD5 of each file's contents, by file name


def build_tiny_arrays(offset: int = 0) -> dict[str, np.ndarray]:
    """Return 6 training and 4 test images of 4x3 pixels with distinct pixels, and labels.

    A different offset gives different pixels, for a dataset with other checksums.
    """
    train_images = ((np.arange(6 * 4 * 3) * 7 + offset) % 256).astype(np.uint8).reshape(6, 4, 3)
    test_images = ((np.arange(4 * 4 * 3) * 11 + offset) % 256).astype(np.uint8).reshape(4, 4, 3)
    return {
        FILE_NAMES[0]: train_images,
        FILE_NAMES[1]: np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8),
        FILE_NAMES[2]: test_images,
        FILE_NAMES[3]: np.array([9, 8, 7, 7], dtype=np.uint8),
    }


def encode_tiny(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Encode tiny arrays as IDX bytes, by file name."""
    return {
        name: idx.encode_images(array) if "images" in name else idx.encode_labels(array)
        for name, array in arrays.items()
    }


@pytest.fixture
def tiny_contents() -> Callable[[int], dict[str, bytes]]:
    """Return a function from a pixel offset to tiny IDX file contents, by file name."""
    return lambda offset: encode_tiny(build_tiny_arrays(offset))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> TinyDataset:
    """Write a tiny dataset to tmp_path/tiny-source and return its arrays and checksums."""
    directory = tmp_path / "tiny-source"
    directory.mkdir()
    arrays = build_tiny_arrays()
    contents = encode_tiny(arrays)
    for name, content in contents.items():
        (directory / name).write_bytes(content)
    md5 = {name: hashlib.md5(content).hexdigest() for name, content in contents.items()}
    return TinyDataset(directory=directory, arrays=arrays, contents=contents, md5=md5)
