"""The optimiser and the learning-rate schedule of a run."""
from __future__ import annotations

import inspect
import math

import torch

from mixbench.spec import RunSpec


def make_optimizer(model: torch.nn.Module, spec: RunSpec, device: torch.device,
                   extra_groups=()) -> torch.optim.Optimizer:
    """SGD with the run's options; fused into one kernel per step on CUDA where torch has it.

    ``extra_groups``: the method's own parameter groups (``MixMethod.param_groups``), after the
    model's; options they leave out take the run's."""
    extra = {}
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.SGD).parameters:
        extra["fused"] = True
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                                weight_decay=spec.weight_decay, **extra)
    for group in extra_groups:
        optimizer.add_param_group(dict(group))
    return optimizer


def lr_factor(step: int, spec: RunSpec, steps_per_epoch: int) -> float:
    """The LR multiplier at optimiser step ``step`` (linear warm-up, then cosine or multi-step)."""
    total = spec.epochs * steps_per_epoch
    warm = spec.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if spec.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    epoch = step / steps_per_epoch
    factor = 1.0
    for m in sorted(m * spec.epochs if m < 1 else m for m in spec.milestones):
        if epoch >= m:  # multiplied one milestone at a time, as the reference's adjust_learning_rate does
            factor *= spec.gamma
    return factor
