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
from collab_fast.kernels.launch import LOCAL_BYTES_OK, CachedLauncher, _key

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
    """What Triton's compile returns, as far as the launcher looks: the options and constexprs it was built
    with, the registers and local memory the driver reports once loaded (n_regs; n_spills, in 4-byte words),
    and a C launcher."""

    def __init__(self, fn, options, block=None):
        self.fn, self.options, self.block = fn, options, block
        self.function = self.packed_metadata = None

    def _init_handles(self):
        self.n_spills = self.fn.spill_words.get(self.options.get("maxnreg"), 0)
        self.n_regs = self.fn.regs.get(self.block, self.options.get("maxnreg") or 64)
        if self.block in self.fn.block_spills and self.options.get("maxnreg"):
            self.n_spills = self.fn.block_spills[self.block]

    def run(self, *a):
        self.fn.launches.append(("cached", self.options, a[-1]))


class _CappedFn:
    device_caches = {}
    pre_run_hooks = []

    def __init__(self, spill_words, regs=None, block_spills=None):
        self.spill_words = spill_words  # maxnreg -> local words of the kernel compiled under it
        self.regs = regs or {}  # constexpr B -> registers of the kernel compiled with it
        self.block_spills = block_spills or {}  # constexpr B -> local words under a cap (instead of spill_words)
        self.launches, self.warmups = [], []

    def _options(self, kw):
        return {k: v for k, v in kw.items() if k in ("num_warps", "maxnreg")}

    def warmup(self, *a, grid, **kw):
        self.warmups.append((kw.get("B"), self._options(kw)))
        return _Compiled(self, self._options(kw), kw.get("B"))

    def __getitem__(self, grid):
        def launch(*a, **kw):
            self.launches.append(("triton", self._options(kw), kw.get("B")))
            return _Compiled(self, self._options(kw), kw.get("B"))
        return launch


def _stub_driver(monkeypatch):
    import types

    from collab_fast.kernels import launch as launch_mod

    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0)
    monkeypatch.setattr(launch_mod, "driver", types.SimpleNamespace(active=active))


@pytest.mark.parametrize("words, kept", [(0, True), (6, True), (7, False), (40, False)])
def test_a_register_cap_is_kept_only_where_the_capped_kernel_does_not_spill(monkeypatch, words, kept):
    # The first launch of a key compiles under the cap and loads the kernel: at most LOCAL_BYTES_OK (24 bytes,
    # 6 words) of local memory a thread keeps the cap, more runs the key uncapped; later launches of the key
    # reuse the choice through the cached C launcher, with no second compile.
    _stub_driver(monkeypatch)
    fn = _CappedFn({128: words})
    launcher = CachedLauncher(fn, ("B",))
    z = torch.zeros(8)
    launcher(2, (z, 3), (16,), 4, 0, 128)
    launcher(2, (z, 3), (16,), 4, 0, 128)
    want = {"num_warps": 4, "maxnreg": 128} if kept else {"num_warps": 4}
    assert fn.warmups == [(16, {"num_warps": 4, "maxnreg": 128})]
    assert fn.launches == [("triton", want, 16), ("cached", want, 16)]
    assert LOCAL_BYTES_OK == 24


@pytest.mark.parametrize("words, kept", [(0, True), (40, False)])
def test_a_watched_launch_decides_the_cap_once_per_key(monkeypatch, words, kept):
    # With a profiler's launch hook every launch takes Triton's path (so the hook sees it), but the cap check
    # (a compile and load under the cap) runs once per key, not per launch.
    _stub_driver(monkeypatch)
    fn = _CappedFn({128: words})
    fn.pre_run_hooks = [lambda *a, **k: None]  # watched, as a launch hook makes it
    launcher = CachedLauncher(fn, ("B",))
    z = torch.zeros(8)
    for _ in range(3):
        launcher(2, (z, 3), (16,), 4, 0, 128)
    launcher(2, (z, 3), (32,), 4, 0, 128)  # another key: checked again
    want = {"num_warps": 4, "maxnreg": 128} if kept else {"num_warps": 4}
    assert fn.warmups == [(16, {"num_warps": 4, "maxnreg": 128}), (32, {"num_warps": 4, "maxnreg": 128})]
    assert fn.launches == [("triton", want, 16)] * 3 + [("triton", want, 32)]
    assert launcher.kernels == {} and launcher.hits == 0


def test_no_register_cap_compiles_once(monkeypatch):
    _stub_driver(monkeypatch)
    fn = _CappedFn({})
    launcher = CachedLauncher(fn, ("B",))
    launcher(2, (torch.zeros(8), 3), (16,), 4, 0)
    assert fn.warmups == [] and fn.launches == [("triton", {"num_warps": 4}, 16)]


_CAP = {"num_warps": 4, "maxnreg": 128}
_FIT = (128, ((("B", 8),), (("B", 4),)))  # a budget of 128 registers; fallbacks B=8, then B=4


@pytest.mark.parametrize("spills, want_block", [({16: 40, 8: 0}, 8), ({16: 40, 8: 40, 4: 0}, 4),
                                                ({16: 0, 8: 0}, 16)])
def test_the_first_fallback_that_fits_is_launched_and_cached(monkeypatch, spills, want_block):
    # Under a cap: each candidate is compiled and loaded in order until one keeps its local memory within
    # LOCAL_BYTES_OK; that one is launched, and the cached launch passes its constexprs, not the requested.
    _stub_driver(monkeypatch)
    fn = _CappedFn({}, block_spills=spills)
    launcher = CachedLauncher(fn, ("B",))
    z = torch.zeros(8)
    for _ in range(2):
        launcher(2, (z, 3), (16,), 4, 0, 128, _FIT)
    tried = [b for b in (16, 8, 4) if b >= want_block]
    assert fn.warmups == [(b, _CAP) for b in tried]
    assert fn.launches == [("triton", _CAP, want_block), ("cached", _CAP, want_block)]
    assert launcher.hits == 1


def test_a_register_budget_without_a_cap_picks_the_first_fallback_within_it(monkeypatch):
    # No cap asked (ptxas free), but a budget: the kernel's own register count decides.
    _stub_driver(monkeypatch)
    fn = _CappedFn({}, regs={16: 248, 8: 200, 4: 96})
    launcher = CachedLauncher(fn, ("B",))
    launcher(2, (torch.zeros(8), 3), (16,), 4, 0, None, _FIT)
    assert fn.warmups == [(16, {"num_warps": 4}), (8, {"num_warps": 4}), (4, {"num_warps": 4})]
    assert fn.launches == [("triton", {"num_warps": 4}, 4)]


def test_where_nothing_fits_the_requested_constexprs_run_uncapped(monkeypatch):
    _stub_driver(monkeypatch)
    fn = _CappedFn({}, block_spills={16: 40, 8: 40, 4: 40})
    launcher = CachedLauncher(fn, ("B",))
    launcher(2, (torch.zeros(8), 3), (16,), 4, 0, 128, _FIT)
    assert [b for b, _ in fn.warmups] == [16, 8, 4]
    assert fn.launches == [("triton", {"num_warps": 4}, 16)]


def test_the_fallbacks_are_part_of_the_key(monkeypatch):
    # The fallbacks carry sizes the key does not see otherwise (a row's number of blocks depends on C, a
    # runtime argument): the same requested constexprs with other fallbacks are chosen again, not reused.
    _stub_driver(monkeypatch)
    fn = _CappedFn({}, block_spills={16: 40, 8: 0, 4: 0})
    launcher = CachedLauncher(fn, ("B",))
    z = torch.zeros(8)
    launcher(2, (z, 3), (16,), 4, 0, 128, _FIT)
    launcher(2, (z, 3), (16,), 4, 0, 128, (128, ((("B", 4),),)))
    assert fn.launches == [("triton", _CAP, 8), ("triton", _CAP, 4)] and launcher.hits == 0


def test_a_watched_launch_makes_the_fit_choice_once_per_key(monkeypatch):
    _stub_driver(monkeypatch)
    fn = _CappedFn({}, block_spills={16: 40, 8: 0})
    fn.pre_run_hooks = [lambda *a, **k: None]
    launcher = CachedLauncher(fn, ("B",))
    for _ in range(3):
        launcher(2, (torch.zeros(8), 3), (16,), 4, 0, 128, _FIT)
    assert fn.warmups == [(16, _CAP), (8, _CAP)]
    assert fn.launches == [("triton", _CAP, 8)] * 3 and launcher.kernels == {}


_CAP_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, BENCHMARKS)
import host_loss  # the stand-in driver: sm_90 compiles, Triton's real launcher, a stub libcuda
from collab_fast.kernels import collab_loss as cl

words = [int(w) for w in sys.argv[1].split(",")]  # local memory of each load in turn (4-byte words), the last repeats
load = host_loss._StubUtils.load_binary
host_loss._StubUtils.load_binary = lambda self, *a: (*load(self, *a)[:3], words.pop(0) if len(words) > 1 else words[0], 1024)
z = torch.randn(8, 4, 5000)  # a looped row of 8 heads: the launcher asks for a cap and a fit
y = torch.randint(0, 5000, (4,))
for _ in range(2):
    loss = cl.launch.launch(z, y, cl.CollabLossParams())[0]
names = cl.launch.CONSTEXPRS
picked = ("BLOCK_C", "NUM_BLOCKS", "TAIL", "SAFE_BLOCK")
out = [[key[3], getattr(k.metadata, "maxnreg", None), *(chosen[names.index(n)] for n in picked)]
       for key, (k, chosen) in cl.launch.kernel_launcher.kernels.items()]
print("RESULT", json.dumps({"kernels": out, "hits": cl.launch.kernel_launcher.hits, "loss": float(loss)}))
""".replace("BENCHMARKS", repr(str(BENCHMARKS)))


@pytest.mark.slow
@pytest.mark.parametrize("words, want", [
    ("0", [128, 128, 512, 10, 4, 128]),  # the default keeps the cap (a tail of 5000 % 512 = 392 columns)
    ("16,0", [128, 128, 512, 10, 13, 32]),  # it spills: the SAFE loops' smaller tile (8 heads x 32 columns)
    ("16,16,0", [128, 128, 256, 20, 5, 32]),  # that spills too: half the block
    ("16", [128, None, 512, 10, 4, 128]),  # everything spills: the default, uncapped
])
def test_the_loss_launch_keeps_its_register_cap_unless_the_kernel_spills(tmp_path, words, want):
    # Through Triton's own warmup and load (the driver stubbed: it reports `words` of local memory, and 128
    # registers): the kernel cached for the key is the first of the default and its fallbacks compiled under
    # maxnreg 128 without spilling, or the default uncapped.
    _needs_stub_build()
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "cap_check.py"
    script.write_text(_CAP_SCRIPT)
    res = subprocess.run([sys.executable, str(script), words], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["kernels"] == [want], out
    assert out["hits"] == 1, out  # the second call: the cached kernel, no second choice
