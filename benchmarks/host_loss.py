"""Host cost of one fused-loss call, measured on a CPU with the CUDA driver stubbed (no GPU needed).

The loss kernel is compiled for sm_90 (as benchmarks/sass_loss.py does) and launched through Triton's real
C launcher, built against a stand-in libcuda whose entry points return success at once; the tensors are CPU
tensors standing for device memory (nothing runs on them). So each figure is the host work up to the
driver: Python, autograd, ATen's allocations and small ops (CPU kernels here, not CUDA launches), the
launcher. Where a GPU is the target these are the microseconds the GPU waits for when a step is host-bound.

Per provider and call: ATen ops, ops that would launch a GPU kernel, Triton launches, allocations, host syncs,
Python function calls, and CPU microseconds (process time; rounds interleaved across providers; median
[min, max] over rounds).

    python benchmarks/host_loss.py                          # H4 N256 C1000 fp32: markdown + JSON in results/
    python benchmarks/host_loss.py --shape 2,4096,128256 --rounds 5 --calls 100

Providers: ours-api (fused_collab_loss fwd+bwd: settings checked on each call), ours-trainer (the trainer's
call: collab_loss with settings built once, return_stats, the loss times a scale, backward), ours-fwd-nograd
(forward under no_grad: evaluation), launch-fwd (one forward launch through the launcher), triton-jit-fwd (the
same forward launched as kernel[grid](...): Triton's own binder and cache lookup per call), autograd-floor (an
empty autograd.Function forward + backward: the floor of any Python autograd.Function).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled and launched, not interpreted
import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, versions, write_tables  # noqa: E402
from sass_loss import _Sm90  # noqa: E402

# Entry points of libcuda that Triton's launchers (3.6's generated one, 3.7+'s driver module) link against.
_STUB_C = r"""
#include <stddef.h>
#include "cuda.h"
#define OK return CUDA_SUCCESS
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)1; OK; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) { OK; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *d) { *d = 0; OK; }
CUresult CUDAAPI cuCtxGetLimit(size_t *v, CUlimit l) { *v = 0; OK; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit l, size_t v) { OK; }
CUresult CUDAAPI cuDeviceGet(CUdevice *d, int i) { *d = 0; OK; }
CUresult CUDAAPI cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) { *v = 0; OK; }
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { *c = (CUcontext)1; OK; }
CUresult CUDAAPI cuDriverGetVersion(int *v) { *v = 13000; OK; }
CUresult CUDAAPI cuFuncGetAttribute(int *v, CUfunction_attribute a, CUfunction f) { *v = 0; OK; }
CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) { OK; }
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { OK; }
CUresult CUDAAPI cuGetErrorString(CUresult e, const char **s) { *s = "stub"; OK; }
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **p, void **x) { OK; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *f, CUmodule m, const char *n) { *f = (CUfunction)1; OK; }
CUresult CUDAAPI cuModuleLoadData(CUmodule *m, const void *img) { *m = (CUmodule)1; OK; }
CUresult CUDAAPI cuModuleUnload(CUmodule m) { OK; }
CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *c) { *n = 1; OK; }
CUresult CUDAAPI cuPointerGetAttribute(void *d, CUpointer_attribute a, CUdeviceptr p) { *(CUdeviceptr *)d = p; OK; }
CUresult CUDAAPI cuPointerGetAttributes(unsigned n, CUpointer_attribute *a, void **d, CUdeviceptr p) { OK; }
CUresult CUDAAPI cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *st) { *st = CU_STREAM_CAPTURE_STATUS_NONE; OK; }
"""


def stub_libcuda() -> Path:
    """Builds the stand-in libcuda.so.1 (once per Triton install) and loads it, so that the launchers Triton
    builds and loads next bind to it (a loaded library is found by its soname)."""
    include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    folder = Path(tempfile.gettempdir()) / f"collab_fast_stub_libcuda_{abs(hash(str(include))):x}"
    lib = folder / "libcuda.so.1"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        src = folder / "stub.c"
        src.write_text(_STUB_C)
        tmp = folder / f"libcuda.so.1.{os.getpid()}"
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", f"-I{include}", "-Wl,-soname,libcuda.so.1", "-o", str(tmp),
                        str(src)], check=True)
        os.replace(tmp, lib)
        if not (folder / "libcuda.so").exists():
            os.symlink("libcuda.so.1", folder / "libcuda.so")
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    os.environ["TRITON_LIBCUDA_PATH"] = str(folder)
    return folder


class _StubUtils:
    """Triton's driver utilities with binaries 'loaded' as dummies (3.7+: its real module, built against
    the stub, for the generic launcher)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        if self.real is None:
            raise AttributeError(name)
        return getattr(self.real, name)

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 128, 0, 1024  # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}


class StubDriver(_Sm90):
    """An H100 as far as Triton's compiler and launcher can tell, with CPU tensors for device memory."""

    def __init__(self):
        from triton.backends.nvidia import driver as nv

        super().__init__(None)
        self.launcher_cls = nv.CudaLauncher
        self.utils = _StubUtils(None if hasattr(nv, "make_launcher") else nv.CudaUtils())

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_capability(self, device=0):
        return (9, 0)

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


def install() -> None:
    stub_libcuda()
    driver.set_active(StubDriver())


install()
from collab_fast import fused_collab_loss  # noqa: E402
from collab_fast.kernels import collab_loss as cl  # noqa: E402

cl.api.check_triton_usable = lambda device: None  # CPU tensors stand for CUDA ones
cl.api.labels_checked_on_host = lambda target: False  # as on CUDA: labels are checked in the kernel, no sync
_kept: dict = {}  # as on CUDA: one workspace per stream (and H), left zeroed by the kernel; a dict lookup here
cl.launch.workspace = lambda heads, device: _kept.get(heads) if heads in _kept else _kept.setdefault(
    heads, torch.zeros(3 * heads + 3))

_NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "alias", "detach", "unsqueeze",
              "squeeze", "slice", "select", "permute", "empty", "empty_strided", "empty_like", "new_empty",
              "new_empty_strided", "_reshape_alias", "lift_fresh", "unbind", "split", "split_with_sizes",
              "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}
_SYNCS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select", "unique", "_unique2",
          "repeat_interleave"}


class _Count(TorchDispatchMode):
    """ATen ops after autograd; an allocation is an output whose storage is none of the inputs'."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        flat = [a for v in list(args) + list((kwargs or {}).values()) for a in (v if isinstance(v, (list, tuple))
                                                                                 else [v])]
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if (isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0
                    and t.untyped_storage().data_ptr() not in inputs):
                self.allocations += 1
        return out


class _CountLaunches:
    def __init__(self, launcher):
        self.launcher, self.calls = launcher, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.launcher(*a, **k)


def count(fn, calls: int = 5) -> dict:
    import cProfile
    import pstats

    for _ in range(3):
        fn()
    real = cl.launch.kernel_launcher
    cl.launch.kernel_launcher = counter = _CountLaunches(real)
    try:
        with _Count() as c:
            for _ in range(calls):
                fn()
    finally:
        cl.launch.kernel_launcher = real
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    ops = sum(c.ops.values())
    kernels = sum(v for k, v in c.ops.items() if k not in _NO_KERNEL)
    return {"aten_ops": ops / calls, "aten_kernels": kernels / calls, "triton_launches": counter.calls / calls,
            "allocations": c.allocations / calls, "host_syncs": sum(c.ops[k] for k in _SYNCS) / calls,
            "python_calls": pstats.Stats(prof).total_calls / calls,
            "ops": {k: v / calls for k, v in c.ops.most_common()}}


def interleaved(fns: dict, rounds: int, calls: int) -> dict:
    """CPU µs per call of each provider: `rounds` rounds, the order rotated each round."""
    for f in fns.values():
        for _ in range(20):
            f()
    keys, times = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            f = fns[k]
            t0 = time.process_time()
            for _ in range(calls):
                f()
            times[k].append((time.process_time() - t0) / calls * 1e6)
    return {k: {"us": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.new_empty(())

    @staticmethod
    def backward(ctx, g):
        return None


def providers(heads: int, rows: int, classes: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    z0 = torch.randn(heads, rows, classes).to(dtype)
    y = torch.randint(0, classes, (rows,))
    z = z0.clone().requires_grad_()
    params = cl.CollabLossParams(temperature=2.0, beta=0.5, impl="triton")
    scale = 1.0

    def api():
        z.grad = None
        fused_collab_loss(z, y, temperature=2.0, beta=0.5, impl="triton").backward()

    def trainer():
        z.grad = None
        loss, stats = cl.collab_loss(z, y, params, return_stats=True)
        (loss * scale).backward()

    def fwd_nograd():
        with torch.no_grad():
            cl.collab_loss(z0, y, params, return_stats=True)

    def launch_fwd():
        cl.launch.launch(z0, y, params, return_stats=True)

    captured = {}
    real = cl.launch.kernel_launcher

    def capture(grid0, args, constexprs, num_warps, device=None, maxnreg=None, fit=None):  # (fit: looped rows only)
        options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
        captured["launch"] = (grid0, args, dict(zip(cl.launch.CONSTEXPRS, constexprs)), options)

    cl.launch.kernel_launcher = capture
    try:
        launch_fwd()
    finally:
        cl.launch.kernel_launcher = real
    grid0, args, consts, options = captured["launch"]

    def triton_jit_fwd():
        cl.jit.collab_loss_kernel[(grid0,)](*args, **consts, **options)

    def floor():
        z.grad = None
        _Empty.apply(z).backward()

    return {"ours-api": api, "ours-trainer": trainer, "ours-fwd-nograd": fwd_nograd, "launch-fwd": launch_fwd,
            "triton-jit-fwd": triton_jit_fwd, "autograd-floor": floor}


COLUMNS = ["provider", "us", "min", "max", "aten_ops", "aten_kernels", "triton_launches", "allocations",
           "host_syncs", "python_calls"]


def markdown(rows: list, meta: dict) -> str:
    lines = [f"# Host cost of one loss call: {meta['shape']}, CPU with the CUDA driver stubbed", "",
             f"- date: {meta['date']}; machine: {meta['machine']}; versions: {meta['versions']}",
             f"- command: `{meta['command']}`",
             "- CPU µs per call (process time), median [min, max] over interleaved rounds; ops, launches and "
             "allocations per call. Not a GPU measurement: the host work a GPU would wait for.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4,256,1000", metavar="H,N,C", help="heads, rows, classes")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=300, help="calls per provider and round")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON here ('-': stdout, nothing else printed)")
    ap.add_argument("--out", metavar="DIR", default=str(RESULTS_DIR), help="where the markdown + JSON go")
    args = ap.parse_args(argv)
    try:
        heads, rows, classes = (int(v) for v in args.shape.split(","))
        assert heads > 0 and rows > 0 and classes > 0
    except (ValueError, AssertionError):
        ap.error(f"--shape: {args.shape!r} is not three positive integers H,N,C (e.g. 4,256,1000)")
    if args.rounds < 1 or args.calls < 1:
        ap.error("--rounds and --calls must be >= 1")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    fns = providers(heads, rows, classes, dtype)
    counts = {k: count(f) for k, f in fns.items()}
    times = interleaved(fns, args.rounds, args.calls)
    rows_out = [dict(provider=k, **times[k], **{c: counts[k][c] for c in COLUMNS[4:]}, ops=counts[k]["ops"])
                for k in fns]
    if args.json == "-":
        print(json.dumps(rows_out))
        return 0
    meta = {"shape": f"H{heads} N{rows} C{classes} {args.dtype}", "date": str(datetime.date.today()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "versions": versions(), "command": " ".join(["python benchmarks/host_loss.py", *(argv or sys.argv[1:])])}
    write_tables(markdown(rows_out, meta), {"meta": meta, "rows": rows_out}, args.json, args.out,
                 f"host_loss_cpu-stub-driver_H{heads}N{rows}C{classes}{args.dtype}_triton{triton.__version__}_"
                 f"{datetime.date.today()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
