"""Mixup (Zhang, Cisse, Dauphin, Lopez-Paz, ICLR 2018, arXiv 1710.09412).

Each sample is blended with a partner from a random permutation of the batch,
``x~ = lam * x + (1 - lam) * x[perm]``, and so are the one-hot targets, with one
``lam ~ Beta(alpha, alpha)`` per batch (as in the authors' code,
facebookresearch/mixup-cifar10).
"""
import torch

from ._registry import MixMethod, MixOutput, mix_targets, register_method


def mixup(x: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """The convex combination ``lam * x + (1 - lam) * x[perm]`` (no randomness inside)."""
    return x.mul(lam).add_(x[perm], alpha=1.0 - lam)


@register_method
class Mixup(MixMethod):
    name = "mixup"

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, model, x, y):
        lam = self.draw_lambda(self.alpha)
        perm = self.draw_perm(x.shape[0], x.device)
        return MixOutput(model(mixup(x, perm, lam)), mix_targets(y, perm, lam))
