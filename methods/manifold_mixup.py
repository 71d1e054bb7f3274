"""Manifold Mixup (Verma, Lamb, Beckham, Najafi, Mitliagkas, Lopez-Paz, Bengio, ICML 2019, arXiv 1806.05236).

Mixup applied to a hidden representation: per batch, one mixing point k is drawn
uniformly from ``mix_points``, one ``lam ~ Beta(alpha, alpha)`` and one random
permutation ``perm``; the activations at point k become
``lam * h + (1 - lam) * h[perm]`` and the one-hot targets are mixed with the
same ``lam``. This follows the authors' code (vikasverma1077/manifold_mixup,
``supervised/models/preresnet.py``), where ``layer_mix`` is drawn from
{0, 1, 2}: the input, the output of ``layer1`` and the output of ``layer2``.

Mixing points are numbered as in :mod:`mixbench.hooks`: 0 is the input and
k >= 1 the output of timm's ``feature_info[k - 1]``; entry 0 is the stem, so
the reference's "after layer1" and "after layer2" are points 2 and 3
(``stages.0`` and ``stages.1`` of ``resnetv2_18``, ``layer1`` and ``layer2`` of
``resnet18``, ``s1`` and ``s2`` of RegNet). Default ``mix_points=(0, 2, 3)``.

``alpha`` defaults to 2.0, the value of the authors' CIFAR runs. The stem
output (point 1) is not a default mixing point: the reference's stem is a single
convolution whose output goes straight into ``layer1``.
"""
import torch
from torch import nn

from mixbench.hooks import Points, check_points, forward_mixed, resolve_points

from ._registry import MixMethod, MixOutput, mix_targets, register_method
from .mixup import mixup


def manifold_mixup(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, lam: float,
                   perm: torch.Tensor) -> MixOutput:
    """Forward ``x`` with ``lam * h + (1 - lam) * h[perm]`` at mixing point ``k``; no randomness inside.

    Returns the logits and the mixed soft targets ``lam * y + (1 - lam) * y[perm]``.
    """
    logits = forward_mixed(model, x, k, lambda h: mixup(h, perm, lam))
    return MixOutput(logits, mix_targets(y, perm, lam))


@register_method
class ManifoldMixup(MixMethod):
    name = "manifold_mixup"

    def __init__(self, alpha: float = 2.0, mix_points: Points = (0, 2, 3)):
        super().__init__()
        self.alpha = alpha
        self.mix_points = check_points(mix_points)

    def forward(self, model, x, y):
        points = resolve_points(model, self.mix_points)
        k, lam, perm = self.draw_point_lambda_perm(points, self.alpha, x.shape[0], x.device)
        return manifold_mixup(model, x, y, k, lam, perm)
