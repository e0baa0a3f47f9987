"""AutoAugment-family policies on a normalised training batch, on the batch's device: TrivialAugment-wide
(Müller & Hutter 2021), RandAugment (Cubuk et al. 2020: 2 ops a image at magnitude 9 of 31) and AutoAugment's
ImageNet policy (Cubuk et al. 2019, 25 sub-policies of two ops, each with a probability and a magnitude).

The ops act on images in [0, 1] (the batch is un-normalised first and normalised again after); m is the
op's magnitude:
  identity;
  shear_x, shear_y     a source pixel (u - m v, v) / (u, v - m u): shear about the top-left corner;
  translate_x, _y      a shift by m pixels;
  rotate               m degrees about the image centre;
  brightness, color,   a blend x + (1 - f)(d - x), f = 1 + m, with d black, the grey image (ITU-R 601 luma),
  contrast, sharpness  its mean grey level, or the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13
                       (border pixels kept); clipped to [0, 1];
  posterize            the 8-bit level with its low 8 - m bits cleared;
  solarize             levels >= m inverted;
  autocontrast         each channel stretched to [0, 1] (a constant channel kept);
  equalize             each channel's 8-bit levels equalized as PIL's ImageOps.equalize does;
  invert               1 - x.
Geometric ops sample the nearest source pixel and fill with black; ops marked signed take a random sign. The
magnitude bins are torchvision's (TrivialAugmentWide, RandAugment, AutoAugment), so a policy here draws what
theirs draws; values stay in float between ops (torchvision rounds to 8 bits after each op on uint8 images).

Batched, with no data-dependent indexing and so no host sync: per layer every image draws one op and its
magnitude; the geometric ops of the whole batch are one nearest-neighbour resampling, the blends take
per-image factors that are exactly the identity (f = 1) for images whose op is another, and posterize,
solarize, autocontrast, equalize and invert are selected per image with torch.where. The draws come from a
generator on the device seeded by (seed, rank, step), so a resumed run augments exactly as the uninterrupted
one did.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from collab_fast.seeding import torch_generator

__all__ = ["OPS", "POLICIES", "AutoAugment", "apply_ops"]

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize", "invert")
_ID = {name: i for i, name in enumerate(OPS)}
_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
POLICIES = ("trivialaugment", "randaugment", "autoaugment")

# TrivialAugment-wide and RandAugment draw among the first 14 ops (no invert).
_DRAWN = len(OPS) - 1
_RAND_OPS, _RAND_MAGNITUDE, _BINS = 2, 9, 31

# AutoAugment's ImageNet policy (Cubuk et al. 2019, appendix): (op, probability, magnitude bin of 10) pairs.
_IMAGENET_POLICY = (
    (("posterize", 0.4, 8), ("rotate", 0.6, 9)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, 0)),
    (("equalize", 0.8, 0), ("equalize", 0.6, 0)),
    (("posterize", 0.6, 7), ("posterize", 0.6, 6)),
    (("equalize", 0.4, 0), ("solarize", 0.2, 4)),
    (("equalize", 0.4, 0), ("rotate", 0.8, 8)),
    (("solarize", 0.6, 3), ("equalize", 0.6, 0)),
    (("posterize", 0.8, 5), ("equalize", 1.0, 0)),
    (("rotate", 0.2, 3), ("solarize", 0.6, 8)),
    (("equalize", 0.6, 0), ("posterize", 0.4, 6)),
    (("rotate", 0.8, 8), ("color", 0.4, 0)),
    (("rotate", 0.4, 9), ("equalize", 0.6, 0)),
    (("equalize", 0.0, 0), ("equalize", 0.8, 0)),
    (("invert", 0.6, 0), ("equalize", 1.0, 0)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("rotate", 0.8, 8), ("color", 1.0, 2)),
    (("color", 0.8, 8), ("solarize", 0.8, 7)),
    (("sharpness", 0.4, 7), ("invert", 0.6, 0)),
    (("shear_x", 0.6, 5), ("equalize", 1.0, 0)),
    (("color", 0.4, 0), ("equalize", 0.6, 0)),
    (("equalize", 0.4, 0), ("solarize", 0.2, 4)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, 0)),
    (("invert", 0.6, 0), ("equalize", 1.0, 0)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("equalize", 0.8, 0), ("equalize", 0.6, 0)),
)


def magnitude_table(policy: str, bins: int, height: int, width: int) -> torch.Tensor:
    """[len(OPS), bins] float64: the magnitude of each op at each bin (0 for ops without one)."""
    wide = policy == "trivialaugment"
    lin = lambda hi: torch.linspace(0.0, hi, bins, dtype=torch.float64)  # noqa: E731
    table = torch.zeros(len(OPS), bins, dtype=torch.float64)
    shear, rotate, enhance = (0.99, 135.0, 0.99) if wide else (0.3, 30.0, 0.9)
    table[_ID["shear_x"]] = table[_ID["shear_y"]] = lin(shear)
    table[_ID["translate_x"]] = lin(32.0 if wide else 150.0 / 331.0 * width)
    table[_ID["translate_y"]] = lin(32.0 if wide else 150.0 / 331.0 * height)
    table[_ID["rotate"]] = lin(rotate)
    for name in ("brightness", "color", "contrast", "sharpness"):
        table[_ID[name]] = lin(enhance)
    table[_ID["posterize"]] = 8 - (torch.arange(bins, dtype=torch.float64) / ((bins - 1) / (6 if wide else 4))).round()
    table[_ID["solarize"]] = torch.linspace(1.0, 0.0, bins, dtype=torch.float64)
    return table


# ----------------------------------------------------------------------------------------------------
# The ops, batched: x [N, C, H, W] float in [0, 1]; op [N] long; m [N] float (signed where the op is)
# ----------------------------------------------------------------------------------------------------


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W]: ITU-R 601-2 luma (PIL's "L"); a one-channel image is its own grey."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: torch.Tensor, degenerate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # x + (1 - f)(d - x): exactly x where f == 1 (the images whose op is another)
    return (x + (1.0 - f) * (degenerate - x)).clamp_(0.0, 1.0)


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """The image smoothed by PIL's SMOOTH kernel, border pixels unchanged (the sharpness op's degenerate)."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return out


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().clamp_(0, 255)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = torch.exp2(8.0 - bits).view(-1, 1, 1, 1)
    return torch.floor(_levels(x) / step) * step / 255.0


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp_min(1e-12))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's equalization of each channel's 8-bit levels: step = (pixels - the top level's count) // 255; where
    step > 0, level v -> (step // 2 + #pixels below v) // step."""
    n, c, h, w = x.shape
    q = _levels(x).long()  # [N, C, H, W] in 0..255
    base = torch.arange(n * c, device=x.device).view(n, c, 1, 1) * 256
    hist = torch.bincount((q + base).flatten(), minlength=n * c * 256).view(n * c, 256)
    top = q.amax(dim=(2, 3)).view(n * c, 1)
    step = (h * w - hist.gather(1, top)) // 255  # [N*C, 1]
    below = torch.cumsum(hist, 1) - hist  # pixels strictly below each level
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))  # step 0: unchanged
    return lut.gather(1, q.reshape(n * c, h * w)).view(n, c, h, w).to(x.dtype) / 255.0


def _resample(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The geometric ops of the whole batch as one nearest-neighbour resampling (identity for the others)."""
    n, _, h, w = x.shape
    zero = torch.zeros_like(m)
    is_ = lambda name: op == _ID[name]  # noqa: E731
    # source = A (u, v) + b per image, in pixel-centre coordinates (pixel i at i)
    theta = torch.where(is_("rotate"), m, zero) * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    a00, a01 = cos, torch.where(is_("shear_x"), -m, sin)
    a10, a11 = torch.where(is_("shear_y"), -m, -sin), cos
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot = is_("rotate")
    b0 = torch.where(rot, cx - cos * cx - sin * cy, zero) - torch.where(is_("translate_x"), m, zero)
    b1 = torch.where(rot, cy + sin * cx - cos * cy, zero) - torch.where(is_("translate_y"), m, zero)
    u = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    v = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    col = lambda t: t.view(n, 1, 1).to(x.dtype)  # noqa: E731
    su = col(a00) * u + col(a01) * v + col(b0)
    sv = col(a10) * u + col(a11) * v + col(b1)
    grid = torch.stack(((2 * su + 1) / w - 1, (2 * sv + 1) / h - 1), dim=-1)  # [N, H, W, 2], align_corners=False
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def apply_ops(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """One layer: image i of x [N, C, H, W] (float in [0, 1]) gets OPS[op[i]] at magnitude m[i]."""
    if x.shape[0] == 0:
        return x
    m = m.to(x.dtype)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    sel = lambda name: (op == _ID[name]).view(-1, 1, 1, 1)  # noqa: E731
    geometric = ((op >= _ID[_GEOMETRIC[0]]) & (op <= _ID[_GEOMETRIC[-1]])).view(-1, 1, 1, 1)  # ids 1..5
    x = torch.where(geometric, _resample(x, op, m), x)
    factor = lambda name: torch.where(op == _ID[name], 1.0 + m, torch.ones_like(m)).view(-1, 1, 1, 1)  # noqa: E731
    x = _blend(x, torch.zeros_like(x), factor("brightness"))
    x = _blend(x, _grey(x), factor("color"))
    x = _blend(x, _grey(x).mean(dim=(2, 3), keepdim=True), factor("contrast"))
    x = _blend(x, _smoothed(x), factor("sharpness"))
    x = torch.where(sel("posterize"), _posterize(x, torch.where(op == _ID["posterize"], m, 8.0)), x)
    threshold = torch.where(op == _ID["solarize"], m, torch.full_like(m, 2.0)).view(-1, 1, 1, 1)
    x = torch.where(x >= threshold, 1.0 - x, x)
    x = torch.where(sel("autocontrast"), _autocontrast(x), x)
    x = torch.where(sel("equalize"), _equalize(x), x)
    x = torch.where(sel("invert"), 1.0 - x, x)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


# ----------------------------------------------------------------------------------------------------
# The policies
# ----------------------------------------------------------------------------------------------------


class AutoAugment:
    """policy(x, step) on a normalised batch x [N, C, H, W]: un-normalise with (mean, std), apply the policy's
    layers, normalise again; x's dtype and memory format kept."""

    def __init__(self, policy: str, mean, std, *, seed: int = 0, rank: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"--auto-augment must be one of none, {', '.join(POLICIES)}; got {policy!r}")
        self.policy, self.seed, self.rank = policy, seed, rank
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._cache: dict = {}  # tensors made once per device: a copy from the host every step would sync

    def _on(self, device, name: str, make):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = make().to(device)
        return self._cache[key]

    def _table(self, h: int, w: int, device) -> torch.Tensor:
        bins = 10 if self.policy == "autoaugment" else _BINS
        return self._on(device, f"table {h}x{w}", lambda: magnitude_table(self.policy, bins, h, w))

    def draw(self, n: int, h: int, w: int, step: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(op [N], signed magnitude [N])] per layer, for step `step`."""
        g = torch_generator((self.seed * 1_000_003 + self.rank) * 1_000_003 + step + 7, device)
        table = self._table(h, w, device)
        signed = self._on(device, "signed", lambda: torch.tensor([name in _SIGNED for name in OPS]))
        layers = []
        if self.policy == "autoaugment":
            spec = self._on(device, "policy", lambda: torch.tensor(  # [25, 2, 3]: op, probability, bin
                [[(_ID[o], p, b) for o, p, b in sub] for sub in _IMAGENET_POLICY], dtype=torch.float64))
            sub = torch.randint(0, len(_IMAGENET_POLICY), (n,), device=device, generator=g)
            for j in range(2):
                op, p, b = spec[sub, j, 0].long(), spec[sub, j, 1], spec[sub, j, 2].long()
                op = torch.where(torch.rand(n, device=device, generator=g, dtype=torch.float64) < p, op, 0)
                layers.append((op, table[op, b]))
        else:
            count = 1 if self.policy == "trivialaugment" else _RAND_OPS
            for _ in range(count):
                op = torch.randint(0, _DRAWN, (n,), device=device, generator=g)
                if self.policy == "trivialaugment":
                    b = torch.randint(0, _BINS, (n,), device=device, generator=g)
                else:
                    b = torch.full((n,), _RAND_MAGNITUDE, device=device)
                layers.append((op, table[op, b]))
        out = []
        for op, mag in layers:
            flip = signed[op] & (torch.rand(n, device=device, generator=g) < 0.5)
            out.append((op, torch.where(flip, -mag, mag)))
        return out

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != len(self.mean):
            raise ValueError(f"auto-augment: the batch has {c} channels, the normalisation {len(self.mean)}")
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        mean = self._on(x.device, "mean", lambda: torch.tensor(self.mean).view(1, c, 1, 1))
        std = self._on(x.device, "std", lambda: torch.tensor(self.std).view(1, c, 1, 1))
        y = (x.float() * std + mean).clamp_(0.0, 1.0)
        for op, mag in self.draw(n, h, w, step, x.device):
            y = apply_ops(y, op, mag.float())
        y = ((y - mean) / std).to(x.dtype)
        return y.contiguous(memory_format=torch.channels_last) if cl else y
