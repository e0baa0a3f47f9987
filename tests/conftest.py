"""Test setup: without a GPU the Triton kernels run in the interpreter (must be set before import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


# The trainer on CPU, on the digits set and the small CIFAR ResNet: what most end-to-end tests start from.
CPU_DIGITS = ["digits", "--device", "cpu", "--arch", "resnet32"]


@pytest.fixture(scope="module")
def built_extension():
    """The C++ extension compiled once per module, before any test (and before DDP workers start)."""
    from collab_fast import extension

    extension.load_extension()
