"""The rescaling ops' build (collab_fast.extension): backends on machines without nvcc or without a compiler,
verified published builds, locking between processes and environments, the CUDA kernel's compile for sm_90."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CPU_ARCH, HAS_CUDA

from collab_fast import extension, rescale
from collab_fast.rescale import scaled_sum

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("built_extension")


def test_build_info():
    info = rescale.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert set(info["ops"]) == {"scaled_sum"}
    assert info["cuda"] == (HAS_CUDA and extension.load_extension().cuda_kernel)



_TRAIN_SPLIT = """
import sys, warnings, torch
warnings.simplefilter("always")
from collab_fast import fused_collab_loss, rescale
from collab_fast.models import build
torch.manual_seed(0)
model = build(sys.argv[1], "hier4", num_classes=10)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
losses = []
for _ in range(3):
    loss = fused_collab_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step(); losses.append(float(loss))
table = torch._C._dispatch_dump_table("collab_fast::scaled_sum").splitlines()
cuda = [ln for ln in table if ln.startswith("CUDA:")]
auto = [ln for ln in table if ln.startswith("AutogradCUDA:")]
g = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
torch.library.opcheck(torch.ops.collab_fast.scaled_sum, (g, 0.5))
print("BACKEND", rescale.build_info()["backend"], rescale.build_info()["cuda_impl"])
print("CUDA", cuda[0] if cuda else "none")
print("AUTOGRAD_CUDA", auto[0] if auto else "none")
print("LOSSES", losses)
"""


def _run_split_training(tmp_path, **env):
    full = dict(os.environ, COLLAB_FAST_CACHE=str(tmp_path / "cache"), **env)
    res = subprocess.run([sys.executable, "-c", _TRAIN_SPLIT, CPU_ARCH], env=full, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in res.stdout.splitlines() if ln.split(" ", 1)[0].isupper())
    return lines, res.stderr


def test_no_compiler_registers_the_torch_ops_and_trains(tmp_path):
    # No C++ compiler at all (CXX names none): the plain-PyTorch ops under the same names, for every device
    # (CUDA included), one warning, and a split pattern trains.
    lines, err = _run_split_training(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert lines["BACKEND"] == "torch torch"
    assert "rescale.py" in lines["CUDA"] and "kernel" in lines["CUDA"]  # a CUDA kernel is registered
    assert "autograd kernel" in lines["AUTOGRAD_CUDA"]
    assert err.count("no C++ compiler was found") == 1 and "plain-PyTorch ops" in err
    losses = eval(lines["LOSSES"])
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("collab_fast_ext_*"))


def test_a_compiler_that_fails_falls_back_once_and_is_remembered(tmp_path):
    # A compiler that exists but fails (a broken toolchain, headers missing): the plain-PyTorch ops with one
    # warning naming the failure, and the failure remembered, so the next process does not compile again.
    calls = tmp_path / "calls"
    cxx = tmp_path / "broken-c++"
    cxx.write_text(f"#!/bin/sh\ncase \"$1\" in --version|-dump*) exec c++ \"$@\";; esac\necho x >> {calls}\n"
                   "echo 'fatal error: torch/extension.h: No such file' >&2\nexit 1\n")
    cxx.chmod(0o755)
    lines, err = _run_split_training(tmp_path, CXX=str(cxx))
    assert lines["BACKEND"] == "torch torch"
    assert all(math.isfinite(v) for v in eval(lines["LOSSES"]))
    warned = [ln for ln in err.splitlines() if "building the C++ extension failed" in ln]
    assert len(warned) == 1 and "plain-PyTorch ops" in warned[0] and "No such file" in warned[0], err[-3000:]
    records = list((tmp_path / "cache").glob("collab_fast_ext_*.failed"))
    assert len(records) == 1 and "No such file" in records[0].read_text()
    assert not list((tmp_path / "cache").glob(".build-*"))  # the failed build's directory is gone
    compiled = calls.read_text().count("x")
    lines, err = _run_split_training(tmp_path, CXX=str(cxx))
    assert lines["BACKEND"] == "torch torch" and "failed before" in err and "delete it to try again" in err
    assert calls.read_text().count("x") == compiled  # not compiled again
    records[0].unlink()  # deleting the record retries the build
    _run_split_training(tmp_path, CXX=str(cxx))
    assert calls.read_text().count("x") > compiled


def test_no_nvcc_build_registers_aten_calls_for_cuda(tmp_path):
    # A compiler but no nvcc (a pip-installed CUDA torch): the C++ build registers its ATen implementation
    # for the CUDA key, so CUDA tensors are accepted, and a split pattern trains.
    lines, err = _run_split_training(tmp_path, CUDA_HOME=str(tmp_path / "no-cuda"))
    assert lines["BACKEND"] == "cpp aten"
    assert "rescale.cpp" in lines["CUDA"]
    assert "no C++ compiler" not in err
    assert all(math.isfinite(v) for v in eval(lines["LOSSES"]))


def test_no_nvcc_on_a_cuda_machine_warns_once_naming_the_cost(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with_cuda, why = extension.want_cuda_kernel()
    assert not with_cuda
    assert "nvcc was not found" in why and "ATen calls" in why and "1.7x" in why


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 9])
def test_aten_implementation_equals_the_kernel(dtype, n):
    # What CUDA tensors run in a build without nvcc (and any other device): the same arithmetic as the
    # kernels, so the same bits, here against the CPU kernel; channels-last layouts kept.
    torch.manual_seed(n)
    g = [torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last) for _ in range(n)]
    mod = extension.load_extension()
    want = torch.ops.collab_fast.scaled_sum(g, 1 / 3)
    got = mod.scaled_sum_aten(g, 1 / 3)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    mixed = [g[0], g[-1].contiguous()]
    assert torch.equal(mod.scaled_sum_aten(mixed, 0.5), torch.ops.collab_fast.scaled_sum(mixed, 0.5))


def test_torch_ops_match_the_cpp_ops():
    # The fallback, called directly (registering it would clash with the loaded C++ op).
    torch.manual_seed(0)
    for dtype in DTYPES:
        g = [torch.randn(3, 37).to(dtype) for _ in range(3)]
        assert torch.equal(rescale._scaled_sum_torch(g, 0.25), scaled_sum(g, 0.25))
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="finite"):
        rescale._scaled_sum_torch([x.detach()], float("inf"))


def test_a_damaged_published_build_is_rebuilt_not_loaded(tmp_path):
    # A truncated .so (a full disk, a copy cut short) would kill the process with SIGBUS when mapped: it is
    # checked against its checksum first and rebuilt.
    name = _ext_name()
    src = extension.cache_root() / name
    (tmp_path / name).mkdir()
    so = tmp_path / name / f"{name}.so"
    so.write_bytes((src / f"{name}.so").read_bytes()[:4096])
    (tmp_path / name / f"{name}.sha256").write_text((src / f"{name}.sha256").read_text())
    res = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "loaded" in res.stdout, res.stderr[-2000:]
    assert "damaged" in res.stderr
    assert so.read_bytes() == (src / f"{name}.so").read_bytes() or so.stat().st_size > 4096


# -------------------------------------------------------------------------- loading: no hang, no thrash

_LOAD = "import torch, collab_fast; collab_fast.grad_rescale(torch.ones(2, requires_grad=True), .5); print('loaded')"


def _env(cache, **extra):
    return dict(os.environ, COLLAB_FAST_CACHE=str(cache), **extra)


def _hold_lock(lock_path):
    # A live process that holds the build lock (as a builder would) until killed.
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'process %d on test' % os.getpid(), 0); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _ext_name():
    extension.load_extension()
    return extension._plan()[0]  # this environment's build (a cache may hold other environments')


def test_loading_a_published_build_takes_no_lock(tmp_path):
    # Copy this session's published build into a fresh cache, and hold its lock from a live process:
    # loading must still succeed at once (it used to wait on the lock, or run ninja).
    name = _ext_name()
    (tmp_path / name).mkdir()
    src = extension.cache_root() / name / f"{name}.so"
    (tmp_path / name / f"{name}.so").write_bytes(src.read_bytes())
    (tmp_path / name / f"{name}.sha256").write_bytes(src.with_suffix(".sha256").read_bytes())
    holder = _hold_lock(tmp_path / f"{name}.lock")
    try:
        res = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path), capture_output=True, text=True,
                             timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0 and "loaded" in res.stdout, res.stderr[-2000:]
    assert "waiting" not in res.stderr and "compiling" not in res.stderr


def test_waiting_on_a_live_builder_says_whom(tmp_path):
    name = _ext_name()
    holder = _hold_lock(tmp_path / f"{name}.lock")
    try:
        res = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path, COLLAB_FAST_BUILD_TIMEOUT="2"),
                             capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode != 0
    assert f"waiting for process {holder.pid} on test" in res.stderr
    assert "COLLAB_FAST_BUILD_TIMEOUT" in res.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_builder_killed_mid_build_does_not_block_the_next(tmp_path):
    # The repro of the hang: kill -9 a process while it builds (lock taken, private build directory
    # present); the next process must build and load, and clear the dead builder's directory.
    p = subprocess.Popen([sys.executable, "-c", _LOAD], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".build-*/*.ninja")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("*.lock")), "the builder never took its lock"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not list(tmp_path.glob("collab_fast_ext_*/*.so")), "killed before publishing"
    res = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "loaded" in res.stdout, res.stderr[-2000:]
    assert len(list(tmp_path.glob("collab_fast_ext_*/*.so"))) == 1
    assert not list(tmp_path.glob(".build-*")), "the dead builder's directory was left behind"


@pytest.mark.slow
def test_ctrl_c_during_the_first_build_is_one_line(tmp_path):
    # Ctrl-C reaches the whole process group (the trainer and ninja's compilers) while the extension builds:
    # one line each, exit 130, no traceback, nothing left that blocks the next build.
    cmd = [sys.executable, "-m", "collab_fast.train", "digits", "--device", "cpu", "--arch", CPU_ARCH,
           "--pattern", "ilr2", "--max-steps", "1", "--output", str(tmp_path / "run")]
    p = subprocess.Popen(cmd, env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob(".build-*/*.ninja")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the compilers are running
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "build was interrupted" in err and "interrupted during setup" in err
    assert not list((tmp_path / "cache").glob(".build-*"))


_STATIC_LIBSTDCXX = """
import sys, torch
from torch.utils.cpp_extension import load
load("collab_fast_static_probe", [sys.argv[1]], extra_cflags=["-O3"], extra_ldflags=["-static-libstdc++"],
     build_directory=sys.argv[2])
ops = torch.ops.collab_fast
for call in (lambda: ops.scaled_sum([torch.randn(3)], float("nan")),
             lambda: ops.scaled_sum([torch.randn(3), torch.randn(2, 2)], 1.0),
             lambda: ops.scaled_sum([torch.randn(3), torch.randn(3).double()], 1.0),
             lambda: ops.scaled_sum([torch.arange(3)], 1.0)):
    try:
        call()
    except RuntimeError as exc:
        print("MSG", str(exc).splitlines()[0])
"""


@pytest.mark.slow
def test_error_messages_survive_a_statically_linked_libstdcxx(tmp_path):
    # Some toolchains link parts of libstdc++ into the extension; its iostream facets then do not match the
    # process's locale and `stream << number` in TORCH_CHECK prints nothing (here, -static-libstdc++) or
    # crashes (SIGSEGV on an H200 image, torch 2.11). The messages must still name their numbers.
    src = Path(extension.__file__).parent / "csrc" / "rescale.cpp"
    res = subprocess.run([sys.executable, "-c", _STATIC_LIBSTDCXX, str(src), str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    msgs = [line.removeprefix("MSG ") for line in res.stdout.splitlines() if line.startswith("MSG ")]
    assert len(msgs) == 4, res.stdout
    assert msgs[0].endswith("scale must be a finite number, got nan"), msgs[0]
    assert "grads[1] has shape [2, 2] but grads[0] has [3]" in msgs[1], msgs[1]
    assert "grads[1] is Double but grads[0] is Float" in msgs[2], msgs[2]
    assert "grads[0] must be float32, float64, float16 or bfloat16, got Long" in msgs[3], msgs[3]


def test_build_key_separates_environments(monkeypatch):
    from torch.utils import cpp_extension

    srcs = [extension.CSRC / "rescale.cpp"]
    k0 = extension.build_key(srcs, ["-O3"], False, "c++")
    assert extension.build_key(srcs, ["-O3"], False, "c++") == k0
    assert extension.build_key(srcs, ["-O2"], False, "c++") != k0
    real = cpp_extension.include_paths
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/other/env"] + real(*a, **k))
    assert extension.build_key(srcs, ["-O3"], False, "c++") != k0  # another environment's torch headers
    monkeypatch.undo()
    monkeypatch.setattr(extension.sys, "version", "3.99.0 (other interpreter)")
    assert extension.build_key(srcs, ["-O3"], False, "c++") != k0




@pytest.mark.slow
def test_cuda_kernel_compiles_for_sm90_with_no_stack_frame(tmp_path):
    # nvcc without a GPU: the extension's CUDA kernel compiles for H100, and ptxas reports no stack frame
    # and no spills (the input pointer array stays in the kernel's parameter space).
    import shutil
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    stub = tmp_path / "c10" / "cuda" / "impl"  # a CPU torch ships no CUDA build macros header
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    src = Path(rescale.__file__).parent / "csrc" / "rescale_cuda.cu"
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-Xptxas", "-v", f"-I{tmp_path}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", "-c", str(src),
           "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    frames = [ln for ln in res.stderr.splitlines() if "stack frame" in ln]
    assert frames and all(ln.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
                          for ln in frames), frames[:3]


@pytest.mark.parametrize("damage", ["cache is a file", "lock is a directory"])
def test_an_unusable_extension_cache_is_one_line_from_the_trainer(tmp_path, monkeypatch, damage):
    # COLLAB_FAST_CACHE unusable: the trainer says so in one line (rc 2), no traceback
    cache = tmp_path / "cache"
    monkeypatch.setenv("COLLAB_FAST_CACHE", str(cache))
    if damage == "cache is a file":
        cache.write_text("")
    else:
        name = extension._plan()[0]
        (cache / f"{name}.lock").mkdir(parents=True)
    env = dict(os.environ, COLLAB_FAST_CACHE=str(cache))
    res = subprocess.run([sys.executable, "-m", "collab_fast.train", "digits", "--device", "cpu", "--arch", CPU_ARCH,
                          "--pattern", "ilr2", "--max-steps", "1", "--progress", "off", "--output",
                          str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("collab_fast: ")]
    assert len(err) == 1 and err[0].startswith("error: cannot ") and "extension cache" in err[0], res.stderr
    assert "Traceback" not in res.stderr
