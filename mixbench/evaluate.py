"""Evaluations of trained runs: robustness, feature reliance, filter usage, calibration, flatness.

``evaluate_run(run_dir, suites)`` loads a finished run (``spec.yaml``,
``model.pt``), puts its test split (or a fixed random subset of it) through the
requested suites and merges their numbers into the run's ``result.json`` under
``eval`` (one atomic rewrite; other suites already there are kept). Timing and
the options used go to ``eval_meta``.

Every suite works in pixel space: images are floats in [0, 1] and the data
set's normalisation runs inside the model wrapper (``PixelModel``), so attacks
and corruptions clamp to valid pixels. Every random draw (PGD start, noise,
elastic fields, loss-landscape directions) comes from ``seed``, so all methods
are measured on identical inputs and directions.

Suites (keyword options in brackets, set from the CLI with ``--set SUITE.KEY=VALUE``):

- ``adversarial``: FGSM and L-inf PGD with a random start [eps, pgd_steps, pgd_step_size].
- ``corruption``: CIFAR-10-C corruptions with Hendrycks & Dietterich's CIFAR
  parameters, computed on whole batches in torch, cached on disk as uint8
  [corruptions, severities].
- ``deformation``: rotations, scalings and elastic deformations of fixed
  magnitude [rotation, scale, elastic].
- ``feature_removal``: zero the k strongest channels (per sample) of the
  features fed to the classifier head; top-1 versus k [ks].
- ``filter_usage``: mean per-channel activation norm at every stage of
  ``feature_info`` and at the head's input; Gini coefficient and effective
  number of channels.
- ``calibration``: expected calibration error (equal-width bins) and NLL [bins].
- ``loss_landscape``: loss along filter-normalised random directions (Li et
  al. 2018) and sharpness at a fixed radius; a 2-D contour on request
  [directions, radius, span, points, split, contour, contour_points].
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mixbench import UsageError, plugins
from mixbench.results import atomic_write_bytes, atomic_write_json, is_complete, read_result

# ---------------------------------------------------------------------------
# Model in pixel space


class PixelModel(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]; ``features``/``head`` split it at the head's input."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalise(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.normalise(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features)


@torch.no_grad()
def predict(model: Callable, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (float32) of ``model`` on ``x``, a batch at a time."""
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def _generator(seed: int, *salt: Any) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a label, stable across processes."""
    digest = hashlib.sha256(repr((seed,) + salt).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---------------------------------------------------------------------------
# Adversarial attacks (L-inf, untargeted, cross-entropy)


def _input_grad(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: Callable, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Goodfellow et al. 2015: ``clamp(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``."""
    return (x + eps * _input_grad(model, x, y).sign()).clamp(0, 1).detach()


def pgd(
    model: Callable, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Madry et al. 2018: a uniform random start in the eps-ball, then ``steps`` signed-gradient steps,
    each projected back onto the eps-ball and [0, 1]. ``generator=None``: no random start."""
    if generator is not None:
        start = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device) * eps
        adv = (x + start).clamp(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv = adv + step_size * _input_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1).detach()
    return adv


# ---------------------------------------------------------------------------
# Feature removal and filter usage


def remove_top_channels(features: torch.Tensor, k: int) -> torch.Tensor:
    """Zero, per sample, the ``k`` channels with the highest mean activation (dim 1 is channels)."""
    if k <= 0:
        return features
    strength = features.flatten(2).mean(2) if features.dim() > 2 else features
    idx = strength.topk(min(k, strength.shape[1]), dim=1).indices
    keep = torch.ones_like(strength).scatter_(1, idx, 0.0)
    return features * keep.view(*keep.shape, *([1] * (features.dim() - 2)))


@torch.no_grad()
def feature_removal_curve(model: PixelModel, x: torch.Tensor, y: torch.Tensor, ks: Sequence[int],
                          batch_size: int = 256) -> List[float]:
    """Top-1 (percent) with the k strongest head-input channels removed, for each k in ``ks``."""
    correct = torch.zeros(len(ks))
    for i in range(0, len(x), batch_size):
        feats = model.features(x[i:i + batch_size])
        for j, k in enumerate(ks):
            logits = model.head(remove_top_channels(feats, k))
            correct[j] += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    return (100.0 * correct / len(x)).tolist()


def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n-1)/n when one holds everything."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten().sort().values
    n, total = len(v), v.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (2.0 * (i * v).sum() / (n * total) - (n + 1.0) / n).item()


def effective_channels(values) -> float:
    """exp(entropy) of the values normalised to sum 1: n when all are equal, 1 when one holds everything."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.sum() <= 0:
        return 0.0
    p = v / v.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def stage_modules(model: nn.Module) -> List[str]:
    """Module names of the stages listed in timm's ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UsageError(f"{type(model).__name__} has no feature_info; filter_usage needs its stage names")
    return [entry["module"] for entry in info]


@torch.no_grad()
def stage_channel_norms(net: nn.Module, batches: Iterable[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per stage of ``feature_info`` (and ``features``, the head's input): the mean over samples of each
    channel's L2 norm (over its spatial positions). ``batches``: model inputs (normalised)."""
    sums: Dict[str, torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        out = out.float()
        norms = out.flatten(2).norm(dim=2) if out.dim() > 2 else out.abs()
        sums[name] = sums.get(name, 0) + norms.sum(0).cpu()

    hooks = [net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: record(name, o))
             for name in stage_modules(net)]
    n = 0
    try:
        for x in batches:
            record("features", net.forward_features(x))
            n += len(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: s.double() / max(n, 1) for name, s in sums.items()}


def channel_norms(model: PixelModel, x: torch.Tensor, batch_size: int = 256) -> Dict[str, torch.Tensor]:
    """:func:`stage_channel_norms` of a pixel-space model on images ``x`` in [0, 1]."""
    batches = (model.normalise(x[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return stage_channel_norms(model.model, batches)


def filter_usage_summary(norms: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Gini and effective channels per stage, and their means over the stages (``features`` excluded)."""
    per = {name: {"channels": len(v), "gini": gini(v), "effective_channels": effective_channels(v),
                  "norms": [round(x, 6) for x in v.tolist()]} for name, v in norms.items()}
    stages = [v for name, v in per.items() if name != "features"]
    return {
        "mean_gini": float(np.mean([v["gini"] for v in stages])),
        "mean_effective_fraction": float(np.mean([v["effective_channels"] / v["channels"] for v in stages])),
        **per,
    }


def filter_usage_during_training(model: nn.Module, loader: Iterable, spec: Any, epoch: int) -> Dict[str, Any]:
    """``{"filter_usage": ...}`` for the epoch's metrics.jsonl line at the epochs chosen by the run option
    ``filter_usage_every`` (every N epochs from the first, and the last), else ``{}``. ``model``: the eager
    module; ``loader``: normalised test batches ``(x, y)``."""
    every = getattr(spec, "filter_usage_every", 0)
    if not every or (epoch % every and epoch != spec.epochs - 1):
        return {}
    was_training = model.training
    model.eval()
    norms = stage_channel_norms(model, (x.float() for x, _ in loader))
    model.train(was_training)
    return {"filter_usage": filter_usage_summary(norms)}


# ---------------------------------------------------------------------------
# Calibration


def calibration_metrics(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> Dict[str, float]:
    """ECE (percent; equal-width confidence bins, weighted by bin size) and NLL (nats) of softmax(logits)."""
    logits = logits.double()
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64).to(conf.device)  # the same edges on any device
    which = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.double().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return {
        "ece": 100.0 * ece,
        "nll": F.cross_entropy(logits, y).item(),
        "mean_confidence": 100.0 * conf.mean().item(),
        "top1": 100.0 * correct.mean().item(),
    }


# ---------------------------------------------------------------------------
# Corruptions (CIFAR-10-C parameters of Hendrycks & Dietterich 2019, batched in torch)


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Same-size 2-D filtering of every channel with ``kernel`` (odd sizes), border ``mode`` for F.pad."""
    kh, kw = kernel.shape
    c = x.shape[1]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    return F.conv2d(padded, kernel.to(x).expand(c, 1, kh, kw).contiguous(), groups=c)


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """An anti-aliased disk kernel (a binary disk on a 17x17 grid, normalised, then a 3x3 Gaussian blur)."""
    t = torch.arange(-8, 9, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    g3 = torch.exp(-0.5 * (torch.arange(-1.0, 2.0) / alias_blur) ** 2)
    g3 = g3 / g3.sum()
    blurred = _filter2d(disk[None, None], g3[:, None] * g3[None, :], "reflect")[0, 0]
    support = blurred.abs().sum(0) > 1e-12
    r = max(int(support.nonzero().max()) - 8, 1)
    return blurred[8 - r:9 + r, 8 - r:9 + r]


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` (>= 1) keeping the size (bilinear)."""
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_noise(x, c, g):
    return x + torch.randn(x.shape, generator=g) * c


def shot_noise(x, c, g):
    return torch.poisson(x * c, generator=g) / c


def impulse_noise(x, c, g):
    hit = torch.rand(x.shape, generator=g) < c
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def speckle_noise(x, c, g):
    return x + x * torch.randn(x.shape, generator=g) * c


def gaussian_blur(x, c, g):
    k = _gaussian_kernel1d(c)
    return _filter2d(x, k[:, None] * k[None, :], "replicate")


def defocus_blur(x, c, g):
    return _filter2d(x, _disk(*c), "reflect")


def zoom_blur(x, c, g):
    factors = np.arange(1, c, 0.01)
    return (x + sum(_zoom(x, float(z)) for z in factors)) / (len(factors) + 1)


def contrast(x, c, g):
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def brightness(x, c, g):
    """Add ``c`` to the HSV value: RGB scales with V at fixed hue and saturation; black becomes grey ``c``."""
    v = x.amax(dim=1, keepdim=True)
    scaled = x * ((v + c).clamp(max=1) / v.clamp(min=1e-12))
    return torch.where(v > 0, scaled, torch.full_like(x, min(c, 1.0)))


def pixelate(x, c, g):
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg_compression(x, c, g):
    from PIL import Image

    out = []
    for image in (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="JPEG", quality=c)
        decoded = np.asarray(Image.open(buf)).reshape(image.shape)
        out.append(torch.from_numpy(decoded.copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255


# name -> (function, parameters for severities 1..5); the order of make_cifar_c.py
CORRUPTIONS: Dict[str, Any] = {
    "gaussian_noise": (gaussian_noise, [0.04, 0.06, 0.08, 0.09, 0.10]),
    "shot_noise": (shot_noise, [500, 250, 100, 75, 50]),
    "impulse_noise": (impulse_noise, [0.01, 0.02, 0.03, 0.05, 0.07]),
    "defocus_blur": (defocus_blur, [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)]),
    "zoom_blur": (zoom_blur, [1.06, 1.11, 1.16, 1.21, 1.26]),
    "brightness": (brightness, [0.05, 0.1, 0.15, 0.2, 0.3]),
    "contrast": (contrast, [0.75, 0.5, 0.4, 0.3, 0.15]),
    "pixelate": (pixelate, [0.95, 0.9, 0.85, 0.75, 0.65]),
    "jpeg_compression": (jpeg_compression, [80, 65, 58, 50, 40]),
    # the extra (validation) corruptions of CIFAR-10-C
    "speckle_noise": (speckle_noise, [0.06, 0.1, 0.12, 0.16, 0.2]),
    "gaussian_blur": (gaussian_blur, [0.4, 0.6, 0.7, 0.8, 1.0]),
}
DEFAULT_CORRUPTIONS = list(CORRUPTIONS)[:9]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupt uint8 images (N, C, H, W) on the CPU; returns uint8 (quantised like the CIFAR-C files)."""
    fn, params = CORRUPTIONS[name]
    x = images.cpu().float() / 255
    out = fn(x, params[severity - 1], _generator(seed, "corruption", name, severity))
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupted_images(images: torch.Tensor, name: str, severities: Sequence[int], seed: int,
                     cache_dir: Optional[Path]) -> torch.Tensor:
    """uint8 (len(severities), N, C, H, W), read from or written to ``cache_dir`` (None: no cache)."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(images.cpu().numpy().tobytes()).hexdigest()[:12]
        path = Path(cache_dir) / f"{name}-s{''.join(map(str, severities))}-seed{seed}-{key}.pt"
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # a damaged cache file is recomputed
                pass
    out = torch.stack([corrupt(images, name, s, seed) for s in severities])
    if path is not None:
        buf = io.BytesIO()
        torch.save(out, buf)
        atomic_write_bytes(path, buf.getvalue())
    return out


# ---------------------------------------------------------------------------
# Deformations


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
        field = torch.rand(n, 2, h, w, generator=_generator(seed, "elastic", magnitude)) * 2 - 1
        k = _gaussian_kernel1d(max(h, w) / 8)
        field = _filter2d(field, k[:, None] * k[None, :], "replicate")
        field = field - field.mean(dim=(2, 3), keepdim=True)
        rms = field.pow(2).sum(1).mean(dim=(1, 2)).sqrt().clamp(min=1e-12)
        field = field * (magnitude / rms).view(n, 1, 1, 1)  # displacement as a fraction of the side
        grid = grid + 2 * field.permute(0, 2, 3, 1).to(x)  # normalised coordinates span 2
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------------
# Loss landscape


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
def landscape_loss(model: PixelModel, params: Dict[str, torch.Tensor], steps: Sequence[Dict[str, torch.Tensor]],
                   coefs: Sequence[float], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Mean cross-entropy with the weights ``params + sum_i coefs[i] * steps[i]``."""
    from torch.func import functional_call

    moved = {n: p + sum(c * d[n] for c, d in zip(coefs, steps)) for n, p in params.items()}
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits = functional_call(model.model, moved, (model.normalise(x[i:i + batch_size]),))
        total += F.cross_entropy(logits.float(), y[i:i + batch_size], reduction="sum").item()
    return total / len(x)


# ---------------------------------------------------------------------------
# Suites


@dataclass
class EvalContext:
    model: PixelModel  # eval mode, on ``device``
    x: torch.Tensor  # test images, float [0, 1], on ``device``
    y: torch.Tensor
    train_x: torch.Tensor  # training images (no augmentation), same subset size
    train_y: torch.Tensor
    batch_size: int
    seed: int
    device: torch.device
    run_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None


SUITES: Dict[str, Callable[..., Dict[str, Any]]] = {}


def register_suite(fn: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    """Function decorator: register ``suite_NAME(ctx: EvalContext, **options) -> dict`` as suite NAME.

    Plugins register suites the same way (see :mod:`mixbench.plugins`); the returned mapping is
    merged into result.json's ``eval[NAME]`` and its numbers appear in the report.
    """
    name = fn.__name__.replace("suite_", "")
    plugins.note_registration("suite", name, fn)  # where it comes from; a plugin's clash is a UsageError
    SUITES[name] = fn
    return fn


def suite_options(name: str) -> Dict[str, Any]:
    """A suite's keyword options and their defaults."""
    params = list(inspect.signature(SUITES[name]).parameters.values())[1:]
    return {p.name: p.default for p in params}


@register_suite
def suite_adversarial(ctx: EvalContext, eps: float = 8 / 255, pgd_steps: int = 10,
                      pgd_step_size: float = 2 / 255) -> Dict[str, Any]:
    clean = fgsm_hits = pgd_hits = 0
    g = _generator(ctx.seed, "pgd")
    for i in range(0, len(ctx.x), ctx.batch_size):
        x, y = ctx.x[i:i + ctx.batch_size], ctx.y[i:i + ctx.batch_size]
        x_fgsm = fgsm(ctx.model, x, y, eps)
        x_pgd = pgd(ctx.model, x, y, eps, pgd_step_size, pgd_steps, g)
        with torch.no_grad():
            clean += (ctx.model(x).argmax(1) == y).sum().item()
            fgsm_hits += (ctx.model(x_fgsm).argmax(1) == y).sum().item()
            pgd_hits += (ctx.model(x_pgd).argmax(1) == y).sum().item()
    n = len(ctx.x)
    return {"clean_top1": 100.0 * clean / n, "fgsm_top1": 100.0 * fgsm_hits / n, "pgd_top1": 100.0 * pgd_hits / n,
            "eps": eps, "pgd_steps": pgd_steps, "pgd_step_size": pgd_step_size}


@register_suite
def suite_corruption(ctx: EvalContext, corruptions: Sequence[str] = tuple(DEFAULT_CORRUPTIONS),
                     severities: Sequence[int] = (1, 2, 3, 4, 5)) -> Dict[str, Any]:
    corruptions = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    severities = [severities] if isinstance(severities, int) else list(severities)
    images = (ctx.x * 255).round().to(torch.uint8).cpu()
    per: Dict[str, Any] = {}
    for name in corruptions:
        stack = corrupted_images(images, name, severities, ctx.seed, ctx.cache_dir)
        accs = [top1(predict(ctx.model, s.to(ctx.device).float() / 255, ctx.batch_size), ctx.y) for s in stack]
        per[name] = {"severity": severities, "top1": accs, "mean_top1": float(np.mean(accs))}
    mean = float(np.mean([v["mean_top1"] for v in per.values()]))
    return {"clean_top1": top1(predict(ctx.model, ctx.x, ctx.batch_size), ctx.y), "mean_top1": mean, **per}


@register_suite
def suite_deformation(ctx: EvalContext, rotation: Sequence[float] = (10, 20, 30, 45),
                      scale: Sequence[float] = (0.7, 0.85, 1.15, 1.3),
                      elastic: Sequence[float] = (0.02, 0.04, 0.08)) -> Dict[str, Any]:
    out: Dict[str, Any] = {"clean_top1": top1(predict(ctx.model, ctx.x, ctx.batch_size), ctx.y)}
    all_accs = []
    for kind, magnitudes in (("rotation", rotation), ("scale", scale), ("elastic", elastic)):
        magnitudes = [magnitudes] if isinstance(magnitudes, (int, float)) else list(magnitudes)
        accs = []
        for m in magnitudes:
            moved = torch.cat([deform(ctx.x[i:i + ctx.batch_size].cpu(), kind, m, ctx.seed + i)
                               for i in range(0, len(ctx.x), ctx.batch_size)])
            accs.append(top1(predict(ctx.model, moved.to(ctx.device), ctx.batch_size), ctx.y))
        out[kind] = {"magnitude": magnitudes, "top1": accs}
        all_accs += accs
    out["mean_top1"] = float(np.mean(all_accs)) if all_accs else float("nan")
    return out


def default_ks(channels: int) -> List[int]:
    """0, 1, 2, 4, ... up to half the channels."""
    ks, k = [0], 1
    while k <= channels // 2:
        ks.append(k)
        k *= 2
    return ks


@register_suite
def suite_feature_removal(ctx: EvalContext, ks: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    with torch.no_grad():
        channels = ctx.model.features(ctx.x[:1]).shape[1]
    ks = default_ks(channels) if ks is None else sorted({int(k) for k in ([ks] if isinstance(ks, int) else ks)})
    if any(k < 0 or k > channels for k in ks):
        raise UsageError(f"feature_removal ks must be in 0..{channels} (the head's input channels), got {ks}")
    accs = feature_removal_curve(ctx.model, ctx.x, ctx.y, ks, ctx.batch_size)
    frac = np.asarray(ks, dtype=float) / channels
    span = frac[-1] - frac[0]
    area = sum((frac[i + 1] - frac[i]) * (accs[i] + accs[i + 1]) / 2 for i in range(len(ks) - 1))
    auc = float(area / span) if span > 0 else float(accs[0])
    return {"channels": channels, "k": ks, "top1": accs, "auc": auc}


@register_suite
def suite_filter_usage(ctx: EvalContext) -> Dict[str, Any]:
    return filter_usage_summary(channel_norms(ctx.model, ctx.x, ctx.batch_size))


@register_suite
def suite_calibration(ctx: EvalContext, bins: int = 15) -> Dict[str, Any]:
    return {**calibration_metrics(predict(ctx.model, ctx.x, ctx.batch_size), ctx.y, bins), "bins": bins}


@register_suite
def suite_loss_landscape(ctx: EvalContext, directions: int = 2, radius: float = 0.5, span: float = 1.0,
                         points: int = 11, split: str = "train", contour: bool = False,
                         contour_points: int = 11) -> Dict[str, Any]:
    x, y = (ctx.train_x, ctx.train_y) if split == "train" else (ctx.x, ctx.y)
    params = {n: p.detach() for n, p in ctx.model.model.named_parameters()}
    g = _generator(ctx.seed, "loss_landscape")
    dirs = [filter_normalised_direction(params, g) for _ in range(directions)]
    loss = lambda steps, coefs: landscape_loss(ctx.model, params, steps, coefs, x, y, ctx.batch_size)  # noqa: E731
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


# ---------------------------------------------------------------------------
# Running suites on run directories


def parse_suites(text: str) -> List[str]:
    """``all`` or a comma-separated list of suite names."""
    plugins.load_entry_points()
    names = list(SUITES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--suite is empty; give 'all' or a comma-separated list")
    for name in names:
        if name not in SUITES:
            raise UsageError(f"unknown evaluation suite {name!r}; choose from: all, {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def parse_options(items: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """``["adversarial.eps=0.03", "corruption.corruptions=[contrast]"]`` -> per-suite keyword options."""
    options: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        suite, dot, name = key.partition(".")
        if not sep or not dot:
            raise UsageError(f"--set {item!r}: expected SUITE.KEY=VALUE")
        if suite not in SUITES:
            raise UsageError(f"--set {item!r}: unknown suite {suite!r}; choose from: {', '.join(SUITES)}")
        valid = suite_options(suite)
        if name not in valid:
            raise UsageError(
                f"--set {item!r}: unknown option {name!r} for {suite}; valid: {', '.join(valid) or '(none)'}"
            )
        options.setdefault(suite, {})[name] = _check_option(item, yaml.safe_load(value), valid[name])
    return options


def _check_option(item: str, value: Any, default: Any) -> Any:
    """``value`` if it has the kind of ``default`` (numbers for numbers, lists of them for lists), else a usage error."""
    def number(v: Any, kind: type) -> bool:
        return isinstance(v, (int, float) if kind is float else kind) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = number(value, type(default))
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # a list (of numbers or of names), or None meaning a list of integers
        kind = type(default[0]) if default else int
        items = value if isinstance(value, list) else [value]
        ok = bool(items) and all(number(v, kind) if kind in (int, float) else isinstance(v, kind) for v in items)
    if not ok:
        raise UsageError(f"--set {item!r}: expected a value like {default!r}")
    return value


def check_options(suite: str, options: Dict[str, Any]) -> None:
    """Values a suite cannot use, reported before any run is loaded."""
    o = {**suite_options(suite), **options}

    def items(v: Any) -> List[Any]:
        return list(v) if isinstance(v, (list, tuple)) else [v]

    if suite == "corruption":
        for c in items(o["corruptions"]):
            if c not in CORRUPTIONS:
                raise UsageError(f"unknown corruption {c!r}; choose from: {', '.join(CORRUPTIONS)}")
        for sev in items(o["severities"]):
            if sev not in (1, 2, 3, 4, 5):
                raise UsageError(f"corruption severity must be in 1..5, got {sev!r}")
    elif suite == "deformation":
        if any(not m > 0 for m in items(o["scale"])):
            raise UsageError(f"deformation scale must be positive, got {o['scale']!r}")
    elif suite == "feature_removal":
        if o["ks"] is not None and any(k < 0 for k in items(o["ks"])):
            raise UsageError(f"feature_removal ks must be >= 0, got {o['ks']!r}")
    elif suite == "calibration":
        if o["bins"] <= 0:
            raise UsageError(f"calibration bins must be a positive integer, got {o['bins']!r}")
    elif suite == "adversarial":
        if o["eps"] < 0 or o["pgd_steps"] < 0 or o["pgd_step_size"] < 0:
            raise UsageError("adversarial eps, pgd_steps and pgd_step_size must be >= 0")
    elif suite == "loss_landscape":
        if o["split"] not in ("train", "test"):
            raise UsageError(f"loss_landscape split must be train or test, got {o['split']!r}")
        if o["directions"] < 1 or o["points"] < 2 or o["contour_points"] < 2:
            raise UsageError("loss_landscape needs directions >= 1, points >= 2 and contour_points >= 2")


def finished_run_dirs(paths: Iterable[Path]) -> List[Path]:
    """Run directories (a result.json beside a model.pt) at or below each path."""
    found: List[Path] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{str(path)!r} does not exist; give a run directory or a results folder")
        if (path / "result.json").exists():
            found.append(path)  # named explicitly: an unfinished run is an error (in load_run)
            continue
        for result in sorted(path.rglob("result.json")):
            if is_complete(result.parent) and (result.parent / "model.pt").exists():
                found.append(result.parent)
            else:
                print(f"mixbench: skipping {result.parent}: not a finished run", file=sys.stderr)
    if not found:
        raise UsageError(f"no finished runs (result.json with model.pt) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def _subset(n: int, limit: Optional[int], seed: int, salt: str) -> torch.Tensor:
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=_generator(seed, "subset", salt))[:limit].sort().values


def load_run(run_dir: Path, device: torch.device):
    """(resolved RunSpec, PixelModel in eval mode on ``device``, Dataset) of a finished run."""
    from mixbench.models import create_model
    from mixbench.spec import RunSpec
    from mixbench.data import get_data

    run_dir = Path(run_dir)
    result = read_result(run_dir)
    if not result or result.get("status") != "complete" or not (run_dir / "model.pt").exists():
        raise UsageError(f"{run_dir} is not a finished run (needs result.json with status complete and model.pt)")
    spec = RunSpec.from_dict(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    data = get_data(spec)
    info = data.info
    model = create_model(spec.model, num_classes=info.num_classes, in_chans=info.in_chans,
                         image_size=info.image_size, stem=spec.stem, **spec.model_kwargs)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    wrapped = PixelModel(model, info.mean, info.std).to(device).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return spec, wrapped, data


def evaluate_run(
    run_dir: Path,
    suites: Sequence[str],
    *,
    max_samples: Optional[int] = None,
    batch_size: int = 256,
    device: str = "auto",
    seed: int = 0,
    options: Optional[Dict[str, Dict[str, Any]]] = None,
    cache_dir: Optional[Path] = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Dict[str, Any]:
    """Run ``suites`` on a finished run and merge them into its result.json (atomically); return it."""
    from mixbench.data import default_data_dir
    from mixbench.devices import resolve_device

    run_dir = Path(run_dir)
    options = options or {}
    for name in suites:
        if name not in SUITES:
            raise UsageError(f"unknown evaluation suite {name!r}; choose from: {', '.join(SUITES)}")
        check_options(name, options.get(name, {}))
    dev = resolve_device(device)
    spec, model, data = load_run(run_dir, dev)
    test_idx = _subset(len(data.test_y), max_samples, seed, "test")
    train_idx = _subset(len(data.train_y), max_samples, seed, "train")
    if cache_dir is None:
        cache_dir = Path(spec.data_dir or default_data_dir()) / "corrupted" / spec.dataset
    ctx = EvalContext(
        model=model, x=(data.test_x[test_idx].float() / 255).to(dev), y=data.test_y[test_idx].to(dev),
        train_x=(data.train_x[train_idx].float() / 255).to(dev), train_y=data.train_y[train_idx].to(dev),
        batch_size=batch_size, seed=seed, device=dev, run_dir=run_dir, cache_dir=cache_dir,
    )
    new, meta = {}, {}
    for name in suites:
        t0 = time.perf_counter()
        new[name] = SUITES[name](ctx, **options.get(name, {}))
        elapsed = time.perf_counter() - t0
        meta[name] = {"time_s": round(elapsed, 3), "samples": len(ctx.y), "train_samples": len(ctx.train_y),
                      "seed": seed, "options": options.get(name, {}),
                      "device": str(dev), "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log(f"{run_dir}: {name} {_headline(name, new[name])} ({elapsed:.1f} s)")
    result = read_result(run_dir)  # re-read just before the write: keep whatever else is there
    result["eval"] = {**result.get("eval", {}), **new}
    result["eval_meta"] = {**result.get("eval_meta", {}), **meta}
    atomic_write_json(run_dir / "result.json", result)
    return result


def _headline(name: str, out: Dict[str, Any]) -> str:
    keys = {"adversarial": ("clean_top1", "fgsm_top1", "pgd_top1"), "corruption": ("mean_top1",),
            "deformation": ("mean_top1",), "feature_removal": ("auc",), "calibration": ("ece", "nll"),
            "loss_landscape": ("loss0", "sharpness")}.get(name)
    if keys is None and name == "filter_usage":
        return " ".join(f"{k}: gini {v['gini']:.3f} eff {v['effective_channels']:.1f}/{v['channels']}"
                        for k, v in out.items() if isinstance(v, dict))
    return " ".join(f"{k}={out[k]:.4g}" for k in keys or ())


def ensure_evaluated(run_dir: Path, suites: Sequence[str], **kwargs: Any) -> Dict[str, Any]:
    """Run only the suites of ``suites`` that the run's result.json does not hold yet."""
    result = read_result(run_dir) or {}
    missing = [s for s in suites if s not in result.get("eval", {})]
    return evaluate_run(run_dir, missing, **kwargs) if missing else result


def run_cli(args: argparse.Namespace) -> int:
    """``mixbench evaluate``."""
    suites = parse_suites(args.suite)
    options = parse_options(args.set or [])
    for suite in options:
        if suite not in suites:
            raise UsageError(f"--set gives options for {suite!r}, which is not among --suite {args.suite!r}")
        check_options(suite, options[suite])
    run_dirs = finished_run_dirs(args.paths)
    for run_dir in run_dirs:
        evaluate_run(run_dir, suites, max_samples=args.max_samples, batch_size=args.batch_size,
                     device=args.device, seed=args.seed, options=options, cache_dir=args.cache_dir)
    print(f"evaluated {len(run_dirs)} run(s): {', '.join(suites)}")
    return 0
