"""The streaming loader's JPEG decoding on the training device (``decode="gpu"``).

The DataLoader workers only read a file's bytes and its header (PIL opens lazily: the size
without decoding) and draw the item's RandomResizedCrop box and flip exactly as the PIL path
would for that item (:class:`mixbench.data.loaders._StreamImages`). The training process then
decodes the whole batch with one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG,
batched, on CUDA; libjpeg-turbo on the CPU, which is how the tests run this path) and crops,
resizes (bilinear, antialiased) and flips each image on that device. Files that are not
baseline RGB or greyscale JPEGs (PNG, CMYK JPEG, a PNG named .JPEG) are decoded in the worker
by PIL, as on the CPU path, and join the batch as uint8 images; an image the batched decode
rejects is decoded alone on the device, else by PIL in the training process.
"""
from __future__ import annotations

import io
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from mixbench import UsageError

# PIL modes that decode_jpeg(mode=RGB) turns into the RGB image PIL's convert("RGB") gives.
_DEVICE_MODES = ("RGB", "L")


class Encoded(NamedTuple):
    """A worker's item for device decoding: the file's bytes and the item's augmentation draws."""

    data: torch.Tensor  # uint8 (L,): the file
    box: Tuple[int, int, int, int]  # (top, left, height, width) of the training crop; the whole image for test items
    flip: bool


class MixedBatch(NamedTuple):
    """A collated batch: device-decoded items at ``encoded_at``, worker-decoded (PIL) ones at ``decoded_at``."""

    labels: torch.Tensor  # int64 (N,)
    data: List[torch.Tensor]
    boxes: torch.Tensor  # int64 (K, 4)
    flips: torch.Tensor  # bool (K,)
    encoded_at: torch.Tensor  # int64 (K,)
    decoded: torch.Tensor  # uint8 (N - K, 3, S, S)
    decoded_at: torch.Tensor  # int64 (N - K,)


def read_jpeg(path: str):
    """``(bytes, image)``: the file as a uint8 tensor and its lazily opened PIL image (header only);
    bytes is None when decode_jpeg should not take the file (not a JPEG, or not RGB/greyscale)."""
    from PIL import Image

    try:
        raw = np.fromfile(path, dtype=np.uint8)
        img = Image.open(io.BytesIO(raw.tobytes()))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the image {path}: {exc}") from None
    if img.format == "JPEG" and img.mode in _DEVICE_MODES:
        return torch.from_numpy(raw), img
    return None, img


def collate(items: Sequence[Tuple[object, int]]) -> MixedBatch:
    """A batch of ``(Encoded | uint8 image, label)`` items."""
    enc = [k for k, (x, _) in enumerate(items) if isinstance(x, Encoded)]
    dec = [k for k, (x, _) in enumerate(items) if not isinstance(x, Encoded)]
    return MixedBatch(
        labels=torch.tensor([label for _, label in items], dtype=torch.int64),
        data=[items[k][0].data for k in enc],
        boxes=torch.tensor([items[k][0].box for k in enc], dtype=torch.int64).view(-1, 4),
        flips=torch.tensor([items[k][0].flip for k in enc], dtype=torch.bool),
        encoded_at=torch.tensor(enc, dtype=torch.int64),
        decoded=torch.stack([items[k][0] for k in dec]) if dec else torch.empty(0, dtype=torch.uint8),
        decoded_at=torch.tensor(dec, dtype=torch.int64),
    )


def _decode(data: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """uint8 (3, H, W) images on ``device``: one batched decode; if it fails, one image at a time,
    and an image the device decoder still rejects by PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for d in data:
        try:
            out.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
        except RuntimeError:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(d.numpy().tobytes())) as img:
                    rgb = np.array(img.convert("RGB"), dtype=np.uint8)
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot decode a JPEG of the batch: {exc}") from None
            out.append(torch.from_numpy(rgb).permute(2, 0, 1).to(device))
    return out


def crop_resize(img: torch.Tensor, box: Optional[Sequence[int]], flip: bool, size: int) -> torch.Tensor:
    """One decoded uint8 (3, H, W) image as the PIL path transforms it: training (``box`` given) the
    crop resized to ``size`` (bilinear, antialiased) and flipped; test (``box`` None) the shorter side
    resized to ``size / 0.875`` and the centre ``size`` x ``size``."""
    import torchvision.transforms.v2.functional as F

    if box is None:
        return F.center_crop(F.resize(img, [round(size / 0.875)], antialias=True), [size, size])
    top, left, height, width = box
    out = F.resized_crop(img, top, left, height, width, [size, size], antialias=True)
    return out.flip(-1) if flip else out


def assemble(batch: MixedBatch, size: int, train: bool, device: torch.device) -> torch.Tensor:
    """The batch's uint8 (N, 3, size, size) images on ``device``."""
    out = torch.empty((len(batch.labels), 3, size, size), dtype=torch.uint8, device=device)
    if len(batch.encoded_at):
        images = _decode(batch.data, device)
        boxes, flips = batch.boxes.tolist(), batch.flips.tolist()
        for k, img, box, flip in zip(batch.encoded_at.tolist(), images, boxes, flips):
            out[k] = crop_resize(img, box if train else None, flip, size)
    if len(batch.decoded_at):
        out[batch.decoded_at.to(device)] = batch.decoded.to(device, non_blocking=True)
    return out
