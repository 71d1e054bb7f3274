"""Decoded training images per second, and per core, of the streaming ImageFolder loader.

The loader of the ImageNet protocol (``mixbench.data.StreamLoader``): JPEG decoding, RandomResizedCrop
and flip in DataLoader worker processes, uint8 batches to the training process. For each number of
workers the table gives the wall-clock rate and the rate per CPU-second (the training process and its
workers together: images per second per core, the number that sizes ``MIXBENCH_WORKERS`` and a
node's cores per GPU on a shared machine).

Each worker count is measured for both decode paths (``--decode``): ``cpu`` (PIL in the workers) and
``gpu`` (the workers read the files; ``torchvision.io.decode_jpeg`` decodes the batch on the device,
crops, resizes and flips there). The ``decoder`` column names where the JPEGs were decoded: on a
machine without CUDA (or with ``--device cpu``) the gpu row measures the CPU's decode_jpeg, labelled
``decode_jpeg (cpu)``. The device's own time is not counted in the CPU seconds.

    python benchmarks/decode_throughput.py --data-dir /data/imagenet --workers 0,2,4,8 --batches 50
    python benchmarks/decode_throughput.py --generate 512          # a generated ImageNet-like tree
    python benchmarks/decode_throughput.py --generate 64 --batches 2 --json out.json   # a quick check
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np


def generate_tree(root: Path, n: int, classes: int = 8, size=(375, 500)) -> Path:
    """``n`` random JPEGs of ImageNet's typical size in ImageFolder layout (train and a small val)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth random images compress like photographs, unlike white noise
            small = rng.integers(0, 256, (size[0] // 25, size[1] // 25, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size[::-1], Image.BILINEAR).save(folder / f"{i}.JPEG", "JPEG", quality=90)
    return root


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once they have exited
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(root: Path, workers: int, batches: int, batch_size: int, image_size: int, decode: str = "cpu",
            device: str = "cpu") -> Dict[str, float]:
    import torch

    from mixbench.data import IMAGENET_MEAN, IMAGENET_STD, StreamLoader, imagefolder_files

    train, _ = imagefolder_files(root)
    if len(train) < batch_size:
        raise SystemExit(f"{root}: {len(train)} training images, fewer than one batch of {batch_size}")
    loader = StreamLoader(train, image_size=image_size, batch_size=batch_size, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, device=device, train=True, num_workers=workers, decode=decode)
    images, wall0, cpu0 = 0, time.perf_counter(), _cpu_seconds()
    while images < batches * batch_size:
        for x, _ in loader:
            images += len(x)
            if images >= batches * batch_size:
                break
    del x
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall0
    time.sleep(0.2)  # let the exited workers be reaped, so that their CPU time is counted
    cpu = _cpu_seconds() - cpu0
    decoder = "PIL (workers)" if decode == "cpu" else f"decode_jpeg ({torch.device(device).type})"
    return {"decode": decode, "decoder": decoder, "workers": workers, "images": images, "wall_s": wall, "cpu_s": cpu,
            "images_per_s": images / wall, "images_per_cpu_s": images / cpu if cpu > 0 else float("nan")}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="an ImageFolder tree (PATH/train/<class>/*.JPEG, PATH/val/...)")
    p.add_argument("--generate", type=int, metavar="N", help="measure on N generated 500x375 JPEGs instead")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts (default: 0,2)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--decode", default="cpu,gpu", help="comma-separated decode paths: cpu, gpu (default: both)")
    p.add_argument("--device", default="auto", help="the training device: auto (CUDA if any), cpu, cuda:N")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if (args.data_dir is None) == (args.generate is None):
        p.error("give one of --data-dir PATH or --generate N")
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    decodes = [d.strip() for d in args.decode.split(",") if d.strip()]
    if not decodes or set(decodes) - {"cpu", "gpu"}:
        p.error(f"--decode must list cpu and/or gpu, got {args.decode!r}")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or generate_tree(Path(tmp) / "imagenet", args.generate)
        rows = [measure(root, w, args.batches, args.batch_size, args.image_size, d, device)
                for d in decodes for w in workers]
    print(f"{'decoder':<18} {'workers':>7} {'images':>7} {'wall s':>8} {'CPU s':>8} {'images/s':>9} "
          f"{'images/s/core':>13}")
    for r in rows:
        print(f"{r['decoder']:<18} {r['workers']:7d} {r['images']:7d} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} "
              f"{r['images_per_s']:9.1f} {r['images_per_cpu_s']:13.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
