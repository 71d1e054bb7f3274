"""The timm CNN kinds that hidden-stage mixing is tested on, in small variants.

16x16 inputs get the CIFAR stem; each variant keeps its kind's block structure.
"""
import torch
from torch import nn

from mixbench.models import create_model

MODELS = {
    "resnet18": ("resnet18", dict(channels=(8, 16, 32, 64), stem_width=8)),
    "preact": ("resnetv2_18", dict(channels=(8, 16, 32, 64), stem_chs=8)),
    # timm's wide ResNet: Bottleneck blocks with base_width 128 (twice the ResNet-50 width), one block per stage.
    "wide": ("wide_resnet50_2", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)),
    "regnet": ("regnetx_002", {}),
    # timm's small test EfficientNet (the EfficientNet class: depthwise-separable and inverted-residual MBConv
    # blocks with squeeze-excitation, 0.1 M parameters); efficientnet_b0's width and depth cannot be set by kwargs.
    "efficientnet": ("test_efficientnet", {}),
}
KINDS = list(MODELS)


def build(kind: str) -> nn.Module:
    """A seeded model of ``kind`` with 5 classes for 16x16 inputs (train mode)."""
    torch.manual_seed(0)
    name, kwargs = MODELS[kind]
    return create_model(name, num_classes=5, image_size=16, **kwargs)
