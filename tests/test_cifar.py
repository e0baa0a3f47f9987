"""models/cifar.py: the CIFAR networks of the paper's section 4.1 (He et al.'s ResNet-32/110 with parameter-free
shortcuts, Huang et al.'s basic DenseNet-40, k = 12) and the rest of He et al.'s family, checked against their
published sizes."""

import pytest
import torch

from collab_fast.models import cifar


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_sizes_are_the_published_ones():
    # He et al. 2016, table 6: 0.27M, 0.46M, 0.66M, 0.85M and 1.7M (ResNet-20/32/44/56/110); Huang et al.
    # 2017, table 2: 1.0M (DenseNet, L = 40, k = 12). The exact counts pin the layouts (a changed shortcut or
    # width moves them). ResNet-8 is the same layout with one block a stage.
    assert _params(cifar.resnet8()) == 75_290
    assert _params(cifar.resnet20()) == 269_722
    assert _params(cifar.resnet32()) == 464_154
    assert _params(cifar.resnet44()) == 658_586
    assert _params(cifar.resnet56()) == 853_018
    assert _params(cifar.resnet110()) == 1_727_962
    assert _params(cifar.densenet40_12()) == 1_019_722


def test_resnet_stages_widths_and_parameter_free_shortcuts():
    net = cifar.resnet32(num_classes=7)
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3)] == [5, 5, 5]  # depth 6n + 2, n = 5
    x = torch.randn(2, 3, 32, 32)
    feats = []
    hooks = [getattr(net, f"layer{i}").register_forward_hook(lambda m, a, out: feats.append(out.shape[1:]))
             for i in (1, 2, 3)]
    assert net(x).shape == (2, 7)
    for h in hooks:
        h.remove()
    assert feats == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    for block in (net.layer2[0], net.layer3[0]):  # option A: the downsampling shortcut has no weights
        assert _params(block) == _params(block.conv1) + _params(block.bn1) + _params(block.conv2) + _params(block.bn2)


def test_densenet_grows_by_k_per_layer_without_compression():
    net = cifar.densenet40_12(num_classes=5)
    assert [len(getattr(net, f"block{i}")) for i in (1, 2, 3)] == [12, 12, 12]
    assert net.fc.in_features == 16 + 3 * 12 * 12
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_grey_input_and_zero_init_residual():
    assert cifar.resnet32(in_chans=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert cifar.densenet40_12(in_chans=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    net = cifar.resnet32(zero_init_residual=True).eval()
    assert not any(b.bn2.weight.any() for layer in (net.layer1, net.layer2, net.layer3) for b in layer)


@pytest.mark.parametrize("make, depth, match", [(cifar.CifarResNet, 33, "6n"), (cifar.DenseNet, 41, "3n")])
def test_bad_depth_is_one_line(make, depth, match):
    with pytest.raises(ValueError, match=match):
        make(depth)
