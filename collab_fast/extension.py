"""Builds and loads collab_fast's C++ extension (csrc/rescale.cpp, csrc/rescale_cuda.cu) on first use.

What gets built depends on the machine (one warning says what is missing and what it costs):

    C++ compiler + nvcc (CUDA torch)   CPU kernel + the fused CUDA kernel
    C++ compiler, no nvcc              CPU kernel; CUDA tensors go through ATen calls (registered for the
                                       CUDA key, compiled without nvcc): same results, ~1.7x the gradient
                                       traffic of the fused kernel at a two-way split's backward
    no C++ compiler, no ninja, or a    nothing: `load_extension` raises BuildError (NoCompilerError where
    compiler that fails                no compiler exists) and collab_fast.rescale registers its
                                       plain-PyTorch ops instead

A build that failed leaves <cache>/<name>.failed (the compiler's output): later processes of the same
environment fall back at once instead of failing the same ~30 s build again; deleting it retries.

A build is published as <cache>/<name>/<name>.so with a <name>.sha256 beside it, <name> hashing everything
that changes the binary (sources, flags, compiler, torch version and include paths, Python ABI), so several
environments share a cache without rebuilding each other's. Loading a published build takes no lock; its
checksum is verified first (a truncated or damaged file is rebuilt, never mapped: a truncated .so kills
the process with SIGBUS). Building happens in a private directory under an flock on <cache>/<name>.lock:
the kernel releases an flock when its owner dies (kill -9, OOM killer), so a crashed builder never blocks
the next one, and a waiter says whom it waits for.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import torch

from collab_fast.cache import cache_root

__all__ = ["BuildError", "ExtensionError", "NoCompilerError", "build_key", "load_extension"]

CSRC = Path(__file__).resolve().parent / "csrc"
_lock = threading.Lock()
_module = None


class ExtensionError(RuntimeError):
    """The extension cannot be built or loaded here (its cache, its lock, ninja, the compiler's failure): a
    problem of the environment, reported in one line by the trainer."""


class BuildError(ExtensionError):
    """The extension cannot be built with this machine's tools (no compiler, no ninja, a compiler that fails):
    collab_fast.rescale falls back to its plain-PyTorch ops, with one warning."""


class NoCompilerError(BuildError):
    """No C++ compiler on this machine: the extension cannot be built."""


def _cpu_flags() -> list[str]:
    # at::vec picks its implementation from CPU_CAPABILITY_*; enable AVX2 only where the CPU has it.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if all(f" {f} " in flags or flags.endswith(f" {f}\n") for f in ("avx2", "fma", "f16c")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def want_cuda_kernel() -> tuple[bool, str | None]:
    """(build the fused CUDA kernel?, why not, when a CUDA device would have used it)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.cuda.is_available():
        return False, None
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, ("a CUDA device is present but nvcc was not found (CUDA_HOME unset or without bin/nvcc; "
                       "pip-installed torch ships none): backprop rescaling runs on CUDA through ATen calls "
                       "instead of its fused kernel (same results, ~1.7x the gradient traffic at each split "
                       "point's backward). Install the CUDA toolkit for the fused kernel.")
    return True, None


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{shutil.which(cxx)} {out.splitlines()[0] if out else '?'}"


def build_key(sources: list[Path], cflags: list[str], with_cuda: bool, cxx: str) -> str:
    """Hash of everything that changes the binary: two environments share a build only if it is theirs."""
    from torch.utils import cpp_extension

    key = hashlib.sha256()
    for src in sources:
        key.update(src.read_bytes())
    parts = [torch.__version__, str(torch.version.cuda), *cflags, _compiler_id(cxx),
             *cpp_extension.include_paths(), sysconfig.get_config_var("EXT_SUFFIX") or "",
             sysconfig.get_paths()["include"], sys.version]
    if with_cuda:
        parts += [str(cpp_extension.CUDA_HOME), os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    key.update("\n".join(parts).encode())
    return key.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(so: Path) -> bool:
    """True when `so` and its checksum file exist and agree (a complete, undamaged build)."""
    try:
        want = so.with_suffix(".sha256").read_text().strip()
        return bool(want) and _sha256(so) == want
    except OSError:
        return False


def _import_built(name: str, so: Path):
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_timeout() -> float:
    raw = os.environ.get("COLLAB_FAST_BUILD_TIMEOUT", "1800")
    try:
        return float(raw)
    except ValueError:
        raise ExtensionError(f"COLLAB_FAST_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None


def _acquire(lock_path: Path, what: str):
    """flock on lock_path (released by the kernel if this process dies); prints whom it waits for."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ExtensionError(f"collab_fast: cannot write the extension cache {lock_path.parent} ({exc.strerror}); "
                           "set COLLAB_FAST_CACHE to a writable directory") from None
    deadline = time.monotonic() + _build_timeout()
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not announced:
                try:
                    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                except OSError:
                    owner = "another process"
                print(f"collab_fast: waiting for {owner} to finish building {what} (lock {lock_path})",
                      file=sys.stderr, flush=True)
                announced = True
            if time.monotonic() > deadline:
                os.close(fd)
                raise ExtensionError(
                    f"collab_fast: gave up after {_build_timeout():.0f} s waiting for the build lock {lock_path} "
                    "(held by a live process); wait for it, or raise COLLAB_FAST_BUILD_TIMEOUT") from None
            time.sleep(0.25)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def _clear_dead_builds(root: Path, name: str) -> None:
    # Private build directories of builders that died (same host, pid gone); we hold the lock.
    host = socket.gethostname()
    for d in root.glob(f".build-{name}-*"):
        pid_s = d.name.rsplit("-", 1)[-1]
        if pid_s.isdigit() and d.name.endswith(f"-{host}-{pid_s}") and not _alive(int(pid_s)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _plan():
    """(name, sources, cflags, with_cuda, cxx) of the build this machine wants."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NoCompilerError(f"no C++ compiler was found (looked for {cxx!r}; set CXX or install one, e.g. "
                              "`apt-get install g++`)")
    with_cuda, why_not = want_cuda_kernel()
    if why_not:
        warnings.warn(f"collab_fast: {why_not}", RuntimeWarning, stacklevel=4)
    sources = [CSRC / "rescale.cpp"] + ([CSRC / "rescale_cuda.cu"] if with_cuda else [])
    cflags = ["-O3"] + _cpu_flags() + (["-DWITH_CUDA"] if with_cuda else [])
    name = f"collab_fast_ext_{'cuda' if with_cuda else 'cpu'}_{build_key(sources, cflags, with_cuda, cxx)}"
    return name, sources, cflags, with_cuda, cxx


def _failed_before(record: Path) -> str:
    return (f"building the C++ extension failed before in this environment (the compiler's output is in {record}; "
            "delete it to try again)")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_extension(verbose: bool | None = None):
    """Compiles (first time) and loads the C++ extension; returns its pybind11 module. Thread-safe.

    Raises BuildError where it cannot be built here (collab_fast.rescale then uses its PyTorch ops)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        name, sources, cflags, with_cuda, _ = _plan()
        root = cache_root()
        published = root / name / f"{name}.so"
        if _verified(published):  # the common case: no lock, no ninja, no compiler
            mod = _import_built(name, published)
        elif (root / f"{name}.failed").is_file():
            raise BuildError(_failed_before(root / f"{name}.failed"))
        else:
            mod = _build_and_publish(name, root, published, sources, cflags, with_cuda, verbose)
        mod.cuda_kernel = with_cuda
        _module = mod
        return _module


def _build_and_publish(name, root, published, sources, cflags, with_cuda, verbose):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("collab_fast's C++ extension is built with ninja, which was not found (`pip install ninja`)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExtensionError(f"collab_fast: cannot create the extension cache {root} ({exc.strerror}); "
                           "set COLLAB_FAST_CACHE to a writable directory") from None
    fd = _acquire(root / f"{name}.lock", f"the C++ extension {name}")
    try:
        if _verified(published):  # built by the process we waited for
            return _import_built(name, published)
        if (root / f"{name}.failed").is_file():  # ... or failed to
            raise BuildError(_failed_before(root / f"{name}.failed"))
        if published.exists():
            print(f"collab_fast: the published build {published} is damaged (checksum mismatch); rebuilding",
                  file=sys.stderr, flush=True)
        _clear_dead_builds(root, name)
        build_dir = root / f".build-{name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir()
        if verbose is None:
            verbose = os.environ.get("COLLAB_FAST_VERBOSE_BUILD", "0") == "1"
        if not verbose:
            print(f"collab_fast: compiling the C++ extension (once per environment, ~30 s) in {root}",
                  file=sys.stderr, flush=True)
        try:
            module = cpp_extension.load(
                name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                extra_cuda_cflags=["-O3", "-DWITH_CUDA"] if with_cuda else None,
                with_cuda=with_cuda, build_directory=str(build_dir), verbose=verbose)
        except KeyboardInterrupt:
            shutil.rmtree(build_dir, ignore_errors=True)
            print("collab_fast: the C++ extension build was interrupted; nothing was left behind (it builds again "
                  "on the next run)", file=sys.stderr, flush=True)
            raise
        except Exception as exc:
            if "interrupted by user" in str(exc):  # ninja got the Ctrl-C first and reported it as a failure
                shutil.rmtree(build_dir, ignore_errors=True)
                print("collab_fast: the C++ extension build was interrupted; nothing was left behind (it builds "
                      "again on the next run)", file=sys.stderr, flush=True)
                raise KeyboardInterrupt from None
            record = root / f"{name}.failed"
            out = getattr(exc, "output", None) or b""  # a CalledProcessError's (ninja's is in the message)
            out = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
            _write_atomic(record, f"{type(exc).__name__}: {exc}\n{out}")
            shutil.rmtree(build_dir, ignore_errors=True)
            said = next((ln.strip() for ln in str(exc).splitlines() if "error:" in ln.lower()), type(exc).__name__)
            raise BuildError(f"building the C++ extension failed ({said[:200]}; the whole output is in {record}: "
                             "delete it to try again)") from None
        # Publish atomically, checksum first: a reader verifies the .so against it before loading, so a
        # partial or damaged file is never mapped.
        built = build_dir / f"{name}.so"
        published.parent.mkdir(exist_ok=True)
        tmp_sum = build_dir / f"{name}.sha256"
        tmp_sum.write_text(_sha256(built) + "\n")
        os.replace(tmp_sum, published.with_suffix(".sha256"))
        os.replace(built, published)
        shutil.rmtree(build_dir, ignore_errors=True)
        return module
    except OSError as exc:
        raise ExtensionError(f"collab_fast: cannot write the extension cache {root} ({exc.strerror}); "
                           "set COLLAB_FAST_CACHE to a writable directory") from None
    finally:
        os.close(fd)  # releases the flock
