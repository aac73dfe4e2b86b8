"""Read, validate and write IDX files, the format of the MNIST dataset files.

    images = read_images("train-images-idx3-ubyte.gz")  # uint8 (60000, 28, 28)
    labels = read_labels("train-labels-idx1-ubyte")     # int64 (60000,)
    write_images("tiny-images-idx3-ubyte", images[:10], compress=True)

An IDX file is a big-endian header followed by the array in C order. The header
is two zero bytes, a data type code (byte offset 2, 0x08 for unsigned bytes), the
number of dimensions (byte offset 3), then one uint32 size per dimension. Images
files have 3 dimensions (count, rows, columns) and magic 0x00000803 (2051).
Labels files have 1 dimension and magic 0x00000801 (2049).

Any file may be gzip-compressed. Reading detects gzip by the first two bytes
(1f 8b), never by the file name. Every problem with a file's contents raises
DataError naming the file, the byte offset, what was found and what was expected.
Offsets in a gzip file count bytes of the decompressed data.
"""

from __future__ import annotations

import gzip
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mnistbench.errors import DataError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that build or read tensors, so that modules
# which only need the dataset registry (such as `mnistbench --help`) start without it.

GZIP_MAGIC = b"\x1f\x8b"
UNSIGNED_BYTE = 0x08
NUM_CLASSES = 10  # MNIST and Fashion-MNIST label values are 0-9

# Data type codes of the IDX format, for error messages.
TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


@dataclass(frozen=True)
class _Kind:
    """The header layout of one kind of IDX file."""

    name: str  # "images" or "labels"
    magic: int
    ndim: int
    dims: str  # what the dimension sizes mean, for messages

    @property
    def header_size(self) -> int:
        return 4 + 4 * self.ndim

    @property
    def article(self) -> str:
        return "an" if self.name[0] in "aeiou" else "a"


IMAGES = _Kind("images", 0x00000803, 3, "count, rows, columns")
LABELS = _Kind("labels", 0x00000801, 1, "count")


def decompress_if_gzip(data: bytes | bytearray, source: str | os.PathLike) -> bytearray:
    """Decompress data that starts with the gzip magic; return other data unchanged.

    Args:
        data: the bytes of a file, compressed or not.
        source: the file or URL the data came from, named in errors.

    Returns:
        The uncompressed bytes, as a writable bytearray.

    Raises:
        DataError: the gzip stream is truncated or corrupt, or its content is
            gzip data again (a file compressed twice).
    """
    if not data.startswith(GZIP_MAGIC):
        return data if isinstance(data, bytearray) else bytearray(data)
    try:
        content = gzip.decompress(data)
    except EOFError as error:
        raise DataError(
            f"{source}: gzip stream is truncated ({error}) after {len(data)} compressed bytes; "
            "copy or download the file again"
        ) from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(
            f"{source}: gzip stream is corrupt ({error}); copy or download the file again"
        ) from error
    if content.startswith(GZIP_MAGIC):
        raise DataError(
            f"{source}: found the gzip magic 1f 8b at byte offset 0 after decompressing, so the "
            "file is compressed twice; decompress it once (gunzip) and keep the result"
        )
    return bytearray(content)


def read_idx_bytes(path: str | os.PathLike) -> bytearray:
    """Read a file and return its uncompressed bytes (gzip is detected by content)."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)
            size = file.readinto(data)
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read: {error.strerror or error}") from error
    del data[size:]  # the file shrank while it was read
    return decompress_if_gzip(data, path)


def _plural(count: int, noun: str) -> str:
    """Return "1 byte" or "3 bytes"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _preview(data: bytes | bytearray) -> str:
    """Return the first bytes of data as hex, for messages."""
    return " ".join(f"{byte:02x}" for byte in data[:8])


def _describe_magic(data: bytes | bytearray, kind: _Kind) -> str | None:
    """Explain why the first 4 bytes are not kind's magic; None when they are."""
    magic = int.from_bytes(data[:4], "big")
    if magic == kind.magic:
        return None
    expected = f"expected the IDX {kind.name} magic 0x{kind.magic:08X}"
    found = f"found bytes {_preview(data[:4])} at byte offset 0"
    other = LABELS if kind is IMAGES else IMAGES

    if data.startswith(GZIP_MAGIC):
        return (
            f"{found}, the gzip magic: the data is still compressed; decompress it before parsing"
        )
    if data[:64].lstrip().startswith(b"<"):
        text = bytes(data[:200]).lstrip().decode("latin-1").split("\n")[0][:60]
        return (
            f"{found}, which is HTML or XML text ({text!r}), not IDX data; {expected}. "
            "This is usually an error page saved in place of the file, so download it again"
        )
    if magic == other.magic:
        return (
            f"{found}: magic 0x{magic:08X} means an IDX {other.name} file, but {kind.article} "
            f"{kind.name} file was expected (magic 0x{kind.magic:08X}); check that the images "
            "and labels paths are not swapped"
        )
    for candidate in (kind, other):
        if magic == int.from_bytes(candidate.magic.to_bytes(4, "big"), "little"):
            return (
                f"{found}, the IDX {candidate.name} magic in little-endian byte order; IDX headers "
                f"are big-endian, so the file was written with the wrong byte order; {expected}"
            )
    if data[0] != 0 or data[1] != 0:
        return (
            f"{found}; an IDX file starts with two zero bytes, so this is not IDX data; {expected}"
        )
    if data[2] != UNSIGNED_BYTE:
        type_name = TYPE_NAMES.get(data[2], "not an IDX type code")
        return (
            f"found data type code 0x{data[2]:02X} ({type_name}) at byte offset 2, expected "
            f"0x{UNSIGNED_BYTE:02X} (unsigned byte)"
        )
    return (
        f"found {data[3]} dimensions at byte offset 3, expected {kind.ndim} for an IDX "
        f"{kind.name} file ({kind.dims})"
    )


def _check_header(
    data: bytes | bytearray, source: str | os.PathLike, kind: _Kind
) -> tuple[int, ...]:
    """Validate the header and length of IDX data and return its dimension sizes."""
    if len(data) == 0:
        raise DataError(
            f"{source}: file is empty (0 bytes); expected an IDX {kind.name} file "
            f"starting with magic 0x{kind.magic:08X}"
        )
    if len(data) >= 4:
        problem = _describe_magic(data, kind)
        if problem is not None:
            raise DataError(f"{source}: {problem}")
    if len(data) < kind.header_size:
        raise DataError(
            f"{source}: header is truncated: the data ends at byte offset {len(data)}, but an IDX "
            f"{kind.name} header needs {kind.header_size} bytes (magic and "
            f"{_plural(kind.ndim, 'dimension size')}: {kind.dims})"
        )

    dims = struct.unpack(f">{kind.ndim}I", data[4 : kind.header_size])
    if kind is IMAGES and (dims[1] == 0 or dims[2] == 0):
        raise DataError(
            f"{source}: found image size {dims[1]}x{dims[2]} at byte offset 8, expected "
            "positive rows and columns (28x28 for MNIST)"
        )

    expected = kind.header_size + int(np.prod(dims, dtype=np.int64))
    if kind is IMAGES:
        declared = f"{dims[0]} images of {dims[1]}x{dims[2]} pixels"
    else:
        declared = f"{dims[0]} labels"
    if len(data) < expected:
        raise DataError(
            f"{source}: file is truncated: the header declares {declared}, which needs "
            f"{expected} bytes, but the data ends at byte offset {len(data)}; "
            f"{_plural(expected - len(data), 'byte')} missing"
        )
    if len(data) > expected:
        raise DataError(
            f"{source}: file is padded: the header declares {declared}, which needs "
            f"{expected} bytes, but {_plural(len(data) - expected, 'extra byte')} follow "
            f"byte offset {expected}"
        )
    return dims


def parse_images(data: bytes | bytearray, source: str | os.PathLike = "<bytes>") -> torch.Tensor:
    """Validate uncompressed IDX images data and return it as a tensor.

    Args:
        data: the whole file, uncompressed. A bytearray is shared with the tensor, not copied.
        source: the file or URL the data came from, named in errors.

    Returns:
        uint8 tensor of shape (count, rows, columns), pixel values 0-255.
    """
    import torch

    count, rows, columns = _check_header(data, source, IMAGES)
    pixels = np.frombuffer(data, dtype=np.uint8, offset=IMAGES.header_size)
    if not pixels.flags.writeable:  # torch warns about tensors over read-only memory
        pixels = pixels.copy()
    return torch.from_numpy(pixels.reshape(count, rows, columns))


def parse_labels(
    data: bytes | bytearray, source: str | os.PathLike = "<bytes>", num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Validate uncompressed IDX labels data and return it as a tensor.

    Args:
        data: the whole file, uncompressed.
        source: the file or URL the data came from, named in errors.
        num_classes: labels must lie in 0 to num_classes - 1.

    Returns:
        int64 tensor of shape (count,).
    """
    import torch

    _check_header(data, source, LABELS)
    labels = np.frombuffer(data, dtype=np.uint8, offset=LABELS.header_size)
    invalid = np.flatnonzero(labels >= num_classes)
    if invalid.size:
        first = int(invalid[0])
        raise DataError(
            f"{source}: {invalid.size} of {labels.size} labels are outside 0-{num_classes - 1}; "
            f"the first is {labels[first]} at index {first} "
            f"(byte offset {LABELS.header_size + first})"
        )
    return torch.from_numpy(labels.astype(np.int64))


def read_images(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX images file, raw or gzip, as a uint8 tensor (count, rows, columns)."""
    return parse_images(read_idx_bytes(path), path)


def read_labels(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Read an IDX labels file, raw or gzip, as an int64 tensor (count,)."""
    return parse_labels(read_idx_bytes(path), path, num_classes)


def check_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    images_source: str | os.PathLike,
    labels_source: str | os.PathLike,
) -> None:
    """Raise DataError unless an images tensor and its labels have the same count."""
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_source} has {images.shape[0]} images but {labels_source} has "
            f"{labels.shape[0]} labels (the counts at byte offset 4 of their headers); "
            "an images file and its labels file must have the same count"
        )


def read_split(
    images_path: str | os.PathLike, labels_path: str | os.PathLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an images file and its labels file and check that their counts agree.

    Returns:
        (images, labels): uint8 (count, rows, columns) and int64 (count,).
    """
    images = read_images(images_path)
    labels = read_labels(labels_path)
    check_split(images, labels, images_path, labels_path)
    return images, labels


def _to_uint8(array: torch.Tensor | np.ndarray, ndim: int, what: str) -> np.ndarray:
    """Convert an integer array with values 0-255 to contiguous uint8."""
    import torch

    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if values.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(values.shape)}")
    if values.dtype != np.uint8:
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{what} must be integers 0-255, got dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError(
                f"{what} must be integers 0-255, got values {values.min()} to {values.max()}"
            )
    return np.ascontiguousarray(values, dtype=np.uint8)


def encode_images(images: torch.Tensor | np.ndarray) -> bytes:
    """Encode integer images (count, rows, columns) with values 0-255 as IDX bytes."""
    pixels = _to_uint8(images, 3, "images")
    return struct.pack(">IIII", IMAGES.magic, *pixels.shape) + pixels.tobytes()


def encode_labels(labels: torch.Tensor | np.ndarray) -> bytes:
    """Encode integer labels (count,) as IDX bytes; any value 0-255 is written as given."""
    values = _to_uint8(labels, 1, "labels")
    return struct.pack(">II", LABELS.magic, values.shape[0]) + values.tobytes()


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes | bytearray, compress: bool = False
) -> None:
    """Write data to path through a temporary file in the same directory and a rename.

    A reader never sees a partial file. With compress=True the data is gzipped
    with the timestamp set to 0, so equal data gives equal files.
    """
    path = Path(path)
    if compress:
        data = gzip.compress(data, mtime=0)
    # os.open with mode 0o666 applies the umask, unlike tempfile.mkstemp, which creates 0o600.
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_images(
    path: str | os.PathLike, images: torch.Tensor | np.ndarray, compress: bool = False
) -> None:
    """Write images (count, rows, columns), integers 0-255, as an IDX file, gzipped if compress."""
    write_bytes_atomic(path, encode_images(images), compress)


def write_labels(
    path: str | os.PathLike, labels: torch.Tensor | np.ndarray, compress: bool = False
) -> None:
    """Write labels (count,), integers 0-255, as an IDX file, gzipped if compress."""
    write_bytes_atomic(path, encode_labels(labels), compress)
