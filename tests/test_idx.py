"""Tests of the IDX reader and writer: round trips, gzip detection and malformed files."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistbench import idx
from mnistbench.errors import DataError

PIXELS = (np.arange(3 * 5 * 4) * 13 % 256).astype(np.uint8).reshape(3, 5, 4)
LABELS = np.array([7, 0, 9], dtype=np.uint8)


def images_bytes(pixels: np.ndarray = PIXELS) -> bytes:
    return idx.encode_images(pixels)


def labels_bytes(labels: np.ndarray = LABELS) -> bytes:
    return idx.encode_labels(labels)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_images_round_trip(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / "images"
    idx.write_images(path, torch.from_numpy(PIXELS), compress=compress)

    images = idx.read_images(path)

    assert images.dtype == torch.uint8
    assert images.shape == (3, 5, 4)
    assert torch.equal(images, torch.from_numpy(PIXELS))
    assert path.read_bytes().startswith(idx.GZIP_MAGIC) == compress


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_labels_round_trip(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / "labels"
    idx.write_labels(path, LABELS, compress=compress)

    labels = idx.read_labels(path)

    assert labels.dtype == torch.int64
    assert labels.tolist() == [7, 0, 9]


def test_image_bytes_follow_the_idx_layout() -> None:
    data = images_bytes()

    assert data[:4] == bytes([0x00, 0x00, 0x08, 0x03])
    assert struct.unpack(">III", data[4:16]) == (3, 5, 4)
    assert data[16:] == PIXELS.tobytes()


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    compressed_without_suffix = tmp_path / "train-images-idx3-ubyte"
    compressed_without_suffix.write_bytes(gzip.compress(images_bytes()))
    raw_with_suffix = tmp_path / "train-labels-idx1-ubyte.gz"
    raw_with_suffix.write_bytes(labels_bytes())

    images, labels = idx.read_split(compressed_without_suffix, raw_with_suffix)

    assert torch.equal(images, torch.from_numpy(PIXELS))
    assert labels.tolist() == [7, 0, 9]


def test_gzip_output_is_deterministic(tmp_path: Path) -> None:
    idx.write_labels(tmp_path / "a", LABELS, compress=True)
    idx.write_labels(tmp_path / "b", LABELS, compress=True)

    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    idx.write_images(tmp_path / "images", PIXELS)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["images"]


def test_zero_images_read_as_empty_tensor(tmp_path: Path) -> None:
    path = tmp_path / "empty-images"
    idx.write_images(path, np.zeros((0, 28, 28), dtype=np.uint8))

    assert idx.read_images(path).shape == (0, 28, 28)


def with_header(magic: bytes, dims: tuple[int, ...], payload: bytes) -> bytes:
    return magic + struct.pack(f">{len(dims)}I", *dims) + payload


def corrupt_crc(data: bytes) -> bytes:
    trailer = bytearray(data)
    trailer[-8] ^= 0xFF  # the CRC-32 of the uncompressed data
    return bytes(trailer)


MALFORMED_IMAGES = [
    pytest.param(b"", r"file is empty \(0 bytes\); expected an IDX images file starting with magic 0x00000803", id="empty"),
    pytest.param(b"\x00\x00", r"header is truncated: the data ends at byte offset 2, .*needs 16 bytes", id="header-before-magic"),
    pytest.param(images_bytes()[:10], r"header is truncated: the data ends at byte offset 10, .*needs 16 bytes", id="header-short"),
    pytest.param(labels_bytes(), r"magic 0x00000801 means an IDX labels file, but an images file was expected", id="labels-not-images"),
    pytest.param(gzip.compress(gzip.compress(images_bytes())), r"gzip magic 1f 8b at byte offset 0 after decompressing, so the file is compressed twice", id="gzip-twice"),
    pytest.param(b"<html><body><h1>403 Forbidden</h1></body></html>", r"which is HTML or XML text \('<html><body><h1>403 Forbidden", id="html"),
    pytest.param(b'<?xml version="1.0"?>\n<Error><Code>AccessDenied</Code></Error>', r"HTML or XML text .*error page", id="xml"),
    pytest.param(b"\n  <!DOCTYPE html>\n<html>", r"HTML or XML text \('<!DOCTYPE html>'\)", id="html-after-whitespace"),
    pytest.param(struct.pack("<IIII", 0x803, 3, 5, 4) + PIXELS.tobytes(), r"bytes 03 08 00 00 at byte offset 0, the IDX images magic in little-endian byte order", id="little-endian"),
    pytest.param(struct.pack("<II", 0x801, 3) + LABELS.tobytes(), r"the IDX labels magic in little-endian byte order", id="little-endian-labels"),
    pytest.param(b"PK\x03\x04" + bytes(40), r"found bytes 50 4b 03 04 at byte offset 0; an IDX file starts with two zero bytes", id="not-idx"),
    pytest.param(with_header(b"\x00\x00\x0d\x03", (3, 5, 4), bytes(240)), r"data type code 0x0D \(float32\) at byte offset 2, expected 0x08 \(unsigned byte\)", id="dtype-float32"),
    pytest.param(with_header(b"\x00\x00\x42\x03", (3, 5, 4), bytes(60)), r"data type code 0x42 \(not an IDX type code\) at byte offset 2", id="dtype-unknown"),
    pytest.param(with_header(b"\x00\x00\x08\x02", (3, 20), bytes(60)), r"found 2 dimensions at byte offset 3, expected 3 for an IDX images file \(count, rows, columns\)", id="ndim-2"),
    pytest.param(with_header(b"\x00\x00\x08\x03", (3, 0, 28), b""), r"found image size 0x28 at byte offset 8, expected positive rows and columns", id="zero-rows"),
    pytest.param(images_bytes()[:-5], r"file is truncated: the header declares 3 images of 5x4 pixels, which needs 76 bytes, but the data ends at byte offset 71; 5 bytes missing", id="truncated"),
    pytest.param(images_bytes() + b"\x00\x00\x00", r"file is padded: .*76 bytes, but 3 extra bytes follow byte offset 76", id="padded"),
    pytest.param(gzip.compress(images_bytes())[:-12], r"gzip stream is truncated .*copy or download the file again", id="gzip-truncated"),
    pytest.param(corrupt_crc(gzip.compress(images_bytes())), r"gzip stream is corrupt \(CRC check failed", id="gzip-corrupt"),
]


@pytest.mark.parametrize(("content", "message"), MALFORMED_IMAGES)
def test_malformed_images_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(content)

    with pytest.raises(DataError, match=message) as error:
        idx.read_images(path)

    assert str(error.value).startswith(f"{path}: ")


MALFORMED_LABELS = [
    pytest.param(images_bytes(), r"magic 0x00000803 means an IDX images file, but a labels file was expected \(magic 0x00000801\); check that the images and labels paths are not swapped", id="images-not-labels"),
    pytest.param(labels_bytes()[:6], r"header is truncated: the data ends at byte offset 6, but an IDX labels header needs 8 bytes", id="header-short"),
    pytest.param(with_header(b"\x00\x00\x08\x03", (3, 1, 1), LABELS.tobytes()), r"means an IDX images file", id="ndim-3"),
    pytest.param(with_header(b"\x00\x00\x08\x02", (3, 1), LABELS.tobytes()), r"found 2 dimensions at byte offset 3, expected 1 for an IDX labels file \(count\)", id="ndim-2"),
    pytest.param(with_header(b"\x00\x00\x0c\x01", (3,), bytes(12)), r"data type code 0x0C \(int32\) at byte offset 2", id="dtype-int32"),
    pytest.param(labels_bytes(np.array([1, 2, 12, 3, 10, 255], dtype=np.uint8)), r"3 of 6 labels are outside 0-9; the first is 12 at index 2 \(byte offset 10\)", id="label-out-of-range"),
    pytest.param(labels_bytes()[:-1], r"file is truncated: the header declares 3 labels, which needs 11 bytes, .*1 byte missing", id="truncated"),
    pytest.param(labels_bytes() + b"\x01", r"file is padded: .*1 extra byte follow byte offset 11", id="padded"),
]


@pytest.mark.parametrize(("content", "message"), MALFORMED_LABELS)
def test_malformed_labels_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-labels-idx1-ubyte.gz"
    path.write_bytes(content)

    with pytest.raises(DataError, match=message) as error:
        idx.read_labels(path)

    assert str(error.value).startswith(f"{path}: ")


def test_gzip_bytes_given_to_parser_rejected() -> None:
    with pytest.raises(DataError, match=r"<bytes>: found bytes 1f 8b .*the gzip magic: the data is still compressed"):
        idx.parse_images(gzip.compress(images_bytes()))


def test_labels_accept_custom_class_count(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    idx.write_labels(path, np.array([0, 25, 3]))

    assert idx.read_labels(path, num_classes=26).tolist() == [0, 25, 3]
    with pytest.raises(DataError, match=r"1 of 3 labels are outside 0-9; the first is 25 at index 1"):
        idx.read_labels(path)


def test_split_count_mismatch_rejected(tmp_path: Path) -> None:
    idx.write_images(tmp_path / "images", PIXELS)
    idx.write_labels(tmp_path / "labels", np.array([1, 2]))

    with pytest.raises(DataError, match=r"images has 3 images but .*labels has 2 labels .*must have the same count"):
        idx.read_split(tmp_path / "images", tmp_path / "labels")


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing-here: file not found"):
        idx.read_images(tmp_path / "nothing-here")


def test_directory_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot be read: Is a directory"):
        idx.read_images(tmp_path)


WRITE_ERRORS = [
    pytest.param(np.zeros((2, 3)), "images must have 3 dimensions, got shape (2, 3)", id="ndim"),
    pytest.param(np.zeros((1, 2, 2), dtype=np.float32), "images must be integers 0-255, got dtype float32", id="float"),
    pytest.param(np.full((1, 2, 2), 256), "images must be integers 0-255, got values 256 to 256", id="range"),
]


@pytest.mark.parametrize(("images", "message"), WRITE_ERRORS)
def test_write_images_rejects_bad_arrays(tmp_path: Path, images: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        idx.write_images(tmp_path / "images", images)

    assert list(tmp_path.iterdir()) == []


def test_read_of_raw_file_is_writable_without_copy(tmp_path: Path) -> None:
    path = tmp_path / "images"
    idx.write_images(path, PIXELS)

    images = idx.read_images(path)
    images[0, 0, 0] = 1  # a tensor over read-only memory would make this undefined

    assert images[0, 0, 0].item() == 1
