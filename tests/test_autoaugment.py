"""collab_fast.data.autoaugment: every op against an independent per-image reference (Pillow's ImageOps and
ImageEnhance where they define the op, float64 formulas or exact pixel identities otherwise), the per-image
selection, the policies' draws and magnitudes, and the trainer's --auto-augment."""

import json
import math

import pytest
import torch
from conftest import CPU_DIGITS

from collab_fast import train
from collab_fast.data import AutoAugment, normalization
from collab_fast.data.autoaugment import _IMAGENET_POLICY, OPS, apply_ops, magnitude_table

Image = pytest.importorskip("PIL.Image")
from PIL import ImageEnhance, ImageOps  # noqa: E402


def _levels_batch(n=5, h=13, w=17, seed=0):
    """Images on the 8-bit grid (so that Pillow sees exactly what the ops see), float64 in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, 3, h, w), generator=g)
    q[0, :, :4] = 37  # a flat region: histogram ties, a constant stretch of the image
    return q.double() / 255.0, q


def _pil(q_img):
    return Image.fromarray(q_img.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB")


def _from_pil(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float64)).permute(2, 0, 1) / 255


def _one(x, name, m):
    n = x.shape[0]
    return apply_ops(x, torch.full((n,), OPS.index(name)), torch.full((n,), float(m), dtype=x.dtype))


@pytest.mark.parametrize("name, pil", [
    ("equalize", lambda im, m: ImageOps.equalize(im)),
    ("posterize", lambda im, m: ImageOps.posterize(im, int(m))),
    ("solarize", lambda im, m: ImageOps.solarize(im, round(m * 255))),
    ("invert", lambda im, m: ImageOps.invert(im)),
])
@pytest.mark.parametrize("m", [0.0, 3.0, 0.5])
def test_level_ops_equal_pillow_exactly(name, pil, m):
    if name == "posterize":
        m = {0.0: 2, 3.0: 3, 0.5: 7}[m]
    elif name == "solarize":
        m = {0.0: 0.0, 3.0: 128 / 255, 0.5: 0.5}[m]
    x, q = _levels_batch()
    got = _one(x, name, m)
    for i in range(x.shape[0]):
        want = _from_pil(pil(_pil(q[i]), m))
        torch.testing.assert_close(got[i], want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name, enhance", [("brightness", ImageEnhance.Brightness), ("color", ImageEnhance.Color),
                                           ("contrast", ImageEnhance.Contrast), ("sharpness", ImageEnhance.Sharpness)])
@pytest.mark.parametrize("m", [-0.7, 0.45, 0.99])
def test_blends_match_pillow_within_its_rounding(name, enhance, m):
    # Pillow rounds its degenerate image (and the contrast mean) to 8 bits; the ops here stay in float
    x, q = _levels_batch(seed=1)
    got = _one(x, name, m)
    for i in range(x.shape[0]):
        want = _from_pil(enhance(_pil(q[i])).enhance(1.0 + m))
        torch.testing.assert_close(got[i], want, atol=2.6 / 255, rtol=0)


def test_autocontrast_stretches_each_channel_and_keeps_flat_ones():
    x, _ = _levels_batch(seed=2)
    x[1, 2] = 0.4  # a constant channel
    got = _one(x, "autocontrast", 0)
    for i in range(x.shape[0]):
        for c in range(3):
            ch = x[i, c]
            lo, hi = ch.min(), ch.max()
            want = ch if hi == lo else (ch - lo) / (hi - lo)
            torch.testing.assert_close(got[i, c], want, atol=1e-12, rtol=0)


def test_geometric_ops_move_pixels_where_they_should():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64) * 0.98 + 0.01  # no zeros: the fill is visible
    shifted = _one(x, "translate_x", 3)
    assert torch.equal(shifted[..., 3:], x[..., :-3]) and torch.equal(shifted[..., :3], torch.zeros_like(x[..., :3]))
    shifted = _one(x, "translate_y", -2)
    assert torch.equal(shifted[..., :-2, :], x[..., 2:, :]) and (shifted[..., -2:, :] == 0).all()
    turned = _one(x, "rotate", 90)  # a square image: pixel centres land on pixel centres
    assert any(torch.equal(turned, torch.rot90(x, k, dims=(2, 3))) for k in (1, -1))
    m = 0.27  # x' = x + m y about the top-left corner: the source of (u, v) is round(u - m v), ties avoided
    sheared = _one(x, "shear_x", m)
    for v in range(12):
        for u in range(12):
            s = round(u - m * v)
            want = x[:, :, v, s] if 0 <= s < 12 else torch.zeros(2, 3, dtype=x.dtype)
            assert torch.equal(sheared[:, :, v, u], want), (u, v)
    sheared = _one(x, "shear_y", -m)
    for v in range(12):
        for u in range(12):
            s = round(v + m * u)
            want = x[:, :, s, u] if 0 <= s < 12 else torch.zeros(2, 3, dtype=x.dtype)
            assert torch.equal(sheared[:, :, v, u], want), (u, v)


def test_each_image_gets_its_own_op_and_the_rest_are_untouched():
    x, _ = _levels_batch(n=len(OPS), seed=4)
    x = x.float()
    op = torch.arange(len(OPS))
    m = torch.tensor([0, 0.2, -0.2, 2, -3, 30, 0.5, -0.5, 0.6, 0.8, 4, 0.6, 0, 0, 0], dtype=torch.float32)
    together = apply_ops(x, op, m)
    for i in range(len(OPS)):
        alone = apply_ops(x[i:i + 1], op[i:i + 1], m[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-6, rtol=0)
    assert torch.equal(together[0], x[0])  # identity: bit for bit
    # an op that draws identity next to images with every other op is exactly unchanged
    mixed = apply_ops(x, torch.where(op % 2 == 0, 0, op), m)
    assert torch.equal(mixed[::2], x[::2])


def test_memory_format_dtype_and_normalisation_round_trip():
    mean, std = normalization("imagenet")
    aug = AutoAugment("trivialaugment", mean, std, seed=0)
    x = torch.randn(8, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    y = aug(x, 0)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    ident = AutoAugment("trivialaugment", mean, std, seed=0)
    ident.draw = lambda n, h, w, step, device: [(torch.zeros(n, dtype=torch.long), torch.zeros(n))]
    z = torch.rand(4, 3, 8, 8)  # inside the image range: the clamp to [0, 1] changes nothing
    xn = (z - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(ident(xn, 0), xn, atol=1e-6, rtol=0)
    assert ident(xn.bfloat16(), 0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--auto-augment must be one of"):
        AutoAugment("augmix", mean, std)


def test_draws_are_seeded_by_step_and_rank_and_follow_the_policy():
    aug = AutoAugment("trivialaugment", (0.5,) * 3, (0.5,) * 3, seed=1)
    (op, m), = aug.draw(4000, 32, 32, 5, "cpu")
    (op2, m2), = aug.draw(4000, 32, 32, 5, "cpu")
    assert torch.equal(op, op2) and torch.equal(m, m2)  # a resumed step draws the same
    assert not torch.equal(op, aug.draw(4000, 32, 32, 6, "cpu")[0][0])
    assert not torch.equal(op, AutoAugment("trivialaugment", (0.5,) * 3, (0.5,) * 3, seed=1, rank=1).draw(
        4000, 32, 32, 5, "cpu")[0][0])
    assert set(op.tolist()) == set(range(len(OPS) - 1))  # all 14 ops, never invert
    rot = m[op == OPS.index("rotate")]
    assert rot.abs().max() <= 135 and (rot < 0).any() and (rot > 0).any()  # signed, up to 135 degrees
    layers = AutoAugment("randaugment", (0.5,) * 3, (0.5,) * 3).draw(1000, 224, 224, 0, "cpu")
    assert len(layers) == 2
    for op, m in layers:
        tr = m[op == OPS.index("translate_x")].abs()
        torch.testing.assert_close(tr, torch.full_like(tr, 150 / 331 * 224 * 9 / 30))  # magnitude 9 of 31
    layers = AutoAugment("autoaugment", (0.5,) * 3, (0.5,) * 3).draw(4000, 32, 32, 0, "cpu")
    used = {OPS[i] for op, _ in layers for i in op.tolist()}
    assert used <= {o for sub in _IMAGENET_POLICY for o, _, _ in sub} | {"identity"} and "invert" in used
    first = layers[0][0]
    # sub-policy ops fire with their probabilities: about (sum of p of the first ops) / 25 of the images
    p_first = sum(sub[0][1] for sub in _IMAGENET_POLICY) / len(_IMAGENET_POLICY)
    assert abs((first != 0).float().mean().item() - p_first) < 0.03


def test_magnitude_bins_are_torchvisions():
    wide = magnitude_table("trivialaugment", 31, 224, 224)
    assert wide[OPS.index("rotate"), -1] == 135 and wide[OPS.index("translate_x"), -1] == 32
    assert wide[OPS.index("posterize")].tolist()[::5] == [8, 7, 6, 5, 4, 3, 2]  # 8 bits down to 2
    assert wide[OPS.index("solarize"), 0] == 1 and wide[OPS.index("solarize"), -1] == 0
    ra = magnitude_table("randaugment", 31, 224, 160)
    assert math.isclose(ra[OPS.index("translate_x"), -1], 150 / 331 * 160)
    assert math.isclose(ra[OPS.index("translate_y"), -1], 150 / 331 * 224)
    assert ra[OPS.index("shear_x"), -1] == 0.3 and ra[OPS.index("posterize"), -1] == 4


def test_trainer_flag_augments_every_training_batch(tmp_path, monkeypatch):
    steps = []
    real = AutoAugment.__call__
    monkeypatch.setattr(AutoAugment, "__call__", lambda self, x, step: steps.append((self.policy, step)) or
                        real(self, x, step))
    out = tmp_path / "run"
    assert train.main([*CPU_DIGITS, "-b", "32", "--max-steps", "3",
                       "--auto-augment", "randaugment", "--output", str(out)]) == 0
    assert steps == [("randaugment", 0), ("randaugment", 1), ("randaugment", 2)]
    assert json.loads((out / "config.json").read_text())["auto_augment"] == "randaugment"
