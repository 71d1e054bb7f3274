"""CUB-200-2011 in its official layout (images.txt, train_test_split.txt, image_class_labels.txt, images/)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

from mixbench import UsageError
from mixbench.data.files import IMAGENET_MEAN, IMAGENET_STD, files_loader, find_root, need_dir, need_file, read_lines
from mixbench.data.registry import DatasetInfo, Samples, register_dataset


def cub200_files(root: Path) -> Tuple[Samples, Samples]:
    """CUB-200-2011's official layout: images.txt, train_test_split.txt, image_class_labels.txt, images/.

    ``root`` is the CUB_200_2011 folder or its parent; labels (1-based in the
    files) become 0-based; the official split gives 5,994 train / 5,794 test.
    """
    root = find_root(root, "images.txt", "CUB_200_2011")
    what = "CUB-200-2011"
    paths = {row[0]: row[1] for row in read_lines(root / "images.txt", what, 2)}
    labels = {row[0]: row[1] for row in read_lines(root / "image_class_labels.txt", what, 2)}
    split = {row[0]: row[1] for row in read_lines(root / "train_test_split.txt", what, 2)}
    need_dir(root / "images", what)
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
    need_file(Path(train[0][0]), what)
    return train, test


register_dataset(DatasetInfo(
    "cub200", 200, 224, 3, IMAGENET_MEAN, IMAGENET_STD, crop_padding=28, flip=True,
    load=files_loader(cub200_files, 224, "cub200"), files=cub200_files,
    defaults=dict(model="resnet18", epochs=200, batch_size=64, lr=0.1, weight_decay=5e-4),
    description="CUB-200-2011, 5,994 / 5,794, 224x224 streaming (CUB_200_2011/ under --data-dir)",
))
