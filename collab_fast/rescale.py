"""Backprop rescaling (paper eq. 5-6): identity forward, gradient times a scale backward.

Math. At a split point H children consume the output x of a shared layer. Autograd would give the
shared layer dL/dx = sum_h g_h, whose variance grows with H. Backprop rescaling inserts I(x):

    I(x) = x,   dI/dx = 1/H        so     dL/dx = (1/H) sum_h g_h                           (eq. 6)

while every branch still receives its own gradient at the single-model rate. In a tree every split point
rescales by 1/(its number of children).

    y  = grad_rescale(x, scale)      forward: x's values, no copy; backward: scale * dy
    ys = branch(x, n, rescale=True)  n tensors, one per child; backward: (dy_1 + ... + dy_n) / n in
                                     one fused pass (each dy read once, the result written once);
                                     rescale=False gives the plain sum (the "no scaling" ablation)

The ops are C++ (csrc/rescale.cpp, csrc/rescale_cuda.cu), registered as torch.ops.collab_fast.*, and
compiled on first use with torch.utils.cpp_extension (ninja), cached under ~/.cache/collab_fast (or
$COLLAB_FAST_CACHE; the project's scripts put it inside their virtual environment) and keyed by
everything that changes the binary. There is no Python fallback: without a compiler the first call
raises a clear error.
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
from torch import nn

__all__ = [
    "GradRescale",
    "branch",
    "branch_reference",
    "build_info",
    "grad_rescale",
    "grad_rescale_reference",
    "load_extension",
    "scaled_sum",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
_lock = threading.Lock()
_module = None


# ----------------------------------------------------------------------------------------------------
# Reference: what autograd does by default (accumulate the children's gradients, then multiply)
# ----------------------------------------------------------------------------------------------------


class _GradRescaleReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def grad_rescale_reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-PyTorch grad_rescale (a Python autograd.Function)."""
    return _GradRescaleReference.apply(x, scale)


def branch_reference(x: torch.Tensor, n: int, rescale: bool = True) -> list[torch.Tensor]:
    """Plain-PyTorch branch: autograd sums the n children's gradients (n - 1 adds), then one scaling."""
    y = grad_rescale_reference(x, 1.0 / n) if rescale else x
    return [y] * n


# ----------------------------------------------------------------------------------------------------
# Build / load. A build is published atomically as <cache>/<name>/<name>.so, <name> hashing everything
# that changes the binary (sources, flags, compiler, torch version and include paths, Python ABI).
# Loading a published build takes no lock. Building happens in a private directory under an flock on
# <cache>/<name>.lock: the kernel releases an flock when its owner dies (kill -9, OOM killer), so a
# crashed builder never blocks the next one, and a waiter says whom it waits for.
# ----------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    if os.environ.get("COLLAB_FAST_CACHE"):
        return Path(os.environ["COLLAB_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "collab_fast"


def _cpu_flags() -> list[str]:
    # at::vec picks its implementation from CPU_CAPABILITY_*; enable AVX2 only where the CPU has it.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if all(f" {f} " in flags or flags.endswith(f" {f}\n") for f in ("avx2", "fma", "f16c")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _want_cuda() -> tuple[bool, str | None]:
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.cuda.is_available():
        return False, None
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, ("a CUDA device is present but nvcc was not found (CUDA_HOME unset or without bin/nvcc): "
                       "the extension is built without its CUDA kernel, and its ops refuse CUDA tensors")
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


def _import_built(name: str, so: Path):
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_timeout() -> float:
    return float(os.environ.get("COLLAB_FAST_BUILD_TIMEOUT", "1800"))


def _acquire(lock_path: Path, what: str):
    """flock on lock_path (released by the kernel if this process dies); prints whom it waits for."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
                raise RuntimeError(
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


def load_extension(verbose: bool | None = None):
    """Compiles (first time) and loads the C++ extension; returns its pybind11 module. Thread-safe."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module

        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise RuntimeError(
                f"collab_fast's C++ extension (backprop rescaling) is compiled on first use, but no C++ compiler "
                f"was found (looked for {cxx!r}; set CXX or install one, e.g. `apt-get install g++`).")
        with_cuda, why_not = _want_cuda()
        if why_not:
            warnings.warn(f"collab_fast: {why_not}", RuntimeWarning, stacklevel=2)
        sources = [_CSRC / "rescale.cpp"] + ([_CSRC / "rescale_cuda.cu"] if with_cuda else [])
        cflags = ["-O3"] + _cpu_flags() + (["-DWITH_CUDA"] if with_cuda else [])
        name = f"collab_fast_ext_{'cuda' if with_cuda else 'cpu'}_{build_key(sources, cflags, with_cuda, cxx)}"
        root = _cache_root()
        published = root / name / f"{name}.so"
        if published.exists():  # the common case: no lock, no ninja, no compiler
            _module = _import_built(name, published)
        else:
            _module = _build_and_publish(name, root, published, sources, cflags, with_cuda, verbose)
        _module.cuda_kernel = with_cuda
        return _module


def _build_and_publish(name, root, published, sources, cflags, with_cuda, verbose):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("collab_fast's C++ extension is built with ninja, which was not found: `pip install ninja`.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"collab_fast: cannot create the extension cache {root} ({exc.strerror}); "
                           "set COLLAB_FAST_CACHE to a writable directory") from None
    fd = _acquire(root / f"{name}.lock", f"the C++ extension {name}")
    try:
        if published.exists():  # built by the process we waited for
            return _import_built(name, published)
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
        except Exception as exc:
            raise RuntimeError(
                f"collab_fast: building the C++ extension in {build_dir} failed ({type(exc).__name__}: "
                f"{str(exc)[-2000:]}). Set COLLAB_FAST_VERBOSE_BUILD=1 to see the compiler output.") from None
        # Publish atomically: a reader sees either no .so or the complete one, never a partial file.
        published.parent.mkdir(exist_ok=True)
        os.replace(build_dir / f"{name}.so", published)
        shutil.rmtree(build_dir, ignore_errors=True)
        return module
    finally:
        os.close(fd)  # releases the flock


def build_info() -> dict:
    """How the loaded extension was built (torch version, CUDA kernel, CPU vector ISA, compiler)."""
    return dict(load_extension().build_info())


def _ops():
    mod = load_extension()
    return torch.ops.collab_fast, mod


def _check_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")


def _check_device(x: torch.Tensor, mod) -> None:
    if x.is_cuda and not mod.cuda_kernel:
        raise RuntimeError("collab_fast's C++ extension was built without its CUDA kernel (no nvcc when it was "
                           "compiled); install the CUDA toolkit and clear ~/.cache/collab_fast to rebuild")


def _check_scale(scale, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    return float(scale)


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------


def grad_rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward (an alias of x, no copy); backward multiplies the gradient by `scale`."""
    _check_tensor(x)
    ops, mod = _ops()
    _check_device(x, mod)
    return ops.grad_rescale(x, _check_scale(scale))


def branch(x: torch.Tensor, n: int, rescale: bool = True) -> list[torch.Tensor]:
    """n aliases of x for n child branches; backward: (g_1 + ... + g_n) / n (or the sum) in one pass."""
    _check_tensor(x)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (the number of child branches), got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n (the number of child branches) must be >= 1, got {n}")
    ops, mod = _ops()
    _check_device(x, mod)
    return list(ops.branch(x, n, 1.0 / n if rescale else 1.0))


def scaled_sum(grads: list[torch.Tensor], scale: float) -> torch.Tensor:
    """scale * (g_1 + ... + g_n) in one pass (the kernel behind both backwards)."""
    if not isinstance(grads, (list, tuple)) or not grads:
        raise TypeError("grads must be a non-empty list of tensors")
    for i, g in enumerate(grads):
        _check_tensor(g, f"grads[{i}]")
    ops, mod = _ops()
    _check_device(grads[0], mod)
    return ops.scaled_sum(list(grads), _check_scale(scale))


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------


class GradRescale(nn.Module):
    """nn.Module form of grad_rescale; where n branches leave a shared layer, scale = 1 / n."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = _check_scale(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_rescale(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
