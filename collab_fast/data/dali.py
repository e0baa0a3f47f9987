"""ImageNet-format folders (DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG) through NVIDIA DALI.

Train: file reader (shuffled, sharded by rank / world size, padded last batch) -> JPEG decoding fused with
the random resized crop (ROI decode; "mixed" device = nvJPEG / the hardware decoder on a GPU) -> resize ->
random horizontal flip + normalisation -> output already on the device, in the trainer's dtype, in NHWC
memory (channels_last) or NCHW. Val: decode -> resize the shorter side -> centre crop -> normalise.

The same pipeline runs with CPU operators when device_id is None (what CI tests): the device is a
parameter, not a second implementation. The reader emits each sample's index; the loader maps it to the
epoch's label on the device, which is how label noise is redrawn every epoch without rebuilding anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from collab_fast.data.images import IMAGENET_MEAN, IMAGENET_STD, NOT_UTF8, DataError, is_utf8, shown
from collab_fast.data.loader import default_threads
from collab_fast.data.noise import LabelNoise
from collab_fast.extras import require
from collab_fast.seeding import torch_generator

__all__ = ["DaliLoader", "check_dali_wheel", "dali_installed", "driver_cuda"]


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported (image folders then default to it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _dali_wheels() -> list[str]:
    from importlib import metadata

    return sorted({d.metadata["Name"].lower() for d in metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("nvidia-dali-cuda")})


def driver_cuda() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (e.g. (12, 4)), or None where there is no driver. Asked
    of the driver library itself (cuDriverGetVersion): torch has no public call for it, and the private one
    that some builds have is missing from others (torch 2.11's CUDA 13 wheel, seen on an H200)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return (v.value // 1000, v.value % 1000 // 10) if v.value > 0 else None


def check_dali_wheel(device: torch.device) -> None:
    """One line naming the right extra when the installed DALI wheel needs a newer CUDA driver than this
    machine has (DALI would otherwise fail at pipeline build with a traceback)."""
    if device.type != "cuda":
        return
    driver = driver_cuda()
    for name in _dali_wheels():
        digits = name[len("nvidia-dali-cuda"):]
        if not digits.isdigit() or driver is None:
            continue
        need = int(digits) // 10
        if need > driver[0]:
            raise ValueError(f"{name} needs a CUDA {need} driver, but this machine's driver supports CUDA "
                             f"{driver[0]}.{driver[1]}: pip uninstall {name} && pip install "
                             f"'collab_fast[dali-cuda{driver[0]}]' (or --loader torch, no DALI)")


def _dali():
    require("nvidia.dali", "dali", "--loader dali", hint="or 'collab_fast[dali-cuda12]' for a CUDA 12 driver; "
            "--loader torch reads image folders without DALI")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy



def _pipeline(files, batch_size, *, train, device_id, image_size, crop_ratio, rank, world, seed, threads, dtype,
              channels_last, mean, std, augment):
    """The DALI pipeline definition (call it, optionally with checkpoint=..., to get a pipeline): reader ->
    decode (+ random resized crop when training) -> resize -> flip + normalise; outputs (images, index)."""
    fn, types, pipeline_def, _, _ = _dali()
    gpu = device_id is not None
    decode_device, op_device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    out_type = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
    threads = threads or default_threads()

    # Checkpointing (training only) records the reader's position and every random generator, so a run
    # resumed mid-epoch or at a later epoch sees the order and augmentations the uninterrupted run saw.
    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=(seed + 17 * rank) % (1 << 63),
                  prefetch_queue_depth=2, enable_checkpointing=train)
    def pipeline():
        # Plain reads, not mmap: a file truncated or rewritten under a running job must give a decode error,
        # not SIGBUS (a mapped page past the new end kills the process with no checkpoint written).
        jpegs, index = fn.readers.file(files=files, labels=list(range(len(files))), shuffle_after_epoch=train,
                                       shard_id=rank, num_shards=world, pad_last_batch=True, name="Reader",
                                       seed=seed % (1 << 63), dont_use_mmap=True)
        if train and augment != "none":
            images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, device=op_device, resize_x=image_size, resize_y=image_size)
            mirror = fn.random.coin_flip(probability=0.5) if augment == "crop+flip" else 0
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, device=op_device, resize_shorter=round(image_size / crop_ratio))
            mirror = 0
        images = fn.crop_mirror_normalize(images, device=op_device, dtype=out_type,
                                          output_layout="HWC" if channels_last else "CHW",
                                          crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                          mean=[255 * m for m in mean], std=[255 * s for s in std], mirror=mirror)
        return images, index.gpu() if gpu else index

    return pipeline


class DaliLoader:
    """(images, labels) batches of an image folder split through a DALI pipeline.

    Args:
        files, labels: from scan_split. train: random resized crop + flip (augment "crop+flip"; "crop": no
            flip; "none": resize + centre crop as in evaluation); else resize + centre crop.
        device_id: CUDA device for the mixed/GPU operators, or None for the CPU pipeline.
        image_size: output side; val resizes the shorter side to round(image_size / crop_ratio) first.
        rank, world: sharding; every sample is read exactly once per epoch across the ranks.
        drop_last: drop each shard's short last batch (training), else return it (evaluation).
    """

    def __init__(self, files: list[str], labels: list[int], batch_size: int, *, train: bool, num_classes: int,
                 image_size: int, device_id: int | None = None, crop_ratio: float = 0.875,
                 rank: int = 0, world: int = 1, seed: int = 0, threads: int | None = None,
                 drop_last: bool | None = None, label_noise: float = 0.0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: str = "crop+flip"):
        if len(files) != len(labels) or not files:
            raise ValueError(f"need as many labels as files (got {len(files)} files, {len(labels)} labels)")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"DALI outputs float32 or float16, got {dtype}")
        not_utf8 = [f for f in files if not is_utf8(Path(f))]
        if not_utf8:
            raise DataError(f"{len(not_utf8)} file(s) cannot be read by DALI, e.g. {shown(not_utf8[0])}: {NOT_UTF8}, "
                            "or pass --skip-bad-images to skip them")
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        if train:
            # A full seeded shuffle first (image folders are sorted by class), then DALI reshuffles the
            # whole list after every epoch, identically on every rank: shards stay disjoint and complete.
            perm = torch.randperm(len(files), generator=torch_generator(seed)).tolist()
            files, labels = [files[i] for i in perm], [labels[i] for i in perm]
        self.train = train
        self.root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.drop_last = train if drop_last is None else drop_last
        self.noise = LabelNoise(torch.tensor(labels), label_noise, num_classes, seed) if train and label_noise > 0 else None
        self.table = torch.tensor(labels, dtype=torch.int64, device=self.device)  # sample index -> label
        self.channels_last = channels_last
        n = len(files)
        self.num_samples = n * (rank + 1) // world - n * rank // world  # DALI's contiguous shard of the list
        self._make_pipeline = _pipeline(files, batch_size, train=train, device_id=device_id, image_size=image_size,
                                        crop_ratio=crop_ratio, rank=rank, world=world, seed=seed,
                                        threads=threads, dtype=dtype, channels_last=channels_last,
                                        mean=mean, std=std, augment=augment)
        _, _, _, iterator_cls, policy = _dali()
        self._make_iter = lambda pipe: iterator_cls(
            [pipe], ["images", "index"], reader_name="Reader", auto_reset=True,
            last_batch_policy=policy.DROP if self.drop_last else policy.PARTIAL)
        self._build(None)

    def _build(self, checkpoint: str | None) -> None:
        self._pipe = self._make_pipeline(checkpoint=checkpoint) if checkpoint else self._make_pipeline()
        self._pipe.build()
        self._iter = self._make_iter(self._pipe)
        self._len = len(self._iter)
        self._resumed_at = 0  # the epoch's batch at which the rebuilt reader starts
        self._position = 0  # batches of the current epoch consumed

    def __len__(self) -> int:
        return self._len

    def state_dict(self) -> dict:
        """The reader's position and random states after the batches consumed so far, and how many batches
        of the epoch that is (training loaders); {} for evaluation loaders, which always start from their
        first batch."""
        if not self.train:
            return {}
        return {"reader": self._iter.checkpoints()[0], "batch_in_epoch": self._position % max(self._len, 1)}

    def load_state_dict(self, state: dict) -> None:
        """Continues where `state` was taken (see state_dict)."""
        if state.get("reader") and self.train:
            try:
                self._build(state["reader"])
            except RuntimeError as exc:
                raise ValueError(f"the data loader state in the checkpoint does not fit this data set or DALI "
                                 f"version ({str(exc).splitlines()[0]}); resume with the same --data and "
                                 "--batch-size") from None
            self._resumed_at = int(state.get("batch_in_epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        # The reader reshuffles by itself after each epoch; only the noisy labels change here.
        if self.noise is not None:
            self.table = self.noise.labels_for_epoch(epoch).to(self.device)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """This epoch's batches from batch `start` on: free after load_state_dict at that batch; otherwise
        the first `start` batches are read and dropped (a checkpoint without loader state)."""
        resumed, self._resumed_at = self._resumed_at, 0
        self._position = resumed
        for i, batch in enumerate(self._batches()):
            self._position = resumed + i + 1  # batches of this epoch consumed once this one is
            if i >= start - resumed:
                yield batch

    def _batches(self):
        try:
            for out in self._iter:
                x = out[0]["images"]
                idx = out[0]["index"].view(-1).long()
                if self.channels_last:
                    x = x.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last, no copy
                yield x, self.table[idx]
        except RuntimeError as exc:
            if "Critical error in pipeline" not in str(exc):
                raise
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "failure" in ln or "rror:" in ln), lines[-1])
            raise DataError(f"DALI could not decode an image under {self.root} ({why}); find it with `python -m "
                            f"collab_fast.data check {self.root} --decode`, or pass --skip-bad-images (every "
                            "image decoded once before training, bad ones named and skipped)") from None
