"""Fashion-MNIST from the standard IDX files (the data folder, torchvision's layout, or Debian's package)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mixbench import UsageError
from mixbench.data.registry import Arrays, DatasetInfo, register_dataset

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: os.PathLike) -> np.ndarray:
    """An IDX file (.gz or not): two zero bytes, a type byte (0x08: uint8), the number of dimensions,
    the big-endian 32-bit sizes, then the data."""
    import gzip
    import struct

    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"cannot read the IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    if data[2] != 0x08:
        raise UsageError(f"{path}: IDX element type 0x{data[2]:02x} is not supported (expected 0x08, uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise UsageError(f"{path}: IDX sizes {dims} need {expected} data bytes, the file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: Path) -> Optional[Path]:
    """The first folder with all four IDX files: ROOT, ROOT/FashionMNIST/raw, ROOT/fashion-mnist, then
    Debian's /usr/share/datasets/fashion-mnist. A folder holding only some of them is an error."""
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist", DEBIAN_FASHION_MNIST):
        found = {k: _idx_path(folder, stem) for k, stem in FASHION_FILES.items()}
        if all(found.values()):
            return folder
        if any(found.values()):
            missing = ", ".join(f"{FASHION_FILES[k]}[.gz]" for k, v in found.items() if v is None)
            raise UsageError(f"Fashion-MNIST: {folder} holds some of the IDX files but not {missing}")
    return None


def load_fashion_mnist(root: Path, download: bool) -> Arrays:
    folder = find_fashion_mnist(root)
    if folder is None and download:
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        folder = find_fashion_mnist(root)
    if folder is None:
        raise UsageError(
            f"Fashion-MNIST not found: expected {FASHION_FILES['train_x']}.gz (and the train labels and t10k "
            f"files) in {root}, {root / 'FashionMNIST' / 'raw'} or {DEBIAN_FASHION_MNIST} "
            "(apt-get install dataset-fashion-mnist, or pass --download)"
        )
    arrays = {k: read_idx(_idx_path(folder, stem)) for k, stem in FASHION_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UsageError(f"Fashion-MNIST in {folder}: {split} images {x.shape} and labels {y.shape} do not match")
        if y.size and y.max() >= 10:
            raise UsageError(f"Fashion-MNIST in {folder}: {split} label {int(y.max())} is out of range 0..9")
    t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return t["train_x"][:, None], t["train_y"].long(), t["test_x"][:, None], t["test_y"].long()


FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

register_dataset(DatasetInfo(
    "fashion-mnist", 10, 28, 1, FASHION_MEAN, FASHION_STD, crop_padding=2, flip=False, load=load_fashion_mnist,
    defaults=dict(model="preactresnet18_w16", epochs=15, batch_size=128, lr=0.1, weight_decay=5e-4),
    description="Fashion-MNIST, 60,000 / 10,000, 28x28, 1 channel (IDX files: --data-dir, Debian "
                "dataset-fashion-mnist, or --download)",
))
