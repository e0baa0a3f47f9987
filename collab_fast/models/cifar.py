"""CIFAR networks: the paper's Table 1, ResNet-32/110 (He et al. 2016, sec. 4.2) and DenseNet-40-12 (Huang et
al. 2017), and the rest of He et al.'s CIFAR family, ResNet-20/44/56, with ResNet-8 (n = 1, a small student
in distillation work). Each is a sequence of named children, so the collaborative builder can split it
after a stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collab_fast.models.drop_path import drop_path, set_drop_path
from collab_fast.models.heads import SingleHead

__all__ = ["CifarResNet", "DenseNet", "densenet40_12", "resnet8", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110"]


class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _CifarBlock(nn.Module):
    drop_path = 0.0  # stochastic depth of the residual branch

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _ShortcutA(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(drop_path(out, self.drop_path, self.training) + self.shortcut(x))


class CifarResNet(SingleHead, nn.Module):
    """Depth 6n + 2: a 3x3 stem, three stages of n basic blocks (16, 32, 64 channels), pooling, fc."""

    def __init__(self, depth: int, num_classes: int = 10, zero_init_residual: bool = False, drop_path: float = 0.0,
                 in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [_CifarBlock(cin, cout, 1 if i == 0 else 2)] + [_CifarBlock(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        set_drop_path([m for m in self.modules() if isinstance(m, _CifarBlock)], drop_path)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, _CifarBlock) and zero_init_residual:
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNet(SingleHead, nn.Module):
    """DenseNet for 32x32 inputs: 3 dense blocks of (depth - 4) / 3 layers, no bottleneck, no compression."""

    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10, init_channels: int = 16,
                 in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n + 4 (40, 100, ...), got {depth}")
        n = (depth - 4) // 3
        c = init_channels  # Huang et al.: 16 for the basic (non-BC) DenseNet
        self.conv1 = nn.Conv2d(in_chans, c, 3, padding=1, bias=False)
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            setattr(self, f"block{b + 1}", nn.Sequential(*layers))
            if b < 2:
                setattr(self, f"trans{b + 1}", _Transition(c, c))
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trans1(self.block1(self.conv1(x)))
        x = self.trans2(self.block2(x))
        x = self.relu(self.norm(self.block3(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet8(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(8, num_classes, **kw)


def resnet20(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(20, num_classes, **kw)


def resnet32(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(32, num_classes, **kw)


def resnet44(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(44, num_classes, **kw)


def resnet56(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(56, num_classes, **kw)


def resnet110(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(110, num_classes, **kw)


def densenet40_12(num_classes: int = 10, in_chans: int = 3) -> DenseNet:
    return DenseNet(40, 12, num_classes, in_chans=in_chans)
