"""Models: any timm model by name, with a CIFAR stem where the input is small.

The CIFAR stem (3x3 stride-1 first convolution, no max-pool) is what the mixup
papers use for 32x32 inputs. It is applied generically: every strided
convolution and pooling layer in front of the model's first stride-4 stage
(found through timm's ``feature_info``) is replaced, so the same code serves
ResNet, pre-activation ResNet, RegNet, EfficientNet and other timm CNNs. The
``cifar-s2`` stem is the same with a stride-2 first convolution: the PuzzleMix
code's PreActResNet for Tiny-ImageNet's 64x64 images (``stride = 2``).

``preactresnet18`` (and ``preactresnet34``, ``preactresnet18_w16``) is the
PreActResNet of the mixup papers' code (snu-mllab/PuzzleMix
``models/preresnet.py``, itself from vikasverma1077/manifold_mixup), built from
timm's ``resnetv2`` blocks: timm's final BN-ReLU before pooling (absent in the
reference: ``avg_pool2d(layer4(out), 4)`` then ``linear``) is removed, and the
weights get the reference's initialisation, PyTorch's default
``reset_parameters`` of every convolution, norm and the classifier, in the
order in which the reference creates them. With the same torch RNG state
before ``create_model`` and before the reference's constructor, the two have
the same initial weights, the same parameter count (11,217,316 for 100
classes) and the same output. The plain timm name ``resnetv2_18`` keeps timm's
architecture and initialisation.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from torch import nn

from mixbench import UsageError

def reference_preact_resnet(model: nn.Module) -> nn.Module:
    """timm's ``resnetv2`` turned into the mixup papers' PreActResNet (see the module docstring).

    Removes the final norm and re-initialises with PyTorch's defaults in the reference's
    creation order: first convolution, then per block ``bn1, conv1, bn2, conv2, shortcut``,
    then the classifier (timm's 1x1-convolution head has the reference ``nn.Linear``'s
    fan-in, so the same draws). Call it under the RNG state the reference would see.
    """
    model.norm = nn.Identity()
    order = [model.stem.conv]
    for stage in model.stages:
        for block in stage.blocks:
            order += [block.norm1, block.conv1, block.norm2, block.conv2]
            if getattr(block, "downsample", None) is not None:
                order.append(block.downsample.conv)
    order.append(model.head.fc)
    for module in order:
        module.reset_parameters()
    return model


# Short names for the backbones of the mixup papers: (timm name, kwargs, what turns timm's model into it).
ALIASES: Dict[str, Tuple[str, Dict[str, Any], Optional[Callable[[nn.Module], nn.Module]]]] = {
    # Pre-activation ResNet-18 (He et al. 2016) as in the code of the Manifold Mixup, PuzzleMix,
    # Co-Mixup and Catch-up Mix CIFAR tables.
    "preactresnet18": ("resnetv2_18", {}, reference_preact_resnet),
    "preactresnet34": ("resnetv2_34", {}, reference_preact_resnet),
    # A narrow PreActResNet-18 (widths 16-128) for the embedded CPU benchmarks.
    "preactresnet18_w16": ("resnetv2_18", {"channels": (16, 32, 64, 128), "stem_chs": 16}, reference_preact_resnet),
}

SMALL_INPUT = 64  # inputs this size or smaller get the CIFAR stem by default
# auto: cifar at <= SMALL_INPUT px, else imagenet; cifar: 3x3 stride-1 first convolution and no pooling
# before the first stage; cifar-s2: the same with stride 2 (PuzzleMix's Tiny-ImageNet model); imagenet: timm's.
STEMS = ("auto", "cifar", "cifar-s2", "imagenet")


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


def apply_cifar_stem(model: nn.Module, stride: int = 1) -> nn.Module:
    """Make the stem keep full resolution: strided convs -> 3x3 stride 1, pools -> Identity.

    Only modules that run before the first stride-4 stage named in ``feature_info``
    are touched. ``stride=2`` gives the first strided convolution stride 2 instead
    (the PuzzleMix code's Tiny-ImageNet stem). ``feature_info`` reductions are
    updated to the new strides.
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
            new_stride = stride if not replacements else 1
            conv = nn.Conv2d(
                module.in_channels, module.out_channels, kernel_size=3, stride=new_stride, padding=1,
                groups=module.groups, bias=module.bias is not None,
            )
            removed *= module.stride[0] // new_stride
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
    "cifar-s2" the CIFAR stem with a stride-2 first convolution, "imagenet" never.
    """
    if stem not in STEMS:
        raise UsageError(f"unknown stem {stem!r}; choose from: {', '.join(STEMS)}")
    timm_name, extra = resolve_model_name(name)
    finish = ALIASES[name][2] if name in ALIASES else None
    extra.update(kwargs)
    rng = torch.get_rng_state()
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
    except TypeError as exc:
        raise UsageError(f"model {name!r} does not accept these options ({exc})") from None
    if stem in ("cifar", "cifar-s2") or (stem == "auto" and image_size <= SMALL_INPUT):
        apply_cifar_stem(model, stride=2 if stem == "cifar-s2" else 1)
    if finish is not None:
        # The reference model's initialisation consumes the RNG as the reference's constructor would.
        torch.set_rng_state(rng)
        model = finish(model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

