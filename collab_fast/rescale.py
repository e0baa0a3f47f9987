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
    scaled_sum(grads, scale)         scale * (g_1 + ... + g_n): the kernel behind both backwards; its own
                                     gradient is scale * grad_out for every input (double backward)

scaled_sum is a registered op, torch.ops.collab_fast.scaled_sum, that works on every device torch runs on:
    - C++ (csrc/rescale.cpp: CPU kernel, Meta) compiled on first use (collab_fast.extension), with the fused
      CUDA kernel (csrc/rescale_cuda.cu) where nvcc exists, else ATen calls for CUDA tensors;
    - where no C++ compiler exists, the plain-PyTorch implementation below under the same name and schema.
Each degraded case says so in one warning. branch and grad_rescale are autograd Functions around it, not
registered ops: an op whose outputs alias its input loses its custom backward where those outputs leave a
torch.compile graph (AOTAutograd regenerates them outside the graph as plain views: a graph break after
branch(x, 2) doubled the trunk's gradient). Eager calls return aliases (no copy); under torch.compile the
Function returns copies, which Inductor removes inside a graph (both children read one buffer) and keeps
only where they leave one, so the compiled backward is always the scaled one.
"""

from __future__ import annotations

import math
import threading
import warnings

import torch
from torch import nn

from collab_fast import extension

__all__ = [
    "GradRescale",
    "branch",
    "branch_reference",
    "build_info",
    "ensure_ops",
    "grad_rescale",
    "grad_rescale_reference",
    "scaled_sum",
]

_lock = threading.Lock()
_backend: str | None = None  # "cpp" (the C++ extension) or "torch" (the plain-PyTorch ops below)
_torch_lib = None  # the torch.library registration of the plain-PyTorch ops, kept alive


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
# scaled_sum: the plain-PyTorch implementation, registered under the same name and schema where no C++
# compiler exists (macOS without Xcode tools, a slim container). It sums in the op-math type in input
# order, then scales once, as the C++ kernels do, so results agree with them. Its gradient, registered for
# both implementations: d/dg_i = scale * grad_out.
# ----------------------------------------------------------------------------------------------------

_SCHEMA = "scaled_sum(Tensor[] grads, float scale) -> Tensor"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_float(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{what} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _scaled_sum_torch(grads: list[torch.Tensor], scale: float) -> torch.Tensor:
    if not math.isfinite(scale):
        raise RuntimeError(f"collab_fast::scaled_sum: scale must be a finite number, got {scale}")
    if not grads:
        raise RuntimeError("collab_fast::scaled_sum: needs at least one gradient")
    g0 = grads[0]
    for i, g in enumerate(grads):
        if g.dtype not in _FLOATS:
            raise RuntimeError(f"collab_fast::scaled_sum: grads[{i}] must be float32, float64, float16 or "
                               f"bfloat16, got {g.dtype}")
        if g.shape != g0.shape:
            raise RuntimeError(f"collab_fast::scaled_sum: grads[{i}] has shape {list(g.shape)} but grads[0] has "
                               f"{list(g0.shape)}")
        if g.dtype != g0.dtype:
            raise RuntimeError(f"collab_fast::scaled_sum: grads[{i}] is {g.dtype} but grads[0] is {g0.dtype}")
    opmath = torch.float64 if g0.dtype == torch.float64 else torch.float32
    acc = g0.to(opmath, copy=True)
    for g in grads[1:]:
        acc.add_(g)
    return acc.mul_(scale).to(g0.dtype)


def _scaled_sum_setup_context(ctx, inputs, output):
    grads, scale = inputs
    ctx.n, ctx.scale = len(grads), scale


def _scaled_sum_backward(ctx, grad):
    g = grad * ctx.scale
    return [g] * ctx.n, None


def _register_torch_op() -> None:
    global _torch_lib
    lib = torch.library.Library("collab_fast", "FRAGMENT")  # noqa: TOR901 (the schema is shared with the C++ op)
    lib.define(_SCHEMA)
    lib.impl("scaled_sum", _scaled_sum_torch, "CompositeExplicitAutograd")
    _torch_lib = lib


def ensure_ops() -> str:
    """Makes torch.ops.collab_fast.scaled_sum available, with its gradient: the C++ extension (built on first
    use), or the plain-PyTorch op with one warning where no C++ compiler exists. Returns which ("cpp" or
    "torch"). Called when a collaborative model is built, so that torch.compile never traces the loader."""
    global _backend
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is None:
            try:
                extension.load_extension()
                backend = "cpp"
            except extension.BuildError as exc:  # no compiler, no ninja, or a compiler that fails
                warnings.warn(f"collab_fast: {exc}: backprop rescaling uses its plain-PyTorch ops (the same "
                              "results; its backward is about as fast as autograd's own gradient sum, measured "
                              "on CPU in a training step)", RuntimeWarning, stacklevel=3)
                _register_torch_op()
                backend = "torch"
            torch.library.register_autograd("collab_fast::scaled_sum", _scaled_sum_backward,
                                            setup_context=_scaled_sum_setup_context)
            _backend = backend
    return _backend


def build_info() -> dict:
    """How the rescaling ops are provided: the C++ build (torch version, CUDA implementation, CPU vector
    ISA, compiler) or the plain-PyTorch ops."""
    if ensure_ops() == "torch":
        return {"backend": "torch", "torch_version": torch.__version__.split("+")[0], "cuda": False,
                "cuda_impl": "torch", "ops": ("scaled_sum",)}
    return {"backend": "cpp", **dict(extension.load_extension().build_info())}


def _ops():
    # Under torch.compile the op was registered when the model was built: tracing never enters the loader.
    if not torch.compiler.is_compiling():
        ensure_ops()
    return torch.ops.collab_fast


def _check_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")


def _check_scale(scale, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not scale - scale == 0.0:  # inf or nan; math.isfinite breaks a torch.compile(dynamic=True) graph
        raise ValueError(f"{name} must be a finite number, got {scale}")
    return scale


# ----------------------------------------------------------------------------------------------------
# Autograd Function: n children of x; backward scale * (sum of the children's gradients) in one pass
# ----------------------------------------------------------------------------------------------------


class _Branch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n: int, scale: float, compiled: bool):
        ctx.scale, ctx.compiled = scale, compiled
        ctx.set_materialize_grads(False)  # a child that gets no gradient costs nothing
        # Eager: aliases. Compiled: copies, which Inductor folds into one buffer inside a graph; an alias
        # that left the graph would be regenerated as a plain view and lose this backward.
        return tuple(x.clone() if compiled else x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        defined = [g for g in grads if g is not None]
        if not defined:
            return None, None, None, None
        if ctx.compiled:  # plain ops: Inductor fuses the sum into the neighbouring backward kernels
            return sum(defined[1:], defined[0]) * ctx.scale, None, None, None
        # The fused op; with create_graph=True its registered gradient makes double backward exact.
        return torch.ops.collab_fast.scaled_sum(defined, ctx.scale), None, None, None


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------


def grad_rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward (an alias of x, no copy); backward multiplies the gradient by `scale`."""
    _check_tensor(x)
    _check_float(x, "x")
    scale = _check_scale(scale)
    compiled = torch.compiler.is_compiling()
    _ops()
    return _Branch.apply(x, 1, scale, compiled)[0]


def branch(x: torch.Tensor, n: int, rescale: bool = True) -> list[torch.Tensor]:
    """n aliases of x for n child branches; backward: (g_1 + ... + g_n) / n (or the sum) in one pass."""
    _check_tensor(x)
    _check_float(x, "x")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (the number of child branches), got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n (the number of child branches) must be >= 1, got {n}")
    compiled = torch.compiler.is_compiling()
    _ops()
    return list(_Branch.apply(x, n, 1.0 / n if rescale else 1.0, compiled))


def scaled_sum(grads: list[torch.Tensor], scale: float) -> torch.Tensor:
    """scale * (g_1 + ... + g_n) in one pass (the kernel behind both backwards)."""
    if not isinstance(grads, (list, tuple)) or not grads:
        raise TypeError("grads must be a non-empty list of tensors")
    for i, g in enumerate(grads):
        _check_tensor(g, f"grads[{i}]")
    ops = _ops()
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
