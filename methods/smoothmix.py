"""SmoothMix (Lee, Zaheer, Astrid, Lee, CVPR Workshops 2020).

"SmoothMix: a Simple Yet Effective Data Augmentation to Train Robust
Classifiers" (CVPR-W 2020, no arXiv version). The partner image is blended in
through a soft Gaussian mask G instead of CutMix's hard box, so the mixed image
has no strong edges: ``x~ = (1 - G) * x + G * x[perm]``, and the labels follow
the blended share, ``y~ = (1 - mean G) * y + mean G * y[perm]``.

Reference code: the ``smoothmix`` augment of Westlake-AI/openmixup
(``openmixup/models/augments/smoothmix.py``). The mask is theirs, bit for bit
(``tests/test_smoothmix.py`` checks it against a local copy): a Gaussian of
standard deviation ``sigma ~ U(0.25, 0.5) * H`` whose centre is shifted from the
image centre by a uniform random integer offset, one mask per batch.

Deviations, also in the README:

- Labels. openmixup blends ``(1 - G) * x + G * x[perm]`` but gives the mask's mean
  to the sample's *own* label (``lam = sum(G) / HW`` paired with ``y_a``), which
  swaps the two label weights. Here the weights are the realised shares, as in
  the paper (the image weighted by G gets the label weight mean G).
- openmixup draws an unused ``lam ~ Beta(alpha, alpha)``; there is no ``alpha``
  here and no unused draw.
- openmixup's mask needs a square image of even side (an odd side makes a
  mask one pixel too large). Here rows and columns are handled separately, so
  any H x W works; on square images of even side the mask is openmixup's.
"""
from typing import Sequence, Tuple

import torch

from mixbench import UsageError

from ._registry import MixMethod, MixOutput, register_method


def smooth_sigma(u: float, height: int, sigma: Sequence[float] = (0.25, 0.5)) -> torch.Tensor:
    """The mask's standard deviation in pixels, ``(lo + u * (hi - lo)) * H``, in float32.

    ``u`` is a uniform draw in [0, 1); the arithmetic is openmixup's float32
    ``(torch.rand(1) / 4 + 0.25) * h`` for the default range.
    """
    lo, hi = float(sigma[0]), float(sigma[1])
    return (torch.tensor([u], dtype=torch.float32) * (hi - lo) + lo) * height


def smooth_mask(height: int, width: int, shift_h: int, shift_w: int, sigma: torch.Tensor,
                device=None) -> torch.Tensor:
    """The (H, W) float32 Gaussian mask: weight of the partner image at each pixel.

    The Gaussian is centred at row ``H - 1/2 - H // 2 + shift_h`` and column
    ``W - 1/2 - W // 2 + shift_w`` (for an even side: half a pixel before the
    centre, moved by the shift), with standard deviation ``sigma`` (pixels, a
    one-element float32 tensor). openmixup computes it as a crop of a rolled
    2H x 2H grid; the squared distances are small integers plus 1/4, exact in
    float32, so the values are the same.
    """
    sigma = sigma.to(device=device, dtype=torch.float32)
    rows = torch.arange(height, device=device) + (height // 2 - int(shift_h)) - (2 * height - 1) / 2
    cols = torch.arange(width, device=device) + (width // 2 - int(shift_w)) - (2 * width - 1) / 2
    dist = cols[None, :] ** 2 + rows[:, None] ** 2
    var = sigma**2
    return torch.exp(-dist / (2 * var))


def smoothmix(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(1 - mask) * x + mask * x[perm]``; returns the mixed batch and the partner's share ``mean(mask)``.

    The share is a float32 scalar tensor, ``sum(mask) / (H * W)`` as openmixup computes it.
    """
    height, width = mask.shape[-2:]
    share = torch.sum(mask) / (height * width)
    mask = mask.to(x.dtype)
    return x * (1 - mask) + x[perm] * mask, share


@register_method
class SmoothMix(MixMethod):
    """SmoothMix; ``sigma``: the range of the mask's standard deviation as fractions of the image height.

    Per batch, from the method's generator, in this order (openmixup's order): the
    permutation, the column offset ``int(U{0..W-1} - W / 2)``, the row offset
    ``int(U{0..H-1} - H / 2)`` and ``u ~ U(0, 1)`` for the standard deviation.
    """

    name = "smoothmix"

    def __init__(self, sigma: Sequence[float] = (0.25, 0.5)):
        super().__init__()
        try:
            lo, hi = (float(s) for s in sigma)
        except (TypeError, ValueError):
            raise UsageError(f"smoothmix sigma must be a pair (low, high), got {sigma!r}") from None
        if not 0 < lo <= hi:
            raise UsageError(f"smoothmix sigma must satisfy 0 < low <= high, got {sigma!r}")
        self.sigma = (lo, hi)

    def draw_mask(self, n: int, height: int, width: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        perm = self.draw_perm(n, device)
        shift_w = int(int(self.rng.integers(width)) - width / 2)
        shift_h = int(int(self.rng.integers(height)) - height / 2)
        sigma = smooth_sigma(float(self.rng.random()), height, self.sigma)
        return perm, smooth_mask(height, width, shift_h, shift_w, sigma, device=device)

    def forward(self, model, x, y):
        perm, mask = self.draw_mask(x.shape[0], x.shape[-2], x.shape[-1], x.device)
        mixed, share = smoothmix(x, perm, mask)
        share = share.to(y.dtype)
        return MixOutput(model(mixed), (1 - share) * y + share * y[perm])
