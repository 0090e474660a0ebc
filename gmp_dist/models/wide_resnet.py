"""Wide-ResNet (Zagoruyko & Komodakis 2016) for CIFAR: WRN-28-8 (Table 2) and WRN-22-8 (Table 7).

Follows the ``WideResNet`` / ``BasicBlock_WRN`` classes of the official code (manasgupta-1/GlobalMP,
``Global MP with MT/model_list.py``), parameter names included (``block1.layer.0.convShortcut``)
so its checkpoints load as they are: pre-activation blocks, a 1x1 conv shortcut only where the
width changes (the first block of each group), identity shortcuts elsewhere — the parameter-free
path that lets WRN-22-8 survive 99.9% sparsity (paper.md §4).

Dropout: the official code builds WRNs with ``dropRate=0.3`` between the two convs of each
block. The paper never mentions it; we keep 0.3 as the default (``model.kwargs.dropout``).
The official ``forward`` ends in ``log_softmax`` (trained with NLL); we return logits, which
with cross-entropy is the same loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        # As in the official block: when the width changes, the shortcut sees the pre-activated input.
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A group of blocks; exists so parameter names match the official code (``blockN.layer.i``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        # The official initialisation: He-normal on fan-out for convs, zero FC bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 8) at 32x32
        return self.fc(out)


def wrn_28_8(num_classes: int = 10, dropout: float = 0.3) -> WideResNet:
    return WideResNet(28, 8, num_classes, dropout)


def wrn_22_8(num_classes: int = 10, dropout: float = 0.3) -> WideResNet:
    return WideResNet(22, 8, num_classes, dropout)
