"""What the trainer reports: device-side meters (read at log intervals, the hot path's only syncs),
records in metrics.jsonl and TensorBoard, console lines, and host-side progress (a tqdm bar on a
terminal, a plain line every few seconds otherwise)."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

from collab_fast.checkpoint import write_text_atomic
from collab_fast.distributed import Dist

__all__ = ["Logger", "Meter", "Progress", "hms", "memory_stats"]


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Meter:
    """Per-head sums of one log interval, kept on the device; read() is the one sync. The sums are zeroed in
    place: a captured step (--cuda-graphs) adds into the tensors it was captured with."""

    def __init__(self, num_heads: int, device: torch.device):
        self.h, self.device = num_heads, device
        z = lambda *s: torch.zeros(*s, device=self.device, dtype=torch.float64)
        self.loss, self.hard, self.soft, self.correct, self.count = z(()), z(self.h), z(self.h), z(self.h), z(())
        self.reset()

    def reset(self) -> None:
        torch._foreach_zero_([self.loss, self.hard, self.soft, self.correct, self.count])
        self.optimizer_steps = 0  # steps, not micro-batches: the ETA divides time by these
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, loss: torch.Tensor, stats) -> None:
        """One micro-batch's loss (its mean over samples) and CollabStats."""
        n = stats.num_valid.double()
        self.loss += loss.detach().double() * n
        self.hard += stats.hard.double() * n
        self.soft += stats.soft.double() * n
        self.correct += stats.correct.double()
        self.count += n

    def step_done(self, images: int) -> None:
        self.optimizer_steps += 1
        self.images += images

    def read(self, proc: Dist) -> dict:
        t = proc.all_reduce(torch.cat([self.loss[None], self.hard, self.soft, self.correct, self.count[None]])).cpu()
        dt = time.perf_counter() - self.t0
        n, h = max(float(t[-1]), 1.0), self.h
        return {"loss": float(t[0]) / n, "hard": (t[1 : 1 + h] / n).tolist(), "soft": (t[1 + h : 1 + 2 * h] / n).tolist(),
                "train_acc": (t[1 + 2 * h : 1 + 3 * h] / n).tolist(), "samples": int(t[-1]),
                "img_per_s": self.images * proc.world / dt, "sec_per_step": dt / max(self.optimizer_steps, 1)}


class Progress:
    """Host-side progress, no device sync: mode "bar" (tqdm), "lines" (one line every `every` seconds, for
    logs that are not a terminal), "off"; "auto" picks bar on a terminal, lines otherwise."""

    def __init__(self, mode: str, total_steps: int, done_steps: int, every: float, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.total, self.every = total_steps, every
        self.bar = None
        if self.mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print("note: the progress bar needs tqdm (pip install 'collab_fast[train]'); printing lines instead",
                      file=sys.stderr)
                self.mode = "lines"
            else:
                self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True,
                                file=sys.stderr, smoothing=0.1)
        self.last_line = time.perf_counter()
        self.stamps: list[tuple[float, int, int]] = []  # (time, step, images) over a recent window

    def update(self, epoch: int, epochs: int, step: int, images: int) -> None:
        now = time.perf_counter()
        self.stamps = (self.stamps + [(now, step, images)])[-50:]
        if self.mode == "bar":
            self.bar.set_description(f"epoch {epoch}/{epochs}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.mode == "lines" and now - self.last_line >= self.every:
            self.last_line = now
            print(f"progress: epoch {epoch}/{epochs} step {step}/{self.total} {self.rate_text()}", flush=True)

    def rate_text(self) -> str:
        if len(self.stamps) < 2:
            return ""
        (t0, s0, _), (t1, s1, _) = self.stamps[0], self.stamps[-1]
        imgs = sum(i for _, _, i in self.stamps[1:])
        steps_per_s = (s1 - s0) / max(t1 - t0, 1e-9)
        eta = (self.total - s1) / steps_per_s if steps_per_s > 0 else float("nan")
        return f"{imgs / max(t1 - t0, 1e-9):.1f} img/s ETA {hms(eta)}"

    def postfix(self, rec: dict) -> None:
        if self.bar is not None:
            acc = "/".join(f"{100 * a:.0f}" for a in rec["train_acc"])
            self.bar.set_postfix_str(f"loss {rec['loss']:.3f} acc/head {acc} {rec['img_per_s']:.0f} img/s", refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _open_repaired(path: Path):
    """metrics.jsonl for appending, with a line cut by an earlier crash or write error removed first (the next
    record would otherwise be glued onto it)."""
    try:
        # O_NOFOLLOW: never append to (or cut) the target of a link planted in the run folder
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        f = open(fd, "a+b")
        size = f.seek(0, os.SEEK_END)
        if size:
            start = max(0, size - (1 << 16))  # records are short: the torn one lies in the last 64 KB
            f.seek(start)
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                f.truncate(start + cut + 1 if cut >= 0 else start)
        f.close()
        return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "a")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; the trainer appends to its own metrics.jsonl, never "
                             "through a link: remove it") from None
        raise ValueError(f"cannot write {path} ({exc.strerror or exc}); check the folder's permissions and space") from None


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes its events from a thread, which re-raises a write error (a full disk) and so prints
    a traceback; the same error reaches the Logger at its next add_scalar, which says it in one line. Only
    that thread's OSError is silenced (installed once; other threads' errors print as before)."""
    previous = threading.excepthook
    if getattr(previous, "_collab_fast", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook._collab_fast = True
    threading.excepthook = hook


# summary.csv: one row per evaluation (timm's summary.csv has one per epoch): where the run stood then.
_SUMMARY = [("epoch", "epoch"), ("step", "step"), ("lr", None), ("train_loss", None), ("train_hard_head0", None),
            ("eval_loss_head0", "val_loss_head0"), ("eval_top1", "top1"), ("eval_top5", "top5"),
            ("eval_top1_ensemble", "top1_ensemble"), ("ema_eval_top1", "ema_top1"), ("ema_eval_top5", "ema_top5")]


class Logger:
    """metrics.jsonl (one JSON record per line), summary.csv (a row per evaluation), TensorBoard events (if
    installed), console lines."""

    def __init__(self, out: Path, enabled: bool, progress: Progress, record: bool = True):
        """enabled: this process logs (the main one); record: into metrics.jsonl and TensorBoard too (not for
        --eval-only, which leaves the record of how the run was trained as it was)."""
        self.enabled, self.progress = enabled, progress
        self.path = out / "metrics.jsonl"
        self.summary = out / "summary.csv"
        self.last_train: dict = {}
        self.file = _open_repaired(self.path) if enabled and record else None
        self.tb = None
        if self.file is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: no TensorBoard events (pip install 'collab_fast[train]' for tensorboard)", file=sys.stderr)
            else:
                _quiet_tensorboard_thread()
                try:
                    self.tb = SummaryWriter(str(out / "tb"))
                except OSError as exc:  # a convenience beside metrics.jsonl: never stops a run
                    print(f"collab_fast: warning: no TensorBoard events ({out / 'tb'}: {exc.strerror or exc}); "
                          "metrics.jsonl goes on", file=sys.stderr)
            self._write(json.dumps({"kind": "start", "time": time.time()}) + "\n")  # wall time from here

    def __call__(self, rec: dict, kind: str) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "time": time.time(), **rec}
        if self.file is not None:
            self._write(json.dumps(rec) + "\n")
        if self.tb is not None:
            try:
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k not in ("time", "step", "epoch"):
                        self.tb.add_scalar(f"{kind}/{k}", v, rec.get("step", 0))
                    elif isinstance(v, list):
                        for i, x in enumerate(v):
                            self.tb.add_scalar(f"{kind}/{k}/head{i}", x, rec.get("step", 0))
            except OSError as exc:  # TensorBoard is a convenience: its write errors never stop a run
                print(f"collab_fast: warning: TensorBoard events stopped ({exc.strerror or exc}); metrics.jsonl "
                      "goes on", file=sys.stderr)
                self.tb = None
        if kind == "train":
            self.progress.postfix(rec)
            self.last_train = rec
        if kind == "eval" and self.file is not None:
            self._summary_row(rec)
        self.progress.write(self.line(rec, kind))

    def _summary_row(self, rec: dict) -> None:
        t = self.last_train
        row = {col: rec.get(key) if key else None for col, key in _SUMMARY}
        row.update(lr=t.get("lr"), train_loss=t.get("loss"), train_hard_head0=(t.get("hard") or [None])[0])
        cols = [c for c, _ in _SUMMARY if c in ("epoch", "step") or row[c] is not None]
        rows = []
        if self.summary.exists():
            try:
                with open(self.summary, newline="") as f:
                    rows = list(csv.DictReader(f))
            except (OSError, csv.Error, UnicodeDecodeError):
                rows = []  # damaged: started again (metrics.jsonl keeps the full record)
            cols += [c for c in (rows[0].keys() if rows else []) if c not in cols and c in dict(_SUMMARY)]
            cols = [c for c, _ in _SUMMARY if c in cols]
            rows = [r for r in rows if r.get("step") != str(row["step"])]  # an evaluation repeated at resume
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows + [{k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()}])
        try:
            write_text_atomic(self.summary, text.getvalue())
        except OSError as exc:  # a convenience beside metrics.jsonl: never stops a run
            print(f"collab_fast: warning: summary.csv not written ({exc.strerror or exc})", file=sys.stderr)

    def _write(self, line: str) -> None:
        """One whole record or nothing: a failed write is cut back off, so no torn line is left behind."""
        pos = self.file.tell()
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as exc:
            try:
                self.file.truncate(pos)
            except OSError:
                pass  # _open_repaired drops the partial line on the next open
            raise ValueError(f"cannot write {self.path} ({exc.strerror or exc}); free space or fix the folder, then "
                             "--resume auto") from None

    @staticmethod
    def line(rec: dict, kind: str) -> str:
        epoch = f"epoch {rec['epoch']}/{rec['epochs']}"
        if kind == "train":
            acc = " ".join(f"{100 * a:.1f}" for a in rec["train_acc"])
            mem = rec.get("peak_mem_mb", rec.get("peak_rss_mb", 0))
            # Head 0's plain CE first (comparable across patterns); the collaborative loss sums every head's
            # hard and soft terms, so it grows with the number of heads (4 heads at chance: about 23).
            hard = rec.get("hard") or []
            ce = f"CE head0 {hard[0]:.4f}, " if hard else ""
            total = f"collaborative loss {rec['loss']:.4f} (sum over {len(hard)} heads)" if len(hard) > 1 else \
                f"loss {rec['loss']:.4f}"
            return (f"{epoch} step {rec['step']}: {ce}{total} lr {rec['lr']:.4g} "
                    f"train acc/head [{acc}] {rec['img_per_s']:.1f} img/s peak mem {mem:.0f} MB ETA {hms(rec['eta_s'])}")
        heads = " ".join(f"{a:.2f}" for a in rec["top1_heads"])
        return (f"{epoch} eval: top-1 head0 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}% | top-1 per head [{heads}] "
                f"ensemble {rec['top1_ensemble']:.2f}% | val CE head0 {rec['val_loss_head0']:.4f}, "
                f"collaborative loss {rec['val_loss']:.4f}")

    def close(self) -> None:
        if self.file:
            try:
                self.file.close()
            except OSError as exc:  # every record was flushed when written: nothing is lost here
                print(f"collab_fast: warning: closing {self.path} ({exc.strerror or exc})", file=sys.stderr)
            self.file = None
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError as exc:
                print(f"collab_fast: warning: TensorBoard events stopped ({exc.strerror or exc}); metrics.jsonl "
                      "is whole", file=sys.stderr)
            self.tb = None
