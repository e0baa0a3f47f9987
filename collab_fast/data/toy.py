"""A deterministic, learnable ImageNet-format JPEG folder: each class has its own hue, stripe orientation
and stripe frequency; every image varies phase, brightness, position of a blob and pixel noise. Used by
tests, the README's main job, and pipeline benchmarks at ImageNet-like sizes (e.g. --size 500x375).
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np

from collab_fast.extras import require

__all__ = ["parse_size", "write_toy"]


def parse_size(size: str | int) -> tuple[int, int]:
    """'160' -> (160, 160); '500x375' -> (width 500, height 375)."""
    if isinstance(size, int):
        w = h = size
    else:
        parts = str(size).lower().split("x")
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            raise ValueError(f"size must be N or WxH (e.g. 160 or 500x375), got {size!r}")
        w, h = int(parts[0]), int(parts[-1])
    if w < 8 or h < 8:
        raise ValueError(f"image size must be at least 8x8, got {w}x{h}")
    return w, h


def _image(rng: np.random.Generator, cls: int, num_classes: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = math.pi * cls / num_classes
    freq = 2 * math.pi * (3 + (cls % 4) * 2) / max(w, h)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.3) * min(w, h)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    hue = (cls / num_classes + rng.normal(0, 0.02)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, 0.8, 1.0), dtype=np.float32)
    other = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5, 0.6), dtype=np.float32)
    bright = rng.uniform(0.6, 1.0)
    img = bright * (stripes[..., None] * base + (1 - stripes[..., None]) * other * 0.5)
    img = img * (1 - 0.5 * blob[..., None]) + rng.normal(0, 0.05, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_toy(out: str | Path, classes: int = 10, per_class: int = 100, size: str | int = 160,
              val_per_class: int | None = None, seed: int = 0, quality: int = 90) -> Path:
    """Writes OUT/train/class_XXX/*.JPEG and OUT/val/class_XXX/*.JPEG; returns OUT."""
    Image = require("PIL.Image", "train", "writing the toy data set")
    if classes < 2 or per_class < 1:
        raise ValueError(f"need at least 2 classes and 1 image per class, got {classes} and {per_class}")
    w, h = parse_size(size)
    val_per_class = max(1, per_class // 5) if val_per_class is None else val_per_class
    out = Path(out)
    for split, count, offset in (("train", per_class, 0), ("val", val_per_class, 1_000_000)):
        for c in range(classes):
            d = out / split / f"class_{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, c, offset + i])
                Image.fromarray(_image(rng, c, classes, w, h)).save(d / f"{split}_{c:03d}_{i:05d}.JPEG",
                                                                    quality=quality)
    return out
