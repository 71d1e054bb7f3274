"""ResizeMix (Qin, Fang, Zhao, Wei, Xie, Liu, 2020, arXiv 2012.11101).

The partner image is shrunk as a whole and pasted into a box of the sample, so
the pasted patch always holds the partner's object. Reference: the ResizeMix
of Westlake-AI/openmixup (``openmixup/models/augments/resizemix.py``), with its
CIFAR-100 settings (``configs/classification/cifar100/mixups/basic/
r18_mixups_CE_none.py``: ``alpha=1``, ``scope=(0.1, 0.8)``, ``use_alpha=True``;
the function's default interpolation ``"nearest"``).

Per batch, in this order from ``self.rng`` (openmixup's order):

- one permutation ``perm``: sample i's partner is ``perm[i]``;
- the scale ``tau``: with ``use_alpha``, ``tau ~ Beta(alpha, alpha)`` and, when it
  falls outside ``scope``, a second draw ``tau ~ U(scope)``; without it,
  ``tau ~ U(scope)`` (the paper's rule; with ``alpha = 1`` both give
  ``tau ~ U(0.1, 0.8)``);
- the box centre: column ``cx`` uniform over ``[0, W)``, then row ``cy`` over
  ``[0, H)``.

The box has side ``int(tau * H)`` by ``int(tau * W)`` centred at (cy, cx), edges
``clip(c -+ side // 2)`` (CutMix's rule); the whole partner image, resized to
the clipped box (``F.interpolate``, ``interpolation``), is pasted in, and the
targets are ``lam * y + (1 - lam) * y[perm]`` with ``lam`` the area outside the box.

Deviations from openmixup: the box's side along the rows uses the height and
along the columns the width (openmixup names them the other way round; the same
on square images); a box that rounds to nothing (``int(tau * side) < 2``, which
happens at 16x16 for ``tau < 0.125``) leaves the batch unchanged with ``lam = 1``
(openmixup's ``interpolate`` to size 0 raises an error).

open-mmlab's mmpretrain (``mmpretrain/models/utils/batch_augments/resizemix.py``)
differs from openmixup: it draws ``lam ~ Beta(alpha, alpha)``, maps it to
``[lam_min, lam_max] = [0.1, 0.8]`` and takes CutMix's box of side
``sqrt(1 - lam)`` (side ratios 0.45 to 0.95, i.e. 20% to 90% of the area,
where openmixup's and the paper's ``tau`` gives side ratios 0.1 to 0.8, 1% to
64% of the area), resizes bilinearly (``align_corners=False``) and draws lam,
the permutation, then the centre row before the column. ``interpolation=
"bilinear"`` gives mmpretrain's resizing here; its box scale is not offered.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError

from ._registry import MixMethod, MixOutput, mix_targets, register_method
from .cutmix import Box

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")


def resizemix_box(height: int, width: int, tau: float, cy: int, cx: int) -> Box:
    """Box of side ``int(tau * side)`` centred at (cy, cx), clipped; (y1, y2, x1, x2) half-open."""
    ch, cw = int(height * tau), int(width * tau)
    y1, y2 = int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height))
    x1, x2 = int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width))
    return y1, y2, x1, x2


def resizemix(x: torch.Tensor, perm: torch.Tensor, box: Box,
              interpolation: str = "nearest") -> Tuple[torch.Tensor, float]:
    """Paste ``x[perm]`` resized to ``box`` into a copy of ``x``; returns it and the own-area fraction."""
    y1, y2, x1, x2 = box
    out = x.clone()
    if y2 <= y1 or x2 <= x1:
        return out, 1.0
    kwargs = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    out[:, :, y1:y2, x1:x2] = F.interpolate(x[perm], size=(y2 - y1, x2 - x1), mode=interpolation, **kwargs)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (x.shape[-2] * x.shape[-1])
    return out, lam


@register_method
class ResizeMix(MixMethod):
    name = "resizemix"

    def __init__(self, alpha: float = 1.0, scope: Sequence[float] = (0.1, 0.8), use_alpha: bool = True,
                 interpolation: str = "nearest"):
        super().__init__()
        if len(scope) != 2 or not 0 <= scope[0] <= scope[1] <= 1:
            raise UsageError(f"resizemix scope must be (low, high) with 0 <= low <= high <= 1, got {scope!r}")
        if interpolation not in INTERPOLATIONS:
            raise UsageError(f"resizemix interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        self.alpha = alpha
        self.scope = tuple(float(s) for s in scope)
        self.use_alpha = use_alpha
        self.interpolation = interpolation

    def draw_tau(self) -> float:
        low, high = self.scope
        if self.use_alpha and self.alpha > 0:
            tau = float(self.rng.beta(self.alpha, self.alpha))
            if low <= tau <= high:
                return tau
        return float(self.rng.uniform(low, high))

    def draw(self, n: int, height: int, width: int) -> Tuple[np.ndarray, float, int, int]:
        """perm, tau, the centre column and row, in openmixup's order."""
        perm = self.rng.permutation(n)
        tau = self.draw_tau()
        cx = int(self.rng.integers(width))
        cy = int(self.rng.integers(height))
        return perm, tau, cy, cx

    def forward(self, model, x, y):
        height, width = x.shape[-2:]
        perm, tau, cy, cx = self.draw(x.shape[0], height, width)
        perm = torch.from_numpy(perm).to(x.device, non_blocking=True)
        mixed, lam = resizemix(x, perm, resizemix_box(height, width, tau, cy, cx), self.interpolation)
        return MixOutput(model(mixed), mix_targets(y, perm, lam))
