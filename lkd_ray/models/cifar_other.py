"""The rest of the CIFAR KD benchmark zoo: WRN, VGG (BN), MobileNetV2 (half width), ShuffleNetV1/V2.

Module names follow the community's benchmark code so its published checkpoints load.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import TappedModel, pool_flatten
from .cifar_resnet import _kaiming_init


# ---------------------------------------------------------------- Wide ResNet
class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.equal else self.convShortcut(o))


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(TappedModel):
    feature_tap = "block3"
    head_modules = ("bn1", "fc")

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = _NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.feature_channels = ch[3]
        _kaiming_init(self)

    def forward_features(self, x):
        return self.block3(self.block2(self.block1(self.conv1(x))))

    def forward_head(self, f):
        return self.fc(pool_flatten(F.relu(self.bn1(f))))


# ---------------------------------------------------------------- VGG
_VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _vgg_block(cfg: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        cin = v
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied in forward, as the benchmark does


class VGG(TappedModel):
    feature_tap = "block4"
    head_modules = ("classifier",)

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        cins = [in_channels] + [c[-1] for c in cfg[:-1]]
        for i, (c, cin) in enumerate(zip(cfg, cins)):
            self.add_module(f"block{i}", _vgg_block(c, cin))
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(512, num_classes)
        self.feature_channels = 512
        _kaiming_init(self)

    def forward_features(self, x):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        x = F.relu(self.block1(self.pool(x)))
        x = F.relu(self.block2(self.pool(x)))
        x = F.relu(self.block3(self.pool(x)))
        if h >= 64:  # ImageNet-size inputs get one more pooling stage
            x = self.pool(x)
        return F.relu(self.block4(x))

    def forward_head(self, f):
        return self.classifier(pool_flatten(f))


# ---------------------------------------------------------------- MobileNetV2 (CIFAR, half width)
class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hid = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Cifar(TappedModel):
    """The benchmark's ``MobileNetV2`` (``mobile_half``): width 0.5, expansion 6, 1280-wide last conv."""

    feature_tap = "conv2"
    head_modules = ("classifier",)

    def __init__(self, num_classes: int = 100, in_channels: int = 3, width: float = 0.5, expand: int = 6):
        super().__init__()
        setting = [[1, 16, 1, 1], [expand, 24, 2, 1], [expand, 32, 3, 2], [expand, 64, 4, 2],
                   [expand, 96, 3, 1], [expand, 160, 3, 2], [expand, 320, 1, 1]]
        cin = int(32 * width)
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        blocks = []
        for t, c, n, s in setting:
            cout = int(c * width)
            stage = []
            for i in range(n):
                stage.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.feature_channels = last
        _kaiming_init(self)

    def forward_features(self, x):
        return self.conv2(self.blocks(self.conv1(x)))

    def forward_head(self, f):
        return self.classifier(pool_flatten(f))


# ---------------------------------------------------------------- ShuffleNets
def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleV1Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        self.g = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1)) if self.stride == 2 else F.relu(out + res)


class ShuffleNetV1(TappedModel):
    feature_tap = "layer3"
    head_modules = ("linear",)

    def __init__(self, num_classes: int = 100, in_channels: int = 3, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(out_planes, num_blocks)):
            blocks = []
            for j in range(n):
                cat = cin if j == 0 else 0
                blocks.append(_ShuffleV1Block(cin, cout - cat, 2 if j == 0 else 1, groups))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)
        self.feature_channels = cin
        _kaiming_init(self)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, f):
        return self.linear(pool_flatten(f))


class _ShuffleV2Basic(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        c = c // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return _shuffle(torch.cat([x1, out], 1), 2)


class _ShuffleV2Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(TappedModel):
    feature_tap = "conv2"
    head_modules = ("linear",)

    def __init__(self, num_classes: int = 100, in_channels: int = 3, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(out_channels[:3], num_blocks)):
            self.add_module(f"layer{i + 1}", nn.Sequential(_ShuffleV2Down(cin, cout), *[_ShuffleV2Basic(cout) for _ in range(n)]))
            cin = cout
        self.conv2 = nn.Conv2d(cin, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_channels = out_channels[3]
        _kaiming_init(self)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x)))

    def forward_head(self, f):
        return self.linear(pool_flatten(f))


def build(name: str, num_classes: int, in_channels: int) -> TappedModel:
    if name.startswith("wrn_"):
        _, depth, widen = name.split("_")
        return WideResNet(int(depth), int(widen), num_classes, in_channels)
    if name in _VGG_CFG:
        return VGG(_VGG_CFG[name], num_classes, in_channels)
    if name == "MobileNetV2":
        return MobileNetV2Cifar(num_classes, in_channels)
    if name == "ShuffleV1":
        return ShuffleNetV1(num_classes, in_channels)
    if name == "ShuffleV2":
        return ShuffleNetV2(num_classes, in_channels)
    raise KeyError(name)


NAMES = ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", *_VGG_CFG, "MobileNetV2", "ShuffleV1", "ShuffleV2"]
