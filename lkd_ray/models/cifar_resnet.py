"""CIFAR ResNets of the KD benchmark (resnet8…110, resnet8x4, resnet32x4) and its CIFAR ResNet50.

Layer names and shapes follow the community's benchmark code so its published checkpoints load
(``conv1, bn1, layer1..3, fc``; no conv biases).
"""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .base import TappedModel, pool_flatten


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _make_layer(block, inplanes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


class CifarResNet(TappedModel):
    """Three-stage CIFAR ResNet: depth = 6n+2 (basic blocks)."""

    feature_tap = "layer3"
    head_modules = ("fc",)

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        inplanes = num_filters[0]
        self.layer1, inplanes = _make_layer(BasicBlock, inplanes, num_filters[1], n, 1)
        self.layer2, inplanes = _make_layer(BasicBlock, inplanes, num_filters[2], n, 2)
        self.layer3, inplanes = _make_layer(BasicBlock, inplanes, num_filters[3], n, 2)
        self.feature_channels = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        _kaiming_init(self)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, f):
        return self.fc(pool_flatten(f))


class CifarResNet50(TappedModel):
    """The benchmark's CIFAR ResNet50: bottleneck [3,4,6,3], 3×3 stem, no max-pool."""

    feature_tap = "layer4"
    head_modules = ("linear",)

    def __init__(self, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        self.layer1, inplanes = _make_layer(Bottleneck, inplanes, 64, 3, 1)
        self.layer2, inplanes = _make_layer(Bottleneck, inplanes, 128, 4, 2)
        self.layer3, inplanes = _make_layer(Bottleneck, inplanes, 256, 6, 2)
        self.layer4, inplanes = _make_layer(Bottleneck, inplanes, 512, 3, 2)
        self.feature_channels = inplanes
        self.linear = nn.Linear(inplanes, num_classes)
        _kaiming_init(self)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, f):
        return self.linear(pool_flatten(f))


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
_X4 = {"resnet8x4": 8, "resnet32x4": 32}


def build(name: str, num_classes: int, in_channels: int) -> TappedModel:
    if name in _DEPTHS:
        return CifarResNet(_DEPTHS[name], [16, 16, 32, 64], num_classes, in_channels)
    if name in _X4:
        return CifarResNet(_X4[name], [32, 64, 128, 256], num_classes, in_channels)
    if name == "ResNet50":
        return CifarResNet50(num_classes, in_channels)
    raise KeyError(name)


NAMES = [*_DEPTHS, *_X4, "ResNet50"]
