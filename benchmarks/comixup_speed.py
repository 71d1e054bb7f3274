"""Co-Mixup speed on one batch (CIFAR shape: 32x32, batch 100, the authors' defaults), in CPU time.

1. Mixing (everything after the saliency): the authors' ``mixup_process``
   (snu-mllab/Co-Mixup ``mixup.py``/``match.py``, loaded from ``--reference``
   or ``$COMIXUP_REFERENCE``, its device forced to the CPU) against
   ``co_mixup`` serially (``workers=0``) and with the worker pool, on the same
   batch, saliency and random draws (the results are compared too).
2. One training step (forward, backward, SGD) of the full PreActResNet-18
   (``preactresnet18``): vanilla against Co-Mixup (saliency pass with the
   clean-input loss, mixing, forward/backward), steps alternated.

    python benchmarks/comixup_speed.py [--reference PATH] [--repeat 5] [--steps 3] [--workers N]

Times are CPU seconds (``time.process_time``: other jobs on a shared machine
slow the wall clock, not the CPU time a process uses). With the pool, the main
process's CPU time leaves out the workers'; the table shows both, and wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from mixbench.losses import soft_cross_entropy
from mixbench.methods import comixup as cm
from mixbench.methods import create_method
from mixbench.models import create_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from comixup_reference import load_comixup, reference_draws  # noqa: E402  (shared with tests/test_comixup.py)

MEAN = torch.tensor([0.5071, 0.4865, 0.4409]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.2673, 0.2564, 0.2762]).reshape(1, 3, 1, 1)


def worker_cpu(pool) -> float:
    """CPU seconds used so far by the pool's worker processes (Linux /proc; 0 elsewhere)."""
    executor = getattr(pool, "_executor", None)
    if executor is None:
        return 0.0
    total = 0.0
    for pid in list(getattr(executor, "_processes", {}) or {}):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(fn, pool=None):
    """(main-process CPU s, main + workers CPU s, wall s, result) of one call."""
    w0, c0, t0 = worker_cpu(pool), time.process_time(), time.perf_counter()
    result = fn()
    c1, t1 = time.process_time(), time.perf_counter()
    return c1 - c0, c1 - c0 + worker_cpu(pool) - w0, t1 - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--reference", default=os.environ.get("COMIXUP_REFERENCE"),
                        help="a checkout of snu-mllab/Co-Mixup (default: $COMIXUP_REFERENCE)")
    parser.add_argument("--repeat", type=int, default=5, help="mixing timings, one draw each (median)")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per method (median)")
    parser.add_argument("--workers", type=int, default=None, help="pool workers (default: cores - 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    n = args.batch_size
    model = create_model("preactresnet18", num_classes=100, image_size=32).train()
    x = F.avg_pool2d((torch.rand(n, 3, 32, 32) - MEAN) / STD, 3, 1, 1)
    y = F.one_hot(torch.arange(n) % 100, 100).float()
    method = create_method("comixup", workers=args.workers)
    method.setup(seed=0, num_classes=100, mean=MEAN.flatten(), std=STD.flatten())
    saliency, _, _ = method_saliency(model, x, y)
    A_dist = cm.compatibility(saliency)
    hyper = method.hyper()
    pool = method.pool
    reference = load_comixup(args.reference) if args.reference else None
    ref_args = types.SimpleNamespace(
        m_block_num=method.block_num, m_part=method.part, m_beta=method.beta, m_gamma=method.gamma,
        m_eta=method.eta, mixup_alpha=method.alpha, m_thres=method.thres, m_thres_type=method.thres_type,
        set_resolve=method.set_resolve, m_niter=method.niter, m_omega=method.omega,
    )
    serial = cm.ChunkPool(0)
    warm = reference_draws(99, n, method.part, method.block_num, method.alpha)
    cm.co_mixup(x, y, saliency, A_dist, method.block_num, *warm, pool=pool, **hyper)  # starts the pool

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores {cores}, torch threads {torch.get_num_threads()}, pool workers {pool.workers}, "
          f"load average {os.getloadavg()[0]:.1f}, batch {n} x 3 x 32 x 32, block_num {method.block_num}, "
          f"part {method.part}, niter {method.niter}")
    rows = {"reference mixup_process": [], "co_mixup, workers=0": [], f"co_mixup, {pool.workers} worker(s)": []}
    same = True
    for seed in range(args.repeat):
        if reference is not None:
            draws = reference_draws(seed, n, method.part, method.block_num, method.alpha)
            r = measure(lambda: reference.mixup_process(x.clone(), y.clone(), args=ref_args, sc=saliency.clone(),
                                                        A_dist=A_dist.clone()))
            rows["reference mixup_process"].append(r[:3])
            want = r[3]
        else:
            draws = reference_draws(seed, n, method.part, method.block_num, method.alpha)
            want = None
        s = measure(lambda: cm.co_mixup(x, y, saliency, A_dist, method.block_num, *draws, pool=serial, **hyper))
        p = measure(lambda: cm.co_mixup(x, y, saliency, A_dist, method.block_num, *draws, pool=pool, **hyper),
                    pool)
        rows["co_mixup, workers=0"].append(s[:3])
        rows[f"co_mixup, {pool.workers} worker(s)"].append(p[:3])
        same &= torch.equal(s[3][0], p[3][0]) and torch.equal(s[3][1], p[3][1])
        if want is not None:
            same &= torch.equal(s[3][0], want[0]) and torch.equal(s[3][1], want[1])

    print()
    print(f"mixing one batch (ms, median of {args.repeat} draws; the same draws for every row)")
    print(f"{'':<28} {'CPU main':>9} {'CPU all':>9} {'wall':>9} {'vs reference (CPU all)':>24}")
    base = statistics.median(r[1] for r in rows["reference mixup_process"]) if reference is not None else None
    for name, vals in rows.items():
        if not vals:
            print(f"{name:<28} {'(no --reference / $COMIXUP_REFERENCE)':>40}")
            continue
        med = [statistics.median(v[i] for v in vals) for i in range(3)]
        ratio = f"{base / med[1]:.2f}x faster" if base else ""
        print(f"{name:<28} {1e3 * med[0]:>9.1f} {1e3 * med[1]:>9.1f} {1e3 * med[2]:>9.1f} {ratio:>24}")
    print(f"same mixed batch and targets in every row: {same}")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(kind):
        if kind == "vanilla":
            logits, target, extra = model(x), y, None
        else:
            out = method(model, x, y)
            logits, target, extra = out.logits, out.target, out.extra_loss
        loss = soft_cross_entropy(logits, target) + (0 if extra is None else extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    kinds = ("vanilla", "comixup")
    for kind in kinds:  # warm-up
        step(kind)
    times = {kind: [] for kind in kinds}
    for _ in range(args.steps):  # alternate, so that changes in the machine's load hit both alike
        for kind in kinds:
            times[kind].append(measure(lambda: step(kind), pool if kind == "comixup" else None)[:3])
    med = {k: [statistics.median(v[i] for v in times[k]) for i in range(3)] for k in kinds}
    print()
    print(f"training step, PreActResNet-18 (preactresnet18), 32x32, batch {n} (s, median of {args.steps})")
    print(f"{'':<10} {'CPU main':>9} {'CPU all':>9} {'wall':>9} {'x vanilla (CPU all)':>20}")
    for k in kinds:
        print(f"{k:<10} {med[k][0]:>9.2f} {med[k][1]:>9.2f} {med[k][2]:>9.2f} "
              f"{med[k][1] / med['vanilla'][1]:>19.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    method.close()


def method_saliency(model, x, y):
    from mixbench.methods import input_gradient_saliency

    return input_gradient_saliency(model, x, y, train_mode=True)


if __name__ == "__main__":
    main()
