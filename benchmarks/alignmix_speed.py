"""AlignMix speed on one batch, in one process.

1. The alignment alone (``align_mix_features``: cost tensor, Sinkhorn, the two matrix products) on the
   last-stage maps of the model for the batch, and the number of Sinkhorn rounds it ran.
2. One training step (forward, backward, SGD) of the model: vanilla against AlignMix with its defaults
   (input mixup or aligned mixup at the last stage, 50/50) and AlignMix always aligning
   (``mix_points=(5,)``, the slower branch), timed in interleaved rounds (rotated order), median.

    python benchmarks/alignmix_speed.py                      # preactresnet18, batch 100, 32 px, 1 thread
    python benchmarks/alignmix_speed.py --steps 8 --rounds 5

CPU time (``time.process_time``) by default, steadier than wall time on a shared machine; the table
prints the load average.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mixbench.hooks import replace_stage_output
from mixbench.losses import soft_cross_entropy
from mixbench.methods import alignmix as am
from mixbench.methods import create_method
from mixbench.models import create_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="preactresnet18")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round (default: 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default: 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(args.seed)
    base = create_model(args.model, num_classes=args.num_classes, image_size=args.image_size)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = F.one_hot(torch.randint(args.num_classes, (args.batch_size,), generator=g), args.num_classes).float()

    # 1. The alignment alone, on the model's last-stage maps.
    captured = []
    with torch.no_grad(), replace_stage_output(base, 5, lambda h: captured.append(h) or h):
        base(x)
    h = captured[0]
    perm = torch.randperm(args.batch_size, generator=g)
    calls = [0]
    real = am._modified_cost

    def counting(*a):
        calls[0] += 1
        return real(*a)

    am._modified_cost = counting
    times = []
    for direction in (0, 1, 0, 1):
        calls[0] = 0
        t0 = clock()
        am.align_mix_features(h, perm, 0.5, direction)
        times.append(clock() - t0)
    am._modified_cost = real
    rounds = (calls[0] - 1) // 2

    # 2. Training steps.
    configs = {"vanilla": ("vanilla", {}), "alignmix": ("alignmix", {}),
               "alignmix, always aligned": ("alignmix", {"mix_points": (5,)})}
    runs = {}
    for label, (name, params) in configs.items():
        model = copy.deepcopy(base).train()
        method = create_method(name, **params)
        method.setup(seed=args.seed, num_classes=args.num_classes, mean=[0.5] * 3, std=[0.25] * 3)
        runs[label] = dict(model=model, method=method, opt=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
                           times=[])

    def step(run):
        out = run["method"](run["model"], x, y)
        loss = soft_cross_entropy(out.logits, out.target)
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()

    labels = list(runs)
    for label in labels:
        step(runs[label])  # warm-up
    for r in range(args.rounds):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            t0 = clock()
            for _ in range(args.steps):
                step(runs[label])
            runs[label]["times"].append((clock() - t0) / args.steps)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{torch.get_num_threads()} thread(s), {'CPU' if args.clock == 'cpu' else 'wall'} clock, "
          f"{args.steps} steps x {args.rounds} rounds, median; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, load average {load:.1f}")
    print(f"alignment alone on maps {tuple(h.shape)}: {1000 * statistics.median(times):.1f} ms "
          f"(median of 4), {rounds} Sinkhorn rounds")
    print()
    print("| configuration | ms/step | vs vanilla |")
    print("|---|---:|---:|")
    ref = statistics.median(runs["vanilla"]["times"])
    for label in labels:
        t = statistics.median(runs[label]["times"])
        print(f"| {label} | {1000 * t:.0f} | {t / ref:.3f} |")


if __name__ == "__main__":
    main()
