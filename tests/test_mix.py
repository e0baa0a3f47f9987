"""collab_fast.data.mix: mixup and cutmix of a batch on its device, the loss on the mixed targets, the flags."""

import json

import pytest
import torch
from conftest import CPU_DIGITS, HAS_CUDA

from collab_fast import collab_loss_reference, fused_collab_loss, train
from collab_fast.data import BatchMix

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def _batch(n=6, c=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def test_mixup_is_a_convex_pair_with_matching_targets():
    x, y = _batch()
    mix = BatchMix(5, mixup=0.4, seed=1)
    kind, lam, box = mix.draw(7, 8, 8)
    assert kind == "mixup" and 0 < lam < 1 and box is None
    xm, t = mix(x, y, 7)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0))
    onehot = torch.nn.functional.one_hot(y, 5).float()
    torch.testing.assert_close(t, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    assert t.dtype == torch.float32 and torch.allclose(t.sum(1), torch.ones(6))
    assert x.data_ptr() != xm.data_ptr()  # the loader's batch is left as it was


def test_cutmix_pastes_a_box_and_weighs_the_labels_by_its_area():
    x, y = _batch(size=16)
    x = x.contiguous(memory_format=torch.channels_last)
    mix = BatchMix(5, cutmix=1.0, seed=2)
    for step in range(20):
        kind, lam, (top, bottom, left, right) = mix.draw(step, 16, 16)
        xm, t = mix(x, y, step)
        assert kind == "cutmix" and xm.is_contiguous(memory_format=torch.channels_last)
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(xm[..., inside], x.roll(1, 0)[..., inside])
        assert torch.equal(xm[..., ~inside], x[..., ~inside])
        assert lam == pytest.approx(1 - inside.float().mean().item())
        onehot = torch.nn.functional.one_hot(y, 5).float()
        torch.testing.assert_close(t, lam * onehot + (1 - lam) * onehot.roll(1, 0))


def test_draws_are_seeded_by_seed_rank_and_step():
    mix = BatchMix(5, mixup=0.2, cutmix=1.0, seed=0)
    assert mix.draw(3, 32, 32) == mix.draw(3, 32, 32)  # a resumed run mixes step 3 as the first run did
    draws = {mix.draw(s, 32, 32)[1] for s in range(50)}
    assert len(draws) > 40  # (cutmix's lam is a box area: a few repeat)
    assert {mix.draw(s, 32, 32)[0] for s in range(50)} == {"mixup", "cutmix"}  # both on: one of them per batch
    assert BatchMix(5, mixup=0.2, seed=0, rank=1).draw(3, 32, 32) != BatchMix(5, mixup=0.2, seed=0).draw(3, 32, 32)
    with pytest.raises(ValueError, match="mixup > 0 or cutmix > 0"):
        BatchMix(5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_on_mixed_targets_equals_the_two_call_reference(impl, eps):
    # What mixup implementations compute with two calls: lam * L(y) + (1 - lam) * L(y rolled). Exact for the
    # whole collaborative loss (the soft term does not see the labels, and lam + (1 - lam) = 1).
    x, y = _batch(n=8)
    mix = BatchMix(5, mixup=1.0, cutmix=1.0, seed=3)
    z = torch.randn(3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        _, lam, _ = mix.draw(step, 8, 8)
        _, t = mix(x, y, step)
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        want = (lam * collab_loss_reference(z2, y, label_smoothing=eps)
                + (1 - lam) * collab_loss_reference(z2, y.roll(1, 0), label_smoothing=eps))
        if impl == "torch":
            got = fused_collab_loss(z1, t.double(), impl="torch", label_smoothing=eps)
            atol = 1e-6  # the targets are float32
        else:
            z1 = z.float().to(DEV).requires_grad_()  # the kernel: CUDA tensors on a GPU host, else the interpreter
            got = fused_collab_loss(z1, t.to(DEV), impl="triton", label_smoothing=eps)
            atol = 1e-5
        got.backward(), want.backward()
        torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=1e-6)
        torch.testing.assert_close(z1.grad.double().cpu(), z2.grad, atol=atol, rtol=1e-6)


BASE = [*CPU_DIGITS, "-b", "32", "--log-every", "1", "--max-steps", "3"]


@pytest.mark.parametrize("flags, kinds", [(["--mixup", "0.2"], {"mixup"}), (["--cutmix", "1.0"], {"cutmix"}),
                                          (["--mixup", "0.2", "--cutmix", "1.0"], {"mixup", "cutmix"})])
def test_trainer_flags_mix_every_training_batch(tmp_path, monkeypatch, flags, kinds):
    seen = []
    real = BatchMix.__call__

    def spy(self, x, y, step):
        xm, t = real(self, x, y, step)
        seen.append((self.draw(step, x.shape[-2], x.shape[-1])[0], t.shape, step))
        return xm, t

    monkeypatch.setattr(BatchMix, "__call__", spy)
    out = tmp_path / "run"
    assert train.main([*BASE, "--pattern", "ilr2", "--output", str(out), *flags]) == 0
    assert [s for *_, s in seen] == [0, 1, 2] and all(shape == (32, 10) for _, shape, _ in seen)
    assert {k for k, *_ in seen} <= kinds
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mixup"] == (0.2 if "--mixup" in flags else 0.0) and cfg["cutmix"] == (1.0 if "--cutmix" in flags else 0.0)


def test_no_mixing_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(BatchMix, "__call__", lambda *a: pytest.fail("mixed without --mixup/--cutmix"))
    assert train.main([*BASE, "--output", str(tmp_path / "run")]) == 0
