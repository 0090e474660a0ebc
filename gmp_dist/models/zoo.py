"""Registers every built-in model. Each architecture lives in its own module.

Input shapes are one sample without the batch dimension; FLOPs (``models.flops``) are measured
at exactly this size, so they must be the resolution the paper's numbers refer to.
"""

from __future__ import annotations

import torchvision

from gmp_dist.models.digits_cnn import DigitsCNN
from gmp_dist.models.fastgrnn import FastGRNN
from gmp_dist.models.mobilenet_v1 import MobileNetV1
from gmp_dist.models.mobilenet_v2_cifar import MobileNetV2Cifar
from gmp_dist.models.registry import ModelSpec, register
from gmp_dist.models.resnet_cifar import resnet32
from gmp_dist.models.wide_resnet import wrn_22_8, wrn_28_8


def _resnet50(num_classes: int = 1000, **kwargs):
    # torchvision's ResNet-50 (stride on the 3x3 conv, "v1.5"): 25,502,912 conv+FC weights,
    # 4.09G MACs — the model and counts of the paper's Table 4 and STR's FLOPs references.
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


register("digits_cnn", ModelSpec(DigitsCNN, (1, 8, 8), 10, "digits", "small CNN for scikit-learn's 8x8 digits"))
register("resnet50", ModelSpec(_resnet50, (3, 224, 224), 1000, "imagenet", "torchvision ResNet-50 (25.5M params)"))
register("mobilenet_v1", ModelSpec(MobileNetV1, (3, 224, 224), 1000, "imagenet",
                                   "MobileNet-V1 width 1.0 (4.21M prunable weights, 569M MACs)"))
register("mobilenet_v2_cifar", ModelSpec(MobileNetV2Cifar, (3, 32, 32), 10, "cifar10",
                                         "kuangliu CIFAR MobileNet-V2 with 1x1 conv shortcuts (2.2M)"))
register("wrn_28_8", ModelSpec(wrn_28_8, (3, 32, 32), 10, "cifar10", "Wide-ResNet-28-8, dropout 0.3 (23.3M)"))
register("wrn_22_8", ModelSpec(wrn_22_8, (3, 32, 32), 10, "cifar10", "Wide-ResNet-22-8, dropout 0.3 (17.1M)"))
register("resnet32", ModelSpec(resnet32, (3, 32, 32), 10, "cifar10", "CIFAR ResNet-32, option-A shortcuts (0.46M)"))
register("fastgrnn", ModelSpec(FastGRNN, (128, 9), 2, "har2",
                               "FastGRNN, hidden 80, low-rank W (r=9) and U (r=80), HAR-2 (128 steps x 9)"))
