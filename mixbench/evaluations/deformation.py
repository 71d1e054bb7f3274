"""``deformation``: rotations, scalings and elastic deformations of fixed magnitude [rotation, scale, elastic]."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext, filter2d, gaussian_kernel1d, generator, percent


def deform(x: torch.Tensor, kind: str, magnitude: float, seed: int = 0) -> torch.Tensor:
    """Rotate by +-``magnitude`` degrees (alternating per sample), scale by ``magnitude`` about the centre,
    or displace elastically with an RMS of ``magnitude`` times the image side (a random field smoothed
    with sigma = image side / 8). Bilinear, zero fill outside the image."""
    n, _, h, w = x.shape
    if kind == "rotation":
        angle = torch.full((n,), math.radians(magnitude))
        angle[1::2] *= -1
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1),
                             torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    elif kind in ("scale", "elastic"):
        s = 1.0 / magnitude if kind == "scale" else 1.0
        theta = torch.tensor([[s, 0.0, 0.0], [0.0, s, 0.0]]).expand(n, 2, 3)
    else:
        raise UsageError(f"unknown deformation {kind!r}; choose from: rotation, scale, elastic")
    grid = F.affine_grid(theta.to(x), [n, 1, h, w], align_corners=False)
    if kind == "elastic":
        field = torch.rand(n, 2, h, w, generator=generator(seed, "elastic", magnitude)) * 2 - 1
        k = gaussian_kernel1d(max(h, w) / 8)
        field = filter2d(field, k[:, None] * k[None, :], "replicate")
        field = field - field.mean(dim=(2, 3), keepdim=True)
        rms = field.pow(2).sum(1).mean(dim=(1, 2)).sqrt().clamp(min=1e-12)
        field = field * (magnitude / rms).view(n, 1, 1, 1)  # displacement as a fraction of the side
        grid = grid + 2 * field.permute(0, 2, 3, 1).to(x)  # normalised coordinates span 2
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _items(v: Any) -> List[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _check(o: Dict[str, Any]) -> None:
    if any(not m > 0 for m in _items(o["scale"])):
        raise UsageError(f"deformation scale must be positive, got {o['scale']!r}")


@register_suite(headlines=[Headline("mean_top1", percent=True)], check=_check)
def suite_deformation(ctx: EvalContext, rotation: Sequence[float] = (10, 20, 30, 45),
                      scale: Sequence[float] = (0.7, 0.85, 1.15, 1.3),
                      elastic: Sequence[float] = (0.02, 0.04, 0.08)) -> Dict[str, Any]:
    kinds = [(kind, [m] if isinstance(m, (int, float)) else list(m))
             for kind, m in (("rotation", rotation), ("scale", scale), ("elastic", elastic))]
    clean = 0
    hits = {(kind, j): 0 for kind, ms in kinds for j in range(len(ms))}
    start = 0
    with torch.no_grad():
        for x, y in ctx.test_batches():  # one pass over the images; the draws are keyed by the batch's start
            clean += (ctx.model(x).argmax(1) == y).sum().item()
            for kind, ms in kinds:
                for j, m in enumerate(ms):
                    moved = deform(x.cpu(), kind, m, ctx.seed + start).to(ctx.device)
                    hits[(kind, j)] += (ctx.model(moved).argmax(1) == y).sum().item()
            start += len(x)
    n = len(ctx.test)
    out: Dict[str, Any] = {"clean_top1": percent(clean, n)}
    all_accs = []
    for kind, ms in kinds:
        accs = [percent(hits[(kind, j)], n) for j in range(len(ms))]
        out[kind] = {"magnitude": ms, "top1": accs}
        all_accs += accs
    out["mean_top1"] = float(np.mean(all_accs)) if all_accs else float("nan")
    return out
