"""Training losses against soft targets, chosen by the run option ``loss``.

- ``ce``: soft-target cross-entropy, ``mean_n sum_k -t_nk log softmax(z)_nk``
  (the timm convention, ``timm.loss.SoftTargetCrossEntropy``).
- ``bce``: binary cross-entropy of the softmax probabilities against the soft
  targets, averaged over the N x K entries: ``nn.BCELoss()(softmax(z), t)``, the
  loss with which snu-mllab/PuzzleMix's ``main.py`` trains every method, vanilla
  included (the code behind the PuzzleMix, Co-Mixup and Catch-up Mix CIFAR and
  Tiny-ImageNet tables). Like ``nn.BCELoss`` it clamps each log at -100.

Both are computed in float32 outside autocast (``binary_cross_entropy`` is not
allowed under CUDA autocast, and a bf16 softmax would round the small
probabilities that the binary terms weigh).

A method's extra loss term (PuzzleMix's clean-input loss) is written in the
units of ``ce``; ``Loss.extra_weight`` rescales it so that it keeps the
reference's weight relative to the main loss: 1 under ``ce``, ``1 / K`` under
``bce`` (the reference adds ``2 * clean_lam * CE / K`` to its binary
cross-entropy, whose mean over K classes is about ``CE / K``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from mixbench import UsageError


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (rows sum to 1), averaged over the batch."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def softmax_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``nn.BCELoss()(softmax(logits), target)``: binary cross-entropy averaged over N x K."""
    return F.binary_cross_entropy(torch.softmax(logits.float(), dim=-1), target.float())


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: str
    per_class_mean: bool  # averaged over the K classes too (extra terms are scaled by 1/K)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            return self.fn(logits.float(), target.float())

    def extra_weight(self, num_classes: int) -> float:
        """The factor for a method's extra loss term, which is written in ``ce`` units."""
        return 1.0 / num_classes if self.per_class_mean else 1.0


LOSSES: Dict[str, Loss] = {
    "ce": Loss("ce", soft_cross_entropy, "soft-target cross-entropy (timm's convention)", per_class_mean=False),
    "bce": Loss("bce", softmax_bce, "BCELoss(softmax(logits), target), mean over N x K (the PuzzleMix code's loss)",
                per_class_mean=True),
}


def list_losses() -> List[str]:
    return list(LOSSES)


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}; choose from: {', '.join(LOSSES)}") from None
