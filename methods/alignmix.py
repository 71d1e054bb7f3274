"""AlignMixup (Venkataramanan, Kijak, Amsaleg, Avrithis, CVPR 2022, arXiv 2103.15375).

Mixup of feature maps that are first aligned: the spatial positions of a
sample's last feature map are matched to those of its partner's by entropic
optimal transport (Sinkhorn), one map is rearranged onto the other's layout
through the transport plan, and the two are interpolated.

Reference code: shashankvkt/AlignMixup_CVPR22 (read at commit ``ec01a68``),
``cifar10_100/models/resnet18_classifier.py`` (``mixup_process`` 12-16,
``mixup_aligned`` 20-46, ``Resnet_classifier.forward`` 58-80),
``cifar10_100/utils/OT.py`` (``SinkhornDistance``, 5-85) and ``cifar10_100/main.py``
(lambda 161, loss 101-102 and 165, ``--alpha 2.0`` in the README's CIFAR-100
command). Per batch:

- lambda ~ Beta(alpha, alpha), ``alpha = 2.0``;
- one mixing point uniformly from ``mix_points``, default ``(0, 5)``: the
  reference's ``layer_mix = random.randint(0, 1)`` between the input and the
  output of ``layer4``, the last stage (point 5 of :mod:`mixbench.hooks` on
  every ResNet, PreActResNet, wide ResNet, RegNet and EfficientNet of timm);
- one partner permutation ``perm``;
- at the input (point 0): plain mixup ``lam * x + (1 - lam) * x[perm]``;
- at a hidden point, activations ``A`` (N, C, H, W) seen as C-dimensional
  features at P = H * W positions, ``A' = A[perm]``: the entropic transport
  plan ``pi`` (N, P, P) between the positions of ``A`` (rows) and of ``A'``
  (columns) with uniform marginals 1/P, cost ``C_ij = sum_c (A_ci - A'_cj)^2``,
  ``eps = 0.1``, log-domain Sinkhorn of at most 100 iterations, stopped when
  the batch mean of ``sum_i |u_i - u_i^prev| < 0.1`` (the reference's check);
  ``R = P * pi`` (an assignment matrix, detached), then one of two directions,
  drawn uniformly (the reference's ``align_mix = random.randint(0, 1)``):
  0: ``lam * A + (1 - lam) * A' R^T`` (the partner aligned to the sample),
  1: ``lam * A R + (1 - lam) * A'`` (the sample aligned to the partner);
- targets ``lam * y + (1 - lam) * y[perm]`` in both cases (the reference's
  ``lam * CE(y_a) + (1 - lam) * CE(y_b)``).

Draw order from the method's generator: the point, lambda, the permutation
(``MixMethod.draw_point_lambda_perm``), then the direction at a hidden point.

:func:`sinkhorn_plan` and :func:`align_mix_features` compute what the
reference's ``SinkhornDistance`` and ``mixup_aligned`` compute, with the same
operations in the same order, in float32 (``tests/test_alignmix.py`` compares
them with a local copy of the reference: equal bit for bit on the CPU).

Deviations (also in the README, with the training protocol's):

- Draws come from the method's seeded generator (the reference: Python's
  ``random`` for the branch and the direction, NumPy's global generator for
  lambda and the permutation): same distributions, exact resume.
- The plan is computed without an autograd graph (the reference builds one and
  detaches the plan: the same values, no gradient through the plan either way).
- The cost tensor (N, P, P, C) is built in chunks of samples (the same values;
  bounded memory for large maps).
- Under autocast (bf16 on CUDA) the plan and the mixed features are computed in
  float32 and cast back to the activations' dtype; the reference has no
  autocast.
- 1x1 feature maps (P = 1): the plan is 1 and the features are not moved, so
  alignment is plain mixup; the reference's ``squeeze`` of the marginals breaks
  the broadcast there and fails for batches over 1.
- lambda = 1 is a no-op at the input and in direction 0; in direction 1 it
  still rearranges the sample's own features onto its partner's layout, as the
  reference does (its target is then the sample's own label).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mixbench import UsageError
from mixbench.hooks import Points, check_points, forward_mixed, resolve_points

from ._registry import MixMethod, MixOutput, mix_targets, register_method
from .mixup import mixup

# Cost tensors are built at most this many float32 elements at a time (256 MB).
_COST_CHUNK_ELEMENTS = 1 << 26


def cost_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C[n, i, j] = sum_d (a[n, i, d] - b[n, j, d])^2`` for ``a`` (N, P, D) and ``b`` (N, Q, D).

    The reference's ``_cost_matrix`` (``torch.sum(torch.abs(x_col - y_lin) ** 2, -1)``, the square of the
    absolute value is the square), evaluated over chunks of samples.
    """
    n, p, d = a.shape
    q = b.shape[1]
    step = max(1, _COST_CHUNK_ELEMENTS // max(1, p * q * d))
    if step >= n:
        return torch.sum((a.unsqueeze(-2) - b.unsqueeze(-3)) ** 2, -1)
    return torch.cat([torch.sum((a[s:s + step].unsqueeze(-2) - b[s:s + step].unsqueeze(-3)) ** 2, -1)
                      for s in range(0, n, step)])


def _modified_cost(neg_cost: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """``(-C_ij + u_i + v_j) / eps`` from ``neg_cost = -C``, the reference's ``M`` (negation is exact)."""
    return (neg_cost + u.unsqueeze(-1) + v.unsqueeze(-2)) / eps


def sinkhorn_plan(a: torch.Tensor, b: torch.Tensor, eps: float = 0.1, max_iter: int = 100,
                  thresh: float = 0.1) -> torch.Tensor:
    """Entropic OT plan (N, P, Q) between the P points of ``a`` (N, P, D) and the Q points of ``b`` (N, Q, D).

    Uniform marginals 1/P and 1/Q, squared Euclidean cost, log-domain Sinkhorn updates of the dual
    potentials ``u`` then ``v``, at most ``max_iter`` rounds, stopped after the first round whose
    batch mean of ``sum_i |u_i - u_i^prev|`` is below ``thresh``; returns ``exp((-C + u + v) / eps)``.
    Float32, no gradient: the reference's ``SinkhornDistance(eps, max_iter).forward`` (its output is
    detached by its caller).
    """
    with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
        a, b = a.detach().float(), b.detach().float()
        neg_cost = -cost_matrix(a, b)
        n, p, q = neg_cost.shape
        mu = torch.full((n, p), 1.0 / p, dtype=torch.float32, device=a.device)
        nu = torch.full((n, q), 1.0 / q, dtype=torch.float32, device=a.device)
        log_mu, log_nu = torch.log(mu + 1e-8), torch.log(nu + 1e-8)
        u, v = torch.zeros_like(mu), torch.zeros_like(nu)
        for _ in range(max_iter):
            u_prev = u
            u = eps * (log_mu - torch.logsumexp(_modified_cost(neg_cost, u, v, eps), dim=-1)) + u
            v = eps * (log_nu - torch.logsumexp(_modified_cost(neg_cost, u, v, eps).transpose(-2, -1), dim=-1)) + v
            if (u - u_prev).abs().sum(-1).mean().item() < thresh:
                break
        return torch.exp(_modified_cost(neg_cost, u, v, eps))


def align_mix_features(h: torch.Tensor, perm: torch.Tensor, lam: float, direction: int, eps: float = 0.1,
                       max_iter: int = 100, thresh: float = 0.1) -> torch.Tensor:
    """AlignMix of activations ``h`` (N, C, H, W) with partners ``perm``; no randomness inside.

    ``direction`` 0: ``lam * A + (1 - lam) * A' R^T``; 1: ``lam * A R + (1 - lam) * A'``, with
    ``A' = h[perm]`` and ``R = H * W * sinkhorn_plan(A^T, A'^T)`` (the reference's ``mixup_aligned``).
    Gradients reach ``A`` and ``A'``, not the plan. Returns a tensor of ``h``'s shape and dtype.
    """
    if direction not in (0, 1):
        raise ValueError(f"direction must be 0 or 1, got {direction!r}")
    n, c, height, width = h.shape
    with torch.autocast(h.device.type, enabled=False):
        # Contiguous (N, C, P) maps whatever the layout of ``h`` (channels_last on CUDA): the same
        # arithmetic, and so the same numbers, as the reference's ``view``s.
        feat1 = h.float().contiguous().view(n, c, height * width)
        feat2 = h[perm].float().contiguous().view(n, c, height * width)
        plan = sinkhorn_plan(feat1.permute(0, 2, 1), feat2.permute(0, 2, 1), eps, max_iter, thresh)
        plan = plan * (height * width)
        if direction == 0:
            aligned = torch.matmul(feat2, plan.permute(0, 2, 1)).view(n, c, height, width)
            mixed = feat1.view(n, c, height, width) * lam + aligned * (1 - lam)
        else:
            aligned = torch.matmul(feat1, plan).view(n, c, height, width)
            mixed = aligned * lam + feat2.view(n, c, height, width) * (1 - lam)
    return mixed.to(h.dtype)


def alignmix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, lam: float, perm: torch.Tensor,
             direction: int = 0, eps: float = 0.1, max_iter: int = 100, thresh: float = 0.1) -> MixOutput:
    """Forward ``x`` with mixup at the input (k = 0) or AlignMix at hidden point ``k``; no randomness inside.

    Returns the logits and the soft targets ``lam * y + (1 - lam) * y[perm]``.
    """
    if k == 0:
        logits = model(mixup(x, perm, lam))
    else:
        logits = forward_mixed(model, x, k, lambda h: align_mix_features(h, perm, lam, direction, eps, max_iter,
                                                                         thresh))
    return MixOutput(logits, mix_targets(y, perm, lam))


def _positive(name: str, value, integer: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise UsageError(f"alignmix {name} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


@register_method
class AlignMix(MixMethod):
    name = "alignmix"

    def __init__(self, alpha: float = 2.0, mix_points: Points = (0, 5), eps: float = 0.1, max_iter: int = 100,
                 thresh: float = 0.1):
        super().__init__()
        self.alpha = alpha
        self.mix_points = check_points(mix_points)
        self.eps = _positive("eps", eps)
        self.max_iter = _positive("max_iter", max_iter, integer=True)
        if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not thresh >= 0:
            raise UsageError(f"alignmix thresh must be a number >= 0, got {thresh!r}")
        self.thresh = float(thresh)

    def forward(self, model, x, y):
        points: Sequence[int] = resolve_points(model, self.mix_points)
        k, lam, perm = self.draw_point_lambda_perm(points, self.alpha, x.shape[0], x.device)
        direction = int(self.rng.integers(2)) if k > 0 else 0
        return alignmix(model, x, y, k, lam, perm, direction, self.eps, self.max_iter, self.thresh)
