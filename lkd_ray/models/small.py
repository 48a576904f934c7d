"""Small CNNs for the offline Fashion-MNIST recipe: fast enough to distil on 2 CPU cores in minutes."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .base import TappedModel, pool_flatten
from .cifar_resnet import _kaiming_init


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(TappedModel):
    """conv-BN-ReLU stages, max-pool between stages; ``widths`` sets the size."""

    feature_tap = "stage3"
    head_modules = ("fc",)

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 10, in_channels: int = 1, double: bool = False):
        super().__init__()
        cin = in_channels
        for i, w in enumerate(widths):
            layers = [_block(cin, w)] + ([_block(w, w)] if double else [])
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            cin = w
        self.fc = nn.Linear(cin, num_classes)
        self.feature_channels = cin
        _kaiming_init(self)

    def forward_features(self, x):
        x = F.max_pool2d(self.stage1(x), 2)
        x = F.max_pool2d(self.stage2(x), 2)
        return self.stage3(x)

    def forward_head(self, f):
        return self.fc(pool_flatten(f))


def build(name: str, num_classes: int, in_channels: int) -> TappedModel:
    if name == "cnn_teacher":
        return SmallCNN((32, 64, 128), num_classes, in_channels)
    if name == "cnn_student":
        return SmallCNN((8, 16, 32), num_classes, in_channels)
    raise KeyError(name)


NAMES = ["cnn_teacher", "cnn_student"]
