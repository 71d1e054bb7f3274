"""``corruption``: the corruptions of CIFAR-10-C (Hendrycks & Dietterich 2019) with CIFAR-10-C's
parameters, the algorithms of ``imagecorruptions`` (:mod:`mixbench.evaluations.corruption_ops`)
[corruptions, severities]. The default is the 15 standard corruptions; ``mean_top1`` is the mean over
the corruptions and severities asked for. The 4 extra ones (speckle_noise, gaussian_blur, spatter,
saturate) are available by name.

In-memory test sets are corrupted whole and cached on disk as uint8 (``cache_dir``); streaming ones
are corrupted a batch at a time (draws keyed by the batch's first index, so they depend on the batch
size) and not cached.
"""
from __future__ import annotations

import hashlib
import inspect
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext, generator, numpy_rng, percent
from mixbench.evaluations.corruption_ops import CORRUPTIONS, STANDARD_CORRUPTIONS, frost_dir
from mixbench.results import atomic_write_bytes

DEFAULT_CORRUPTIONS = list(STANDARD_CORRUPTIONS)


def definition_key(name: str) -> str:
    """A short hash of a corruption's definition (its algorithm's source and its parameters), so that a
    cached corrupted set made by an older definition is never read back."""
    entry = CORRUPTIONS[name]
    text = inspect.getsource(entry.fn) + repr(entry.params) + repr(entry.rng)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, salt: Sequence[Any] = ()) -> torch.Tensor:
    """Corrupt uint8 images (N, C, H, W) on the CPU; returns uint8 (quantised like the CIFAR-C files).
    The draws come from ``seed``, the corruption, the severity and ``salt``."""
    entry = CORRUPTIONS[name]
    c = entry.params[severity - 1]
    if hasattr(c, "resolve"):
        c = c.resolve(max(images.shape[-2:]))
    key = ("corruption", name, severity, *salt)
    rng = generator(seed, *key) if entry.rng == "torch" else numpy_rng(seed, *key) if entry.rng == "numpy" else None
    out = entry.fn(images.cpu().float() / 255, c, rng)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupted_images(images: torch.Tensor, name: str, severities: Sequence[int], seed: int,
                     cache_dir: Optional[Path]) -> torch.Tensor:
    """uint8 (len(severities), N, C, H, W), read from or written to ``cache_dir`` (None: no cache)."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(images.cpu().numpy().tobytes()).hexdigest()[:12]
        path = Path(cache_dir) / f"{name}-s{''.join(map(str, severities))}-seed{seed}-{key}-{definition_key(name)}.pt"
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


def _items(v: Any) -> List[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _check(o: Dict[str, Any]) -> None:
    for c in _items(o["corruptions"]):
        if c not in CORRUPTIONS:
            raise UsageError(f"unknown corruption {c!r}; choose from: {', '.join(CORRUPTIONS)}")
    for sev in _items(o["severities"]):
        if sev not in (1, 2, 3, 4, 5):
            raise UsageError(f"corruption severity must be in 1..5, got {sev!r}")
    if "frost" in _items(o["corruptions"]):
        frost_dir()  # the frost photographs come with the imagecorruptions package


@register_suite(headlines=[Headline("mean_top1", percent=True)], check=_check)
def suite_corruption(ctx: EvalContext, corruptions: Sequence[str] = tuple(DEFAULT_CORRUPTIONS),
                     severities: Sequence[int] = (1, 2, 3, 4, 5)) -> Dict[str, Any]:
    corruptions = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    severities = [severities] if isinstance(severities, int) else list(severities)
    hits = {(name, s): 0 for name in corruptions for s in severities}
    clean = 0

    def count(x: torch.Tensor, y: torch.Tensor) -> int:
        with torch.no_grad():
            return int((ctx.model(x.to(ctx.device).float() / 255).argmax(1) == y).sum().item())

    if ctx.test.in_memory:  # the whole set at once, cached
        x, y = ctx.test.tensors()
        images = (x * 255).round().to(torch.uint8).cpu()
        for name in corruptions:
            stack = corrupted_images(images, name, severities, ctx.seed, ctx.cache_dir)
            for s, corrupted in zip(severities, stack):
                hits[(name, s)] = sum(count(corrupted[i:i + ctx.batch_size], y[i:i + ctx.batch_size])
                                      for i in range(0, len(y), ctx.batch_size))
        clean = sum(count(images[i:i + ctx.batch_size], y[i:i + ctx.batch_size]) for i in range(0, len(y), ctx.batch_size))
    else:
        start = 0
        for x, y in ctx.test_batches():
            images = (x * 255).round().to(torch.uint8).cpu()
            clean += count(images, y)
            for name in corruptions:
                for s in severities:
                    hits[(name, s)] += count(corrupt(images, name, s, ctx.seed, salt=("batch", start)), y)
            start += len(y)
    n = len(ctx.test)
    per: Dict[str, Any] = {}
    for name in corruptions:
        accs = [percent(hits[(name, s)], n) for s in severities]
        per[name] = {"severity": severities, "top1": accs, "mean_top1": float(np.mean(accs))}
    mean = float(np.mean([v["mean_top1"] for v in per.values()]))
    return {"clean_top1": percent(clean, n), "mean_top1": mean, **per}
