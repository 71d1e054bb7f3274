"""Tiny-ImageNet-200 in its distributed layout (wnids.txt, train/<wnid>/images, val/ with annotations)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

from mixbench import UsageError
from mixbench.data.files import files_loader, find_root, image_files, need_dir, need_file, read_lines
from mixbench.data.registry import PAPER_DEFAULTS, DatasetInfo, Samples, register_dataset

TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.5,) * 3, (0.5,) * 3  # the PuzzleMix code's (127.5 / 255)


def tiny_imagenet_files(root: Path) -> Tuple[Samples, Samples]:
    """Tiny-ImageNet-200 as distributed: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt.

    ``root`` is the tiny-imagenet-200 folder or its parent. Classes are the sorted
    wnids; the labelled ``val`` split is the test set (``test`` has no labels).
    """
    root = find_root(root, "wnids.txt", "tiny-imagenet-200")
    what = "Tiny-ImageNet"
    wnids = sorted({row[0] for row in read_lines(root / "wnids.txt", what, 1)})
    index = {w: i for i, w in enumerate(wnids)}
    train: Samples = []
    for wnid in wnids:
        files = image_files(need_dir(root / "train" / wnid / "images", what))
        if not files:
            raise UsageError(f"{what}: no images in {root / 'train' / wnid / 'images'}")
        train += [(str(p), index[wnid]) for p in files]
    images = need_dir(root / "val" / "images", what)
    test: Samples = []
    for lineno, row in enumerate(read_lines(root / "val" / "val_annotations.txt", what, 2), 1):
        if row[1] not in index:
            raise UsageError(f"{what}: {root / 'val' / 'val_annotations.txt'} names wnid {row[1]!r} "
                             f"(entry {lineno}), which is not in {root / 'wnids.txt'}")
        test.append((str(need_file(images / row[0], what)), index[row[1]]))
    return train, test


register_dataset(DatasetInfo(
    "tiny-imagenet", 200, 64, 3, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, crop_padding=4, flip=True,
    load=files_loader(tiny_imagenet_files, 64, "tiny-imagenet"), files=tiny_imagenet_files,
    # The PuzzleMix code's Tiny-ImageNet model: a 3x3 stride-2 first convolution at 64 px; lr 0.2.
    defaults=dict(PAPER_DEFAULTS, epochs=200, lr=0.2, stem="cifar-s2"),
    description="Tiny-ImageNet-200, 100,000 / 10,000 (val), 64x64 (tiny-imagenet-200/ under --data-dir)",
))
