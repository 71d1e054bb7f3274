"""Hidden-stage mixing on any timm CNN: find the stages, replace one stage's output.

Feature-level methods (Manifold Mixup, Catch-up Mix) mix the activations after
one stage of the network. This module does that for every timm model that has a
``feature_info`` (the list timm keeps of the modules whose outputs are the
model's feature maps), with no model-specific code.

Mixing points
-------------
A model's mixing points are ``["input"] + stage_names(model)``, numbered from 0:

- point 0 is the input batch;
- point k >= 1 is the output of the module ``feature_info[k - 1]``.

timm's ``feature_info`` starts with the stem (the stride-2 level of an ImageNet
model, kept as the first entry when the CIFAR stem removes the stride), followed
by one entry per stage. So for every timm CNN, point 1 is the output of the
stem and point 2 + s is the output of the residual stage s (0-based):

============  =========  ==========  ==========  ==========  ==========  ==========
model         0          1           2           3           4           5
============  =========  ==========  ==========  ==========  ==========  ==========
resnet18      input      act1        layer1      layer2      layer3      layer4
resnetv2_18   input      stem.conv   stages.0    stages.1    stages.2    stages.3
regnetx_002   input      stem        s1          s2          s3          s4
============  =========  ==========  ==========  ==========  ==========  ==========

``replace_stage_output(model, k, fn)`` is a context manager that installs a
one-shot hook: in the next forward pass the output ``h`` of point k is replaced
by ``fn(h)`` (for k = 0, a forward pre-hook on the model replaces the input).
Later forward passes inside the context, and all passes after it, are
untouched; leaving the context removes the hook and checks that it fired.

``torch.compile``: a compiled model does not see hooks added after compilation
(dynamo does not guard on them), so :func:`forward_mixed` runs the original,
eager module when it mixes at a hidden point (k >= 1); mixing at the input
keeps the compiled forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from mixbench import UsageError

StageFn = Callable[[torch.Tensor], torch.Tensor]
Points = Union[str, Sequence[int]]


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def stage_names(model: nn.Module) -> List[str]:
    """Module names of the model's stages, in forward order, from timm's ``feature_info``."""
    info = getattr(unwrap(model), "feature_info", None)
    if not info:
        raise UsageError(
            f"{type(unwrap(model)).__name__} has no feature_info; hidden-stage mixing needs a timm CNN "
            "with feature_info (e.g. resnet18, resnetv2_18, regnetx_002)"
        )
    return [entry["module"] for entry in info]


def mixing_points(model: nn.Module) -> List[str]:
    """``["input"] + stage_names(model)``: the name of each mixing point, indexed by k."""
    return ["input"] + stage_names(model)


def resolve_points(model: nn.Module, points: Points) -> Tuple[int, ...]:
    """Validate a method's ``mix_points`` against ``model``; ``"all"`` means every point."""
    names = mixing_points(model)
    if isinstance(points, str):
        if points != "all":
            raise UsageError(f"mix_points {points!r}: give 'all' or a list of point indices 0..{len(names) - 1}")
        return tuple(range(len(names)))
    resolved = tuple(int(k) for k in points)
    if not resolved:
        raise UsageError("mix_points is empty; give 'all' or a list of point indices")
    bad = [k for k in resolved if not 0 <= k < len(names)]
    if bad:
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise UsageError(f"mix_points {bad} out of range for {type(unwrap(model)).__name__}; valid: {choices}")
    return resolved


def check_points(points: Points) -> Points:
    """Constructor-time check of ``mix_points`` (the model is not known yet): 'all' or non-negative ints."""
    if isinstance(points, str):
        if points != "all":
            raise UsageError(f"mix_points {points!r}: give 'all' or a list of point indices (0 = input)")
        return points
    try:
        resolved = tuple(int(k) for k in points)
    except (TypeError, ValueError):
        raise UsageError(f"mix_points {points!r}: give 'all' or a list of point indices (0 = input)") from None
    if not resolved or any(k < 0 for k in resolved):
        raise UsageError(f"mix_points {points!r}: give 'all' or a non-empty list of point indices >= 0")
    return resolved


@contextlib.contextmanager
def replace_stage_output(model: nn.Module, k: int, fn: StageFn) -> Iterator[None]:
    """In the next forward pass of ``model``, replace the output ``h`` of point ``k`` by ``fn(h)``.

    One-shot: only the first call of the stage module inside the context is
    changed. On a normal exit the hook must have fired, otherwise the stage did
    not run and a ``RuntimeError`` says so.
    """
    names = mixing_points(model)
    if not 0 <= k < len(names):
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise UsageError(f"mixing point {k} out of range; valid: {choices}")
    module = unwrap(model)
    fired = [False]

    if k == 0:
        def pre_hook(_module, args, kwargs):
            if fired[0]:
                return None
            fired[0] = True
            return (fn(args[0]),) + tuple(args[1:]), kwargs

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(_module, _args, output):
            if fired[0]:
                return None
            fired[0] = True
            return fn(output)

        handle = module.get_submodule(names[k]).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if not fired[0]:
        raise RuntimeError(f"mixing point {k} ({names[k]}) did not run in the forward pass")


def forward_mixed(model: nn.Module, x: torch.Tensor, k: int, fn: StageFn) -> torch.Tensor:
    """``model(x)`` with the output of point ``k`` replaced by ``fn(output)``.

    k = 0 calls ``model(fn(x))`` (a compiled model stays compiled); k >= 1 runs
    the eager module under :func:`replace_stage_output`.
    """
    if k == 0:
        return model(fn(x))
    with replace_stage_output(model, k, fn):
        return unwrap(model)(x)
