"""Data sets and the on-device batch pipeline.

A data set is registered by name with what the harness needs to know about it
(classes, image size, channels, mean/std, default augmentation, default run
options) and a loader that returns uint8 image tensors (N, C, H, W) and int64
labels. Small data sets then live whole on the training device and are
augmented a batch at a time there (random crop with zero padding, horizontal
flip, normalisation): no per-sample Python in the hot loop.
"""
from __future__ import annotations

import dataclasses
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
    # Image-file data sets: root -> (train samples, test samples), lists of (path, label).
    # Such a set can also stream (see make_loaders); ``load`` decodes every file.
    files: Optional[Callable[[Path], Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]]] = None


_DATASETS: Dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    _DATASETS[info.name] = info
    return info


def list_datasets() -> List[str]:
    return list(_DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """A registered data set, or a parametrised one such as ``imagefolder:PATH`` (built once per name)."""
    if name in _DATASETS:
        return _DATASETS[name]
    family, sep, arg = name.partition(":")
    if family in _FAMILIES and arg:
        if name not in _FAMILY_CACHE:
            _FAMILY_CACHE[name] = _FAMILIES[family][0](arg)
        return _FAMILY_CACHE[name]
    choices = ", ".join([*_DATASETS, *(f"{f}:PATH" for f in _FAMILIES)])
    raise UsageError(f"unknown dataset {name!r}; choose from: {choices}")


_FAMILY_CACHE: Dict[str, DatasetInfo] = {}


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


def _load_synthetic(root: Path, download: bool, n_train: int = 2048, n_test: int = 512) -> Arrays:
    """Ten classes of fixed random 16x16 colour templates plus noise: learnable in seconds, for tests."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(10, 3, 16, 16, generator=g) * 255

    def sample(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        noise = torch.randn(n, 3, 16, 16, generator=g) * 25
        return (templates[y] + noise).clamp(0, 255).to(torch.uint8), y

    return (*sample(n_train), *sample(n_test))


# The statistics of the mixup papers' code (snu-mllab/PuzzleMix load_data.py and main.py, from
# GibbsNet_pytorch), in pixel units / 255.
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
# The paper protocol's run options on CIFAR and Tiny-ImageNet: the reference's loss (mixbench.losses).
_PAPER_DEFAULTS = dict(model="preactresnet18", batch_size=100, weight_decay=1e-4, loss="bce")

register_dataset(DatasetInfo(
    "digits", 10, DIGITS_SIZE, 3, (0.5,) * 3, (0.5,) * 3, crop_padding=2, flip=False, load=_load_digits,
    defaults=dict(model="preactresnet18_w16", epochs=15, batch_size=64, lr=0.1, weight_decay=5e-4, loss="bce"),
    description="scikit-learn digits, 1,347 train / 450 test, 16x16 (embedded, no download)",
))
register_dataset(DatasetInfo(
    "cifar10", 10, 32, 3, CIFAR10_MEAN, CIFAR10_STD, crop_padding=2, flip=True,
    load=_torchvision_cifar("CIFAR10", "cifar-10-batches-py"),
    defaults=dict(_PAPER_DEFAULTS, epochs=200, lr=0.1),
    description="CIFAR-10, 50,000 / 10,000, 32x32 (torchvision; --download)",
))
register_dataset(DatasetInfo(
    "cifar100", 100, 32, 3, CIFAR100_MEAN, CIFAR100_STD, crop_padding=2, flip=True,
    load=_torchvision_cifar("CIFAR100", "cifar-100-python"),
    defaults=dict(_PAPER_DEFAULTS, epochs=200, lr=0.1),
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


# ---------------------------------------------------------------------------
# Data sets stored as image files: Tiny-ImageNet, CUB-200-2011, ImageNet-style folders
#
# Such a set is described by two lists of (path, label) samples. It trains either
# in memory (every image decoded once, resized to the declared size, kept as a
# uint8 tensor and augmented on the device like CIFAR) or streaming (decoded by
# DataLoader workers every epoch, RandomResizedCrop + flip). ``data_mode`` picks:
# "memory", "stream" or "auto" (memory for images of at most 64 px whose decoded
# size is under ``memory_limit_bytes()``, otherwise streaming).

Samples = List[Tuple[str, int]]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATA_MODES = ("auto", "memory", "stream")
MEMORY_MAX_SIZE = 64  # auto mode keeps images up to this size in memory


def memory_limit_bytes() -> int:
    """Largest decoded training + test set that ``auto`` keeps in memory ($MIXBENCH_MEMORY_GB, default 4)."""
    return int(float(os.environ.get("MIXBENCH_MEMORY_GB", "4")) * 2**30)


def default_num_workers() -> int:
    """DataLoader workers of the streaming path ($MIXBENCH_WORKERS, default: the CPUs, at most 8)."""
    if os.environ.get("MIXBENCH_WORKERS"):
        return int(os.environ["MIXBENCH_WORKERS"])
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{what}: expected the file {path}, which does not exist")
    return path


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UsageError(f"{what}: expected the folder {path}, which does not exist")
    return path


def _read_lines(path: Path, what: str, fields: int) -> List[List[str]]:
    """Non-empty lines of a whitespace-separated text file, each with at least ``fields`` fields."""
    rows = []
    with open(_need_file(path, what)) as f:
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


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _find_root(root: Path, marker: str, subfolder: str) -> Path:
    """``root`` if it holds ``marker`` itself, else ``root/subfolder`` (where a missing file is then reported)."""
    return root if (root / marker).exists() else root / subfolder


def tiny_imagenet_files(root: Path) -> Tuple[Samples, Samples]:
    """Tiny-ImageNet-200 as distributed: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt.

    ``root`` is the tiny-imagenet-200 folder or its parent. Classes are the sorted
    wnids; the labelled ``val`` split is the test set (``test`` has no labels).
    """
    root = _find_root(root, "wnids.txt", "tiny-imagenet-200")
    what = "Tiny-ImageNet"
    wnids = sorted({row[0] for row in _read_lines(root / "wnids.txt", what, 1)})
    index = {w: i for i, w in enumerate(wnids)}
    train: Samples = []
    for wnid in wnids:
        files = _image_files(_need_dir(root / "train" / wnid / "images", what))
        if not files:
            raise UsageError(f"{what}: no images in {root / 'train' / wnid / 'images'}")
        train += [(str(p), index[wnid]) for p in files]
    images = _need_dir(root / "val" / "images", what)
    test: Samples = []
    for lineno, row in enumerate(_read_lines(root / "val" / "val_annotations.txt", what, 2), 1):
        if row[1] not in index:
            raise UsageError(f"{what}: {root / 'val' / 'val_annotations.txt'} names wnid {row[1]!r} "
                             f"(entry {lineno}), which is not in {root / 'wnids.txt'}")
        test.append((str(_need_file(images / row[0], what)), index[row[1]]))
    return train, test


def cub200_files(root: Path) -> Tuple[Samples, Samples]:
    """CUB-200-2011's official layout: images.txt, train_test_split.txt, image_class_labels.txt, images/.

    ``root`` is the CUB_200_2011 folder or its parent; labels (1-based in the
    files) become 0-based; the official split gives 5,994 train / 5,794 test.
    """
    root = _find_root(root, "images.txt", "CUB_200_2011")
    what = "CUB-200-2011"
    paths = {row[0]: row[1] for row in _read_lines(root / "images.txt", what, 2)}
    labels = {row[0]: row[1] for row in _read_lines(root / "image_class_labels.txt", what, 2)}
    split = {row[0]: row[1] for row in _read_lines(root / "train_test_split.txt", what, 2)}
    _need_dir(root / "images", what)
    train: Samples = []
    test: Samples = []
    for image_id, rel in paths.items():
        if image_id not in labels or image_id not in split:
            missing = "image_class_labels.txt" if image_id not in labels else "train_test_split.txt"
            raise UsageError(f"{what}: image id {image_id} of images.txt has no entry in {root / missing}")
        try:
            label = int(labels[image_id]) - 1
        except ValueError:
            label = -1
        if not 0 <= label < 200:
            raise UsageError(f"{what}: {root / 'image_class_labels.txt'} gives image {image_id} the class "
                             f"{labels[image_id]!r}; classes are 1..200")
        (train if split[image_id] == "1" else test).append((str(root / "images" / rel), label))
    if not train or not test:
        raise UsageError(f"{what}: {root / 'train_test_split.txt'} leaves the train or the test split empty")
    _need_file(Path(train[0][0]), what)
    return train, test


def imagefolder_classes(path: Path) -> List[str]:
    train = path / "train"
    if not train.is_dir():
        raise UsageError(f"imagefolder: expected the folder {train} (PATH/train/<class>/<image> and "
                         f"PATH/val/<class>/<image>), which does not exist")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"imagefolder: {train} has no class folders (expected {train}/<class>/<image>)")
    return classes


def imagefolder_files(path: Path) -> Tuple[Samples, Samples]:
    """``PATH/train/<class>/...`` and ``PATH/val/<class>/...`` (ImageNet's layout); classes sorted by name."""
    classes = imagefolder_classes(path)
    index = {c: i for i, c in enumerate(classes)}
    _need_dir(path / "val", "imagefolder")
    out = []
    for split in ("train", "val"):
        samples: Samples = []
        for folder in sorted(d for d in (path / split).iterdir() if d.is_dir()):
            if folder.name not in index:
                raise UsageError(f"imagefolder: class folder {folder} has no counterpart in {path / 'train'}")
            files = _image_files(folder)
            if not files and split == "train":
                raise UsageError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
            samples += [(str(p), index[folder.name]) for p in files]
        if not samples:
            raise UsageError(f"imagefolder: no images under {path / split} (expected {path / split}/<class>/<image>)")
        out.append(samples)
    return out[0], out[1]


def load_image(path: str, size: int) -> np.ndarray:
    """Decode one image as RGB, resize its shorter side to ``size`` and centre-crop: uint8 (size, size, 3)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the image {path}: {exc}") from None
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


def _files_loader(files: Callable[[Path], Tuple[Samples, Samples]], size: int, name: str) -> Callable[..., Arrays]:
    def load(root: Path, download: bool) -> Arrays:
        train, test = files(root)
        return (*decode_images(train, size, f"{name} train"), *decode_images(test, size, f"{name} test"))

    return load


# ---------------------------------------------------------------------------
# Fashion-MNIST from the standard IDX files

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


def _load_fashion_mnist(root: Path, download: bool) -> Arrays:
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


TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.5,) * 3, (0.5,) * 3  # the PuzzleMix code's (127.5 / 255)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

register_dataset(DatasetInfo(
    "fashion-mnist", 10, 28, 1, FASHION_MEAN, FASHION_STD, crop_padding=2, flip=False, load=_load_fashion_mnist,
    defaults=dict(model="preactresnet18_w16", epochs=15, batch_size=128, lr=0.1, weight_decay=5e-4),
    description="Fashion-MNIST, 60,000 / 10,000, 28x28, 1 channel (IDX files: --data-dir, Debian "
                "dataset-fashion-mnist, or --download)",
))
register_dataset(DatasetInfo(
    "tiny-imagenet", 200, 64, 3, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, crop_padding=4, flip=True,
    load=_files_loader(tiny_imagenet_files, 64, "tiny-imagenet"), files=tiny_imagenet_files,
    # The PuzzleMix code's Tiny-ImageNet model: a 3x3 stride-2 first convolution at 64 px; lr 0.2.
    defaults=dict(_PAPER_DEFAULTS, epochs=200, lr=0.2, stem="cifar-s2"),
    description="Tiny-ImageNet-200, 100,000 / 10,000 (val), 64x64 (tiny-imagenet-200/ under --data-dir)",
))
register_dataset(DatasetInfo(
    "cub200", 200, 224, 3, IMAGENET_MEAN, IMAGENET_STD, crop_padding=28, flip=True,
    load=_files_loader(cub200_files, 224, "cub200"), files=cub200_files,
    defaults=dict(model="resnet18", epochs=200, batch_size=64, lr=0.1, weight_decay=5e-4),
    description="CUB-200-2011, 5,994 / 5,794, 224x224 streaming (CUB_200_2011/ under --data-dir)",
))


def _imagefolder_info(arg: str) -> DatasetInfo:
    path = Path(arg).expanduser()
    classes = imagefolder_classes(path)
    files = lambda root: imagefolder_files(path)  # noqa: E731 (the path is part of the name, not --data-dir)
    return DatasetInfo(
        f"imagefolder:{arg}", len(classes), 224, 3, IMAGENET_MEAN, IMAGENET_STD, crop_padding=28, flip=True,
        load=_files_loader(files, 224, "imagefolder"), files=files,
        defaults=dict(model="resnet18", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4),
        description=f"{len(classes)} classes in {path}",
    )


# Parametrised data sets: "family:ARG" -> DatasetInfo.
_FAMILIES: Dict[str, Tuple[Callable[[str], DatasetInfo], str]] = {
    "imagefolder": (_imagefolder_info, "PATH/train/<class>/<image>, PATH/val/<class>/<image> (ImageNet layout; "
                                       "224x224 by default, in memory or streaming)"),
}


def dataset_descriptions() -> Dict[str, str]:
    """Name -> one-line description, the parametrised families as ``family:PATH``."""
    out = {name: info.description for name, info in _DATASETS.items()}
    out.update({f"{family}:PATH": text for family, (_, text) in _FAMILIES.items()})
    return out


def normalise_dataset_name(name: str, data_dir: Optional[os.PathLike] = None) -> str:
    """Check a data set name; ``imagefolder`` alone means ``imagefolder:DATA_DIR``; family paths become absolute."""
    family, sep, arg = name.partition(":")
    if family in _FAMILIES:
        if not arg:
            if not data_dir:
                raise UsageError(f"dataset {name!r} needs a folder: give {family}:PATH or --data-dir PATH")
            arg = str(data_dir)
        name = f"{family}:{Path(arg).expanduser().resolve()}"
    get_dataset_info(name)
    return name


def dataset_slug(name: str) -> str:
    """A folder name for a data set: ``imagefolder:/data/imagenet`` -> ``imagefolder-imagenet``."""
    family, sep, arg = name.partition(":")
    return f"{family}-{Path(arg).name or 'root'}" if sep else name


# ---------------------------------------------------------------------------
# Training subsets, the streaming loader and the loaders of a run


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` samples, each class in proportion to its size (largest remainder).

    Within a class the samples are a seeded random choice: the same labels, ``n``
    and ``seed`` always give the same subset.
    """
    labels = torch.as_tensor(labels).cpu()
    total = len(labels)
    if not 0 < n <= total:
        raise UsageError(f"train_subset {n} must be between 1 and the training set size {total}")
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    rest = n - int(take.sum())
    if rest:
        take[torch.argsort(quota - take, descending=True, stable=True)[:rest]] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values


class _StreamImages(torch.utils.data.Dataset):
    """Decodes one image file per item. Training items get RandomResizedCrop (+ flip) drawn from a seed
    made of the epoch's seed and the item's index, so the stream does not depend on the number of workers."""

    def __init__(self, samples: "Samples", size: int, train: bool, flip: bool):
        import torchvision.transforms as T

        # numpy arrays, not a list of tuples: forked workers then share the pages (no reference-count writes)
        self.paths = np.array([path.encode() for path, _ in samples])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.train, self.epoch_seed = train, 0
        if train:
            steps = [T.RandomResizedCrop(size, antialias=True)] + ([T.RandomHorizontalFlip()] if flip else [])
        else:
            steps = [T.Resize(round(size / 0.875), antialias=True), T.CenterCrop(size)]
        self.transform = T.Compose(steps + [T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.paths[i].decode(), int(self.labels[i])
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the image {path}: {exc}") from None
        if not self.train:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.epoch_seed + i * 1_000_003) % 2**63)
            return self.transform(img), label


class StreamLoader:
    """Batches decoded from image files by DataLoader workers, normalised on the device.

    The same interface as ``DeviceLoader``: iterating gives normalised float
    ``(x, y)`` on ``device``; ``train=True`` shuffles, drops the last incomplete
    batch and augments (RandomResizedCrop, flip). Images travel as uint8 through
    pinned memory. The order and the augmentation seeds come from ``generator``,
    which ``state_dict`` exposes for exact resume at an epoch boundary.
    """

    def __init__(
        self,
        samples: "Samples",
        *,
        image_size: int,
        batch_size: int,
        mean,
        std,
        device: torch.device,
        train: bool,
        flip: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        num_workers: Optional[int] = None,
    ):
        self.samples = samples
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.channels_last = channels_last
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.dataset = _StreamImages(samples, image_size, train, flip)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Yield only rank ``rank``'s contiguous ``1/world`` of each global batch (data-parallel runs);
        the order and the augmentation seeds stay those of the global batch."""
        if self.batch_size % world:
            raise UsageError(f"batch_size {self.batch_size} must be divisible by the {world} processes of the run")
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        n = len(self.samples)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.samples)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            order = torch.randperm(len(self.samples), generator=self.generator)[: len(self) * self.batch_size]
            self.dataset.epoch_seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        else:
            order = torch.arange(len(self.samples))
        batch_size = self.batch_size
        if self.world > 1 and self.train:
            batch_size //= self.world
            order = order.view(-1, self.world, batch_size)[:, self.rank].reshape(-1)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0),
            prefetch_factor=4 if self.num_workers else None,
        )
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            yield self.normalise(x), y.to(self.device, non_blocking=True)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


_FILES_CACHE: Dict[Tuple[str, str], Tuple["Samples", "Samples"]] = {}
_MEMORY_CACHE: Dict[Tuple[str, str, bool, int], Dataset] = {}


def check_data_options(train_subset: Optional[int], data_mode: str, image_size: Optional[int]) -> None:
    if train_subset is not None and (not isinstance(train_subset, int) or isinstance(train_subset, bool)
                                     or train_subset <= 0):
        raise UsageError(f"train_subset must be a positive int or null, got {train_subset!r}")
    if data_mode not in DATA_MODES:
        raise UsageError(f"unknown data_mode {data_mode!r}; choose from: {', '.join(DATA_MODES)}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size <= 0):
        raise UsageError(f"image_size must be a positive int or null, got {image_size!r}")


_DATA_CACHE: Dict[Tuple[str, str, bool], Dataset] = {}


def get_data(spec: Any) -> Dataset:
    """Load a run's data set (``spec.dataset``, ``.data_dir``, ``.download``) once per process:
    a grid trains many runs on the same data, and evaluation reads it again."""
    key = (spec.dataset, str(spec.data_dir), spec.download)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(spec.dataset, spec.data_dir, spec.download)
    return _DATA_CACHE[key]


def make_loaders(spec: Any, device: torch.device, *, channels_last: bool = False,
                 num_workers: Optional[int] = None) -> Tuple[Any, Any]:
    """The training and test loaders of a run spec.

    In-memory sets give ``DeviceLoader``s, streaming ones ``StreamLoader``s; both
    carry ``.info`` (the data set's info at the run's image size) and ``.mode``
    ("memory" or "stream"). Data sets are read once per process; ``train_subset``
    (stratified, seeded by the run's seed) applies to the training split only.
    """
    info = get_dataset_info(spec.dataset)
    mode, subset, size = spec.data_mode, spec.train_subset, spec.image_size or info.image_size
    check_data_options(subset, mode, size)
    if size != info.image_size:  # the random-crop padding keeps its share of the image
        padding = round(info.crop_padding * size / info.image_size)
        info = dataclasses.replace(info, image_size=size, crop_padding=padding)
    root = Path(spec.data_dir) if spec.data_dir else default_data_dir()
    if info.files is None:
        if mode == "stream":
            raise UsageError(f"data_mode 'stream' needs an image-file data set (tiny-imagenet, cub200, "
                             f"imagefolder:PATH); {spec.dataset} is held in memory only")
        mode = "memory"
    else:
        key = (info.name, str(root))
        if key not in _FILES_CACHE:
            _FILES_CACHE[key] = info.files(root)
        train_s, test_s = _FILES_CACHE[key]
        if mode == "auto":
            decoded = (len(train_s) + len(test_s)) * info.in_chans * size * size
            mode = "memory" if size <= MEMORY_MAX_SIZE and decoded <= memory_limit_bytes() else "stream"

    common = dict(mean=info.mean, std=info.std, device=device, channels_last=channels_last)
    if mode == "memory":
        key = (info.name, str(root), bool(spec.download), size)
        if key not in _MEMORY_CACHE:
            if info.files is not None:
                arrays = (*decode_images(train_s, size, f"{info.name} train"),
                          *decode_images(test_s, size, f"{info.name} test"))
                _MEMORY_CACHE[key] = Dataset(info, *arrays)
            else:
                data = load_dataset(spec.dataset, spec.data_dir, spec.download)
                _MEMORY_CACHE[key] = Dataset(info, _resize_uint8(data.train_x, size), data.train_y,
                                             _resize_uint8(data.test_x, size), data.test_y)
        data = _MEMORY_CACHE[key]
        train_x, train_y = data.train_x, data.train_y
        if subset:
            idx = stratified_subset(train_y, subset, spec.seed)
            train_x, train_y = train_x[idx], train_y[idx]
        labels = torch.cat([train_y, data.test_y])
        train = DeviceLoader(train_x, train_y, batch_size=spec.batch_size, train=True,
                             crop_padding=info.crop_padding, flip=info.flip, seed=spec.seed, **common)
        test = DeviceLoader(data.test_x, data.test_y, batch_size=max(spec.batch_size, 256), train=False, **common)
    else:
        if subset:
            idx = stratified_subset(torch.tensor([label for _, label in train_s]), subset, spec.seed)
            train_s = [train_s[i] for i in idx.tolist()]
        labels = torch.tensor([label for _, label in train_s + test_s])
        stream = dict(image_size=size, flip=info.flip, num_workers=num_workers, **common)
        train = StreamLoader(train_s, batch_size=spec.batch_size, train=True, seed=spec.seed, **stream)
        test = StreamLoader(test_s, batch_size=spec.batch_size, train=False, **stream)
    if len(labels) and int(labels.max()) >= info.num_classes:
        raise UsageError(f"{spec.dataset}: label {int(labels.max())} found, but the data set declares "
                         f"{info.num_classes} classes")
    if len(train) == 0:
        n = len(train.labels) if mode == "memory" else len(train.samples)
        raise UsageError(f"batch_size {spec.batch_size} is larger than the training set ({n} images)")
    for loader in (train, test):
        loader.info, loader.mode = info, mode
    return train, test
