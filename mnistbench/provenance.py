"""Provenance stored with every run: package version, git commit, torch version, device.

    info = provenance(dataset_md5="f85a...")   # {"package_version": ..., "git_commit": ...}
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import torch

from mnistbench import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Return the commit of the source tree mnistbench runs from, "+dirty" if modified.

    Returns "unknown" outside a git checkout (an installed wheel, for example).
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    suffix = "+dirty" if status.stdout.strip() else ""
    return commit.stdout.strip()[:12] + suffix


def device_name(device: torch.device | str) -> str:
    """Describe a device for the store: "cpu" or "cuda:0 (NVIDIA H200)"."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def provenance(dataset_md5: str) -> dict[str, str]:
    """Return the provenance fields every stored run carries."""
    return {
        "package_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "dataset_md5": dataset_md5,
    }
