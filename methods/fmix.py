"""FMix (Harris, Marcu, Painter, Niranjan, Prügel-Bennett, Hare, 2020, arXiv 2002.12047).

Mixing with a binary mask cut from a low-frequency random image: Gaussian
noise in Fourier space, scaled by ``1 / f ** decay_power``, transformed back,
and thresholded so that a fraction ``lam`` of the pixels (the brightest) keeps
the sample's own image and the rest shows its partner. Reference: the authors'
code, ecs-vlc/FMix, ``fmix.py`` (``sample_mask``, ``make_low_freq_image``,
``binarise_mask``) and ``implementations/torchbearer_implementation.py`` (the
mixing and the loss), with the settings of their CIFAR runs (``trainer.py``):
``decay_power=3``, ``alpha=1``, ``max_soft=0``, ``reformulate=False``.

Per batch, in this order from ``self.rng`` (the reference's order):

- ``lam ~ Beta(alpha, alpha)``;
- the Fourier noise: standard normals of shape (1, H, F, 2), ``F = W // 2 + 1``
  (``W // 2 + 2`` for odd ``W``, as the reference's ``fftfreqnd`` slices it);
- a coin ``u ~ U[0, 1)``: the mask keeps ``ceil(lam * H * W)`` pixels when
  ``u > 0.5``, else ``floor(lam * H * W)``;
- one permutation ``perm``.

One mask for the whole batch: ``x~ = mask * x + (1 - mask) * x[perm]``, targets
``lam * y + (1 - lam) * y[perm]`` with the drawn ``lam`` (the reference's rule:
the mask's mean is ``ceil`` or ``floor`` of ``lam * H * W`` over ``H * W``, within
``1 / (H * W)`` of ``lam``).

The mask is built on the CPU with NumPy (an (H, W) inverse FFT and an argsort:
tens of microseconds at 32x32) and copied to the device once per batch.

Notes on the reference, reproduced here so that masks are equal bit for bit:

- ``make_low_freq_image`` forms the complex spectrum as ``spectrum[:, 0] + 1j *
  spectrum[:, 1]`` on an array of shape (1, H, F, 2); this indexes the
  frequency-row axis, not the last (real, imaginary) axis, so the spectrum that
  is inverted is the (F, 2) block made of rows 0 and 1 (zero-padded to (H, W)
  by ``irfftn``). Only those 2F normals of the draw shape the mask; the rest
  are drawn and unused. The masks are still smooth low-frequency blobs, and
  they are the masks that gave the paper's numbers.
- ``binarise_mask`` ranks pixels with NumPy's default (unstable) argsort,
  reversed; mixbench uses the same call.

Deviations: ``reformulate=True`` (the paper's reformulated loss) is not offered;
the mask is given to ``irfftn`` with explicit ``axes`` (the last two, the
reference's implicit choice, which NumPy 2 deprecates).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from ._registry import MixMethod, MixOutput, mix_targets, register_method


def fourier_frequencies(height: int, width: int) -> np.ndarray:
    """|f| of the bins of a real 2-D FFT of (height, width), shape (H, F); the reference's ``fftfreqnd``."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[: width // 2 + (2 if width % 2 == 1 else 1)]
    return np.sqrt(fx * fx + fy * fy)


def noise_shape(height: int, width: int) -> Tuple[int, int, int, int]:
    """The shape of the standard-normal draw behind one mask."""
    return (1,) + fourier_frequencies(height, width).shape + (2,)


def low_freq_image(noise: np.ndarray, decay_power: float, height: int, width: int) -> np.ndarray:
    """The grey-level image in [0, 1], shape (1, H, W), that ``make_low_freq_image`` makes from ``noise``."""
    freqs = fourier_frequencies(height, width)
    scale = np.ones(1) / (np.maximum(freqs, np.array([1.0 / max(width, height, 0)])) ** decay_power)
    spectrum = np.expand_dims(scale, -1)[None, :] * noise
    spectrum = spectrum[:, 0] + 1j * spectrum[:, 1]  # the reference's indexing (see the module docstring)
    image = np.real(np.fft.irfftn(spectrum, (height, width), axes=(-2, -1)))
    image = image[:1, :height, :width]
    image = image - image.min()
    return image / image.max()


def binarise(image: np.ndarray, lam: float, take_ceil: bool, max_soft: float = 0.0) -> np.ndarray:
    """The reference's ``binarise_mask``: the top ``ceil``/``floor(lam * size)`` pixels are 1, the rest 0.

    ``max_soft`` > 0 softens a band of ``size * max_soft`` pixels either side of the threshold linearly.
    Returns a float64 array of ``image``'s shape (a copy).
    """
    shape = image.shape
    flat = image.reshape(-1).copy()
    order = flat.argsort()[::-1]
    num = math.ceil(lam * flat.size) if take_ceil else math.floor(lam * flat.size)
    soft = max_soft if not (max_soft > lam or max_soft > 1 - lam) else min(lam, 1 - lam)
    soft = int(flat.size * soft)
    low, high = num - soft, num + soft
    flat[order[:high]] = 1
    flat[order[low:]] = 0
    flat[order[low:high]] = np.linspace(1, 0, high - low)
    return flat.reshape(shape)


def fmix_mask(noise: np.ndarray, lam: float, take_ceil: bool, height: int, width: int,
              decay_power: float = 3.0, max_soft: float = 0.0) -> np.ndarray:
    """The mask (1, H, W), float64, 1 where the sample keeps its own pixels (no randomness inside)."""
    return binarise(low_freq_image(noise, decay_power, height, width), lam, take_ceil, max_soft)


def fmix(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * x + (1 - mask) * x[perm]`` with one (1, H, W) or (H, W) mask for the batch."""
    mask = mask.to(x.dtype)
    return mask * x + (1 - mask) * x[perm]


@register_method
class FMix(MixMethod):
    name = "fmix"

    def __init__(self, alpha: float = 1.0, decay_power: float = 3.0, max_soft: float = 0.0):
        super().__init__()
        self.alpha = alpha
        self.decay_power = decay_power
        self.max_soft = max_soft

    def draw(self, n: int, height: int, width: int) -> Tuple[float, np.ndarray, bool, np.ndarray]:
        """lam, the Fourier noise, the ceil/floor coin and the permutation, in the reference's order."""
        lam = self.draw_lambda(self.alpha)
        noise = self.rng.standard_normal(noise_shape(height, width))
        take_ceil = bool(self.rng.random() > 0.5)
        return lam, noise, take_ceil, self.rng.permutation(n)

    def forward(self, model, x, y):
        height, width = x.shape[-2:]
        lam, noise, take_ceil, perm = self.draw(x.shape[0], height, width)
        mask = fmix_mask(noise, lam, take_ceil, height, width, self.decay_power, self.max_soft)
        mask = torch.from_numpy(mask).float().to(x.device, non_blocking=True)
        perm = torch.from_numpy(perm).to(x.device, non_blocking=True)
        return MixOutput(model(fmix(x, perm, mask)), mix_targets(y, perm, lam))
