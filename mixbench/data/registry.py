"""The data-set registry: what the harness needs to know about each data set, by name.

A data set is registered with its classes, image size, channels, mean/std, default
augmentation, default run options and a loader that returns uint8 image tensors
(N, C, H, W) and int64 labels. Parametrised families (``imagefolder:PATH``) register a
function that builds the description from the argument.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from mixbench import UsageError
from mixbench.data.cache import CACHE, data_root

Arrays = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train_x, train_y, test_x, test_y
Samples = List[Tuple[str, int]]  # (image path, label)
DATA_MODES = ("auto", "memory", "stream")

# The paper protocol's run options on CIFAR and Tiny-ImageNet: the reference's loss (mixbench.losses).
PAPER_DEFAULTS = dict(model="preactresnet18", batch_size=100, weight_decay=1e-4, loss="bce")


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
    files: Optional[Callable[[Path], Tuple[Samples, Samples]]] = None


@dataclass
class Dataset:
    info: DatasetInfo
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor


_DATASETS: Dict[str, DatasetInfo] = {}
# Parametrised data sets: "family:ARG" -> DatasetInfo, with a description of ARG.
_FAMILIES: Dict[str, Tuple[Callable[[str], DatasetInfo], str]] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    _DATASETS[info.name] = info
    return info


def register_family(family: str, make: Callable[[str], DatasetInfo], description: str) -> None:
    _FAMILIES[family] = (make, description)


def list_datasets() -> List[str]:
    return list(_DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """A registered data set, or a parametrised one such as ``imagefolder:PATH`` (built once per name)."""
    if name in _DATASETS:
        return _DATASETS[name]
    family, sep, arg = name.partition(":")
    if family in _FAMILIES and arg:
        return CACHE.get(("info", name), lambda: _FAMILIES[family][0](arg))
    choices = ", ".join([*_DATASETS, *(f"{f}:PATH" for f in _FAMILIES)])
    raise UsageError(f"unknown dataset {name!r}; choose from: {choices}")


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


def check_data_options(train_subset: Optional[int], data_mode: str, image_size: Optional[int]) -> None:
    if train_subset is not None and (not isinstance(train_subset, int) or isinstance(train_subset, bool)
                                     or train_subset <= 0):
        raise UsageError(f"train_subset must be a positive int or null, got {train_subset!r}")
    if data_mode not in DATA_MODES:
        raise UsageError(f"unknown data_mode {data_mode!r}; choose from: {', '.join(DATA_MODES)}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size <= 0):
        raise UsageError(f"image_size must be a positive int or null, got {image_size!r}")


def load_dataset(name: str, data_dir: Optional[os.PathLike] = None, download: bool = False) -> Dataset:
    """Read a data set from its data folder (uncached; ``mixbench.data.get_data`` caches)."""
    info = get_dataset_info(name)
    train_x, train_y, test_x, test_y = info.load(root=data_root(data_dir), download=download)
    for t in (train_x, test_x):
        assert t.dtype == torch.uint8 and t.dim() == 4, "loaders return uint8 (N, C, H, W)"
    return Dataset(info, train_x, train_y.long(), test_x, test_y.long())
