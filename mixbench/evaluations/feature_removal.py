"""``feature_removal``: zero the k strongest channels (per sample) of the features fed to the classifier
head; top-1 versus k [ks]."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext, PixelModel


def remove_top_channels(features: torch.Tensor, k: int) -> torch.Tensor:
    """Zero, per sample, the ``k`` channels with the highest mean activation (dim 1 is channels)."""
    if k <= 0:
        return features
    strength = features.flatten(2).mean(2) if features.dim() > 2 else features
    idx = strength.topk(min(k, strength.shape[1]), dim=1).indices
    keep = torch.ones_like(strength).scatter_(1, idx, 0.0)
    return features * keep.view(*keep.shape, *([1] * (features.dim() - 2)))


@torch.no_grad()
def feature_removal_hits(model: PixelModel, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                         ks: Sequence[int]) -> Tuple[torch.Tensor, int]:
    """(correct predictions for each k in ``ks``, number of samples) over ``(x, y)`` batches."""
    correct, n = torch.zeros(len(ks)), 0
    for x, y in batches:
        feats = model.features(x)
        for j, k in enumerate(ks):
            correct[j] += (model.head(remove_top_channels(feats, k)).argmax(1) == y).sum().item()
        n += len(x)
    return correct, n


def feature_removal_curve(model: PixelModel, x: torch.Tensor, y: torch.Tensor, ks: Sequence[int],
                          batch_size: int = 256) -> List[float]:
    """Top-1 (percent) with the k strongest head-input channels removed, for each k in ``ks``."""
    batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    correct, n = feature_removal_hits(model, batches, ks)
    return (100.0 * correct / n).tolist()


def default_ks(channels: int) -> List[int]:
    """0, 1, 2, 4, ... up to half the channels."""
    ks, k = [0], 1
    while k <= channels // 2:
        ks.append(k)
        k *= 2
    return ks


def _check(o: Dict[str, Any]) -> None:
    ks = o["ks"]
    if ks is not None and any(k < 0 for k in (list(ks) if isinstance(ks, (list, tuple)) else [ks])):
        raise UsageError(f"feature_removal ks must be >= 0, got {ks!r}")


@register_suite(headlines=[Headline("auc", percent=True)], check=_check)
def suite_feature_removal(ctx: EvalContext, ks: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    first, _ = next(iter(ctx.test_batches()))
    with torch.no_grad():
        channels = ctx.model.features(first[:1]).shape[1]
    ks = default_ks(channels) if ks is None else sorted({int(k) for k in ([ks] if isinstance(ks, int) else ks)})
    if any(k < 0 or k > channels for k in ks):
        raise UsageError(f"feature_removal ks must be in 0..{channels} (the head's input channels), got {ks}")
    correct, n = feature_removal_hits(ctx.model, ctx.test_batches(), ks)
    accs = (100.0 * correct / n).tolist()
    frac = np.asarray(ks, dtype=float) / channels
    span = frac[-1] - frac[0]
    area = sum((frac[i + 1] - frac[i]) * (accs[i] + accs[i + 1]) / 2 for i in range(len(ks) - 1))
    auc = float(area / span) if span > 0 else float(accs[0])
    return {"channels": channels, "k": ks, "top1": accs, "auc": auc}
