"""Data sets and the on-device batch pipeline.

A data set is registered by name with what the harness needs to know about it
(classes, image size, channels, mean/std, default augmentation, default run
options) and a loader that returns uint8 image tensors (N, C, H, W) and int64
labels. Small data sets then live whole on the training device and are
augmented a batch at a time there (random crop with zero padding, horizontal
flip, normalisation): no per-sample Python in the hot loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError

Arrays = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train_x, train_y, test_x, test_y


def default_data_dir() -> Path:
    return Path(os.environ.get("MIXBENCH_DATA") or Path.home() / ".cache" / "mixbench")


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_padding: int  # random-crop zero padding in pixels (0: no crop)
    flip: bool  # random horizontal flip
    load: Callable[..., Arrays]
    defaults: Dict[str, Any] = field(default_factory=dict)  # default run options (model, epochs, ...)
    description: str = ""


_DATASETS: Dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    _DATASETS[info.name] = info
    return info


def list_datasets() -> List[str]:
    return list(_DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    try:
        return _DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; choose from: {', '.join(_DATASETS)}") from None


@dataclass
class Dataset:
    info: DatasetInfo
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_dataset(name: str, data_dir: Optional[os.PathLike] = None, download: bool = False) -> Dataset:
    info = get_dataset_info(name)
    root = Path(data_dir) if data_dir else default_data_dir()
    train_x, train_y, test_x, test_y = info.load(root=root, download=download)
    for t in (train_x, test_x):
        assert t.dtype == torch.uint8 and t.dim() == 4, "loaders return uint8 (N, C, H, W)"
    return Dataset(info, train_x, train_y.long(), test_x, test_y.long())


# ---------------------------------------------------------------------------
# Loaders


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


DIGITS_SIZE = 16


def _load_digits(root: Path, download: bool) -> Arrays:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).

    Fixed stratified split (25% test, random_state 0), upsampled to 16x16 and
    replicated to 3 channels so that the ImageNet-style models take it unchanged.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).round().to(torch.uint8)
    images = _resize_uint8(images[:, None], DIGITS_SIZE).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.25, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def _torchvision_cifar(cls_name: str, folder: str) -> Callable[..., Arrays]:
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


def _load_synthetic(root: Path, download: bool, n_train: int = 512, n_test: int = 256) -> Arrays:
    """Ten classes of fixed random 16x16 colour templates plus noise: learnable in seconds, for tests."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(10, 3, 16, 16, generator=g) * 255

    def sample(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        noise = torch.randn(n, 3, 16, 16, generator=g) * 40
        return (templates[y] + noise).clamp(0, 255).to(torch.uint8), y

    return (*sample(n_train), *sample(n_test))


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

register_dataset(DatasetInfo(
    "digits", 10, DIGITS_SIZE, 3, (0.5,) * 3, (0.5,) * 3, crop_padding=2, flip=False, load=_load_digits,
    defaults=dict(model="preactresnet18_w16", epochs=15, batch_size=64, lr=0.1, weight_decay=5e-4),
    description="scikit-learn digits, 1,347 train / 450 test, 16x16 (embedded, no download)",
))
register_dataset(DatasetInfo(
    "cifar10", 10, 32, 3, CIFAR10_MEAN, CIFAR10_STD, crop_padding=4, flip=True,
    load=_torchvision_cifar("CIFAR10", "cifar-10-batches-py"),
    defaults=dict(model="preactresnet18", epochs=200, batch_size=100, lr=0.1, weight_decay=1e-4),
    description="CIFAR-10, 50,000 / 10,000, 32x32 (torchvision; --download)",
))
register_dataset(DatasetInfo(
    "cifar100", 100, 32, 3, CIFAR100_MEAN, CIFAR100_STD, crop_padding=4, flip=True,
    load=_torchvision_cifar("CIFAR100", "cifar-100-python"),
    defaults=dict(model="preactresnet18", epochs=200, batch_size=100, lr=0.1, weight_decay=1e-4),
    description="CIFAR-100, 50,000 / 10,000, 32x32 (torchvision; --download)",
))
register_dataset(DatasetInfo(
    "synthetic", 10, 16, 3, (0.5,) * 3, (0.25,) * 3, crop_padding=2, flip=True, load=_load_synthetic,
    defaults=dict(model="preactresnet18_w16", epochs=2, batch_size=64, lr=0.05, weight_decay=5e-4),
    description="random class templates plus noise, 16x16, for tests",
))


# ---------------------------------------------------------------------------
# On-device batches


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch, one gather for the whole batch."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class DeviceLoader:
    """Batches of a device-resident uint8 data set, augmented and normalised on the device.

    Iterating gives ``(x, y)`` with ``x`` float32 normalised (N, C, H, W) and ``y``
    int64 labels. ``train=True`` shuffles, drops the last incomplete batch and
    augments; the shuffling and augmentation draws come from ``generator``, whose
    state ``state_dict`` exposes for exact resume.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean,
        std,
        device: torch.device,
        train: bool,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.crop_padding = crop_padding
        self.flip = flip
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.labels)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = random_crop(x, self.crop_padding, self.generator)
                if self.flip:
                    x = random_hflip(x, self.generator)
            yield self.normalise(x), self.labels[idx]

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
