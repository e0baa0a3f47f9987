"""Launching a compiled Triton kernel for the cost of its C launcher.

`kernel[grid](*args)` binds and specialises every argument, hashes a cache key and builds launch metadata on
each call (about 18 µs of host time for the loss kernel's 25 runtime arguments, of which the C launcher is 2).
`CachedLauncher` builds a cheaper key on each call, from what Triton's binder specialises on (integers equal
to 1, divisible by 16 and their width; tensors' dtype and 16-byte alignment; the constexprs and launch
options), and does Triton's work once per key: the first launch of a key goes through Triton (which compiles
and returns the kernel), later ones call the compiled kernel's launcher directly. Triton's own path is kept
where it must run: the interpreter, launch hooks (profilers such as Proton), pre-run hooks, stage-inspection
hooks, and a `run` replaced on the kernel object (a caller compiling without launching, as some tests do).

A register cap (`maxnreg`, NVIDIA) is a request: ptxas meets it by spilling when the kernel needs more, and a
spill inside a column loop costs more than the occupancy the cap buys. A launch may also name a register
budget (`fit`: at most that many registers a thread) and fallback constexprs (e.g. smaller blocks). The first
launch of a key compiles and loads the kernel (under the cap, where one is asked) and keeps the first of the
requested constexprs and the fallbacks whose kernel stays within the budget and within `LOCAL_BYTES_OK` of
local memory (spills and stack frame) a thread; where none does, the key runs the requested constexprs
uncapped. Later launches of the key reuse the choice. (benchmarks/sass_loss.py makes the same choice, reading
registers and local memory from the SASS, through `_usage`.)
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
    """`launcher(grid0, args, constexprs, num_warps, device, maxnreg, fit)` launches `fn` on a 1-D grid of
    `grid0` programs like `fn[(grid0,)](*args, **dict(zip(constexpr_names, constexprs)), num_warps=num_warps)`
    (and `maxnreg=maxnreg` unless None: a register cap, NVIDIA only), where `args` are the runtime arguments in
    the kernel's order and the constexprs follow them in its signature; `fit` (None or (register budget,
    fallbacks)): see the module's docstring."""

    def __init__(self, fn, constexpr_names: tuple[str, ...]):
        self.fn = fn
        self.constexpr_names = constexpr_names
        self.kernels: dict = {}  # key -> (compiled kernel, the constexprs it was compiled with)
        self.choices: dict = {}  # key -> (constexprs, register cap or None), for launches taking Triton's path
        self.hits = 0  # launches that skipped Triton's binder (tests read it)

    def _plain(self, grid0, args, constexprs, num_warps, maxnreg):
        options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
        return self.fn[(grid0,)](*args, **dict(zip(self.constexpr_names, constexprs)), **options)

    def _compile(self, grid0, args, constexprs, num_warps, maxnreg):
        """The kernel compiled, not launched."""
        options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
        return self.fn.warmup(*args, grid=(grid0,), **dict(zip(self.constexpr_names, constexprs)), **options)

    def _usage(self, kernel) -> tuple[int, int]:
        """(registers, bytes of local memory) a thread: the kernel loaded, as the driver reports them (n_spills:
        4-byte words)."""
        kernel._init_handles()
        return kernel.n_regs, kernel.n_spills * 4

    def _choose(self, grid0, args, constexprs, num_warps, maxnreg, fit):
        """(constexprs, maxnreg) to launch: see the module's docstring. `fit`: None, or (register budget or None,
        fallbacks: tuples of (constexpr name, value) pairs, each replacing those of the requested constexprs)."""
        if maxnreg is None and fit is None:
            return constexprs, None
        budget, fallbacks = fit if fit is not None else (None, ())
        candidates = [constexprs]
        for overrides in fallbacks:
            values = dict(zip(self.constexpr_names, constexprs))
            values.update(overrides)
            candidates.append(tuple(values[name] for name in self.constexpr_names))
        for cx in candidates:
            regs, local = self._usage(self._compile(grid0, args, cx, num_warps, maxnreg))
            if local <= LOCAL_BYTES_OK and (budget is None or regs <= budget):
                return cx, maxnreg
        return constexprs, None

    def __call__(self, grid0: int, args: tuple, constexprs: tuple, num_warps: int, device: int | None = None,
                 maxnreg: int | None = None, fit: tuple | None = None):
        fn = self.fn
        knobs = triton.knobs
        rt = knobs.runtime
        if "run" in vars(fn):  # a caller's own run (compiling without launching): the options as asked
            self._plain(grid0, args, constexprs, num_warps, maxnreg)
            return
        watched = (not hasattr(fn, "device_caches") or fn.pre_run_hooks or _hooked(rt.launch_enter_hook)
                   or _hooked(rt.launch_exit_hook) or rt.add_stages_inspection_hook is not None)
        if watched and maxnreg is None and fit is None:  # (the interpreter never asks for a cap or a fit)
            self._plain(grid0, args, constexprs, num_warps, None)
            return
        active = driver.active
        device = active.get_current_device() if device is None else device
        # (fit is in the key: its fallbacks depend on sizes that are runtime arguments, e.g. the row length)
        key = (device, constexprs, num_warps, maxnreg, fit, rt.debug, knobs.compilation.instrumentation_mode,
               _key(args))
        if watched:
            # someone watching launches (a profiler's hooks): Triton's path, the kernel a cached launch would
            # run; the choice made once per key (each check compiles and loads a kernel)
            if key not in self.choices:
                self.choices[key] = self._choose(grid0, args, constexprs, num_warps, maxnreg, fit)
            chosen, cap = self.choices[key]
            self._plain(grid0, args, chosen, num_warps, cap)
            return
        cached = self.kernels.get(key)
        if cached is None:
            chosen, cap = self._choose(grid0, args, constexprs, num_warps, maxnreg, fit)
            kernel = self._plain(grid0, args, chosen, num_warps, cap)
            if kernel is not None:
                self.kernels[key] = (kernel, chosen)
            return
        self.hits += 1
        kernel, chosen = cached
        kernel.run(grid0, 1, 1, active.get_current_stream(device), kernel.function, kernel.packed_metadata, None,
                   None, None, *args, *chosen)
