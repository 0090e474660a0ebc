"""Registers every built-in model. Each architecture lives in its own module."""

from __future__ import annotations

import torchvision

from gmp_dist.models.digits_cnn import DigitsCNN
from gmp_dist.models.registry import ModelSpec, register


def _resnet50(num_classes: int = 1000, **kwargs):
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


register("digits_cnn", ModelSpec(DigitsCNN, (1, 8, 8), 10, "digits", "small CNN for scikit-learn's 8x8 digits"))
register("resnet50", ModelSpec(_resnet50, (3, 224, 224), 1000, "imagenet", "torchvision ResNet-50 (25.5M params)"))
