"""The loss kernel's launcher: block and warp choice per row shape, register cap and loop stages, the
workspace, the buffers of each launch, and the launch itself (through kernels.launch.CachedLauncher)."""

from __future__ import annotations

import contextlib
import functools

import torch

from collab_fast.kernels.collab_loss.jit import TRITON_IMPORT_ERROR, collab_loss_kernel
from collab_fast.kernels.collab_loss.params import CollabLossParams
from collab_fast.kernels.launch import CachedLauncher

__all__ = ["CONSTEXPRS", "LOOP_STAGES", "WORKSPACES", "check_triton_usable", "fast_exp", "interpreter_active",
           "kernel_launcher", "launch", "loop_stages", "num_valid", "pick_block_c", "plan", "row_stats_buffer",
           "row_stats_count", "safe_block", "shared_memory_limit", "traced_launch", "vector_width", "workspace"]

MAX_TILE = 8192  # elements of the [H_PAD, BLOCK_C] register tile
# Rows longer than one block (LM vocabularies) loop over blocks of at most LONG_ROW_BLOCK columns with 4
# warps. Measured on an H200 (benchmarks/results/bench_loss_sweep_nvidia-h200_2026-12-04.md: fwd+bwd kernel-only
# over tiles 4096-16384, 4/8/16 warps, prefetch on/off): 4 warps were fastest at both LM shapes, and the
# earlier rule (warps = tile / 512, i.e. 16) was 1.7x (H2 C128256: 5.74 -> 3.31 ms) and 4.1x (H8 C32000:
# 22.7 -> 5.49 ms) slower; blocks of 2048 (H2) and 1024 (H8) columns were the fastest there (before the
# per-thread statistics). Since: with 3-8 heads the registers bound the warps an SM keeps, so the block and a
# register cap are chosen from the sm_90 SASS (benchmarks/sass_loss.py: no spill, <= 128 registers, the
# fewest instructions a logit): 3-4 heads 1024 columns (2048: the backward spills), 5-8 heads 512 (at 1024
# the finite loop alone needs 168 registers: 2-3 CTAs an SM; at 512 it needs <= 128 for ~10% more
# instructions a logit). Unswept on a GPU.
LONG_ROW_BLOCK = 2048
LONG_ROW_BLOCKS = {4: 1024, 8: 512}  # by H_PAD; more heads: the largest tile (MAX_TILE)
# ptxas's register limit for looped rows of 3-8 heads: 4 CTAs of 4 warps an SM. Kept where the kernel does
# not spill under it (launch.CachedLauncher checks each compile).
REG_CAP = 128
# The register budget of a looped row of 1-8 heads (4 CTAs of 4 warps an SM). The defaults keep it on sm_90
# under Triton 3.6-3.9; some settings do not (benchmarks/sass_loss.py, 2026-12-07: a live consensus or a
# target distribution in backward, e.g. H8 C32000 168-224 registers, H2 C50257 248; stats with KL, label
# smoothing and T != 2 in the forward of rows not 16-byte aligned, H8 C50257 240). The launcher then tries,
# in this order, the SAFE loops' tile at FIT_SAFE_TILE, then also the column block halved (each compile
# checked: CachedLauncher), and keeps the first within the budget without spilling: the SAFE loops (the last
# partial block, rows with -inf) hold the row's statistics of every head in each thread where the rows are
# not 16-byte aligned, and a live consensus or a target distribution adds [H_PAD, BLOCK_C] values to the
# finite loop's. Where none fits, the default runs uncapped. (A quarter block fits the last setting found
# over it, H8 C50257 forward with a target distribution, stats, KL, smoothing and T = 3, at 1.9x the
# instructions a logit of the uncapped default: not tried.) FIT_MAX_HEADS = 0 turns the fallbacks off.
FIT_SAFE_TILE = 256
FIT_MAX_HEADS = 8
# Software pipelining of the column loops (rows of at least this many blocks): Triton turns the loop's
# loads into cp.async copies of the next block into shared memory. Off (1) by default: on the H200 sweep it
# was slower in 16 of 18 configurations (by 1-12%; 2x in one). 2 compiles without stack or local memory
# under Triton 3.6-3.9; bench_loss.py's "ours-prefetch" provider keeps the A/B.
LOOP_STAGES = 1
SAFE_TILE = 1024  # elements of the SAFE loops' [H_PAD, SAFE_BLOCK] tile (see safe_block)


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before import)."""
    if collab_loss_kernel is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(collab_loss_kernel, InterpretedFunction)


@functools.cache  # fixed at import: the interpreter is chosen by TRITON_INTERPRET before it
def fast_exp() -> bool:
    """Exponentials through PTX's ex2.approx.ftz (jit._exp2): compiled for NVIDIA GPUs, not interpreted."""
    return torch.version.hip is None and not interpreter_active()


def check_triton_usable(device: torch.device) -> None:
    if collab_loss_kernel is None:
        raise RuntimeError(f"impl='triton' needs the triton package, which failed to import: {TRITON_IMPORT_ERROR}")
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"impl='triton' got {device.type} tensors: the Triton kernel runs on CUDA tensors, or on CPU "
            "tensors only under the Triton interpreter (set TRITON_INTERPRET=1 before importing collab_fast). "
            "Use impl='torch' or impl='auto' for the reference on CPU."
        )


def vector_width(logits: torch.Tensor, grad: torch.Tensor, traced: bool = False) -> int:
    """Elements per 16-byte vector when the logits and the gradient both have unit class stride, 16-byte
    aligned storage, and head and row strides and C that are multiples of it; else 1 (scalar accesses).
    `traced` (inside a compiled graph, no data pointer): the storage offset stands for the address, which
    is Inductor's own rule (it copies a graph input whose storage is not 16-byte aligned before use)."""
    size = logits.element_size()
    vec = 16 // size
    if logits.shape[2] % vec:
        return 1
    for t in (logits,) if grad is logits else (logits, grad):
        s = t.stride()
        if s[2] != 1 or s[0] % vec or s[1] % vec or t.element_size() != size:
            return 1
        if (t.storage_offset() % vec) if traced else (t.data_ptr() % 16):
            return 1
    return vec


def pow2(n: int) -> int:
    """The smallest power of two >= n (triton.next_power_of_2 without its per-call host cost)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pick_block_c(num_heads: int, num_classes: int, block_c: int | None = None) -> tuple[int, int, int]:
    """Column block, number of blocks and warps for a row of `num_heads` x `num_classes`."""
    h_pad = pow2(num_heads)
    if block_c is None:
        block_c = min(pow2(num_classes), max(MAX_TILE // h_pad, 16))
        if block_c < num_classes:  # a looped row: see LONG_ROW_BLOCK
            block_c = min(block_c, LONG_ROW_BLOCK if h_pad <= 2 else LONG_ROW_BLOCKS.get(h_pad, block_c))
    num_blocks = -(-num_classes // block_c)
    num_warps = 4 if num_blocks > 1 else min(16, max(4, (h_pad * block_c) // 512))
    return block_c, num_blocks, num_warps


def safe_block(num_heads: int, block_c: int, tile: int | None = None) -> int:
    """Columns per block of the SAFE loops (rows with -inf logits, the last partial block). Their tile holds
    more live values per logit than the finite loop's (absent-class masks and counts, per-block maxima), and
    the kernel's registers are the most any of its loops needs: at the finite loop's block they set the
    count (H8 at 1024 columns: 245 registers, 168 without them). They run over narrower blocks instead."""
    return min(block_c, max(16, (SAFE_TILE if tile is None else tile) // pow2(num_heads)))


# Shared memory: a prefetching loop keeps (stages - 1) tiles of [H_PAD, BLOCK_C] in shared memory, and
# Triton's layout conversions and cross-warp reductions need up to one tile of scratch. The default block
# (a tile of at most MAX_TILE elements: 32 KB in fp32) fits every GPU; a user's block_c may not (the
# 99 KB of sm_86/89/120, the 227 KB of sm_90): prefetch is then turned off, and a tile that does not fit
# even without it is refused before launch instead of failing there with OutOfResources.
_SMEM_MARGIN = 4096  # bytes for the kernel's small reduction buffers


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on `device` (opt-in maximum); None off CUDA."""
    if device.type != "cuda" or interpreter_active():
        return None
    return _smem_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _smem_of(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 49152))


def loop_stages(num_heads: int, block_c: int, num_blocks: int, element_size: int, smem_limit: int | None,
                user_block: bool = False, depth: int | None = None) -> int:
    """Pipeline depth of the column loops for this tile on a device with `smem_limit` bytes per program:
    `depth` (default LOOP_STAGES) where it fits and the row has that many blocks, else 1."""
    tile = pow2(num_heads) * block_c * element_size
    if smem_limit is not None and tile + _SMEM_MARGIN > smem_limit:
        largest = max(16, pow2((smem_limit - _SMEM_MARGIN) // (pow2(num_heads) * element_size)) // 2)
        what = "block_c" if user_block else "the column block"
        raise ValueError(f"{what}={block_c} needs about {(tile + _SMEM_MARGIN) // 1024} KB of shared memory for "
                         f"{num_heads} heads of {element_size}-byte logits, over this GPU's {smem_limit // 1024} KB "
                         f"per block: use block_c <= {largest} (or leave block_c unset)")
    depth = LOOP_STAGES if depth is None else depth
    stages = depth if num_blocks >= depth else 1
    if stages > 1 and smem_limit is not None and stages * tile + _SMEM_MARGIN > smem_limit:
        stages = 1  # the prefetch buffer does not fit next to the scratch: no prefetch
    return stages


CONSTEXPRS = ("H", "H_PAD", "BLOCK_C", "NUM_BLOCKS", "REDUCE", "MEAN", "COMPUTE_LOSS", "COMPUTE_GRAD", "ROW_WEIGHTS",
               "DETACH", "STATS", "SMOOTH", "T_IS_TWO", "KL", "VEC", "ROW_STATS", "NUM_STAGES", "PROBS", "FAST_EXP",
               "TAIL", "SAFE_BLOCK", "SOFT_FACTOR")
kernel_launcher = CachedLauncher(collab_loss_kernel, CONSTEXPRS) if collab_loss_kernel is not None else None


@functools.lru_cache(maxsize=256)
def plan(num_heads: int, num_classes: int, block_c: int | None, element_size: int, smem_limit: int | None):
    """(H_PAD, block, number of blocks, warps, loop stages, SAFE blocks of the tail, SAFE block, register
    cap or None, fit or None) of a row: computed once per shape. `fit` (CachedLauncher's): the register
    budget and the fallback blocks of a looped row (see FIT_SAFE_TILE); none for a block the caller chose."""
    block, num_blocks, num_warps = pick_block_c(num_heads, num_classes, block_c)
    stages = loop_stages(num_heads, block, num_blocks, element_size, smem_limit, block_c is not None)
    safe = safe_block(num_heads, block)
    tail = -(-(num_classes % block) // safe)
    h_pad = pow2(num_heads)
    looped = num_blocks > 1 and fast_exp()
    cap = REG_CAP if looped and h_pad in LONG_ROW_BLOCKS else None
    fit = None
    if looped and block_c is None and h_pad <= FIT_MAX_HEADS:
        fallbacks = []
        for b in (block, block // 2):
            s = safe_block(num_heads, b, FIT_SAFE_TILE)
            if b >= 128 and (b, s) != (block, safe):
                fallbacks.append((("BLOCK_C", b), ("NUM_BLOCKS", -(-num_classes // b)),
                                  ("TAIL", -(-(num_classes % b) // s)), ("SAFE_BLOCK", s)))
        fit = (REG_CAP, tuple(fallbacks))
    return h_pad, block, num_blocks, num_warps, stages, tail, safe, cap, fit


WORKSPACES: dict = {}  # (device index, stream, H) -> the kernel's zeroed workspace on that stream


def workspace(num_heads: int, device: torch.device) -> torch.Tensor:
    """fp32 [3H + 3] zeros for the kernel's sums (stats, loss), n_valid and ticket (int32 words). The kernel
    leaves it zeroed, so on CUDA one per device, stream and H is kept (calls on one stream run in order): no
    zero fill per call. Elsewhere (the interpreter), and while a CUDA graph is captured (the graph keeps its
    own, so that a replay on another stream shares nothing), a fresh one."""
    fresh = lambda: torch.zeros(3 * num_heads + 3, dtype=torch.float32, device=device)
    if device.type != "cuda":
        return fresh()
    current = torch.cuda.current_device()
    index = current if device.index is None else device.index
    with torch.cuda.device(index) if index != current else contextlib.nullcontext():
        if torch.cuda.is_current_stream_capturing():  # (the stream of the logits' device)
            return fresh()
    key = (index, torch._C._cuda_getCurrentRawStream(index), num_heads)
    ws = WORKSPACES.get(key)
    if ws is None:
        ws = WORKSPACES[key] = torch.zeros(3 * num_heads + 3, dtype=torch.float32, device=device)
    return ws


def launch(
    logits: torch.Tensor,  # [H, N, C]
    target: torch.Tensor,  # [N] labels, or [N, C] probabilities (floating point)
    params: CollabLossParams,
    *,
    compute_loss: bool = True,
    compute_grad: bool = False,
    return_stats: bool = False,
    row_weights: torch.Tensor | None = None,  # [H, N] or [] upstream weights (backward)
    grad_out: torch.Tensor | None = None,  # where to write the gradient (default: fresh [H, N, C])
    save_row_stats: torch.Tensor | None = None,  # fp32 [K, H, N]: forward stores pass 1's statistics here
    row_stats: torch.Tensor | None = None,  # fp32 [K, H, N] from forward: backward skips pass 1
    counts: torch.Tensor | None = None,  # backward of "mean": forward's [5, H] stats buffer ([4, 0] = n_valid)
    soft_factor: torch.Tensor | None = None,  # fp32 [] on the device: multiplies the soft coefficient
    traced: bool = False,  # the body of the torch.library op that torch.compile traces (see autograd.py)
):
    """Runs the kernel once. Returns (loss, stats [4, H] or None, grad or None, counts or None): a forward
    of "mean" (or with stats) returns the [5, H] buffer holding n_valid, which backward takes as `counts`.

    `traced`: the launch as a compiled graph holds it. The kernel goes through `wrap_triton`, so Inductor
    sees it and launches (and captures) it itself; the workspace is a fresh zeroed buffer (the graph owns
    its memory); a pointer the kernel never touches gets a buffer of its own (no argument aliases another,
    as functionalization asks); no register cap (Inductor takes none for a user kernel)."""
    num_heads, n, c = logits.shape
    if traced:  # the kernel is specialised on H and C: concrete (a guard each); N may stay symbolic
        num_heads, c = int(num_heads), int(c)
    device = logits.device
    h_pad, block, num_blocks, num_warps, stages, tail, safe, cap, fit = plan(
        num_heads, c, params.block_c, logits.element_size(), shared_memory_limit(device))
    reduce = compute_loss and params.reduction != "none" and row_weights is None
    mean = params.reduction == "mean" and (reduce or counts is not None)
    if compute_grad and (reduce or return_stats):
        raise ValueError("internal: a launch that reduces the loss or counts stats computes no gradient")
    f32 = torch.float32
    finish = reduce or return_stats  # the last program finishes sums kept in the workspace
    if traced:
        ws = torch.zeros(3 * num_heads + 3, dtype=f32, device=device) if finish and n else None
    else:
        ws = workspace(num_heads, device) if finish and n else None
    if finish:
        stats = (torch.empty if n else torch.zeros)((5, num_heads), dtype=f32, device=device)
    else:
        stats = counts
    if reduce:
        loss = (torch.empty if n else torch.zeros)((), dtype=f32, device=device)
    elif compute_loss:
        loss = torch.empty((num_heads, n), dtype=f32, device=device)
    else:
        loss = None
    # a pointer the kernel never uses (its constexprs rule every access out): another of the call's
    # buffers, or traced, an empty one of its own
    if traced:
        unused = torch.empty(0, dtype=f32, device=device)
    else:
        unused = loss if loss is not None else stats if stats is not None else row_weights
    loss = unused if loss is None else loss
    stats = unused if stats is None else stats
    ws = unused if ws is None else ws
    probs = target.is_floating_point()
    if compute_grad:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_out is None else grad_out
    else:
        grad = unused if traced else logits  # never written (COMPUTE_GRAD is a constexpr False)
    r = row_weights if row_weights is not None else unused
    r_strides = (0, 0) if row_weights is None or row_weights.dim() == 0 else row_weights.stride()
    vec = vector_width(logits, grad if compute_grad else logits, traced)
    mode = 1 if save_row_stats is not None else 2 if row_stats is not None else 0
    rs = save_row_stats if mode == 1 else row_stats if mode == 2 else unused
    if mode:
        k = row_stats_count(target)
        if rs.shape != (k, num_heads, n) or rs.dtype != f32 or not rs.is_contiguous():
            raise ValueError(f"row statistics must be contiguous float32 [{k}, {num_heads}, {n}], got {rs.dtype} "
                             f"{tuple(rs.shape)}")
    if n > 0:
        g_strides = (grad.stride(0) // vec, grad.stride(1) // vec, grad.stride(2)) if compute_grad else (0, 0, 0)
        args = (logits, logits.stride(0) // vec, logits.stride(1) // vec, logits.stride(2),
                target, target.stride(0), target.stride(1) if probs else 0,
                grad, *g_strides,
                loss, stats, ws, r, r_strides[0], r_strides[1], rs, unused if soft_factor is None else soft_factor,
                n, c // vec, params.ignore_index,
                1.0 / params.temperature, params.hard_coef, params.soft_coef, params.label_smoothing)
        constexprs = (num_heads, h_pad, block, num_blocks, reduce, mean, compute_loss, compute_grad,
                      row_weights is not None, params.detach_consensus, return_stats, params.label_smoothing > 0,
                      params.temperature == 2.0, params.soft_loss == "kl", vec, mode, stages, probs, fast_exp(), tail,
                      safe, soft_factor is not None)
        if traced:
            traced_launch(n, args, constexprs, num_warps)
        else:
            # Triton launches on the current device: logits on another GPU (model parallel, device_map) need it set.
            index = device.index
            guard = (torch.cuda.device(device) if device.type == "cuda" and index is not None
                     and index != torch.cuda.current_device() else contextlib.nullcontext())
            with guard:
                kernel_launcher(n, args, constexprs, num_warps, index if device.type == "cuda" else None, cap, fit)
    return loss, (stats[:4] if return_stats else None), (grad if compute_grad else None), (stats if finish else None)


def traced_launch(grid0, args: tuple, constexprs: tuple, num_warps: int) -> None:
    """The kernel on a grid of `grid0` programs, as a traced graph holds it: through `wrap_triton`, a node
    Inductor compiles and launches itself (its analysis of the kernel's stores tells it which buffers the
    kernel writes). The interpreter's kernel cannot be traced (wrap_triton hands it back as it is): there the
    op is opaque to the compiler, and this body is its fake implementation too, so on fake tensors nothing
    is launched (the buffers' shapes are the result)."""
    if interpreter_active():
        if isinstance(args[0], torch._subclasses.FakeTensor):
            return
        kernel = collab_loss_kernel
    else:
        from torch.library import wrap_triton

        kernel = wrap_triton(collab_loss_kernel)
    kernel[(grid0,)](*args, **dict(zip(CONSTEXPRS, constexprs)), num_warps=num_warps)


def num_valid(target: torch.Tensor, params: CollabLossParams) -> torch.Tensor:
    """[] the number of samples that count, on the device (no sync): labels other than ignore_index, or
    every row of a probability target."""
    if target.is_floating_point():
        return torch.full((), target.shape[0], dtype=torch.int64, device=target.device)
    return (target != params.ignore_index).sum()


def row_stats_count(target: torch.Tensor) -> int:
    # m1, s1, s_t, m_c, s_c, t_c, v_c, n_fin, the row's absent-class flag; the target's sum for probabilities
    return 10 if target.is_floating_point() else 9


def row_stats_buffer(logits: torch.Tensor, target: torch.Tensor, params: CollabLossParams) -> torch.Tensor | None:
    """fp32 [K, H, N] for forward to keep pass 1's statistics of rows longer than one block (backward then
    reads the row once instead of twice); None where a row is one block (read once anyway)."""
    num_heads, n, c = logits.shape
    if pick_block_c(int(num_heads), int(c), params.block_c)[1] == 1:  # (int: concrete under a trace)
        return None
    return torch.empty((row_stats_count(target), num_heads, n), dtype=torch.float32, device=logits.device)
