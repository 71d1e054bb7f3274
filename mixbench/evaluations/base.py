"""What every suite works with: the model in pixel space, the images a batch at a time, seeded draws.

Every suite works in pixel space: images are floats in [0, 1] and the data set's normalisation runs
inside the model wrapper (``PixelModel``), so attacks and corruptions clamp to valid pixels. Every
random draw comes from the evaluation's ``seed`` (:func:`generator`, :func:`numpy_rng`), so all
methods are measured on identical inputs and directions.

The images of a split are an :class:`ImageSet`: held whole on the device for in-memory data sets, or
decoded a batch at a time from image files (a streaming data set); ``batches()`` serves both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError


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


def percent(hits: int, n: int) -> float:
    """``hits`` of ``n`` in percent, rounded as :func:`top1` rounds (a float32 mean)."""
    return 100.0 * (torch.tensor(float(hits)) / n).item()


def _digest(seed: int, salt: Tuple[Any, ...]) -> int:
    return int.from_bytes(hashlib.sha256(repr((seed,) + salt).encode()).digest()[:8], "little")


def generator(seed: int, *salt: Any) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a label, stable across processes."""
    return torch.Generator().manual_seed(_digest(seed, salt) & (2**63 - 1))


def numpy_rng(seed: int, *salt: Any) -> np.random.RandomState:
    """A numpy RandomState seeded from ``seed`` and a label (the legacy API, whose draws the reference
    corruption code makes through ``np.random``)."""
    return np.random.RandomState(_digest(seed, salt) & (2**32 - 1))


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised."""
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Same-size 2-D filtering of every channel with ``kernel`` (odd sizes), border ``mode`` for F.pad."""
    kh, kw = kernel.shape
    c = x.shape[1]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    return F.conv2d(padded, kernel.to(x).expand(c, 1, kh, kw).contiguous(), groups=c)


class ImageSet:
    """The images of one split: ``batches(batch_size)`` gives ``(x, y)``, ``x`` float in [0, 1] on the
    device, in a fixed order. ``y`` holds every label (on the device).

    In memory (``images`` uint8 (N, C, H, W)) the whole split is also ``tensors()``. Streaming
    (``loader``: an iterable of normalised batches, as ``mixbench.data``'s loaders give them, with the
    data set's ``mean``/``std``) it is decoded anew on every pass; ``tensors()`` is then a UsageError.
    """

    def __init__(self, y: torch.Tensor, device: torch.device, *, images: Optional[torch.Tensor] = None,
                 loader: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
                 mean: Sequence[float] = (), std: Sequence[float] = ()):
        if (images is None) == (loader is None):
            raise ValueError("an ImageSet holds images or a loader")
        self.device = torch.device(device)
        self.y = y.to(self.device)
        self.loader = loader
        self._x = (images.float() / 255).to(self.device) if images is not None else None
        self._mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self._std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.y)

    @property
    def in_memory(self) -> bool:
        return self._x is not None

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole split ``(x, y)`` on the device (in-memory data sets only)."""
        if self._x is None:
            raise UsageError("this evaluation reads the whole split at once (ctx.x), which a streaming (image-file) "
                             "data set does not hold; iterate over ctx.test.batches() instead")
        return self._x, self.y

    def batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._x is not None:
            for i in range(0, len(self._x), batch_size):
                yield self._x[i:i + batch_size], self.y[i:i + batch_size]
            return
        for x, y in self.loader:  # normalised floats of uint8 pixels: back to the exact pixels
            x = ((x.float() * self._std + self._mean).round().clamp(0, 255) / 255).to(self.device)
            yield x, y.to(self.device)


@dataclass
class EvalContext:
    model: PixelModel  # eval mode, on ``device``
    test: ImageSet  # the test split (or a fixed random subset of it)
    train: ImageSet  # training images without augmentation, a subset of the same size
    batch_size: int
    seed: int
    device: torch.device
    run_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None

    # The whole splits as tensors, for in-memory data sets (the interface of earlier plugin suites).
    @property
    def x(self) -> torch.Tensor:
        return self.test.tensors()[0]

    @property
    def y(self) -> torch.Tensor:
        return self.test.y

    @property
    def train_x(self) -> torch.Tensor:
        return self.train.tensors()[0]

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.y

    def test_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self.test.batches(self.batch_size)

    def predict_test(self) -> torch.Tensor:
        """Logits (float32) of the model on the test split, in order."""
        with torch.no_grad():
            return torch.cat([self.model(x).float() for x, _ in self.test_batches()])
