"""Numeric health checks: finite weights and numbers."""

import torch

from collab_fast.health import finite_model, finite_number


def test_finite_model_sees_buffers():
    net = torch.nn.BatchNorm1d(3)
    assert finite_model(net)
    net.running_mean[1] = float("nan")
    assert not finite_model(net)


def test_finite_number():
    assert finite_number(1) and finite_number(2.5)
    assert not finite_number(float("inf")) and not finite_number(float("nan")) and not finite_number("1")
