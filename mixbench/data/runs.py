"""The data of a run: its data set read once per process, training subsets, its two loaders.

Image-file sets train in memory or streaming: ``data_mode`` "memory", "stream" or "auto"
(memory for images of at most ``MEMORY_MAX_SIZE`` px whose decoded size is under
``memory_limit_bytes()``, otherwise streaming).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from mixbench import UsageError
from mixbench.data.augment import resize_uint8
from mixbench.data.cache import CACHE, data_root
from mixbench.data.files import decode_splits
from mixbench.data.loaders import BatchLoader, DeviceLoader, StreamLoader
from mixbench.data.registry import (
    Dataset,
    DatasetInfo,
    Samples,
    check_data_options,
    get_dataset_info,
    load_dataset,
)

MEMORY_MAX_SIZE = 64  # auto mode keeps images up to this size in memory


def memory_limit_bytes() -> int:
    """Largest decoded training + test set that ``auto`` keeps in memory ($MIXBENCH_MEMORY_GB, default 4)."""
    return int(float(os.environ.get("MIXBENCH_MEMORY_GB", "4")) * 2**30)


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


def _samples(info: DatasetInfo, root: Path) -> Tuple[Samples, Samples]:
    """The (train, test) file lists of an image-file set, listed once per process."""
    return CACHE.get(("files", info.name, str(root)), lambda: info.files(root))


def _arrays(name: str, info: DatasetInfo, data_dir: Optional[os.PathLike], download: bool, size: int) -> Dataset:
    """A data set as uint8 arrays at ``size`` px, read (image files: decoded) once per process.

    ``info`` is the data set's at ``size`` (the registered one at its own size).
    """
    root = data_root(data_dir)

    def make() -> Dataset:
        if info.files is not None:
            train_s, test_s = _samples(info, root)
            return Dataset(info, *decode_splits(train_s, test_s, size, info.name))
        data = load_dataset(name, data_dir, download)
        return Dataset(info, resize_uint8(data.train_x, size), data.train_y,
                       resize_uint8(data.test_x, size), data.test_y)

    return CACHE.get(("arrays", info.name, str(root), bool(download), size), make)


def get_data(spec: Any) -> Dataset:
    """A run's data set (``spec.dataset``, ``.data_dir``, ``.download``) at its declared size, read once
    per process: a grid trains many runs on the same data, and evaluation reads it again."""
    info = get_dataset_info(spec.dataset)
    return _arrays(spec.dataset, info, spec.data_dir, spec.download, info.image_size)


def make_loaders(spec: Any, device: torch.device, *, channels_last: bool = False,
                 num_workers: Optional[int] = None) -> Tuple[BatchLoader, BatchLoader]:
    """The training and test loaders of a run spec.

    In-memory sets give ``DeviceLoader``s, streaming ones ``StreamLoader``s; both
    carry ``.info`` (the data set's info at the run's image size) and ``.mode``
    ("memory" or "stream"). ``decode`` "gpu" decodes streamed JPEGs on ``device`` (a CUDA device, or the
    CPU when the run asked for it). Data sets are read once per process; ``train_subset``
    (stratified, seeded by the run's seed) applies to the training split only.
    """
    info = get_dataset_info(spec.dataset)
    mode, subset, size = spec.data_mode, spec.train_subset, spec.image_size or info.image_size
    check_data_options(subset, mode, size)
    if size != info.image_size:  # the random-crop padding keeps its share of the image
        padding = round(info.crop_padding * size / info.image_size)
        info = dataclasses.replace(info, image_size=size, crop_padding=padding)
    if info.files is None:
        if mode == "stream":
            raise UsageError(f"data_mode 'stream' needs an image-file data set (tiny-imagenet, cub200, "
                             f"imagefolder:PATH); {spec.dataset} is held in memory only")
        mode = "memory"
    else:
        train_s, test_s = _samples(info, data_root(spec.data_dir))
        if mode == "auto":
            decoded = (len(train_s) + len(test_s)) * info.in_chans * size * size
            mode = "memory" if size <= MEMORY_MAX_SIZE and decoded <= memory_limit_bytes() else "stream"

    decode = getattr(spec, "decode", "cpu")
    if decode == "gpu":
        if mode == "memory":
            raise UsageError(f"decode 'gpu' applies to streamed image files; {spec.dataset} at {size} px is held in "
                             "memory (decoded once): pass --data-mode stream, or leave decode at cpu")
        if device.type != "cuda" and spec.device != "cpu":
            raise UsageError(f"decode 'gpu' needs a CUDA device, and this run trains on the {device.type} "
                             f"(--device {spec.device}); leave decode at cpu, or pass --device cpu to run the same "
                             "code path with the CPU's JPEG decoder")

    common = dict(mean=info.mean, std=info.std, device=device, channels_last=channels_last)
    if mode == "memory":
        data = _arrays(spec.dataset, info, spec.data_dir, spec.download, size)
        train_x, train_y = data.train_x, data.train_y
        if subset:
            idx = stratified_subset(train_y, subset, spec.seed)
            train_x, train_y = train_x[idx], train_y[idx]
        labels = torch.cat([train_y, data.test_y])
        train: BatchLoader = DeviceLoader(train_x, train_y, batch_size=spec.batch_size, train=True,
                                          crop_padding=info.crop_padding, flip=info.flip, seed=spec.seed, **common)
        test: BatchLoader = DeviceLoader(data.test_x, data.test_y, batch_size=max(spec.batch_size, 256),
                                         train=False, **common)
    else:
        if subset:
            idx = stratified_subset(torch.tensor([label for _, label in train_s]), subset, spec.seed)
            train_s = [train_s[i] for i in idx.tolist()]
        labels = torch.tensor([label for _, label in train_s + test_s])
        stream = dict(image_size=size, flip=info.flip, num_workers=num_workers, decode=decode, **common)
        train = StreamLoader(train_s, batch_size=spec.batch_size, train=True, seed=spec.seed, **stream)
        test = StreamLoader(test_s, batch_size=spec.batch_size, train=False, **stream)
    if len(labels) and int(labels.max()) >= info.num_classes:
        raise UsageError(f"{spec.dataset}: label {int(labels.max())} found, but the data set declares "
                         f"{info.num_classes} classes")
    if len(train) == 0:
        raise UsageError(f"batch_size {spec.batch_size} is larger than the training set ({train._num_items()} images)")
    for loader in (train, test):
        loader.info, loader.mode = info, mode
    return train, test
