"""Collaborative learning for a small causal language model, on this CPU machine in minutes.

    python examples/collab_lm.py                       # H=2 heads vs a single head, 3 seeds each
    python examples/collab_lm.py --heads 4 --steps 600 --seeds 0,1,2,3,4

The model is a byte-level GPT (pre-LN blocks, causal attention), built in code. Its collaborative version
shares the lower blocks and gives each head its own top block(s), final norm and lm-head (ILR sharing for
transformers, the paper's sec. 3.2), with backprop rescaling at the split (collab_fast.branch: the shared
blocks receive the mean of the heads' gradients). The loss is fused_linear_collab_loss: the heads' lm-heads
and the collaborative loss, chunked, so the [H, tokens, 256] logits never exist. Head 0 is exported as the
plain single-head model (its state dict loads strict into TinyGPT) and evaluated alone.

Corpus: the Python standard library's own sources (every .py file of this interpreter's stdlib, sorted by
path; files whose index is a multiple of 10 are the validation split). It exists offline wherever Python
does. Reported: head 0's validation loss (nats per byte) against a single-head model trained for the same
steps on the same batches, mean and standard deviation over seeds, and the training FLOPs of each.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from collab_fast import branch, fused_linear_collab_loss


# ------------------------------------------------------------------------------------------ the corpus
def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) of the stdlib sources, at most max_bytes in all."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts)
    train, val, total = [], [], 0
    for i, p in enumerate(files):
        try:
            data = p.read_bytes()
        except OSError:
            continue
        (val if i % 10 == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val)


def batch(data: torch.Tensor, size: int, context: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.randint(0, len(data) - context - 1, (size,), generator=g)
    x = torch.stack([data[j : j + context] for j in i.tolist()])
    y = torch.stack([data[j + 1 : j + 1 + context] for j in i.tolist()])
    return x, y


# ------------------------------------------------------------------------------------------ the model
class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """The plain model: embeddings, blocks, final norm, lm-head (256 bytes)."""

    def __init__(self, d: int = 64, layers: int = 4, n_head: int = 4, context: int = 64, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class CollabGPT(nn.Module):
    """H heads sharing the embeddings and the lower `layers - top` blocks; each head owns its top blocks,
    final norm and lm-head. forward(idx) -> per-head hidden states [H, B*T, d] and lm-head weights [H, V, d]."""

    def __init__(self, heads: int, top: int, **kw):
        super().__init__()
        self.num_heads, self.top = heads, top
        copies = [TinyGPT(**kw) for _ in range(heads)]  # independently initialised: each head its own
        base = copies[0]
        self.tok, self.pos = base.tok, base.pos
        self.shared = nn.ModuleList(base.blocks[: len(base.blocks) - top])
        self.own = nn.ModuleList(nn.ModuleList(c.blocks[len(c.blocks) - top :]) for c in copies)
        self.ln_f = nn.ModuleList(c.ln_f for c in copies)
        self.lm = nn.ModuleList(c.head for c in copies)
        self.kw = kw

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.shared:
            x = blk(x)
        outs = []
        for xh, blocks, ln in zip(branch(x, self.num_heads) if self.num_heads > 1 else [x], self.own, self.ln_f):
            for blk in blocks:
                xh = blk(xh)
            outs.append(ln(xh).flatten(0, 1))
        return torch.stack(outs), torch.stack([m.weight for m in self.lm])

    def export_head(self, k: int) -> TinyGPT:
        net = TinyGPT(**self.kw)
        net.tok.load_state_dict(self.tok.state_dict())
        net.pos.load_state_dict(self.pos.state_dict())
        n_shared = len(self.shared)
        for i, blk in enumerate(self.shared):
            net.blocks[i].load_state_dict(blk.state_dict())
        for i, blk in enumerate(self.own[k]):
            net.blocks[n_shared + i].load_state_dict(blk.state_dict())
        net.ln_f.load_state_dict(self.ln_f[k].state_dict())
        net.head.load_state_dict(self.lm[k].state_dict())
        return net


def train_flops(model: nn.Module, tokens: int, heads: int, top: int, layers: int, d: int, vocab: int) -> float:
    """6 x parameters-touched x tokens (forward + backward), attention's T^2 term left out (small here)."""
    block = 12 * d * d
    per_token = (layers - top) * block + heads * (top * block + vocab * d)
    return 6.0 * per_token * tokens


@torch.no_grad()
def val_loss(net: TinyGPT, data: torch.Tensor, context: int, batches: int = 20) -> float:
    net.eval()
    g = torch.Generator().manual_seed(1234)  # the same validation windows for every run
    total = 0.0
    for _ in range(batches):
        x, y = batch(data, 32, context, g)
        total += F.cross_entropy(net(x).flatten(0, 1), y.flatten()).item()
    net.train()
    return total / batches


def run(heads: int, seed: int, args, train_data, val_data) -> dict:
    torch.manual_seed(seed)
    kw = dict(d=args.d, layers=args.layers, n_head=4, context=args.context)
    model = CollabGPT(heads, args.top, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(10_000 + seed)  # the same batches for the single and the collaborative run
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = batch(train_data, args.batch, args.context, g)
        hidden, weight = model(x)
        loss = fused_linear_collab_loss(hidden, weight, y.flatten(), temperature=args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head0 = model.export_head(0)
    plain = TinyGPT(**kw)
    plain.load_state_dict(head0.state_dict(), strict=True)  # the exported head is the plain model
    return {"heads": heads, "seed": seed, "val_loss_head0": val_loss(plain, val_data, args.context),
            "train_s": time.perf_counter() - t0,
            "train_gflops": train_flops(model, args.steps * args.batch * args.context, heads, args.top, args.layers,
                                        args.d, 256) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=2, help="collaborative heads (default: %(default)s)")
    p.add_argument("--top", type=int, default=2, help="blocks each head owns (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.top <= args.layers:
        p.error(f"--top must be in [1, --layers {args.layers}], got {args.top}")
    train_data, val_data = load_corpus(args.corpus_bytes)
    print(f"corpus: {len(train_data) / 1e6:.2f} MB train, {len(val_data) / 1e6:.2f} MB validation (this Python's "
          f"stdlib sources, {sys.version.split()[0]})", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for heads in (1, args.heads):
        for seed in seeds:
            r = run(heads, seed, args, train_data, val_data)
            results.append(r)
            print(f"heads {heads} seed {seed}: head-0 validation loss {r['val_loss_head0']:.4f} nats/byte, "
                  f"{r['train_gflops']:.0f} GFLOP, {r['train_s']:.0f} s", flush=True)
    summary = {}
    for heads in (1, args.heads):
        v = [r["val_loss_head0"] for r in results if r["heads"] == heads]
        summary[heads] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
        print(f"heads {heads}: {summary[heads][0]:.4f} +- {summary[heads][1]:.4f} (mean +- sd over {len(v)} seeds)")
    diffs = [b["val_loss_head0"] - a["val_loss_head0"] for a in results if a["heads"] == 1
             for b in results if b["heads"] == args.heads and b["seed"] == a["seed"]]
    print(f"collaborative - single, paired by seed: {statistics.mean(diffs):+.4f} "
          f"(+- {statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.4f} sd)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
