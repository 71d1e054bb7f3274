"""SaliencyMix (Uddin, Monira, Shin, Chung, Bae, ICLR 2021, arXiv 2006.01791).

CutMix whose box is centred on the most salient pixel of the image it is cut
from. Reference: the authors' code, afm-shahab-uddin/SaliencyMix,
``SaliencyMix_CIFAR/saliencymix.py`` (``saliency_bbox`` and the training loop).

Per batch, in this order from ``self.rng``:

- when ``prob < 1``, a coin ``r ~ U[0, 1)``; the batch is mixed only when
  ``r < prob`` (otherwise it trains on the clean batch, targets unchanged);
- ``lam ~ Beta(alpha, alpha)``;
- one permutation ``perm``: sample i's partner is ``perm[i]``.

Then, as in the reference, ONE box for the whole batch:

- the saliency map of the partner of sample 0, ``x[perm[0]]`` (the normalised
  image as the network sees it, float32, (H, W, C)), from OpenCV's
  fine-grained static saliency (``cv2.saliency.StaticSaliencyFineGrained``,
  package opencv-contrib-python-headless), scaled by 255 and cast to uint8;
- its peak: the first maximum in row-major order (``np.argmax``);
- a box of side ``int(sqrt(1 - lam) * H)`` by ``int(sqrt(1 - lam) * W)``
  centred on the peak, edges ``clip(peak -+ side // 2)``;
- every sample takes its partner's pixels inside the box; the targets are
  ``lam' * y + (1 - lam') * y[perm]`` with ``lam'`` the area outside the box.

Defaults: the authors' CIFAR commands (``--beta 1.0 --salmix_prob 0.5``):
``alpha=1.0``, ``prob=0.5``. Note the difference from mixbench's ``cutmix``,
whose ``prob`` defaults to 1.0 (the PuzzleMix protocol): SaliencyMix keeps its
own paper's 0.5; pass ``prob=1.0`` to mix every batch.

Cost: one saliency map per batch (one image, on the CPU: under a millisecond at
32x32), so the batch is copied off an accelerator once per step (a sync).

Deviations from the reference: none in the mixing. The box edges along the
rows use the image height and along the columns its width (the reference names
them the other way round; the same on square images). A grey-scale (1-channel)
image is given to OpenCV as (H, W, 1), which OpenCV accepts. The reference
pins opencv-contrib-python 4.2.0.32; mixbench uses the current release, and
equality with the reference is checked with the same OpenCV on both sides.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch

from ._registry import MixMethod, MixOutput, mix_targets, register_method
from .cutmix import Box, cutmix

INSTALL_HINT = "pip install opencv-contrib-python-headless"


def _saliency_module():
    try:
        import cv2
    except ImportError:
        return None
    return getattr(cv2, "saliency", None)


def saliency_detector():
    """A new OpenCV fine-grained static saliency detector (opencv-contrib)."""
    module = _saliency_module()
    if module is None:
        raise RuntimeError(f"saliencymix needs OpenCV's contrib saliency module: {INSTALL_HINT}")
    return module.StaticSaliencyFineGrained_create()


def saliency_peak(image: np.ndarray, detector=None) -> Tuple[int, int]:
    """(row, column) of the first maximum of the uint8 saliency map of ``image`` (H, W, C) float32."""
    detector = saliency_detector() if detector is None else detector
    ok, saliency = detector.computeSaliency(image)
    if not ok:
        raise RuntimeError("OpenCV's fine-grained saliency failed on an image of shape %s" % (image.shape,))
    saliency = (saliency * 255).astype("uint8")
    row, col = np.unravel_index(np.argmax(saliency, axis=None), saliency.shape)
    return int(row), int(col)


def saliency_box(height: int, width: int, lam: float, peak: Tuple[int, int]) -> Box:
    """The box of side ``int(sqrt(1 - lam) * side)`` centred on ``peak``, clipped; (y1, y2, x1, x2) half-open."""
    cut = np.sqrt(1.0 - lam)  # np.sqrt as in the reference (``** 0.5`` can differ by one ulp)
    ch, cw = int(height * cut), int(width * cut)
    row, col = peak
    y1, y2 = int(np.clip(row - ch // 2, 0, height)), int(np.clip(row + ch // 2, 0, height))
    x1, x2 = int(np.clip(col - cw // 2, 0, width)), int(np.clip(col + cw // 2, 0, width))
    return y1, y2, x1, x2


def image_for_saliency(x: torch.Tensor, index: int) -> np.ndarray:
    """``x[index]`` as the reference hands it to OpenCV: float32 on the CPU, (H, W, C)."""
    return x[index].detach().float().cpu().numpy().transpose(1, 2, 0)


def saliencymix(x: torch.Tensor, perm: torch.Tensor, lam: float, peak: Tuple[int, int]) -> Tuple[torch.Tensor, float]:
    """Paste ``x[perm]`` inside the box of ``lam`` centred on ``peak``; returns the mixed batch and own-area fraction."""
    return cutmix(x, perm, saliency_box(x.shape[-2], x.shape[-1], lam, peak))


@register_method
class SaliencyMix(MixMethod):
    name = "saliencymix"

    def __init__(self, alpha: float = 1.0, prob: float = 0.5):
        super().__init__()
        self.alpha = alpha
        self.prob = prob
        self._detector = None

    @classmethod
    def available(cls, **params: Any) -> bool:
        return _saliency_module() is not None

    @classmethod
    def unavailable_reason(cls, **params: Any) -> str:
        return f"saliencymix needs OpenCV's contrib saliency module (cv2.saliency): {INSTALL_HINT}"

    def _peak(self, image: np.ndarray) -> Tuple[int, int]:
        if self._detector is None:
            self._detector = saliency_detector()  # stateless between calls: one per run
        return saliency_peak(image, self._detector)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_detector"] = None  # OpenCV objects do not pickle
        return state

    def draw(self, n: int) -> Optional[Tuple[float, np.ndarray]]:
        """The batch's draws: None when the coin says no mixing, else (lam, perm)."""
        if self.prob < 1.0 and self.rng.random() >= self.prob:
            return None
        lam = self.draw_lambda(self.alpha)
        return lam, self.rng.permutation(n)

    def forward(self, model, x, y):
        draws = self.draw(x.shape[0])
        if draws is None:
            return MixOutput(model(x), y)
        lam, perm_np = draws
        peak = self._peak(image_for_saliency(x, int(perm_np[0])))  # index known on the host: no device sync for it
        perm = torch.from_numpy(perm_np).to(x.device, non_blocking=True)
        mixed, lam = saliencymix(x, perm, lam, peak)
        return MixOutput(model(mixed), mix_targets(y, perm, lam))
