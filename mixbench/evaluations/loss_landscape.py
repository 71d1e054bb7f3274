"""``loss_landscape``: loss along filter-normalised random directions (Li et al. 2018) and sharpness at a
fixed radius; a 2-D contour on request [directions, radius, span, points, split, contour, contour_points]."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext, PixelModel, generator
from mixbench.results import atomic_write_bytes


def filter_normalised_direction(params: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """A Gaussian direction with each filter (slice along dim 0) rescaled to the norm of the same filter
    in the weights; biases and normalisation parameters (dim <= 1) get zero (Li et al. 2018)."""
    direction = {}
    for name, p in params.items():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator).to(p)
        scale = p.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp(min=1e-10)
        direction[name] = d * scale.view(-1, *([1] * (p.dim() - 1)))
    return direction


@torch.no_grad()
def batches_loss(model: PixelModel, params: Dict[str, torch.Tensor], steps: Sequence[Dict[str, torch.Tensor]],
                 coefs: Sequence[float], batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy over ``(x, y)`` batches with the weights ``params + sum_i coefs[i] * steps[i]``."""
    from torch.func import functional_call

    moved = {n: p + sum(c * d[n] for c, d in zip(coefs, steps)) for n, p in params.items()}
    total, n = 0.0, 0
    for x, y in batches:
        logits = functional_call(model.model, moved, (model.normalise(x),))
        total += F.cross_entropy(logits.float(), y, reduction="sum").item()
        n += len(x)
    return total / n


def landscape_loss(model: PixelModel, params: Dict[str, torch.Tensor], steps: Sequence[Dict[str, torch.Tensor]],
                   coefs: Sequence[float], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Mean cross-entropy on ``x``, ``y`` with the weights ``params + sum_i coefs[i] * steps[i]``."""
    batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return batches_loss(model, params, steps, coefs, batches)


def _check(o: Dict[str, Any]) -> None:
    if o["split"] not in ("train", "test"):
        raise UsageError(f"loss_landscape split must be train or test, got {o['split']!r}")
    if o["directions"] < 1 or o["points"] < 2 or o["contour_points"] < 2:
        raise UsageError("loss_landscape needs directions >= 1, points >= 2 and contour_points >= 2")


@register_suite(headlines=[Headline("sharpness", lower_is_better=True)], check=_check)
def suite_loss_landscape(ctx: EvalContext, directions: int = 2, radius: float = 0.5, span: float = 1.0,
                         points: int = 11, split: str = "train", contour: bool = False,
                         contour_points: int = 11) -> Dict[str, Any]:
    images = ctx.train if split == "train" else ctx.test
    params = {n: p.detach() for n, p in ctx.model.model.named_parameters()}
    g = generator(ctx.seed, "loss_landscape")
    dirs = [filter_normalised_direction(params, g) for _ in range(directions)]
    loss = lambda steps, coefs: batches_loss(ctx.model, params, steps, coefs,  # noqa: E731
                                             images.batches(ctx.batch_size))
    base = loss([], [])
    alphas = np.linspace(-span, span, points).tolist()
    curves = [[loss([d], [a]) for a in alphas] for d in dirs]
    rises = [(loss([d], [radius]) + loss([d], [-radius])) / 2 - base for d in dirs]
    out = {"split": split, "radius": radius, "directions": directions, "loss0": base,
           "sharpness": float(np.mean(rises)), "alpha": alphas,
           "loss": np.mean(curves, axis=0).tolist(), "loss_per_direction": curves}
    if contour:
        if directions < 2:
            dirs.append(filter_normalised_direction(params, g))
        grid_a = np.linspace(-span, span, contour_points).tolist()
        grid = [[loss(dirs[:2], [a, b]) for a in grid_a] for b in grid_a]
        out["contour"] = {"alpha": grid_a, "loss": grid}
        if ctx.run_dir is not None:
            _plot_contour(grid_a, grid, ctx.run_dir / "loss_landscape_2d.png", split)
    return out


def _plot_contour(alphas: List[float], grid: List[List[float]], path: Path, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    cs = ax.contour(alphas, alphas, np.log(np.asarray(grid)), levels=20)
    ax.clabel(cs, fontsize=6)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(f"log {split} loss, filter-normalised directions")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

