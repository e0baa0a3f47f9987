"""collab_fast.kernels.launch: the cached launch picks the kernel and passes the arguments that Triton's own
kernel[grid](...) would, for every specialisation Triton makes; hooks and the interpreter keep Triton's path.

Needs no GPU: the kernels are compiled for sm_90 and launched through Triton's real C launcher against a
stand-in libcuda (benchmarks/host_loss.py), in a subprocess (the test session runs the interpreter)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collab_fast.kernels import collab_loss as cl
from collab_fast.kernels.launch import CachedLauncher, _key

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

_SCRIPT = r"""
import json, sys
import torch, triton, triton.language as tl
sys.path.insert(0, BENCHMARKS)
import host_loss  # noqa: F401  (installs the stand-in driver: sm_90 compiles, real launcher, stub libcuda)
from triton.runtime import driver
from collab_fast.kernels.launch import CachedLauncher


@triton.jit
def scale_copy(x_ptr, y_ptr, n, stride, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(x_ptr + i * stride, mask=m)
    if FLAG:
        v = v * scale
    tl.store(y_ptr + i, v, mask=m)


calls = []
base = driver.active.launcher_cls


class Recording(base):  # every launch that reaches a C launcher: which kernel, the grid, the kernel's arguments
    def __call__(self, *a):
        calls.append([id(self), list(a[:3]), [x.data_ptr() if isinstance(x, torch.Tensor) else x for x in a[9:]]])
        return super().__call__(*a)


driver.active.launcher_cls = Recording
launch = CachedLauncher(scale_copy, ("BLOCK", "FLAG"))
x, y = torch.randn(4096), torch.empty(4096)
cases = {  # each differs from the first in one thing Triton specialises on (or must not)
    "aligned": ((x, y, 64, 1, 2.0), (64, True), 4),
    "pointer off 16 bytes": ((x[1:], y, 64, 1, 2.0), (64, True), 4),
    "int != 1": ((x, y, 64, 3, 2.0), (64, True), 4),
    "int divisible by 16": ((x, y, 64, 16, 2.0), (64, True), 4),
    "int == 1": ((x, y, 1, 1, 2.0), (64, True), 4),
    "int over 2**31": ((x, y, 2**31 + 16, 1, 2.0), (64, True), 4),
    "negative int": ((x, y, -47, 1, 2.0), (64, True), 4),
    "another float": ((x, y, 64, 1, 0.25), (64, True), 4),
    "another dtype": ((x.half(), y.half(), 64, 1, 2.0), (64, True), 4),
    "another constexpr": ((x, y, 64, 1, 2.0), (64, False), 4),
    "another block": ((x, y, 64, 1, 2.0), (128, True), 4),
    "more warps": ((x, y, 64, 1, 2.0), (64, True), 8),
    "aligned again": ((x, y, 64, 1, 2.0), (64, True), 4),
}
out = {}
for name, (args, consts, warps) in cases.items():
    hits = launch.hits
    calls.clear()
    launch(3, args, consts, warps)  # a miss (through Triton) or a hit
    launch(3, args, consts, warps)  # a hit
    scale_copy[(3,)](*args, BLOCK=consts[0], FLAG=consts[1], num_warps=warps)  # Triton's own choice
    out[name] = {"calls": calls[:], "hits": launch.hits - hits}

seen = []
hook = lambda *a, **k: seen.append(1)
rt = triton.knobs.runtime
if hasattr(rt.launch_enter_hook, "add"):  # Triton >= 3.7: a chain of hooks
    rt.launch_enter_hook.add(hook)
else:
    rt.launch_enter_hook = hook
hits = launch.hits
calls.clear()
launch(3, (x, y, 64, 1, 2.0), (64, True), 4)
out["hooked"] = {"calls": calls[:], "hits": launch.hits - hits, "hook_calls": len(seen)}
out["kernels"] = len(launch.kernels)
print("RESULT", json.dumps(out))
""".replace("BENCHMARKS", repr(str(BENCHMARKS)))


def _needs_stub_build():
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler (cc) to build the stand-in libcuda and Triton's launcher")


@pytest.mark.slow
def test_cached_launch_equals_tritons_own_for_every_specialisation(tmp_path):
    _needs_stub_build()
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "launch_check.py"  # a file: @triton.jit reads its function's source
    script.write_text(_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    kernels = set()
    for name, r in out.items():
        if name in ("hooked", "kernels"):
            continue
        first, second, triton_own = r["calls"]
        # the cached launch (the second call at least) chose Triton's kernel with Triton's arguments
        assert second == triton_own, (name, second, triton_own)
        assert first == triton_own, (name, first, triton_own)
        # a first call misses unless an earlier case has its specialisation (a float's value is not one)
        assert r["hits"] == (2 if name in ("aligned again", "another float") else 1), (name, r["hits"])
        kernels.add(triton_own[0])
    # every case but those two is a specialisation of its own: a compiled kernel each
    assert len(kernels) == len(out) - 4, kernels
    assert out["kernels"] == len(out) - 4  # the cache holds one entry per specialisation, not per call
    hooked = out["hooked"]
    assert hooked["hits"] == 0 and hooked["hook_calls"] == 1 and len(hooked["calls"]) == 1  # Triton's path


def test_key_separates_what_triton_specialises_on():
    x = torch.zeros(64)
    k = lambda *a: _key(a)
    assert k(x) == k(torch.zeros(8)) != k(x[1:])  # alignment, not size
    assert k(x) != k(x.half())
    assert k(1) != k(2) and k(2) == k(3) != k(16) == k(32)
    assert k(2**31 - 15) != k(2**31 + 1) != k(2**63 + 1)
    assert k(-16) != k(-2**31 - 16)
    assert k(0.5) == k(2.0)
    assert k(True) != k(False) and k(True) != k(1)


def test_interpreter_and_replaced_run_take_tritons_path(monkeypatch):
    # Under the interpreter (this session) the kernel is an InterpretedFunction: the launcher hands every call
    # to kernel[grid](...), which runs it; nothing is cached.
    z = torch.randn(2, 3, 20)
    y = torch.tensor([1, 2, 3])
    loss, _, _, _ = cl.launch.launch(z, y, cl.CollabLossParams(impl="triton"))
    ref = cl.collab_loss_reference(z.double(), y)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    assert cl.launch.kernel_launcher.kernels == {} and cl.launch.kernel_launcher.hits == 0

    class Fn:  # a compiled kernel whose run was replaced (a caller compiling without launching)
        device_caches = {}
        pre_run_hooks = []

        def __init__(self):
            self.seen = []
            self.run = lambda *a, grid, warmup, **k: self.seen.append((grid, a, k))

        def __getitem__(self, grid):
            return lambda *a, **k: self.run(*a, grid=grid, warmup=False, **k)

    fn = Fn()
    launcher = CachedLauncher(fn, ("B",))
    launcher(2, (z, 3), (16,), 4)
    launcher(2, (z, 3), (16,), 4)
    assert len(fn.seen) == 2 and fn.seen[0][2] == {"B": 16, "num_warps": 4} and launcher.kernels == {}


class _Compiled:
    """What Triton's compile returns, as far as the launcher looks: the options it was built with, the local
    memory the driver reports once loaded (n_spills, in 4-byte words), and a C launcher."""

    def __init__(self, fn, options):
        self.fn, self.options = fn, options
        self.function = self.packed_metadata = None

    def _init_handles(self):
        self.n_spills = self.fn.spill_words.get(self.options.get("maxnreg"), 0)

    def run(self, *a):
        self.fn.launches.append(("cached", self.options))


class _CappedFn:
    device_caches = {}
    pre_run_hooks = []

    def __init__(self, spill_words):
        self.spill_words = spill_words  # maxnreg -> local words of the kernel compiled under it
        self.launches, self.warmups = [], []

    def _options(self, kw):
        return {k: v for k, v in kw.items() if k in ("num_warps", "maxnreg")}

    def warmup(self, *a, grid, **kw):
        self.warmups.append(self._options(kw))
        return _Compiled(self, self._options(kw))

    def __getitem__(self, grid):
        def launch(*a, **kw):
            self.launches.append(("triton", self._options(kw)))
            return _Compiled(self, self._options(kw))
        return launch


@pytest.mark.parametrize("words, kept", [(0, True), (6, True), (7, False), (40, False)])
def test_a_register_cap_is_kept_only_where_the_capped_kernel_does_not_spill(monkeypatch, words, kept):
    # The first launch of a key compiles under the cap and loads the kernel: at most LOCAL_BYTES_OK (24 bytes,
    # 6 words) of local memory a thread keeps the cap, more runs the key uncapped; later launches of the key
    # reuse the choice through the cached C launcher, with no second compile.
    import types

    from collab_fast.kernels import launch as launch_mod

    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0)
    monkeypatch.setattr(launch_mod, "driver", types.SimpleNamespace(active=active))
    fn = _CappedFn({128: words})
    launcher = CachedLauncher(fn, ("B",))
    z = torch.zeros(8)
    launcher(2, (z, 3), (16,), 4, 0, 128)
    launcher(2, (z, 3), (16,), 4, 0, 128)
    want = {"num_warps": 4, "maxnreg": 128} if kept else {"num_warps": 4}
    assert fn.warmups == [{"num_warps": 4, "maxnreg": 128}]
    assert fn.launches == [("triton", want), ("cached", want)]
    assert launch_mod.LOCAL_BYTES_OK == 24


@pytest.mark.parametrize("words, kept", [(0, True), (40, False)])
def test_a_watched_launch_decides_the_cap_once_per_key(monkeypatch, words, kept):
    # With a profiler's launch hook every launch takes Triton's path (so the hook sees it), but the cap check
    # (a compile and load under the cap) runs once per key, not per launch.
    import types

    from collab_fast.kernels import launch as launch_mod

    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0)
    monkeypatch.setattr(launch_mod, "driver", types.SimpleNamespace(active=active))
    fn = _CappedFn({128: words})
    fn.pre_run_hooks = [lambda *a, **k: None]  # watched, as a launch hook makes it
    launcher = CachedLauncher(fn, ("B",))
    z = torch.zeros(8)
    for _ in range(3):
        launcher(2, (z, 3), (16,), 4, 0, 128)
    launcher(2, (z, 3), (32,), 4, 0, 128)  # another key: checked again
    want = {"num_warps": 4, "maxnreg": 128} if kept else {"num_warps": 4}
    assert fn.warmups == [{"num_warps": 4, "maxnreg": 128}] * 2
    assert fn.launches == [("triton", want)] * 4 and launcher.kernels == {} and launcher.hits == 0


def test_no_register_cap_compiles_once(monkeypatch):
    import types

    from collab_fast.kernels import launch as launch_mod

    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0)
    monkeypatch.setattr(launch_mod, "driver", types.SimpleNamespace(active=active))
    fn = _CappedFn({})
    launcher = CachedLauncher(fn, ("B",))
    launcher(2, (torch.zeros(8), 3), (16,), 4, 0)
    assert fn.warmups == [] and fn.launches == [("triton", {"num_warps": 4})]


_CAP_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, BENCHMARKS)
import host_loss  # the stand-in driver: sm_90 compiles, Triton's real launcher, a stub libcuda
from collab_fast.kernels import collab_loss as cl

words = int(sys.argv[1])
load = host_loss._StubUtils.load_binary
host_loss._StubUtils.load_binary = lambda self, *a: (*load(self, *a)[:3], words, 1024)  # local memory, 4-byte words
z = torch.randn(8, 4, 5000)  # a looped row of 8 heads: the launcher asks for a cap
y = torch.randint(0, 5000, (4,))
for _ in range(2):
    loss = cl.launch.launch(z, y, cl.CollabLossParams())[0]
out = [[key[3], getattr(k.metadata, "maxnreg", None)] for key, k in cl.launch.kernel_launcher.kernels.items()]
print("RESULT", json.dumps({"kernels": out, "hits": cl.launch.kernel_launcher.hits, "loss": float(loss)}))
""".replace("BENCHMARKS", repr(str(BENCHMARKS)))


@pytest.mark.slow
@pytest.mark.parametrize("words, kept", [(0, True), (16, False)])
def test_the_loss_launch_keeps_its_register_cap_unless_the_kernel_spills(tmp_path, words, kept):
    # Through Triton's own warmup and load (the driver stubbed: it reports `words` of local memory): the
    # kernel cached for the key is the one compiled under maxnreg 128, or the uncapped one.
    _needs_stub_build()
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "cap_check.py"
    script.write_text(_CAP_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(words)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["kernels"] == [[128, 128 if kept else None]], out
    assert out["hits"] == 1, out  # the second call: the cached kernel, no second choice
