"""--cuda-graphs: the whole optimizer step captured once in a CUDA graph and replayed at every step after.

What is captured is Step's call: forward (autocast), the fused loss, backward over the micro-batches, the
ranks' non-finite agreement, clipping, the optimizer's update, the EMA and the device-side meter. A replay
launches all of it from one host call, so the host's cost per step no longer grows with the model's kernels.

How it follows PyTorch's documented recipe (torch.cuda.graphs, "whole network capture"):
- warm-up: the first steps run eagerly on a side stream (3; 11 under DDP, which builds its buckets in them),
  so cuDNN's benchmark, Triton's compiles, the optimizer's state and the grad scaler's lazy state exist
  before the capture; they are real training steps, on the real batches;
- static inputs: each batch is copied into the captured step's input buffers; a batch of another shape is
  refused in one line (every training loader drops its last short batch, so none arrives);
- what changes per step is read from device memory: the learning rate (one tensor shared by every parameter
  group, Step.set_lr), --soft-ramp's factor (loaded by the loss kernel), the grad scaler's scale, the
  optimizer's step counts (AdamW capturable);
- the gradients are set to None once before the capture: the backward then allocates them inside the graph's
  memory pool, and every replay writes them in place;
- evaluation and checkpoints run outside the graph, on the same parameters.

On CPU there is no CUDA graph. OpTape stands in: it records the ATen ops of the captured call (below
autograd, so the backward's too) with the tensors they read and write, and replays that fixed list with the
Python no longer running. Whatever a CUDA graph would freeze is frozen the same way: a Python number baked
into an op stays as it was at capture, a host sync inside the step is refused, a tensor the step does not
read from its buffers keeps its captured value. It is slower than eager and only a rehearsal: CPU tests and
the GPU check's --dry-run run the captured path through it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from collab_fast.metrics import Meter
from collab_fast.step import Step

__all__ = ["CapturedStep", "OpTape", "SYNC_OPS", "warmup_steps"]

# ATen ops that read a device value on the host: a CUDA graph refuses them inside a capture.
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                      "_unique2", "repeat_interleave"})


def warmup_steps(ddp: bool) -> int:
    """Eager steps before the capture: DDP needs 11 (PyTorch's CUDA graphs notes: its reducer rebuilds the
    buckets after the first iterations), everything else 3 (cuDNN's benchmark and the lazy states)."""
    return 11 if ddp else 3


class OpTape:
    """The CPU stand-in of torch.cuda.CUDAGraph (same two calls: capture(), replay()). See the module's
    docstring for what it freezes and why."""

    def __init__(self):
        self.ops: list[tuple] = []  # (op, args, kwargs, outputs to refill or None)

    def capture(self):
        return _Record(self)

    @torch.no_grad()
    def replay(self) -> None:
        with torch._C._AutoDispatchBelowAutograd():  # the recorded ops are already below autograd
            for op, args, kwargs, outs in self.ops:
                fresh = op(*args, **kwargs)
                if outs is not None:  # a new tensor: written into the captured one, which later ops read
                    for old, new in zip(outs, tree_flatten(fresh)[0]):
                        if isinstance(old, torch.Tensor):
                            old.copy_(new)


class _Record(TorchDispatchMode):
    captures = True  # what the loss looks for: no label check on the host while recording

    def __init__(self, tape: OpTape):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            raise RuntimeError(f"--cuda-graphs: {func} reads a device value on the host inside the captured step "
                               "(a CUDA graph cannot capture it)")
        if name == "lift_fresh":  # torch.tensor(python data): on CUDA a copy from pageable host memory
            raise RuntimeError("--cuda-graphs: a tensor made from Python data inside the captured step (on CUDA a "
                               "copy from host memory, which a CUDA graph cannot capture); make it once, outside")
        out = func(*args, **kwargs)
        # views and in-place/out= ops alias tensors the tape already holds: re-running them is enough
        aliases = func.is_view or any(r.alias_info is not None for r in func._schema.returns)
        outs = None if aliases else tree_flatten(out)[0]
        self.tape.ops.append((func, args, kwargs, outs))
        return out


class CapturedStep:
    """Step, captured (see the module's docstring). Called as Step is: (x, y, meter) -> the step's loss (a
    device tensor that every replay rewrites). `graph` makes the graph object (torch.cuda.CUDAGraph on CUDA,
    OpTape elsewhere); the meter must be the same object at every call, as the graph adds into its tensors."""

    def __init__(self, step: Step, warmup: int | None = None, graph=None):
        if step.lr is None:
            raise ValueError("CapturedStep: the step must hold its learning rate on the device (a Step built from a "
                             "config with cuda_graphs=True)")
        self.step = step
        self.warmup = warmup_steps(step.ddp is not None) if warmup is None else warmup
        self.graph_type = graph
        self.calls = 0
        self.graph = None
        self.x = self.y = self.loss = self.meter = None

    # the per-step settings live on the device: the step's own setters fill them in place
    def set_lr(self, lr: float) -> None:
        self.step.set_lr(lr)

    def set_soft_factor(self, factor: float) -> None:
        self.step.set_soft_factor(factor)

    @property
    def bad(self) -> torch.Tensor:
        return self.step.bad

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, meter: Meter | None = None) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            with _side_stream(x.device):
                return self.step(x, y, meter)
        if self.graph is None:
            if self._capture(x, y, meter):
                return self.loss  # the tape's recording ran this batch's step already
        elif meter is not self.meter:
            raise RuntimeError("CapturedStep: the meter differs from the one captured (reset it in place instead)")
        else:
            self._fill(x, y)
        self.graph.replay()
        return self.loss

    def _fill(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for new, static, name in ((x, self.x, "images"), (y, self.y, "labels")):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(f"--cuda-graphs: a batch of {name} {tuple(new.shape)} {new.dtype} differs from the "
                                 f"captured {tuple(static.shape)} {static.dtype}; the captured step takes one shape "
                                 "(train without --cuda-graphs, or give every batch that shape)")
            static.copy_(new)

    def _capture(self, x: torch.Tensor, y: torch.Tensor, meter: Meter | None) -> bool:
        """Captures the step on this batch; True when capturing also ran it (the tape), False when the
        batch still has to be replayed (a CUDA capture records without running)."""
        # the static inputs keep the batch's layout (channels_last), so the captured convolutions are the fast ones
        self.x, self.y, self.meter = x.clone(), y.clone(), meter
        self.step.optimizer.zero_grad(set_to_none=True)  # the gradients: allocated inside the graph, in place after
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            graph = (self.graph_type or torch.cuda.CUDAGraph)()
            # thread_local: CUDA calls of other threads (a loader's pinned-memory thread, DALI's) may go on meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.loss = self.step(self.x, self.y, meter)
            self.graph = graph
            return False
        graph = (self.graph_type or OpTape)()
        with graph.capture():
            self.loss = self.step(self.x, self.y, meter)
        self.graph = graph
        return True


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """The warm-up's stream (PyTorch's recipe: warm up on a side stream, then join it)."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)
