"""Catch-up Mix (Kang, Kang, Kim, AAAI 2024, arXiv 2401.13193).

Feature-level mixing that gives lagging filters learning exposure: at a random
stage, each sample keeps its own activation maps where they are relatively weak
compared with its partner's and takes the partner's maps elsewhere, so strongly
activated maps are masked out and both samples forward the weaker map of each
pair.

Per batch (all draws from ``self.rng``):

- one mixing point k uniformly from ``mix_points``. Points are numbered as in
  :mod:`mixbench.hooks` (0 = input, k >= 1 = output of timm's
  ``feature_info[k - 1]``); the default ``"all"`` is the input plus the outputs
  of the stem and of every stage;
- one ``lam ~ Beta(alpha, alpha)``, ``alpha = 1.0``;
- one random permutation ``perm``: sample i's partner is ``perm[i]``.

At k = 0 the input gets CutMix (``methods/cutmix.py``'s pure ``cutmix_box`` and
``cutmix``, box centre uniform over the pixels, ``lam`` corrected to the clipped
box). At a hidden point with activations ``h`` of shape (N, C, H, W),
:func:`mix_channels` does the rest:

- filter influence of sample i: its per-channel spatial l2 norms
  ``||h[i, c]||_2`` divided by their sum over channels (computed in float32
  without gradient; a sample whose maps are all zero gets influence 0 rather
  than 0/0);
- relative filter influence ``RFI_i = influence_i - influence_perm[i]``;
- the ``n = floor(lam * C)`` channels with the lowest RFI come from sample i,
  the other ``C - n`` from ``perm[i]``. ``lam * C`` is evaluated in double
  precision. Sample i keeps its maps that are weakest relative to its
  partner's and takes the partner's map in the channels where its own are
  relatively strongest, so its highly activated maps are masked out; the split
  follows ``lam``;
- ties in RFI are broken by channel index, lower index first (a stable
  ascending sort), so the selection is deterministic;
- the mask is a select (a gather of whole maps), not a detach: gradients reach the
  selected maps of both samples;
- targets ``lam' * y + (1 - lam') * y[perm]`` with the realised fraction
  ``lam' = n / C`` (at k = 0, the CutMix own-area fraction).

The mask costs one stable argsort over the channels of the whole batch and one
scatter; the mixing is one gather of whole maps (``index_select`` on the
(N * C, H * W) view, a ``torch.where`` select for channels_last tensors). No
loop over samples.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from mixbench.hooks import Points, check_points, forward_mixed, resolve_points

from ._registry import MixMethod, MixOutput, mix_targets, register_method
from .cutmix import cutmix, cutmix_box


def own_channel_mask(h: torch.Tensor, perm: torch.Tensor, n_own: int) -> torch.Tensor:
    """Boolean (N, C) mask: True where sample i keeps its own map (its ``n_own`` lowest-RFI channels)."""
    with torch.no_grad():
        norms = torch.linalg.vector_norm(h.detach().float().flatten(2), dim=2)  # (N, C)
        total = norms.sum(dim=1, keepdim=True)
        influence = norms / torch.where(total > 0, total, torch.ones_like(total))
        rfi = influence - influence[perm]
        order = torch.argsort(rfi, dim=1, stable=True)
        mask = torch.zeros(rfi.shape, dtype=torch.bool, device=h.device)
        mask.scatter_(1, order[:, :n_own], True)
    return mask


def mix_channels(h: torch.Tensor, perm: torch.Tensor, lam: float) -> Tuple[torch.Tensor, float]:
    """Catch-up Mix of activations ``h`` (N, C, H, W) with partners ``perm``; no randomness inside.

    Returns the mixed activations and the realised own-channel fraction
    ``floor(lam * C) / C``.
    """
    channels = h.shape[1]
    n_own = math.floor(float(lam) * channels)
    mask = own_channel_mask(h, perm, n_own)
    if h.is_contiguous():
        # One gather of whole maps: row i * C + c of the output is row src * C + c of ``h``, src = i or
        # perm[i]. Its backward is one index_add, several times faster on CPU than where + h[perm].
        n = h.shape[0]
        rows = torch.arange(n, device=h.device)
        src = torch.where(mask, rows[:, None], perm[:, None]) * channels + torch.arange(channels, device=h.device)
        mixed = h.reshape(n * channels, -1).index_select(0, src.flatten()).view(h.shape)
    else:  # channels_last and other layouts: a select that keeps the layout
        mixed = torch.where(mask[:, :, None, None], h, h.index_select(0, perm))
    return mixed, n_own / channels


def catchup_mix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, lam: float, perm: torch.Tensor,
                centre: Tuple[int, int] = (0, 0)) -> MixOutput:
    """Forward ``x`` with Catch-up Mix at point ``k`` (``centre`` is the CutMix box centre for k = 0).

    Returns the logits and the soft targets mixed with the realised fraction.
    """
    if k == 0:
        box = cutmix_box(x.shape[-2], x.shape[-1], lam, *centre)
        mixed, lam_realised = cutmix(x, perm, box)
        return MixOutput(model(mixed), mix_targets(y, perm, lam_realised))
    realised = []

    def mix(h):
        out, lam_h = mix_channels(h, perm, lam)
        realised.append(lam_h)
        return out

    logits = forward_mixed(model, x, k, mix)
    return MixOutput(logits, mix_targets(y, perm, realised[0]))


@register_method
class CatchupMix(MixMethod):
    name = "catchup_mix"

    def __init__(self, alpha: float = 1.0, mix_points: Points = "all"):
        super().__init__()
        self.alpha = alpha
        self.mix_points = check_points(mix_points)

    def forward(self, model, x, y):
        points = resolve_points(model, self.mix_points)
        k, lam, perm = self.draw_point_lambda_perm(points, self.alpha, x.shape[0], x.device)
        centre = (0, 0)
        if k == 0:
            centre = (int(self.rng.integers(x.shape[-2])), int(self.rng.integers(x.shape[-1])))
        return catchup_mix(model, x, y, k, lam, perm, centre)
