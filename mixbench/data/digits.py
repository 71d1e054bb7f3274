"""scikit-learn's handwritten digits, embedded in the package (no download)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixbench.data.augment import resize_uint8
from mixbench.data.registry import Arrays, DatasetInfo, register_dataset

DIGITS_SIZE = 16


def load_digits(root: Path, download: bool) -> Arrays:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).

    Fixed stratified split (25% test, random_state 0), upsampled to 16x16 and
    replicated to 3 channels so that the ImageNet-style models take it unchanged.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).round().to(torch.uint8)
    images = resize_uint8(images[:, None], DIGITS_SIZE).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.25, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


register_dataset(DatasetInfo(
    "digits", 10, DIGITS_SIZE, 3, (0.5,) * 3, (0.5,) * 3, crop_padding=2, flip=False, load=load_digits,
    defaults=dict(model="preactresnet18_w16", epochs=15, batch_size=64, lr=0.1, weight_decay=5e-4, loss="bce"),
    description="scikit-learn digits, 1,347 train / 450 test, 16x16 (embedded, no download)",
))
