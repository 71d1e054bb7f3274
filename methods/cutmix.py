"""CutMix (Yun, Han, Oh, Chun, Choe, Yoo, ICCV 2019, arXiv 1905.04899).

A box of area ``(1 - lam) * H * W`` centred at a uniform random pixel is pasted
from the partner image; the box is clipped at the border and ``lam`` is then
corrected to the area that really stayed the sample's own (as in the authors'
code, clovaai/CutMix-PyTorch).

Deviation: the authors' CIFAR runs apply CutMix with probability 0.5; ``prob``
defaults to 1.0 here, the protocol of the PuzzleMix and Catch-up Mix papers whose
tables this suite reproduces. Pass ``prob=0.5`` for the CutMix paper's setting.
"""
from typing import Tuple

import torch

from ._registry import MixMethod, MixOutput, mix_targets, register_method

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> Box:
    """The box pasted from the partner: side ``sqrt(1 - lam)`` of the image, centre (cy, cx), clipped."""
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(height * cut), int(width * cut)
    y1, y2 = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
    x1, x2 = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
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

    def __init__(self, alpha: float = 1.0, prob: float = 1.0):
        super().__init__()
        self.alpha = alpha
        self.prob = prob

    def draw_box(self, height: int, width: int) -> Tuple[Box, float]:
        lam = self.draw_lambda(self.alpha)
        cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
        return cutmix_box(height, width, lam, cy, cx), lam

    def forward(self, model, x, y):
        if self.prob < 1.0 and self.rng.random() >= self.prob:
            return MixOutput(model(x), y)
        box, _ = self.draw_box(x.shape[-2], x.shape[-1])
        perm = self.draw_perm(x.shape[0], x.device)
        mixed, lam = cutmix(x, perm, box)
        return MixOutput(model(mixed), mix_targets(y, perm, lam))
