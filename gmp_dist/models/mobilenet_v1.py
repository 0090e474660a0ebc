"""MobileNet-V1 (Howard et al. 2017), ImageNet, width 1.0, 28 layers (27 conv + 1 FC).

Same layer list as STR's ``models/mobilenetv1.py`` (RAIVNLab/STR), the model behind the paper's
Table 5, and as the ``MobileNetV1`` class in the official code (manasgupta-1/GlobalMP,
``model_list.py``). Parameter names match that class (``model.<i>.<j>``, bias-free ``fc``), so its
checkpoints load as they are. STR's classifier is a 1x1 conv with the same 1024x1000 weight. The
prunable count is the paper's 4,209,088 (3,185,088 conv + 1,024,000 FC) and the dense cost
568.7M MACs (STR's 569M).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (out_channels, stride) of the 13 depthwise-separable blocks after the 32-channel stem.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv + 1x1 pointwise conv, each followed by BN and ReLU (one flat Sequential, as upstream)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),  # depthwise: prunable like any conv (paper.md §1.1)
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 2)]
        cin = 32
        for cout, stride in _BLOCKS:
            layers.append(_conv_dw(cin, cout, stride))
            cin = cout
        self.model = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(7) at 224x224, also works at other sizes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.model(x)).flatten(1)
        return self.fc(self.dropout(x))
