"""Does a C++ exception (TORCH_CHECK) thrown inside a JIT-built extension reach Python on this machine?

Run by scripts/gpu_check.sh when the ops tests crash (seen once on an H200 image: torch 2.11.0+cu130, a
SIGSEGV where tests/test_rescale.py::test_bad_input expects a RuntimeError). Each case runs in a child
process, so a crash is reported, not suffered:
  1. collab_fast's extension: scaled_sum with a NaN scale (its TORCH_CHECK), from Python;
  2. a minimal extension built here with the same torch.utils.cpp_extension, whose only function throws, called
     through pybind11 and through a TORCH_LIBRARY op; built with and without -fno-omit-frame-pointer;
  3. case 1 under cuda-gdb (where there is one), for the crashing frame.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

OURS = """
import torch
from collab_fast.rescale import ensure_ops
print("backend", ensure_ops(), flush=True)
try:
    torch.ops.collab_fast.scaled_sum([torch.randn(3)], float("nan"))
except RuntimeError as exc:
    print("raised:", str(exc).splitlines()[0][:100])
"""

MINIMAL = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
src = '''
#include <torch/extension.h>
#include <torch/library.h>
at::Tensor always_throws(const at::Tensor& x) { TORCH_CHECK(false, "thrown on purpose"); return x; }
TORCH_LIBRARY(diag_exc_%(tag)s, m) { m.def("throws(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(diag_exc_%(tag)s, CPU, m) { m.impl("throws", &always_throws); }
'''
mod = load_inline("diag_exc_%(tag)s", cpp_sources=[src], functions=["always_throws"],
                  extra_cflags=%(flags)r, build_directory=sys.argv[1], verbose=False)
for name, call in (("pybind11", lambda: mod.always_throws(torch.ones(1))),
                   ("torch.ops", lambda: torch.ops.diag_exc_%(tag)s.throws(torch.ones(1)))):
    try:
        call()
    except RuntimeError as exc:
        print(name, "raised:", str(exc).splitlines()[0][:60], flush=True)
"""


def child(code: str, *args: str, timeout: int = 240) -> None:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    print((res.stdout + res.stderr).strip()[-1500:])
    print(f"-> exit {res.returncode}{' (SIGSEGV)' if res.returncode in (-11, 139) else ''}", flush=True)


def main() -> int:
    print("== 1. collab_fast extension, scaled_sum(nan)", flush=True)
    child(OURS)
    for tag, flags in (("plain", ["-O3"]), ("fp", ["-O3", "-fno-omit-frame-pointer"])):
        print(f"== 2. minimal extension, flags {flags}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            child(MINIMAL % {"tag": tag, "flags": flags}, d)
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb:
        print(f"== 3. case 1 under {os.path.basename(gdb)}", flush=True)
        res = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "--args", sys.executable, "-c", OURS],
                             capture_output=True, text=True, timeout=240)
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("#") or "SIGSEGV" in ln
                 or "raised" in ln]
        print("\n".join(lines[:40]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
