"""The two batch loaders of a run, on one base class.

``DeviceLoader`` batches a device-resident uint8 data set and augments it on the device
(random crop with zero padding, horizontal flip): no per-sample Python in the hot loop.
``StreamLoader`` decodes image files in DataLoader workers every epoch (RandomResizedCrop +
flip) and moves uint8 batches through pinned memory, or (``decode="gpu"``) has the workers read
JPEG files and the training process decode them in batches on the device. ``BatchLoader``
holds what they share: the number of batches, the epoch's sample order drawn from the loader's
generator, the normalisation on the device, data-parallel sharding, and the generator's state
for resume.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from mixbench import UsageError
from mixbench.data.augment import random_crop, random_hflip
from mixbench.data.files import default_num_workers, open_rgb
from mixbench.data.jpeg import Encoded, assemble, collate, read_jpeg
from mixbench.data.registry import Samples

Batch = Tuple[torch.Tensor, torch.Tensor]
DECODE_CHOICES = ("cpu", "gpu")  # the streaming loader's decoding: PIL in the workers, or decode_jpeg on the device


class BatchLoader:
    """Normalised batches ``(x, y)`` on ``device``: ``x`` float32 (N, C, H, W), ``y`` int64 labels.

    ``train=True`` shuffles, drops the last incomplete batch and augments; the order and
    the augmentation draws come from ``generator`` (seeded by ``seed``), whose state
    ``state_dict`` exposes for exact resume at an epoch boundary. ``shard(rank, world)``
    makes a training loader yield only rank ``rank``'s contiguous ``1/world`` of every
    global batch; ``eval_shard`` gives a loader over a rank's share of the samples.
    Subclasses give the number of samples (``_num_items``), the global batches of an epoch
    order (``_batches``) and a contiguous selection of the samples (``_select``).
    """

    def __init__(self, *, batch_size: int, mean, std, device: torch.device, train: bool, seed: int,
                 channels_last: bool, generator_device: torch.device):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.generator = torch.Generator(device=generator_device)
        self.generator.manual_seed(seed)
        self.rank, self.world = 0, 1

    # -- subclasses -----------------------------------------------------------
    def _num_items(self) -> int:
        raise NotImplementedError

    def _batches(self, order: torch.Tensor) -> Iterator[Batch]:
        """uint8 images and labels of this rank's part of each global batch of ``order``."""
        raise NotImplementedError

    def _select(self, lo: int, hi: int) -> None:
        """Keep only the samples ``lo:hi`` (on a copy made by ``eval_shard``)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def __len__(self) -> int:
        n = self._num_items()
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples of an epoch, over all the ranks."""
        return len(self) * self.batch_size if self.train else self._num_items()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def shard(self, rank: int, world: int) -> None:
        """Yield only rank ``rank``'s contiguous ``1/world`` of each global batch (data-parallel runs);
        the order and the augmentation draws stay those of the global batch."""
        if self.batch_size % world:
            raise UsageError(f"batch_size {self.batch_size} must be divisible by the {world} processes of the run")
        self.rank, self.world = rank, world

    def _rank_part(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous share of global batches laid out along ``dim`` (all of it unsharded)."""
        if self.world == 1 or not self.train:
            return t
        per = t.shape[dim] // self.world
        return t.narrow(dim, self.rank * per, per)

    def eval_shard(self, rank: int, world: int) -> "BatchLoader":
        """A copy over rank ``rank``'s contiguous share of the samples (a data-parallel run's test set)."""
        n = self._num_items()
        part = copy.copy(self)
        part._select(rank * n // world, (rank + 1) * n // world)
        return part

    def _epoch_order(self) -> torch.Tensor:
        """The samples of this epoch's ``len(self)`` global batches, in order (training: shuffled)."""
        n = self._num_items()
        if self.train:
            order = torch.randperm(n, device=self.generator.device, generator=self.generator)
            return order[: len(self) * self.batch_size]
        return torch.arange(n, device=self.generator.device)

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self._batches(self._epoch_order()):
            yield self.normalise(x), y

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class DeviceLoader(BatchLoader):
    """Batches of a device-resident uint8 data set, augmented (crop, flip) and normalised on the device.

    The crops and flips are drawn for the whole global batch, after the epoch's order.
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
        super().__init__(batch_size=batch_size, mean=mean, std=std, device=device, train=train, seed=seed,
                         channels_last=channels_last, generator_device=torch.device(device))
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.crop_padding = crop_padding
        self.flip = flip

    def _num_items(self) -> int:
        return len(self.labels)

    def _select(self, lo: int, hi: int) -> None:
        self.images, self.labels = self.images[lo:hi], self.labels[lo:hi]

    def _batches(self, order: torch.Tensor) -> Iterator[Batch]:
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = random_crop(x, self.crop_padding, self.generator)
                if self.flip:
                    x = random_hflip(x, self.generator)
            yield self._rank_part(x), self._rank_part(self.labels[idx])


class _StreamImages(torch.utils.data.Dataset):
    """Decodes one image file per item. Training items get RandomResizedCrop (+ flip) drawn from a seed
    made of the epoch's seed and the item's index, so the stream does not depend on the number of workers.

    ``decode="gpu"``: a JPEG item is the file's bytes with the crop box and flip the PIL path draws for
    it (:class:`mixbench.data.jpeg.Encoded`), decoded in the training process; other files (PNG, CMYK
    JPEG...) are still decoded here by PIL.
    """

    def __init__(self, samples: Samples, size: int, train: bool, flip: bool, decode: str = "cpu"):
        import torchvision.transforms as T

        # numpy arrays, not a list of tuples: forked workers then share the pages (no reference-count writes)
        self.paths = np.array([path.encode() for path, _ in samples])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.train, self.epoch_seed, self.decode = train, 0, decode
        if train:
            self.crop, self.hflip = T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip() if flip else None
            steps = [self.crop] + ([self.hflip] if flip else [])
        else:
            steps = [T.Resize(round(size / 0.875), antialias=True), T.CenterCrop(size)]
        self.transform = T.Compose(steps + [T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        path, label = self.paths[i].decode(), int(self.labels[i])
        if self.decode == "gpu":
            data, img = read_jpeg(path)
            if data is not None:
                return self._draws(data, img, i), label
            img = img.convert("RGB")
        else:
            img = open_rgb(path)
        if not self.train:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(i))
            return self.transform(img), label

    def _seed(self, i: int) -> int:
        return (self.epoch_seed + i * 1_000_003) % 2**63

    def _draws(self, data: torch.Tensor, img, i: int) -> Encoded:
        """Item ``i``'s bytes with the crop box and flip that ``self.transform`` draws for it (same seed,
        same calls in the same order); ``img`` is opened lazily, only its size is read."""
        width, height = img.size
        if not self.train:
            return Encoded(data, (0, 0, height, width), False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(i))
            box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
            flipped = bool(torch.rand(1) < self.hflip.p) if self.hflip is not None else False
        return Encoded(data, tuple(box), flipped)


class StreamLoader(BatchLoader):
    """Batches decoded from image files by DataLoader workers, normalised on the device.

    Training batches get RandomResizedCrop and flip; images travel as uint8 through pinned
    memory. After the epoch's order the generator draws the epoch's augmentation seed; a
    sharded loader decodes only its rank's share (the per-image seeds do not depend on the rank).

    ``decode="gpu"``: the workers only read JPEG files and draw their crops and flips; the batch is
    decoded, cropped, resized and flipped on ``device`` (:mod:`mixbench.data.jpeg`; on a CPU device the
    same code runs with the CPU decoder). The draws are the PIL path's, and so is the resume state.
    Other files (PNG, CMYK JPEG...) fall back to PIL decoding in the workers.
    """

    def __init__(
        self,
        samples: Samples,
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
        decode: str = "cpu",
    ):
        super().__init__(batch_size=batch_size, mean=mean, std=std, device=device, train=train, seed=seed,
                         channels_last=channels_last, generator_device=torch.device("cpu"))
        if decode not in DECODE_CHOICES:
            raise UsageError(f"unknown decode {decode!r}; choose from: {', '.join(DECODE_CHOICES)}")
        self.samples, self.image_size, self.decode = samples, image_size, decode
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.dataset = _StreamImages(samples, image_size, train, flip, decode)

    def _num_items(self) -> int:
        return len(self.samples)

    def _select(self, lo: int, hi: int) -> None:
        self.samples = self.samples[lo:hi]
        self.dataset = copy.copy(self.dataset)
        self.dataset.paths, self.dataset.labels = self.dataset.paths[lo:hi], self.dataset.labels[lo:hi]

    def _batches(self, order: torch.Tensor) -> Iterator[Batch]:
        if self.train:
            self.dataset.epoch_seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            order = self._rank_part(order.view(len(self), self.batch_size), dim=1)
        batch_size = order.shape[-1] if self.train else self.batch_size
        on_device = self.decode == "gpu"
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=order.reshape(-1).tolist(), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda" and not on_device, generator=torch.Generator().manual_seed(0),
            prefetch_factor=4 if self.num_workers else None, collate_fn=collate if on_device else None,
        )
        for batch in loader:
            if on_device:
                yield assemble(batch, self.image_size, self.train, self.device), batch.labels.to(self.device)
            else:
                x, y = batch
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
