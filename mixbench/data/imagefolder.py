"""Image folders in ImageNet's layout: ``imagefolder:PATH`` with PATH/train/<class>/... and PATH/val/<class>/..."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from mixbench import UsageError
from mixbench.data.files import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, files_loader, image_files, need_dir
from mixbench.data.registry import DatasetInfo, Samples, register_family


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
    need_dir(path / "val", "imagefolder")
    out = []
    for split in ("train", "val"):
        samples: Samples = []
        for folder in sorted(d for d in (path / split).iterdir() if d.is_dir()):
            if folder.name not in index:
                raise UsageError(f"imagefolder: class folder {folder} has no counterpart in {path / 'train'}")
            files = image_files(folder)
            if not files and split == "train":
                raise UsageError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
            samples += [(str(p), index[folder.name]) for p in files]
        if not samples:
            raise UsageError(f"imagefolder: no images under {path / split} (expected {path / split}/<class>/<image>)")
        out.append(samples)
    return out[0], out[1]


def _imagefolder_info(arg: str) -> DatasetInfo:
    path = Path(arg).expanduser()
    classes = imagefolder_classes(path)
    files = lambda root: imagefolder_files(path)  # noqa: E731 (the path is part of the name, not --data-dir)
    return DatasetInfo(
        f"imagefolder:{arg}", len(classes), 224, 3, IMAGENET_MEAN, IMAGENET_STD, crop_padding=28, flip=True,
        load=files_loader(files, 224, "imagefolder"), files=files,
        defaults=dict(model="resnet18", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4),
        description=f"{len(classes)} classes in {path}",
    )


register_family("imagefolder", _imagefolder_info, "PATH/train/<class>/<image>, PATH/val/<class>/<image> "
                "(ImageNet layout; 224x224 by default, in memory or streaming)")
