"""Models: any timm model by name, with a CIFAR stem where the input is small.

The CIFAR stem (3x3 stride-1 first convolution, no max-pool) is what the mixup
papers use for 32x32 inputs. It is applied generically: every strided
convolution and pooling layer in front of the model's first stride-4 stage
(found through timm's ``feature_info``) is replaced, so the same code serves
ResNet, pre-activation ResNet, RegNet, EfficientNet and other timm CNNs.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Tuple

import timm
import torch
from torch import nn

from mixbench import UsageError

# Short names for the backbones of the mixup papers.
ALIASES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    # Pre-activation ResNet-18 (He et al. 2016), the backbone of the Manifold Mixup,
    # PuzzleMix and Catch-up Mix CIFAR tables.
    "preactresnet18": ("resnetv2_18", {}),
    "preactresnet34": ("resnetv2_34", {}),
    # A narrow PreActResNet-18 (widths 16-128) for the embedded CPU benchmarks.
    "preactresnet18_w16": ("resnetv2_18", {"channels": (16, 32, 64, 128), "stem_chs": 16}),
}

SMALL_INPUT = 64  # inputs this size or smaller get the CIFAR stem by default


def list_model_names() -> List[str]:
    return list(ALIASES) + timm.list_models()


def resolve_model_name(name: str) -> Tuple[str, Dict[str, Any]]:
    """Map an alias or a timm name to (timm name, extra kwargs); unknown names are a usage error."""
    if name in ALIASES:
        return ALIASES[name][0], dict(ALIASES[name][1])
    if timm.is_model(name):
        return name, {}
    close = difflib.get_close_matches(name, list_model_names(), n=5)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    raise UsageError(
        f"unknown model {name!r}{hint} (aliases: {', '.join(ALIASES)}; any timm model name works, "
        "see `mixbench list models`)"
    )


def _first_stage_name(model: nn.Module) -> str | None:
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    for entry in info:
        if entry.get("reduction", 0) >= 4:
            return entry["module"]
    return None


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Make the stem keep full resolution: strided convs -> 3x3 stride 1, pools -> Identity.

    Only modules that run before the first stride-4 stage named in ``feature_info``
    are touched. ``feature_info`` reductions are updated to the new strides.
    """
    first_stage = _first_stage_name(model)
    if first_stage is None:
        raise UsageError(f"{type(model).__name__} has no feature_info; it cannot get a CIFAR stem (use --stem imagenet)")
    removed = 1
    replacements = []
    for name, module in model.named_modules():
        if name == first_stage or name.startswith(first_stage + "."):
            break
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            conv = nn.Conv2d(
                module.in_channels, module.out_channels, kernel_size=3, stride=1, padding=1,
                groups=module.groups, bias=module.bias is not None,
            )
            removed *= module.stride[0]
            replacements.append((name, conv))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            stride = module.stride if isinstance(module.stride, int) else module.stride[0]
            removed *= stride
            replacements.append((name, nn.Identity()))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for entry in model.feature_info:
        entry["reduction"] = max(1, entry["reduction"] // removed)
    return model


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 224,
    stem: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model (or an alias) for ``num_classes`` classes.

    ``stem``: "auto" gives the CIFAR stem when ``image_size <= 64``, "cifar" always,
    "imagenet" never.
    """
    if stem not in ("auto", "cifar", "imagenet"):
        raise UsageError(f"unknown stem {stem!r}; choose from: auto, cifar, imagenet")
    timm_name, extra = resolve_model_name(name)
    extra.update(kwargs)
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
    except TypeError as exc:
        raise UsageError(f"model {name!r} does not accept these options ({exc})") from None
    if stem == "cifar" or (stem == "auto" and image_size <= SMALL_INPUT):
        apply_cifar_stem(model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

