"""What the fused loss kernel executes per logit at language-model shapes, read from the SASS that Triton
builds for sm_90 (H100/H200) through the launcher's own calls on meta tensors (specialised by Triton's
launch-time binder and compiled, never launched: no GPU needed), and what that implies on a GPU.

    python benchmarks/sass_loss.py                    # default shapes: markdown + JSON in benchmarks/results/
    python benchmarks/sass_loss.py --json -           # the rows as JSON on stdout (what tests/ read)
    python benchmarks/sass_loss.py --shapes H8:32000:bf16 --stats

Per shape and phase (forward: the loss, keeping the row statistics; backward: the gradient from them):
the block the launcher chose (as on a GPU: its register cap, and its fallback blocks where the default
does not fit 128 registers without spilling, CachedLauncher's choice with the SASS's counts), registers,
CTAs per SM, stack, and each column loop (a backward branch in the SASS): its instructions and
MUFU.EX2 per element (elements = heads x block columns a thread holds), and its local-memory accesses. The
finite path (full blocks of finite logits: what an LM row runs) is the smallest loop with exponentials; the
others are the SAFE loops (rows with -inf, the last partial block). The model: warp-instructions of a
fwd+bwd (rows x warps x (full blocks x the finite loop + the rest of the kernel)) over SMs x 4 schedulers x
1 per clock, against the DRAM floor (logits read once + gradient written once at a copy rate). A bound, not
a measurement: latency, occupancy and the memory system decide the rest on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, versions, write_tables  # noqa: E402

from collab_fast.kernels import collab_loss as cl  # noqa: E402
from collab_fast.kernels.launch import LOCAL_BYTES_OK, CachedLauncher  # noqa: E402

DEFAULT_SHAPES = ["H1:128256:bf16", "H2:128256:bf16", "H2:128256:fp32", "H3:50257:bf16", "H4:32000:bf16",
                  "H8:32000:bf16", "H8:50257:bf16"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KINDS = [("MUFU", r"MUFU"), ("load/store global", r"(LDG|STG)"), ("shared", r"(LDS|STS|LDSM)"), ("shuffle", r"SHFL"),
         ("barrier", r"BAR"), ("fp32 FMA pipe", r"(FFMA|FMUL|FADD)"), ("fp compare/select", r"(FSETP|FSEL|FMNMX|FSET)"),
         ("integer/logic", r"(ISETP|IADD3|IMAD|LOP3|SEL|SHF|LEA|PRMT|P2R|R2P|PLOP3|IABS|IMNMX|VIADD)"),
         ("conversion", r"(F2F|I2F|F2I|F2FP|HADD2|HFMA2|HMUL2)"), ("local memory", r"(LDL|STL)")]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _Sm90:
    """Enough of a driver for Triton's binder to specialise and compile for an H100 without one."""

    def __init__(self, real):
        self.real = real

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        return getattr(self.real, name)


OPTIONS = {  # --options: settings other than the defaults (T 2, detached CE consensus, labels)
    "kl": {"soft_loss": "kl"}, "smooth": {"label_smoothing": 0.1}, "live": {"detach_consensus": False},
    "t3": {"temperature": 3.0}, "probs": {},  # probs: a target distribution [N, C] instead of labels
}


class _CompileOnly(CachedLauncher):
    """The loss's launcher as it chooses on a GPU (the register cap, the fallback blocks: CachedLauncher._choose),
    with registers and local memory read from the SASS instead of a loaded kernel; compiles, never launches."""

    def __init__(self):
        super().__init__(cl.jit.collab_loss_kernel, cl.launch.CONSTEXPRS)
        self.compiled = []

    def _usage(self, kernel) -> tuple[int, int]:
        usage = sass_of(kernel.asm["cubin"])[1]
        return usage["reg"], usage.get("stack", 0) + usage.get("local", 0)

    def __call__(self, grid0, args, constexprs, num_warps, device=None, maxnreg=None, fit=None):
        chosen, cap = self._choose(grid0, args, constexprs, num_warps, maxnreg, fit)
        kernel = self._compile(grid0, args, chosen, num_warps, cap)
        values = dict(zip(self.constexpr_names, chosen))
        kernel.choice = {"maxnreg": maxnreg, "cap_kept": maxnreg is not None and cap is not None,
                         "block_c": values["BLOCK_C"], "safe_block": values["SAFE_BLOCK"],
                         "fallback": chosen != constexprs}
        self.compiled.append(kernel)


def compile_launches(heads: int, rows: int, classes: int, dtype: torch.dtype, stats: bool,
                     options: tuple[str, ...] = ()) -> list:
    """The kernels the launcher's forward and backward calls compile to, for sm_90."""
    try:
        real = driver.active
    except Exception:
        real = None
    launcher, cl.launch.kernel_launcher = cl.launch.kernel_launcher, _CompileOnly()
    driver.set_active(_Sm90(real))
    try:
        z = torch.empty(heads, rows, classes, dtype=dtype, device="meta")
        if "probs" in options:
            y = torch.empty(rows, classes, dtype=torch.float32, device="meta")
        else:
            y = torch.empty(rows, dtype=torch.int64, device="meta")
        p = cl.CollabLossParams(**{k: v for o in options for k, v in OPTIONS[o].items()})
        rs = cl.launch.row_stats_buffer(z, y, p)
        cl.launch.launch(z, y, p, return_stats=stats, save_row_stats=rs)
        r, w = torch.empty((), device="meta"), torch.empty(5, heads, device="meta")  # as backward: grad_output, n_valid
        cl.launch.launch(z, y, p, compute_loss=False, compute_grad=True, row_weights=r, row_stats=rs, counts=w)
        return cl.launch.kernel_launcher.compiled
    finally:
        cl.launch.kernel_launcher = launcher
        if real is not None:
            driver.set_active(real)


def sass_of(cubin: bytes) -> tuple[list, dict]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([str(CUOBJDUMP), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    ins = []  # (address, opcode, operands)
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", text):
        ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return ins, {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


def _load_bytes(op: str) -> int:
    """Bytes one thread loads with a global load opcode (LDG.E.128: 16; LDG.E.U16: 2; LDG.E: 4)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def loops_of(ins: list, element_size: int) -> list[dict]:
    """Each loop (a branch back to an earlier address): its instructions per element, by kind. A loop's
    elements are the logits a thread loads in one iteration (its global loads' bytes over the logit size):
    the SAFE loops run narrower blocks than the finite one."""
    out = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
        kinds = collections.Counter()
        for o in body:
            kinds[next((name for name, pat in KINDS if re.match(pat, o)), "other")] += 1
        elements = sum(_load_bytes(o) for o in body if o.startswith("LDG")) // element_size
        if elements == 0:
            continue  # no logits read: the ignored rows' zero fill
        out.append({"instructions": len(body), "elements": elements, "per_element": len(body) / elements,
                    "ex2_per_element": sum(o.startswith("MUFU.EX2") for o in body) / elements,
                    "local": kinds["local memory"],
                    "by_kind_per_element": {k: round(v / elements, 2) for k, v in kinds.most_common()}})
    return out


def ctas_per_sm(regs: int, warps: int) -> int:
    per_warp = math.ceil(regs * 32 / 256) * 256  # allocation granularity: 256 registers a warp
    return min(65536 // (per_warp * warps), 64 // warps, 32)


def measure(shape: str, stats: bool, rows: int, sms: int, ghz: float, copy_tbs: float,
            options: tuple[str, ...] = ()) -> list[dict]:
    h, c, dt = shape.split(":")
    heads, classes, dtype = int(h.lstrip("H")), int(c), DTYPES[dt]
    _, _, warps = cl.launch.pick_block_c(heads, classes)
    out, warp_instructions = [], 0
    for phase, kernel in zip(("forward", "backward"), compile_launches(heads, rows, classes, dtype, stats, options)):
        choice = kernel.choice  # the block the launcher chose for this phase (a fallback where the default spills)
        block = choice["block_c"]
        per_thread = heads * block // (warps * 32)  # logits of a block a thread loads (padded heads load none)
        full_blocks = classes // block
        ins, usage = sass_of(kernel.asm["cubin"])
        loops = loops_of(ins, dtype.itemsize)
        exp_loops = sorted((lp for lp in loops if lp["ex2_per_element"] > 0), key=lambda lp: lp["per_element"])
        # the finite loop: the cheapest over a whole block (a row of one block has no column loop: its whole
        # kernel runs once); the others run SAFE, over narrower blocks where _safe_block says so
        whole = [lp for lp in exp_loops if lp["elements"] == per_thread]
        finite = (whole or exp_loops or [None])[0]
        if finite is not None:
            exp_loops.remove(finite)
            exp_loops.insert(0, finite)
        rest = len(ins) - sum(lp["instructions"] for lp in loops)  # straight-line code, counted once
        warp_instructions += rows * warps * (full_blocks * finite["instructions"] + rest if finite else len(ins))
        out.append({"shape": f"H{heads} C{classes} {dt}", "phase": phase, "stats": stats, "options": list(options),
                    "maxnreg": choice["maxnreg"], "cap_kept": choice["cap_kept"], "block_c": block,
                    "safe_block": choice["safe_block"], "fallback": choice["fallback"],
                    "num_blocks": -(-classes // block), "warps": warps, "elements_per_thread": per_thread, **usage,
                    "ctas_per_sm": ctas_per_sm(usage["reg"], warps), "exp_loops": len(exp_loops),
                    "finite": finite, "safe": exp_loops[1:], "loop_local": sum(lp["local"] for lp in loops),
                    "triton": triton.__version__})
    nbytes = heads * rows * classes * dtype.itemsize
    issue_ms = warp_instructions / (sms * 4 * ghz * 1e9) * 1e3
    floor_ms = 2 * nbytes / (copy_tbs * 1e12) * 1e3
    for r in out:
        r.update({"rows": rows, "fwd_bwd_issue_bound_ms": issue_ms, "floor_ms_1R1W": floor_ms,
                  "issue_bound_pct_of_floor": 100 * floor_ms / issue_ms})
    return out


def markdown(rows: list[dict], argv: list[str], model: dict) -> str:
    lines = ["# Fused loss kernel: SASS per element for sm_90 (compiled, not run: no GPU)", "",
             f"Command: `python benchmarks/sass_loss.py {' '.join(argv)}`. Versions: {json.dumps(versions())}.",
             f"Model: {model['sms']} SMs x 4 schedulers x 1 warp-instruction a clock at {model['ghz']} GHz; floor = "
             f"logits read once + gradient written once at {model['copy_tbs']} TB/s. N = {rows[0]['rows']} rows.", "",
             "Block / SAFE block: the columns of the finite loop's and the SAFE loops' blocks the launcher chose "
             "(marked * where a fallback: the default block did not fit 128 registers without spilling). Register "
             "cap: the launcher's maxnreg for the shape; 'kept' where the capped kernel's local memory stays within "
             f"{LOCAL_BYTES_OK} bytes a thread (launch.CachedLauncher), else dropped: the row shows the uncapped "
             "kernel, which is what runs.", "",
             "| shape | phase | block / SAFE block | register cap | regs | CTAs/SM | stack | finite loop / element | "
             "MUFU.EX2 / element | SAFE loops / element | fwd+bwd issue bound (ms) | floor (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        safe = ", ".join(f"{lp['per_element']:.1f}" for lp in r["safe"])
        f = r["finite"] or {"per_element": float("nan"), "ex2_per_element": float("nan")}
        cap = "-" if r["maxnreg"] is None else f"{r['maxnreg']} ({'kept' if r['cap_kept'] else 'dropped: spills'})"
        opts = "".join(f" {o}" for o in r.get("options", ()))
        block = f"{r['block_c']} / {r['safe_block']}{' *' if r['fallback'] else ''}"
        lines.append(f"| {r['shape']}{' stats' if r['stats'] else ''}{opts} | {r['phase']} | {block} | {cap} | "
                     f"{r['reg']} | "
                     f"{r['ctas_per_sm']} | {r.get('stack', 0)} | {f['per_element']:.1f} | {f['ex2_per_element']:.2f} | "
                     f"{safe} | {r['fwd_bwd_issue_bound_ms']:.2f} | {r['floor_ms_1R1W']:.2f} |")
    lines += ["", "Finite loop by kind (per element; nan: the row is one block, no loop):", ""]
    for r in rows:
        if r["finite"]:
            lines.append(f"- {r['shape']} {r['phase']}: {r['finite']['by_kind_per_element']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="H:C:DTYPE",
                    help="heads, classes and dtype (bf16, fp16, fp32) of each shape")
    ap.add_argument("--rows", type=int, default=4096, help="rows N (for the model only)")
    ap.add_argument("--stats", action="store_true", help="forward with return_stats (per-head accuracy)")
    ap.add_argument("--options", nargs="*", default=[], choices=sorted(OPTIONS),
                    help="settings other than the defaults: KL soft loss, label smoothing 0.1, a live consensus, "
                         "T = 3, a probability target")
    ap.add_argument("--no-fit", action="store_true",
                    help="without the launcher's fallback blocks (collab_loss.launch.FIT_MAX_HEADS = 0): the default "
                         "block under the cap, or uncapped where it spills (an A/B of the register fit)")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--ghz", type=float, default=1.98, help="SM clock (H100/H200 SXM boost)")
    ap.add_argument("--copy-tbs", type=float, default=4.225,
                    help="DRAM copy rate, TB/s (default: measured on the H200, bench_loss_nvidia-h200_2026-12-04)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON here ('-': stdout, nothing else printed)")
    ap.add_argument("--out", metavar="DIR", default=str(RESULTS_DIR), help="where the markdown + JSON go")
    ap.add_argument("--tag", default="", help="a word in the result files' names (e.g. which change they measure)")
    args = ap.parse_args(argv)
    if not CUOBJDUMP.exists():
        print(f"sass_loss: this Triton ({triton.__version__}) ships no cuobjdump at {CUOBJDUMP}", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[\w.-]*", args.tag):
        ap.error(f"--tag: {args.tag!r} may hold letters, digits, '.', '-' and '_' only")
    for s in args.shapes:
        if not re.fullmatch(r"H[1-9]\d*:[1-9]\d*:(bf16|fp16|fp32)", s):
            ap.error(f"--shapes: {s!r} is not H:C:DTYPE (e.g. H2:128256:bf16)")
    if args.no_fit:
        cl.launch.FIT_MAX_HEADS = 0
    rows = [r for s in args.shapes
            for r in measure(s, args.stats, args.rows, args.sms, args.ghz, args.copy_tbs, tuple(args.options))]
    if args.json == "-":
        print(json.dumps(rows))
        return 0
    text = markdown(rows, sys.argv[1:] if argv is None else argv,
                    {"sms": args.sms, "ghz": args.ghz, "copy_tbs": args.copy_tbs})
    write_tables(text, rows, args.json, args.out,
                 f"sass_loss_sm90_triton{triton.__version__}{'_stats' if args.stats else ''}"
                 f"{''.join('_' + o for o in args.options)}{'_' + args.tag if args.tag else ''}_{datetime.date.today()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
