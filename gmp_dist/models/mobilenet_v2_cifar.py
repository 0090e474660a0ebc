"""MobileNet-V2 for CIFAR-10, as in kuangliu/pytorch-cifar.

This is the ``MobileNetV2`` ("MobileNet-V2-kuangliu-CIFAR10") class of the paper's official code
(manasgupta-1/GlobalMP, ``Global MP with MT/model_list.py``), used for Table 8. CIFAR changes
from the ImageNet network: stem stride 1, the second stage stride 1, 4x4 average pool.

Why this variant matters: a block with stride 1 and ``in != out`` channels has a **1x1 conv
shortcut**, which is prunable. The last block (160 -> 320) has one, so Global MP at 98% can prune
the whole path to the classifier; the paper calls this layer collapse and fixes it with MT 0.02%
(paper.md §4). The official file also holds a Distiller variant with identity-only shortcuts; it
is *not* the model the layer-collapse story is about.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# (expansion, out_planes, num_blocks, stride), kuangliu's table with the CIFAR strides.
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class Block(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise -> 1x1 project (linear bottleneck)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # Kept exactly as kuangliu wrote it: an empty Sequential is the identity, a conv+BN
        # shortcut when the channel count changes at stride 1 (stride 2 has no residual at all).
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2Cifar(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks: list[nn.Module] = []
        in_planes = 32
        for expansion, out_planes, num_blocks, stride in _CFG:
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(Block(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 4) at 32x32
        return self.linear(out)
