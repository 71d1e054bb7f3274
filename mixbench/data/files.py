"""What the image-file data sets share: reading their index files, listing and decoding images.

Such a set is described by two lists of (path, label) samples. It trains either in memory
(every image decoded once, resized to the declared size, kept as a uint8 tensor and
augmented on the device like CIFAR) or streaming (decoded by DataLoader workers every
epoch); ``make_loaders``'s ``data_mode`` picks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch

from mixbench import UsageError
from mixbench.data.registry import Arrays, Samples

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def default_num_workers() -> int:
    """DataLoader workers of the streaming path ($MIXBENCH_WORKERS, default: the CPUs, at most 8)."""
    if os.environ.get("MIXBENCH_WORKERS"):
        return int(os.environ["MIXBENCH_WORKERS"])
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{what}: expected the file {path}, which does not exist")
    return path


def need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UsageError(f"{what}: expected the folder {path}, which does not exist")
    return path


def read_lines(path: Path, what: str, fields: int) -> List[List[str]]:
    """Non-empty lines of a whitespace-separated text file, each with at least ``fields`` fields."""
    rows = []
    with open(need_file(path, what)) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < fields:
                raise UsageError(
                    f"{what}: {path} line {lineno} is malformed (expected {fields} fields): {line.strip()!r}"
                )
            rows.append(parts)
    return rows


def image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def find_root(root: Path, marker: str, subfolder: str) -> Path:
    """``root`` if it holds ``marker`` itself, else ``root/subfolder`` (where a missing file is then reported)."""
    return root if (root / marker).exists() else root / subfolder


def open_rgb(path: str):
    """The image at ``path`` as an RGB PIL image; an unreadable file is a UsageError."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the image {path}: {exc}") from None


def load_image(path: str, size: int) -> np.ndarray:
    """Decode one image as RGB, resize its shorter side to ``size`` and centre-crop: uint8 (size, size, 3)."""
    from PIL import Image

    img = open_rgb(path)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def decode_images(samples: Samples, size: int, desc: str = "decoding") -> Tuple[torch.Tensor, torch.Tensor]:
    """All images of ``samples`` as uint8 (N, 3, size, size) and int64 labels, decoded by a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    out = np.empty((len(samples), 3, size, size), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = load_image(samples[i][0], size).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=max(1, default_num_workers())) as pool, \
            tqdm(total=len(samples), desc=desc, unit="img", disable=len(samples) < 5000, mininterval=2.0) as bar:
        for _ in pool.map(work, range(len(samples)), chunksize=64):
            bar.update(1)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return torch.from_numpy(out), labels


def decode_splits(train: Samples, test: Samples, size: int, name: str) -> Arrays:
    """Both splits of an image-file set decoded at ``size``."""
    return (*decode_images(train, size, f"{name} train"), *decode_images(test, size, f"{name} test"))


def files_loader(files: Callable[[Path], Tuple[Samples, Samples]], size: int, name: str) -> Callable[..., Arrays]:
    """A ``DatasetInfo.load`` that lists the files under the data folder and decodes them all at ``size``."""
    def load(root: Path, download: bool) -> Arrays:
        return decode_splits(*files(root), size, name)

    return load
