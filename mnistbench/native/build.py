"""Build and load the compiled kernels: one shared library per sources, flags and machine.

    path = build()      # in <cache>/native/, compiled once and checked on every load
    library = load(path)

The library's name hashes the C sources, the compiler command, the flags, the
compiler's version and the machine's architecture. Beside it a ``.sha256`` file records the SHA-256 of the
library as built. A library whose checksum file is missing or does not match (a
cut-off copy, a file written over) is built again, because loading a damaged shared
library can crash the process instead of raising an error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mnistbench.data import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("front.c", "tails.c", "bands.c", "hidden.c"))
HEADERS = (Path(__file__).with_name("vectors.h"),)
SYMBOLS = ("front_forward", "front_sums", "first_layer_tails", "first_layer_weight_tails",
           "constant_gradient", "bands_forward", "bands_input_gradient",
           "bands_weight_gradient", "hidden_forward")
NATIVE_ENV = "MNISTBENCH_NATIVE"
OFF = ("0", "false", "off", "no")
ON = ("", "1", "true", "on", "yes")
# No fused multiply-adds of the compiler's choosing: the backward kernel computes each
# pooled pair again and must round as the forward kernel did, and the compiler could
# fuse in one inlined copy of a formula and not in another. The kernels fuse only
# through fused() in vectors.h, the same way in every copy.
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi")
# Temporary files older than this are left over from a build that was killed.
STALE_SECONDS = 3600


class BuildError(RuntimeError):
    """The kernels could not be built or loaded: no C compiler, a failed compile, or a
    library that does not load."""


def enabled() -> bool:
    """Return whether ``$MNISTBENCH_NATIVE`` allows the compiled kernels (unset: yes)."""
    setting = os.environ.get(NATIVE_ENV, "").strip().lower()
    if setting in OFF:
        return False
    if setting not in ON:
        log.warning("%s=%r is not one of %s (off) or %s (on); using the compiled kernels",
                    NATIVE_ENV, setting, ", ".join(OFF), ", ".join(v for v in ON if v))
    return True


def vector_flags() -> tuple[str, ...]:
    """Return the compiler flags for the vector extensions that torch uses on this CPU."""
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
            "AVX2", "AVX512"):
        return ("-mavx2", "-mfma")
    return ()


def compiler_command() -> list[str]:
    """Return the C compiler's command: ``$CC`` split as a shell splits it, else ``cc`` or
    ``gcc``.

    Raises:
        BuildError: no compiler was found.
    """
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise BuildError("no C compiler found ($CC, cc or gcc) to build the native kernels")
    return [found]


def build_hash(command: list[str]) -> str:
    """Return the hash that names a library: 16 hex digits of the C sources, the compiler
    command and the version it reports, and the machine's architecture. Each of them
    can change the kernels' numbers."""
    key = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key += " ".join(command + [platform.system(), platform.machine()]).encode()
    key += _compiler_version(tuple(compiler_command())).encode()
    return hashlib.sha256(key).hexdigest()[:16]


@functools.cache
def _compiler_version(compiler: tuple[str, ...]) -> str:
    """Return what ``compiler --version`` prints, or nothing where it does not run."""
    try:
        result = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout


def build(directory: Path | None = None) -> Path:
    """Compile the kernels into ``directory`` (default: the cache's ``native``) unless an
    intact build is there, and return the library's path.

    Raises:
        BuildError: no C compiler was found, it failed, or its output does not load.
    """
    command = compiler_command() + list(FLAGS + vector_flags())
    directory = cache_dir() / "native" if directory is None else directory
    target = directory / f"kernels-{build_hash(command)}.so"
    checksum = target.with_suffix(".sha256")
    if _intact(target, checksum):
        return target
    partial = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale(directory)
        # Build under a temporary name and rename: workers that build at once each
        # write their own file, and the rename is atomic.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(handle)
        result = subprocess.run([*command, "-o", partial, *map(str, SOURCES)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            detail = result.stderr.strip()[:500]
            raise BuildError(f"{shlex.join(command[:1])} failed to build the native kernels "
                             f"(exit {result.returncode})" + (f": {detail}" if detail else ""))
        try:
            load(Path(partial))
        except BuildError as error:  # as from CC=true, which writes nothing
            raise BuildError(f"{shlex.join(command[:1])} wrote no loadable library: "
                             f"{error.__cause__}") from error
        os.chmod(partial, 0o755)  # mkstemp's 0600 would keep other users of the cache out
        digest = _sha256(Path(partial))
        os.replace(partial, target)
        _write_atomically(checksum, digest)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"could not build the native kernels in {directory}: {error}"
                         ) from error
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return target


def load(path: Path) -> ctypes.CDLL:
    """Load a built library and check that it has every kernel.

    Raises:
        BuildError: it does not load, or a kernel is missing.
    """
    try:
        library = ctypes.CDLL(str(path))
        for name in SYMBOLS:
            getattr(library, name)
    except (OSError, AttributeError) as error:
        raise BuildError(f"the native kernels in {path} do not load ({error}); delete the "
                         f"file to build them again") from error
    return library


def _intact(target: Path, checksum: Path) -> bool:
    try:
        return checksum.read_text().strip() == _sha256(target)
    except OSError:  # either file is missing or unreadable
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    handle, partial = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text + "\n")
    os.chmod(partial, 0o644)
    os.replace(partial, path)


def _remove_stale(directory: Path) -> None:
    """Remove temporary files that a killed build left behind."""
    cutoff = time.time() - STALE_SECONDS
    for leftover in [*directory.glob("tmp*.so"), *directory.glob("tmp*.tmp")]:
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:  # another process removed or renamed it first
            pass
