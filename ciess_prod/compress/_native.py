"""Builds and loads the compiled ragged-lookup op (``ragged_kernels.cpp``) without ninja or setuptools.

``torch.utils.cpp_extension.load`` needs ninja, which a fresh machine with only gcc and the virtualenv lacks, so the
op is compiled by one plain ``c++`` call into a shared library that registers ``torch.ops.ciess_ragged`` through
TORCH_LIBRARY, then loaded with ``torch.ops.load_library``. The library is cached under a key over the source, the
flags, the compiler, the CPU's features and torch, so it is compiled once per machine (10-20 s) and reused by every
process.

Any failure (no compiler, a compile error, a load error) is logged once as a warning and ``ops()`` returns None:
callers then use the pure-torch path in ``ragged_torch``, which gives the same results, only slower.
``CIESS_NATIVE=0`` disables the build; ``CIESS_EXT_DIR`` overrides the cache directory; ``CXX`` the compiler;
``CIESS_RAGGED_LIB`` loads a prebuilt library (compiler-less serving images).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils import cpp_extension

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ragged_kernels.cpp")
NAMESPACE = "ciess_ragged"
BUILD_TIMEOUT_S = 900  # a loaded 2-core machine needs about a minute; give a slow one room before giving up
_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden")
# The library is built on the machine that runs it, so it may use that CPU's vector units (F16C, AVX2/512); the CPU's
# feature flags are part of the cache key, so a home directory shared by different CPUs keeps one build per CPU type.
# -ffp-contract=off keeps results identical to the pure-torch path whatever the ISA.
_ARCH_FLAGS = ("-march=native",) if platform.machine() in ("x86_64", "AMD64") else ()


class NativeBuildError(RuntimeError):
    """The compiled op could not be built or loaded; the message carries the compiler's output."""


def cache_dir() -> Path:
    """Where built libraries live: $CIESS_EXT_DIR, else $TORCH_EXTENSIONS_DIR/ciess_prod, else
    ~/.cache/ciess_prod/ext (or under $XDG_CACHE_HOME)."""
    if os.environ.get("CIESS_EXT_DIR"):
        return Path(os.environ["CIESS_EXT_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "ciess_prod"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ciess_prod" / "ext"


def compile_command(source: Path, output: Path, compiler: str) -> list[str]:
    """The one compiler call: torch headers, the C++ ABI torch was built with, linked against c10 and torch_cpu."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    return [
        compiler,
        *_FLAGS,
        *_ARCH_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        str(source),
        "-o",
        str(output),
        *[f"-L{p}" for p in libs],
        *[f"-Wl,-rpath,{p}" for p in libs],
        "-lc10",
        "-ltorch_cpu",
    ]


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"C++ compiler {compiler!r} cannot be run ({e})") from e
    if done.returncode != 0:
        raise NativeBuildError(f"C++ compiler {compiler!r} failed on --version: {done.stderr.strip()}")
    return done.stdout.strip()


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a build for one CPU is never loaded on a CPU lacking its ISA."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def library_path(source: Path, directory: Path, compiler: str) -> Path:
    """The cached library's path: a hash over everything that changes the binary, so stale builds are never reused."""
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        " ".join(compile_command(Path("src"), Path("out"), compiler)).encode(),
        _compiler_version(compiler).encode(),
        torch.__version__.encode(),
        sysconfig.get_platform().encode(),
        _cpu_flags().encode(),
        sys.implementation.cache_tag.encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return directory / f"{NAMESPACE}_{key.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialises builds across processes (pytest workers, parallel jobs) so each machine compiles once."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_library(source: Path = SOURCE, directory: Path | None = None, compiler: str | None = None) -> Path:
    """Returns the path of the built library, compiling it first when the cache lacks it; raises NativeBuildError."""
    directory = cache_dir() if directory is None else Path(directory)
    compiler = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    if not source.is_file():
        raise NativeBuildError(f"{source}: kernel source missing (was the package installed without its .cpp?)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeBuildError(f"{directory}: cannot create the extension cache directory ({e})") from e
    target = library_path(source, directory, compiler)
    if target.is_file():
        return target
    with _file_lock(directory / f"{NAMESPACE}.lock"):
        if target.is_file():  # another process built it while we waited
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        command = compile_command(source, tmp, compiler)
        log.info("compiling the ragged embedding op (first use on this machine): %s", " ".join(command))
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            tmp.unlink(missing_ok=True)
            raise NativeBuildError(f"compiling {source} failed to run: {e}") from e
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise NativeBuildError(
                f"compiling {source} failed (exit {done.returncode}):\n{done.stderr[-4000:]}\ncommand: {command}"
            )
        os.replace(tmp, target)  # atomic: readers never see half a library
        log.info("compiled %s in %.1f s", target, time.monotonic() - started)
    return target


def _load() -> Any:
    """Builds (if needed) and loads the library once per process; TORCH_LIBRARY cannot register a namespace twice.

    ``CIESS_RAGGED_LIB`` names a prebuilt library instead (``build_library()`` run when an image is built), for
    machines that serve without a compiler.
    """
    if not hasattr(getattr(torch.ops, NAMESPACE), "lookup"):
        prebuilt = os.environ.get("CIESS_RAGGED_LIB")
        torch.ops.load_library(prebuilt or str(build_library()))
    return getattr(torch.ops, NAMESPACE)


_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops" once loaded, "error" once failed; a process tries at most once


def ops() -> Any | None:
    """``torch.ops.ciess_ragged`` (ops ``lookup``, ``pooled``), or None when it cannot be built here (warned once)."""
    if "ops" in _state:
        return _state["ops"]
    if "error" in _state:
        return None
    with _lock:
        if "ops" in _state or "error" in _state:
            return _state.get("ops")
        if os.environ.get("CIESS_NATIVE", "1") == "0":
            _state["error"] = "disabled by CIESS_NATIVE=0"
            log.warning("ragged embedding op disabled by CIESS_NATIVE=0; using the slower pure-torch lookups")
            return None
        try:
            _state["ops"] = _load()
        except (NativeBuildError, OSError, RuntimeError) as e:
            _state["error"] = str(e)
            log.warning("ragged embedding op unavailable, using the slower pure-torch lookups: %s", e)
            return None
    return _state["ops"]


def error() -> str | None:
    """Why ``ops()`` returned None, if it did."""
    return _state.get("error")
