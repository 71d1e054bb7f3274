"""CIFAR-10 and CIFAR-100 through torchvision's on-disk format (and its download)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mixbench import UsageError
from mixbench.data.registry import PAPER_DEFAULTS, Arrays, DatasetInfo, register_dataset

# The statistics of the mixup papers' code (snu-mllab/PuzzleMix load_data.py and main.py, from
# GibbsNet_pytorch), in pixel units / 255.
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))


def torchvision_cifar(cls_name: str, folder: str) -> Callable[..., Arrays]:
    """A ``DatasetInfo.load`` for torchvision's ``cls_name``, whose files live in ``root/folder``."""
    def load(root: Path, download: bool) -> Arrays:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        if not download and not (root / folder).is_dir():
            raise UsageError(
                f"{cls_name} not found: expected {root / folder}/ (pass --download to fetch it, "
                "or --data-dir pointing at the folder that holds it)"
            )
        try:
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise UsageError(f"{cls_name} under {root}: {exc}") from None

        def arrays(ds):
            x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            return x, torch.as_tensor(ds.targets, dtype=torch.int64)

        return (*arrays(train), *arrays(test))

    return load


register_dataset(DatasetInfo(
    "cifar10", 10, 32, 3, CIFAR10_MEAN, CIFAR10_STD, crop_padding=2, flip=True,
    load=torchvision_cifar("CIFAR10", "cifar-10-batches-py"),
    defaults=dict(PAPER_DEFAULTS, epochs=200, lr=0.1),
    description="CIFAR-10, 50,000 / 10,000, 32x32 (torchvision; --download)",
))
register_dataset(DatasetInfo(
    "cifar100", 100, 32, 3, CIFAR100_MEAN, CIFAR100_STD, crop_padding=2, flip=True,
    load=torchvision_cifar("CIFAR100", "cifar-100-python"),
    defaults=dict(PAPER_DEFAULTS, epochs=200, lr=0.1),
    description="CIFAR-100, 50,000 / 10,000, 32x32 (torchvision; --download)",
))
