"""Launching a compiled Triton kernel for the cost of its C launcher.

`kernel[grid](*args)` binds and specialises every argument, hashes a cache key and builds launch metadata on
each call (about 18 µs of host time for the loss kernel's 25 runtime arguments, of which the C launcher is 2).
`CachedLauncher` builds a cheaper key on each call, from what Triton's binder specialises on (integers equal
to 1, divisible by 16 and their width; tensors' dtype and 16-byte alignment; the constexprs and launch
options), and does Triton's work once per key: the first launch of a key goes through Triton (which compiles
and returns the kernel), later ones call the compiled kernel's launcher directly. Triton's own path is kept
where it must run: the interpreter, launch hooks (profilers such as Proton), pre-run hooks, stage-inspection
hooks, and a `run` replaced on the kernel object (a caller compiling without launching, as
benchmarks/sass_loss.py does).

A register cap (`maxnreg`, NVIDIA) is a request: ptxas meets it by spilling when the kernel needs more, and a
spill inside a column loop costs more than the occupancy the cap buys. The first launch of a key compiles the
kernel under the cap and keeps the cap only if the kernel's local memory (spills and stack frame) stays within
`LOCAL_BYTES_OK` a thread; otherwise the key runs uncapped. (sass_loss.py, which replaces `run`, makes the
same choice from the SASS's stack size.)
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.runtime import driver
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None

_LO32, _HI32, _HI64 = -(2**31), 2**31, 2**63
# Local memory a thread that a capped kernel may keep. In every sm_90 compile of the loss kernel measured
# (Triton 3.6-3.9, H 3-8, each setting: benchmarks/sass_loss.py) one with at most 24 bytes had no local
# access inside its column loops; every one with more had some there.
LOCAL_BYTES_OK = 24
_Tensor = torch.Tensor


def _key(args: tuple) -> tuple:
    """What Triton's binder specialises on, per runtime argument (a key at least as fine as its own): a
    tensor's dtype and 16-byte alignment; an integer's being 1, its divisibility by 16 and its width (i32,
    i64, u64); nothing of a float; any other value itself. One comprehension: this runs on every launch."""
    return tuple([(a == 1, not a & 15, (a >= _LO32) + (a >= _HI32) + (a >= _HI64)) if type(a) is int
                  else None if type(a) is float
                  else (a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor) else (type(a), a) for a in args])


def _hooked(hook) -> bool:
    # Triton >= 3.7 keeps an empty HookChain where older versions keep None
    return hook is not None and bool(getattr(hook, "calls", True))


class CachedLauncher:
    """`launcher(grid0, args, constexprs, num_warps, device, maxnreg)` launches `fn` on a 1-D grid of `grid0`
    programs like `fn[(grid0,)](*args, **dict(zip(constexpr_names, constexprs)), num_warps=num_warps)` (and
    `maxnreg=maxnreg` unless None: a register cap, NVIDIA only), where `args` are the runtime arguments in
    the kernel's order and the constexprs follow them in its signature."""

    def __init__(self, fn, constexpr_names: tuple[str, ...]):
        self.fn = fn
        self.constexpr_names = constexpr_names
        self.kernels: dict = {}  # key -> compiled kernel
        self.caps: dict = {}  # key -> the register cap kept (or None), for launches that take Triton's path
        self.hits = 0  # launches that skipped Triton's binder (tests read it)

    def _plain(self, grid0, args, constexprs, num_warps, maxnreg):
        options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
        return self.fn[(grid0,)](*args, **dict(zip(self.constexpr_names, constexprs)), **options)

    def _cap(self, grid0, args, constexprs, num_warps, maxnreg):
        """maxnreg if the kernel compiled under it keeps at most LOCAL_BYTES_OK of local memory a thread, else
        None (compiled, not launched; the uncapped kernel is compiled by the launch that follows)."""
        if maxnreg is None:
            return None
        kernel = self.fn.warmup(*args, grid=(grid0,), **dict(zip(self.constexpr_names, constexprs)),
                                num_warps=num_warps, maxnreg=maxnreg)
        kernel._init_handles()  # loads it: the driver reports its local memory (n_spills: 4-byte words)
        return maxnreg if kernel.n_spills * 4 <= LOCAL_BYTES_OK else None

    def __call__(self, grid0: int, args: tuple, constexprs: tuple, num_warps: int, device: int | None = None,
                 maxnreg: int | None = None):
        fn = self.fn
        knobs = triton.knobs
        rt = knobs.runtime
        if "run" in vars(fn):  # a caller's own run (compiling without launching): the options as asked
            self._plain(grid0, args, constexprs, num_warps, maxnreg)
            return
        watched = (not hasattr(fn, "device_caches") or fn.pre_run_hooks or _hooked(rt.launch_enter_hook)
                   or _hooked(rt.launch_exit_hook) or rt.add_stages_inspection_hook is not None)
        if watched and maxnreg is None:  # (the interpreter never asks for a cap)
            self._plain(grid0, args, constexprs, num_warps, None)
            return
        active = driver.active
        device = active.get_current_device() if device is None else device
        key = (device, constexprs, num_warps, maxnreg, rt.debug, knobs.compilation.instrumentation_mode,
               _key(args))
        if watched:
            # someone watching launches (a profiler's hooks): Triton's path, the kernel a cached launch would
            # run; the cap decided once per key (its check compiles and loads the capped kernel)
            if key not in self.caps:
                self.caps[key] = self._cap(grid0, args, constexprs, num_warps, maxnreg)
            self._plain(grid0, args, constexprs, num_warps, self.caps[key])
            return
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self._plain(grid0, args, constexprs, num_warps,
                                 self._cap(grid0, args, constexprs, num_warps, maxnreg))
            if kernel is not None:
                self.kernels[key] = kernel
            return
        self.hits += 1
        kernel.run(grid0, 1, 1, active.get_current_stream(device), kernel.function, kernel.packed_metadata, None,
                   None, None, *args, *constexprs)
