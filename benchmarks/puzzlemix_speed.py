"""PuzzleMix speed on one batch, in one process.

1. Mixing time per grid size: ``puzzle_mix`` (graph cuts in the worker pool,
   vectorised transport) against a straightforward serial loop over the batch
   (one graph cut and one dense-plan transport per sample, as the reference
   code does them), and ``puzzle_mix`` without the pool.
2. One training step (forward, backward, SGD) of PreActResNet-18 at 32x32:
   vanilla against PuzzleMix (saliency pass + mixing + forward/backward),
   averaged over steps so the uniform grid draw is represented.

    python benchmarks/puzzlemix_speed.py [--batch-size 64] [--steps 12] [--workers N]

Timings depend on the cores free at the time: the table prints the load average;
mixing times are the best of --repeat runs, step times the median of alternating steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from mixbench.losses import soft_cross_entropy
from mixbench.methods import MixOutput, create_method
from mixbench.methods import puzzlemix as pm
from mixbench.models import create_model

MEAN = torch.tensor([0.5071, 0.4865, 0.4409]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.2673, 0.2564, 0.2762]).reshape(1, 3, 1, 1)


def dense_plan(mask: torch.Tensor, unary: torch.Tensor, t_eps: float) -> torch.Tensor:
    """The greedy transport with dense (n^2, n^2) plans per round, for one sample (the straightforward way)."""
    side = mask.shape[-1]
    n2 = side * side
    cost = t_eps * pm.cost_matrix(side, mask.device) - unary.reshape(n2, 1) * (mask > 0).float().reshape(1, n2)
    for _ in range(side):
        plan = torch.zeros_like(cost).scatter_(-1, cost.min(-1).indices[:, None], 1)
        fight = plan * cost
        win = torch.zeros_like(cost).scatter_(0, fight.min(0).indices[None], 1) * plan
        cost += plan - win
    has = win.sum(0) > 0
    return torch.where(has, win.argmax(0), -1)


def serial_mix(x, saliency, perm, lam, block_num, hyper):
    """One sample at a time: graph cut, then transport of both images with dense plans."""
    n, _, _, width = x.shape
    unary, pw_v, pw_h, smooth = pm.graph_cut_costs(
        x, saliency, perm, lam, block_num, mean=MEAN, std=STD, beta=hyper["beta"], gamma=hyper["gamma"],
        eta=hyper["eta"], neigh_size=hyper["neigh_size"], n_labels=hyper["n_labels"],
    )
    t_size = min(hyper["t_size"], width // block_num)
    side = width // t_size
    out, ratio = torch.empty_like(x), torch.empty(n)
    for i in range(n):
        labels = pm._cut_chunk(unary[i : i + 1], pw_v[i : i + 1], pw_h[i : i + 1], smooth)[0]
        mask = torch.tensor(1.0 - labels / (hyper["n_labels"] - 1), dtype=torch.float32).reshape(1, 1, block_num, -1)
        mask = F.interpolate(mask, size=side)
        imgs = []
        for img, sal, m in ((x[i], saliency[i], mask), (x[perm[i]], saliency[perm[i]], 1 - mask)):
            pooled = F.avg_pool2d(sal[None], t_size)[0]
            plan = dense_plan(m[0, 0], pooled / pooled.sum(), hyper["t_eps"])
            imgs.append(pm.transport_blocks(img[None], plan[None], side)[0])
        full = F.interpolate(mask, size=width)[0]
        out[i] = full * imgs[0] + (1 - full) * imgs[1]
        ratio[i] = full.mean()
    return out, ratio


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result  # the least disturbed run: other processes only ever add time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="training steps timed per method")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per mixing timing (best of)")
    parser.add_argument("--workers", type=int, default=None, help="graph-cut worker processes (default: cores - 1)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch_size
    model = create_model("preactresnet18", num_classes=100, image_size=32)
    x = (torch.rand(n, 3, 32, 32) - MEAN) / STD
    x = F.avg_pool2d(x, 3, 1, 1)  # some spatial structure
    y = F.one_hot(torch.arange(n) % 100, 100).float()
    method = create_method("puzzlemix", workers=args.workers)
    method.setup(seed=0, num_classes=100, mean=MEAN.flatten(), std=STD.flatten())
    model.train()
    saliency, _, _ = method.saliency(model, x, y)
    hyper = method.hyper()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    lam = 0.4
    pool = method.pool
    pm.puzzle_mix(x, saliency, perm, lam, 16, mean=MEAN, std=STD, pool=pool, **hyper)  # start the pool

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores {cores}, torch threads {torch.get_num_threads()}, graph-cut workers {pool.workers}, "
          f"load average {os.getloadavg()[0]:.1f}, batch {n} x 3 x 32 x 32")
    print()
    print(f"mixing time per batch (ms, best of {args.repeat})")
    print(f"{'grid':>6} {'serial loop':>12} {'no pool':>9} {'puzzle_mix':>11} {'speed-up':>9}  same result")
    rows = []
    for block_num in (2, 4, 8, 16):
        t_serial, ref = timed(lambda: serial_mix(x, saliency, perm, lam, block_num, hyper), args.repeat)
        t_nopool, _ = timed(lambda: pm.puzzle_mix(x, saliency, perm, lam, block_num, mean=MEAN, std=STD, **hyper),
                            args.repeat)
        t_fast, got = timed(
            lambda: pm.puzzle_mix(x, saliency, perm, lam, block_num, mean=MEAN, std=STD, pool=pool, **hyper),
            args.repeat,
        )
        same = torch.equal(ref[0], got[0]) and torch.allclose(ref[1], got[1])
        rows.append((t_serial, t_fast))
        print(f"{block_num:>6} {1e3 * t_serial:>12.1f} {1e3 * t_nopool:>9.1f} {1e3 * t_fast:>11.1f} "
              f"{t_serial / t_fast:>8.1f}x  {same}")
    mean_serial, mean_fast = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
    print(f"{'mean':>6} {1e3 * mean_serial:>12.1f} {'':>9} {1e3 * mean_fast:>11.1f} {mean_serial / mean_fast:>8.1f}x")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(fn):
        out = fn()
        loss = soft_cross_entropy(out.logits, out.target) + (0 if out.extra_loss is None else out.extra_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed_step(fn):
        t0 = time.perf_counter()
        step(fn)
        return time.perf_counter() - t0

    vanilla, puzzle = (lambda: MixOutput(model(x), y)), (lambda: method(model, x, y))
    timed_step(vanilla), timed_step(puzzle)  # warm-up
    # Alternate the two step by step so that changes in the machine's load hit both alike.
    t_vanilla, t_puzzle = [], []
    for _ in range(args.steps):
        t_vanilla.append(timed_step(vanilla))
        t_puzzle.append(timed_step(puzzle))
    t_vanilla, t_puzzle = statistics.median(t_vanilla), statistics.median(t_puzzle)
    print()
    print(f"training step, PreActResNet-18, 32x32, batch {n} (median of {args.steps} alternating steps each)")
    print(f"  vanilla    {1e3 * t_vanilla:8.1f} ms")
    print(f"  puzzlemix  {1e3 * t_puzzle:8.1f} ms   {t_puzzle / t_vanilla:.2f}x vanilla")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    method.close()


if __name__ == "__main__":
    main()
