"""ImageNet models: torchvision's resnet18/34/50 and mobilenet_v2 (state-dict keys unchanged, so
torchvision weights load as published) plus MobileNetV1, the ImageNet KD benchmark's student."""
from __future__ import annotations

from torch import nn
from torchvision import models as tvm
from torchvision.models.mobilenetv2 import MobileNetV2 as _TVMobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet as _TVResNet

from .base import TappedModel, pool_flatten


class TVResNet(_TVResNet, TappedModel):
    feature_tap = "layer4"
    head_modules = ("fc",)

    def __init__(self, block, layers, num_classes: int = 1000, in_channels: int = 3):
        super().__init__(block, layers, num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.feature_channels = 512 * block.expansion

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, f):
        return self.fc(pool_flatten(f))

    forward = TappedModel.forward


class TVMobileNetV2(_TVMobileNetV2, TappedModel):
    feature_tap = "features"
    head_modules = ("classifier",)

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__(num_classes=num_classes)
        if in_channels != 3:
            first = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 2, 1, bias=False)
        self.feature_channels = self.last_channel

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f):
        return self.classifier(pool_flatten(f))

    forward = TappedModel.forward


def _conv_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_dw(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class MobileNetV1(TappedModel):
    """MobileNet v1 (width 1.0, ~4.2 M parameters), as the ImageNet KD benchmarks train it."""

    feature_tap = "model"
    head_modules = ("fc",)

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
               *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]
        self.model = nn.Sequential(_conv_bn(in_channels, 32, 2), *[_conv_dw(a, b, s) for a, b, s in cfg])
        self.fc = nn.Linear(1024, num_classes)
        self.feature_channels = 1024

    def forward_features(self, x):
        return self.model(x)

    def forward_head(self, f):
        return self.fc(pool_flatten(f))


def build(name: str, num_classes: int, in_channels: int) -> TappedModel:
    if name == "resnet18":
        return TVResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)
    if name == "resnet34":
        return TVResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)
    if name == "resnet50":
        return TVResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)
    if name == "mobilenet_v2":
        return TVMobileNetV2(num_classes, in_channels)
    if name == "mobilenet_v1":
        return MobileNetV1(num_classes, in_channels)
    raise KeyError(name)


NAMES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v1"]

# torchvision weight enums for the models torchvision publishes; used by teacher loading.
TORCHVISION_WEIGHTS = {
    "resnet18": tvm.ResNet18_Weights,
    "resnet34": tvm.ResNet34_Weights,
    "resnet50": tvm.ResNet50_Weights,
    "mobilenet_v2": tvm.MobileNet_V2_Weights,
}
