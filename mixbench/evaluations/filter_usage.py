"""``filter_usage``: mean per-channel activation norm at every stage of ``feature_info`` and at the head's
input; Gini coefficient and effective number of channels. Also measured during training (the run option
``filter_usage_every``, :func:`filter_usage_during_training`)."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List

import numpy as np
import torch
from torch import nn

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext, PixelModel


def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n-1)/n when one holds everything."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten().sort().values
    n, total = len(v), v.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (2.0 * (i * v).sum() / (n * total) - (n + 1.0) / n).item()


def effective_channels(values) -> float:
    """exp(entropy) of the values normalised to sum 1: n when all are equal, 1 when one holds everything."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.sum() <= 0:
        return 0.0
    p = v / v.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def stage_modules(model: nn.Module) -> List[str]:
    """Module names of the stages listed in timm's ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UsageError(f"{type(model).__name__} has no feature_info; filter_usage needs its stage names")
    return [entry["module"] for entry in info]


@torch.no_grad()
def stage_channel_norms(net: nn.Module, batches: Iterable[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per stage of ``feature_info`` (and ``features``, the head's input): the mean over samples of each
    channel's L2 norm (over its spatial positions). ``batches``: model inputs (normalised)."""
    sums: Dict[str, torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        out = out.float()
        norms = out.flatten(2).norm(dim=2) if out.dim() > 2 else out.abs()
        sums[name] = sums.get(name, 0) + norms.sum(0).cpu()

    hooks = [net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: record(name, o))
             for name in stage_modules(net)]
    n = 0
    try:
        for x in batches:
            record("features", net.forward_features(x))
            n += len(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: s.double() / max(n, 1) for name, s in sums.items()}


def channel_norms(model: PixelModel, x: torch.Tensor, batch_size: int = 256) -> Dict[str, torch.Tensor]:
    """:func:`stage_channel_norms` of a pixel-space model on images ``x`` in [0, 1]."""
    batches = (model.normalise(x[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return stage_channel_norms(model.model, batches)


def filter_usage_summary(norms: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Gini and effective channels per stage, and their means over the stages (``features`` excluded)."""
    per = {name: {"channels": len(v), "gini": gini(v), "effective_channels": effective_channels(v),
                  "norms": [round(x, 6) for x in v.tolist()]} for name, v in norms.items()}
    stages = [v for name, v in per.items() if name != "features"]
    return {
        "mean_gini": float(np.mean([v["gini"] for v in stages])),
        "mean_effective_fraction": float(np.mean([v["effective_channels"] / v["channels"] for v in stages])),
        **per,
    }


def filter_usage_during_training(model: nn.Module, loader: Iterable, spec: Any, epoch: int) -> Dict[str, Any]:
    """``{"filter_usage": ...}`` for the epoch's metrics.jsonl line at the epochs chosen by the run option
    ``filter_usage_every`` (every N epochs from the first, and the last), else ``{}``. ``model``: the eager
    module; ``loader``: normalised test batches ``(x, y)``."""
    every = getattr(spec, "filter_usage_every", 0)
    if not every or (epoch % every and epoch != spec.epochs - 1):
        return {}
    was_training = model.training
    model.eval()
    norms = stage_channel_norms(model, (x.float() for x, _ in loader))
    model.train(was_training)
    return {"filter_usage": filter_usage_summary(norms)}


@register_suite(headlines=[Headline("mean_gini", lower_is_better=True, decimals=3),
                           Headline("mean_effective_fraction", decimals=3)])
def suite_filter_usage(ctx: EvalContext) -> Dict[str, Any]:
    batches = (ctx.model.normalise(x) for x, _ in ctx.test_batches())
    return filter_usage_summary(stage_channel_norms(ctx.model.model, batches))
