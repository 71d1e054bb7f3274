"""CutMix (Yun, Han, Oh, Chun, Choe, Yoo, ICCV 2019, arXiv 1905.04899).

A box of area ``(1 - lam) * H * W`` centred at a uniform random point is pasted
from the partner image; the box is clipped at the border and ``lam`` is then
corrected to the area that really stayed the sample's own.

Two box rules, the ``box`` parameter:

- ``"puzzlemix"`` (default): the CutMix of snu-mllab/PuzzleMix's ``mixup_box``,
  which trained the CutMix baseline of the PuzzleMix, Co-Mixup and Catch-up Mix
  tables: a continuous centre ``(cy, cx) ~ U(0, H) x U(0, W)``, side
  ``sqrt(1 - lam) * H``, edges ``int(clip(c -+ side / 2))``.
- ``"clovaai"``: the CutMix authors' code (clovaai/CutMix-PyTorch): an integer
  centre, side ``int(sqrt(1 - lam) * H)``, edges ``clip(c -+ side // 2)``.

The two differ by at most one pixel per edge. ``prob`` defaults to 1.0 (every
batch), as in the PuzzleMix protocol; the CutMix paper's CIFAR runs use 0.5
with the clovaai box: ``cutmix: {method_params: {prob: 0.5, box: clovaai}}``.
"""
from typing import Tuple

import numpy as np
import torch

from mixbench import UsageError

from ._registry import MixMethod, MixOutput, mix_targets, register_method

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open


BOX_RULES = ("puzzlemix", "clovaai")


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> Box:
    """The clovaai box: side ``int(sqrt(1 - lam) * side)``, integer centre (cy, cx), clipped."""
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(height * cut), int(width * cut)
    y1, y2 = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
    x1, x2 = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
    return y1, y2, x1, x2


def puzzlemix_box(height: int, width: int, lam: float, cy: float, cx: float) -> Box:
    """The PuzzleMix code's box: side ``sqrt(1 - lam) * side``, continuous centre (cy, cx), edges truncated."""
    cut = np.sqrt(1.0 - lam)
    rh, rw = cut * height, cut * width
    y1, y2 = int(np.clip(cy - rh / 2, 0.0, height)), int(np.clip(cy + rh / 2, 0.0, height))
    x1, x2 = int(np.clip(cx - rw / 2, 0.0, width)), int(np.clip(cx + rw / 2, 0.0, width))
    return y1, y2, x1, x2


def cutmix(x: torch.Tensor, perm: torch.Tensor, box: Box) -> Tuple[torch.Tensor, float]:
    """Paste ``x[perm]`` inside ``box``; returns the mixed batch and the realised own-area fraction."""
    y1, y2, x1, x2 = box
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (x.shape[-2] * x.shape[-1])
    return out, lam


@register_method
class CutMix(MixMethod):
    name = "cutmix"

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, box: str = "puzzlemix"):
        super().__init__()
        if box not in BOX_RULES:
            raise UsageError(f"cutmix box must be one of {', '.join(BOX_RULES)}, got {box!r}")
        self.alpha = alpha
        self.prob = prob
        self.box = box

    def draw_box(self, height: int, width: int) -> Tuple[Box, float]:
        """lambda, then the centre (row, column): continuous for the puzzlemix rule, integer for clovaai."""
        lam = self.draw_lambda(self.alpha)
        if self.box == "puzzlemix":
            cy, cx = float(self.rng.uniform(0, height)), float(self.rng.uniform(0, width))
            return puzzlemix_box(height, width, lam, cy, cx), lam
        cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
        return cutmix_box(height, width, lam, cy, cx), lam

    def forward(self, model, x, y):
        if self.prob < 1.0 and self.rng.random() >= self.prob:
            return MixOutput(model(x), y)
        box, _ = self.draw_box(x.shape[-2], x.shape[-1])
        perm = self.draw_perm(x.shape[0], x.device)
        mixed, lam = cutmix(x, perm, box)
        return MixOutput(model(mixed), mix_targets(y, perm, lam))
