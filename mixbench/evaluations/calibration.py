"""``calibration``: expected calibration error (equal-width confidence bins) and NLL [bins]."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext


def calibration_metrics(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> Dict[str, float]:
    """ECE (percent; equal-width confidence bins, weighted by bin size) and NLL (nats) of softmax(logits)."""
    logits = logits.double()
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64).to(conf.device)  # the same edges on any device
    which = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.double().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return {
        "ece": 100.0 * ece,
        "nll": F.cross_entropy(logits, y).item(),
        "mean_confidence": 100.0 * conf.mean().item(),
        "top1": 100.0 * correct.mean().item(),
    }


def _check(o: Dict[str, Any]) -> None:
    if o["bins"] <= 0:
        raise UsageError(f"calibration bins must be a positive integer, got {o['bins']!r}")


@register_suite(headlines=[Headline("ece", lower_is_better=True, percent=True), Headline("nll", lower_is_better=True)],
                check=_check)
def suite_calibration(ctx: EvalContext, bins: int = 15) -> Dict[str, Any]:
    return {**calibration_metrics(ctx.predict_test(), ctx.test.y, bins), "bins": bins}
