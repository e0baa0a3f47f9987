"""Image folders without DALI: a multi-process PyTorch DataLoader with Pillow decode (a machine or platform
with no DALI wheel, a CUDA driver that matches none). The same augmentation as the DALI pipeline (random
resized crop: area 0.08-1, aspect 3/4-4/3, 10 attempts, then a flip; evaluation: shorter side resized to
size / crop_ratio, centre crop), the same sharding and the same loader contract (collab_fast.data.loader.Loader).
Slower than DALI: decode and augmentation run on the CPU workers.

Workers start once per loader (persistent) from a fork server, not forked from the trainer: a process that
has started threads (torch's, Triton's, a CUDA context) can crash in a forked child, and Python 3.14 makes the
fork server its default for that reason. The epoch travels with each sample index, so persistent workers
need no per-epoch state.

Exact resume for free: the epoch's order is a permutation seeded by (seed, epoch), and every sample's crop and
flip are drawn from a generator seeded by (seed, epoch, sample), so starting at batch k of an epoch yields
exactly the batches an uninterrupted run saw from k on, with nothing read and dropped.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import select
import threading
import time

import torch

from collab_fast.data.images import IMAGENET_MEAN, IMAGENET_STD, DataError
from collab_fast.data.loader import default_threads
from collab_fast.data.noise import LabelNoise
from collab_fast.extras import require
from collab_fast.seeding import torch_generator

__all__ = ["TorchFolderLoader"]


def _crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """A random resized crop's box (left, top, right, bottom): area 8-100%, aspect 3/4-4/3 (log-uniform),
    10 attempts, else the centre square-ish crop of the whole image (as DALI and torchvision do)."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (0.08 + u[0] * 0.92)
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * 4 / 3), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class _FolderDataset(torch.utils.data.Dataset):
    """(epoch, sample index) -> (uint8 [3, S, S] image, sample index)."""

    def __init__(self, files, *, train, image_size, crop_ratio, augment, seed):
        self.files, self.train, self.size, self.crop_ratio = files, train, image_size, crop_ratio
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image = require("PIL.Image", "train", "reading image folders without DALI (Pillow)")
        path = self.files[index]
        try:
            with image.open(path) as im:
                im = im.convert("RGB")
                if self.train and self.augment != "none":
                    g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & (2**63 - 1))
                    im = im.resize((self.size, self.size), image.BILINEAR, box=_crop_box(*im.size, g))
                    if self.augment == "crop+flip" and torch.rand((), generator=g) < 0.5:
                        im = im.transpose(image.FLIP_LEFT_RIGHT)
                else:
                    short = round(self.size / self.crop_ratio)
                    w, h = im.size
                    scale = short / min(w, h)
                    im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                   image.BILINEAR)
                    w, h = im.size
                    left, top = (w - self.size) // 2, (h - self.size) // 2
                    im = im.crop((left, top, left + self.size, top + self.size))
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except Exception as exc:  # Pillow raises many types for broken files (DecompressionBombError included)
            raise DataError(f"could not decode {path} ({type(exc).__name__}: {exc}); find bad files with `python -m "
                            f"collab_fast.data check {os.path.dirname(os.path.dirname(path))} --decode`, or pass "
                            "--skip-bad-images") from None
        return data.view(self.size, self.size, 3).permute(2, 0, 1), index


class _Order(torch.utils.data.Sampler):
    """(epoch, sample index) of this rank's samples of the current epoch from position `start` on."""

    def __init__(self, n, *, train, rank, world, seed):
        self.n, self.train, self.rank, self.world, self.seed = n, train, rank, world, seed
        self.epoch, self.start = 0, 0

    def shard(self) -> list[int]:
        order = (torch.randperm(self.n, generator=torch_generator(self.seed * 1000003 + self.epoch))
                 if self.train else torch.arange(self.n)).tolist()
        lo, hi = self.n * self.rank // self.world, self.n * (self.rank + 1) // self.world
        return order[lo:hi]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.shard()[self.start:]])

    def __len__(self) -> int:
        return len(self.shard()) - self.start


_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None  # None: the platform's


def _exit_with(trainer: int, _worker_id: int) -> None:
    """In each worker: exit as soon as the trainer process does (SIGKILL included). A worker is the fork
    server's child, not the trainer's, and holds the fork server's liveness pipe: torch's own check (is my
    parent alive?) never fires, so without this the workers and the fork server outlive a killed trainer."""
    def watch():
        try:
            fd = os.pidfd_open(trainer)  # readable once the process has ended (Linux 5.3+)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(trainer):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="collab-fast-trainer-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class TorchFolderLoader:
    """(images, labels) batches of an image folder split through torch.utils.data (see the module doc).
    Arguments as DaliLoader's, with `device` instead of device_id; `threads` worker processes (0: load in this
    process)."""

    def __init__(self, files: list[str], labels: list[int], batch_size: int, *, train: bool, num_classes: int,
                 image_size: int, device: torch.device | str = "cpu", crop_ratio: float = 0.875,
                 rank: int = 0, world: int = 1, seed: int = 0, threads: int | None = None,
                 drop_last: bool | None = None, label_noise: float = 0.0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: str = "crop+flip"):
        if len(files) != len(labels) or not files:
            raise ValueError(f"need as many labels as files (got {len(files)} files, {len(labels)} labels)")
        self.device = torch.device(device)
        self.train, self.batch_size, self.num_classes = train, batch_size, num_classes
        self.drop_last = train if drop_last is None else drop_last
        self.dtype, self.channels_last = dtype, channels_last
        self.noise = LabelNoise(torch.tensor(labels), label_noise, num_classes, seed) if train and label_noise > 0 else None
        self.table = torch.tensor(labels, dtype=torch.int64, device=self.device)  # sample index -> label
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(shape)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(shape)
        self.dataset = _FolderDataset(files, train=train, image_size=image_size, crop_ratio=crop_ratio,
                                      augment=augment, seed=seed)
        self.order = _Order(len(files), train=train, rank=rank, world=world, seed=seed)
        workers = default_threads() if threads is None else threads
        self.threads = workers
        # Its own generator: a DataLoader draws its workers' base seed from torch's global RNG at every new
        # iterator (an epoch, a resume), which would shift what the model draws (drop-path, dropout) and make
        # a resumed run differ. The samples' randomness is the dataset's own (seeded per sample), not this.
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.order, num_workers=workers, drop_last=self.drop_last,
            generator=torch_generator(seed), worker_init_fn=functools.partial(_exit_with, os.getpid()) if workers else None,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            multiprocessing_context=_START if workers > 0 else None)

    def __len__(self) -> int:
        n = len(self.order.shard())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.order.epoch = epoch
        if self.noise is not None:
            self.table = self.noise.labels_for_epoch(epoch).to(self.device)

    def state_dict(self) -> dict:
        """{}: the position is (epoch, batch), which the trainer saves anyway (see the module doc)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: iter_from(batch) starts there exactly."""

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """This epoch's batches from batch `start` on (the skipped ones are never read)."""
        self.order.start = start * self.batch_size
        try:
            for images, index in _one_line_errors(self._loader):
                x = images.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x = x.to(self.dtype).sub_(self.mean.to(self.dtype)).div_(self.std.to(self.dtype))
                yield x, self.table[index.to(self.device, non_blocking=True)]
        finally:
            self.order.start = 0


def _one_line_errors(loader):
    """The loader's batches; a worker's DataError as its own one line (torch re-raises it with the worker's
    traceback in the message), a worker that died as one line saying the usual cause."""
    try:
        yield from loader
    except DataError as exc:
        raise DataError(_original_message(str(exc))) from None
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if text.startswith("DataLoader worker"):
            raise DataError(f"a PyTorch loader worker died ({text}); the usual cause is host memory: lower --threads "
                            "or --batch-size") from None
        raise


def _original_message(text: str) -> str:
    # "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\n...DataError: <message>"
    marker = "DataError: "
    last = [ln for ln in text.strip().splitlines() if marker in ln]
    return last[-1].split(marker, 1)[1] if last and "Original Traceback" in text else text.strip().splitlines()[-1]
