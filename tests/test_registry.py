"""models/registry.py: the built-in architectures and what follows from a name alone."""

import pytest

from collab_fast.models.registry import (
    ARCHS,
    arch_entry,
    default_splits,
    input_channels,
    is_builtin_resnet,
    native_image_size,
)


def test_the_papers_split_points_and_native_sizes():
    # sec. 4.2: after conv3_x and conv4_x of the ImageNet ResNets; sec. 4.1: after the first (and second) stage
    assert default_splits("resnet50", 2) == ["layer2", "layer3"] and default_splits("resnet18", 1) == ["layer2"]
    assert default_splits("resnet32", 2) == ["layer1", "layer2"] and default_splits("densenet40_12", 1) == ["block1"]
    assert {a: native_image_size(a) for a in ("resnet50", "resnet152", "resnet110", "densenet40_12")} == {
        "resnet50": 224, "resnet152": 224, "resnet110": 32, "densenet40_12": 32}
    splits = default_splits("resnet50", 2)
    splits.append("x")  # a copy: the table is not changed through it
    assert default_splits("resnet50", 2) == ["layer2", "layer3"]


def test_names_and_channels():
    assert all(is_builtin_resnet(a) == a.startswith("resnet") for a in ARCHS)
    assert not is_builtin_resnet("timm:resnet50")
    assert input_channels("resnet32", 1) == 1 and input_channels("timm:resnet18", 1) == 1
    assert input_channels("torchvision:resnet18", 1) == 3  # a fixed 3-channel stem


def test_unknown_arch_and_too_many_levels_are_one_line():
    with pytest.raises(ValueError, match=r"unknown arch 'vgg16'; valid: resnet18, .*timm:NAME / torchvision:NAME"):
        arch_entry("vgg16")
    with pytest.raises(ValueError, match=r"resnet32 has split points for at most 2 levels .*the pattern needs 3"):
        default_splits("resnet32", 3)
