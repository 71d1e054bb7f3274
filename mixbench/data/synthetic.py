"""Ten classes of fixed random colour templates plus noise: learnable in seconds, for tests."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from mixbench.data.registry import Arrays, DatasetInfo, register_dataset


def load_synthetic(root: Path, download: bool, n_train: int = 2048, n_test: int = 512) -> Arrays:
    """Ten classes of fixed random 16x16 colour templates plus noise: learnable in seconds, for tests."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(10, 3, 16, 16, generator=g) * 255

    def sample(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        noise = torch.randn(n, 3, 16, 16, generator=g) * 25
        return (templates[y] + noise).clamp(0, 255).to(torch.uint8), y

    return (*sample(n_train), *sample(n_test))


register_dataset(DatasetInfo(
    "synthetic", 10, 16, 3, (0.5,) * 3, (0.25,) * 3, crop_padding=2, flip=True, load=load_synthetic,
    defaults=dict(model="preactresnet18_w16", epochs=2, batch_size=64, lr=0.05, weight_decay=5e-4),
    description="random class templates plus noise, 16x16, for tests",
))
