"""GridMix (Baek, Bang, Shim, "GridMix: Strong regularization through local context mapping",
Pattern Recognition, 2021; https://www.sciencedirect.com/science/article/pii/S0031320320303976; no arXiv version).

The partner shows through a regular grid of square holes laid over a random
crop of the sample, so every part of the image keeps some local context of
both. Reference: the GridMix of Westlake-AI/openmixup
(``openmixup/models/augments/gridmix.py``, after IlyaDobrynin/GridMixup), with
its CIFAR-100 settings (``configs/classification/cifar100/mixups/basic/
r18_mixups_CE_none.py``): ``alpha=1``, ``n_holes=(2, 6)``,
``hole_aspect_ratio=1``, ``cut_area_ratio=(0.5, 1)``, ``cut_aspect_ratio=(0.5, 2)``.

Per batch, in this order from ``self.rng`` (openmixup's order):

- ``lam ~ Beta(alpha, alpha)``;
- the number of holes per row, an integer uniform over ``n_holes`` (both ends
  included); the hole aspect ratio, the crop's area share and the crop's aspect
  ratio, each uniform over its range (a range may be one number: the draw is
  still made);
- one permutation ``perm``;
- the crop's position ``(u, v) ~ U[0, 1)^2``: column then row.

The mask (:func:`gridmix_mask`, one for the batch, 1 where the partner shows):

- a crop of ``cut_w = int(sqrt(int(H * W * area) / aspect))`` columns and
  ``cut_h = int(cut_w * aspect)`` rows, top-left corner
  ``(int((H - cut_h) * v), int((W - cut_w) * u))``;
- patches of ``pw = ceil(cut_w / n_holes)`` columns and ``ph = int(pw *
  hole_aspect)`` rows tile the crop from its corner; each holds a hole at its top
  left of ``int(pw * sqrt(1 - lam))`` by ``int(ph * sqrt(1 - lam))`` pixels, each
  held to at least 1 and at most the patch's side less 1;
- targets ``lam' * y + (1 - lam') * y[perm]``, ``lam'`` the share of pixels that
  stay the sample's own.

Properties of the reference, kept here: a hole is at least one pixel, so
``lam = 1`` still mixes a little (``lam'`` reports it); a crop taller than the
image (``cut_h > H``, possible when the aspect ratio is above 1) starts at a
negative row, and the reference's slices ``start:stop`` then count from the
bottom of the image (Python's negative indices) or come out empty; the mask is
built with the same slices.

Deviations from openmixup: the crop's columns use the image width and its rows
the height (openmixup names them the other way round; the same on square
images); ``n_holes`` is held to ``cut_w // 2`` where openmixup asserts it (at
16x16 a crop can be 8 columns wide, so 5 or 6 holes would stop training; from
28x28 up the assertion never fires and nothing changes).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from mixbench import UsageError

from ._registry import MixMethod, MixOutput, mix_targets, register_method

Range = Union[float, Sequence[float]]


def _pair(value: Range) -> Tuple[float, float]:
    if isinstance(value, (int, float)):
        return value, value
    if len(value) != 2 or value[0] > value[1]:
        raise UsageError(f"gridmix: a range is a number or (low, high) with low <= high, got {value!r}")
    return value[0], value[1]


def gridmix_mask(height: int, width: int, lam: float, n_holes: int, hole_aspect_ratio: float,
                 cut_area_ratio: float, cut_aspect_ratio: float, u: float, v: float) -> np.ndarray:
    """Boolean (H, W) mask, True where the partner shows (no randomness inside)."""
    cut_area = int(height * width * cut_area_ratio)
    cut_w = int(np.sqrt(cut_area / cut_aspect_ratio))
    cut_h = int(cut_w * cut_aspect_ratio)
    col0 = int((width - cut_w) * u)
    row0 = int((height - cut_h) * v)
    n_holes = max(1, min(n_holes, cut_w // 2))  # openmixup asserts 1 <= n_holes <= cut_w // 2
    patch_w = math.ceil(cut_w / n_holes)
    patch_h = int(patch_w * hole_aspect_ratio)
    n_rows = math.ceil(cut_h / patch_h)
    ratio = np.sqrt(1 - lam)
    hole_w = min(max(int(patch_w * ratio), 1), patch_w - 1)
    hole_h = min(max(int(patch_h * ratio), 1), patch_h - 1)
    # The holes are the product of a set of row slices and a set of column slices, so the mask is
    # an outer product; the slices are the reference's, negative starts included.
    rows = np.zeros(height, dtype=bool)
    for j in range(n_rows + 1):
        y1 = min(patch_h * j, cut_h)
        rows[row0 + y1: row0 + min(y1 + hole_h, cut_h)] = True
    cols = np.zeros(width, dtype=bool)
    for i in range(n_holes + 1):
        x1 = min(patch_w * i, cut_w)
        cols[col0 + x1: col0 + min(x1 + hole_w, cut_w)] = True
    return rows[:, None] & cols[None, :]


def gridmix(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """``x[perm]`` where ``mask`` (H, W, bool) is set, ``x`` elsewhere; returns it and the own-pixel share."""
    mixed = torch.where(mask.to(x.device), x[perm], x)
    return mixed, 1.0 - float(mask.sum()) / mask.numel()


@register_method
class GridMix(MixMethod):
    name = "gridmix"

    def __init__(self, alpha: float = 1.0, n_holes: Range = (2, 6), hole_aspect_ratio: Range = 1.0,
                 cut_area_ratio: Range = (0.5, 1.0), cut_aspect_ratio: Range = (0.5, 2.0)):
        super().__init__()
        for value in (n_holes, hole_aspect_ratio, cut_area_ratio, cut_aspect_ratio):
            _pair(value)
        self.alpha = alpha
        self.n_holes = n_holes
        self.hole_aspect_ratio = hole_aspect_ratio
        self.cut_area_ratio = cut_area_ratio
        self.cut_aspect_ratio = cut_aspect_ratio

    def draw(self, n: int):
        """lam, the grid's parameters, perm and the crop position (u, v), in openmixup's order."""
        lam = self.draw_lambda(self.alpha)
        low, high = _pair(self.n_holes)
        holes = int(self.rng.integers(int(low), int(high) + 1))
        ratios = [float(self.rng.uniform(*_pair(r)))
                  for r in (self.hole_aspect_ratio, self.cut_area_ratio, self.cut_aspect_ratio)]
        perm = self.rng.permutation(n)
        u, v = float(self.rng.random()), float(self.rng.random())
        return lam, holes, ratios, perm, u, v

    def forward(self, model, x, y):
        height, width = x.shape[-2:]
        lam, holes, (hole_aspect, area, aspect), perm, u, v = self.draw(x.shape[0])
        mask = torch.from_numpy(gridmix_mask(height, width, lam, holes, hole_aspect, area, aspect, u, v))
        perm = torch.from_numpy(perm).to(x.device, non_blocking=True)
        mixed, lam = gridmix(x, perm, mask)
        return MixOutput(model(mixed), mix_targets(y, perm, lam))
