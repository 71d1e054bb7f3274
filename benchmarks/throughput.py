"""Training throughput of every registered method, relative to vanilla, in one process.

Each method trains the same model (a copy of one initialisation) on the same
random batch: ``method(model, x, y)``, soft-target cross-entropy, backward, SGD
step and the method's ``after_step`` (its own modules bound and optimised as in the
harness), exactly the work of one step of the training loop (bf16 autocast and
channels_last on CUDA, as there). Methods are timed in interleaved rounds, in a
rotated order each round, so that a load change on a shared machine hits every
method alike; the table gives the median over rounds.

    python benchmarks/throughput.py                                   # all methods, CPU defaults
    python benchmarks/throughput.py --model preactresnet18 --batch-size 100 --device cuda
    python benchmarks/throughput.py --methods vanilla,catchup_mix --steps 50 --rounds 5
    python benchmarks/throughput.py --threads 1 --clock cpu                # on a busy shared CPU

Vanilla is always measured (it is the reference of the ratio column).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.losses import soft_cross_entropy
from mixbench.methods import create_method, get_method, list_methods
from mixbench.models import create_model


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="preactresnet18_w16", help="timm name or alias (default: preactresnet18_w16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method per round (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default: 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before the first round")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
                        "(use with --threads 1; ignored on CUDA, which is always timed by wall clock)")
    p.add_argument("--no-amp", action="store_true", help="on CUDA, train in float32 instead of bf16 autocast")
    p.add_argument("--methods", default="all", help="'all' or a comma-separated list (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace):
    if args.methods.strip() == "all":  # every method whose dependencies (or extractor) are there
        names = [m for m in list_methods() if get_method(m).available()]
        for m in sorted(set(list_methods()) - set(names)):
            print(f"throughput: skipping {m}: {get_method(m).unavailable_reason()}", file=sys.stderr)
    else:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods is empty; give 'all' or a comma-separated list")
    for name in names:
        create_method(name)  # unknown names: a usage error listing the registered ones
    if "vanilla" not in names:
        names.insert(0, "vanilla")
    for flag in ("batch_size", "image_size", "in_chans", "num_classes", "steps", "rounds"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive integer")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r}: choose from auto, cpu, cuda, cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device!r}: choose from auto, cpu, cuda, cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device!r}: CUDA is not available on this machine; choose from: auto, cpu")
    return names, device


def main(argv: List[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names, device = resolve(args)
    except UsageError as exc:
        print(f"throughput: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter
    amp = cuda and not args.no_amp
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    fmt = torch.channels_last if cuda else torch.contiguous_format

    torch.manual_seed(args.seed)
    base = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, image_size=args.image_size)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.in_chans, args.image_size, args.image_size, generator=g)
    x = x.to(device).contiguous(memory_format=fmt)
    y = F.one_hot(torch.randint(args.num_classes, (args.batch_size,), generator=g), args.num_classes).float().to(device)

    runs: Dict[str, dict] = {}
    for name in names:
        model = copy.deepcopy(base).to(device, memory_format=fmt).train()
        method = create_method(name)
        method.setup(seed=args.seed, num_classes=args.num_classes, mean=[0.5] * args.in_chans, std=[0.25] * args.in_chans)
        method.bind(model)  # a method's own modules (AutoMix's MixBlock and momentum model), as the harness does
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for group in method.param_groups():
            optimizer.add_param_group(group)
        runs[name] = {"model": model, "method": method, "opt": optimizer, "rates": [], "steps": 0}

    def step(run) -> None:
        with autocast():
            out = run["method"](run["model"], x, y)
        loss = soft_cross_entropy(out.logits, out.target)
        if out.extra_loss is not None:
            loss = loss + out.extra_loss
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()
        run["method"].after_step(run["model"], run["steps"], 10**6)
        run["steps"] += 1

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        for name in names:
            for _ in range(args.warmup):
                step(runs[name])
        sync()
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = clock()
                for _ in range(args.steps):
                    step(runs[name])
                sync()
                runs[name]["rates"].append(args.steps * args.batch_size / (clock() - t0))
    finally:
        for run in runs.values():
            run["method"].close()

    what = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, device {what}"
          f"{', bf16 autocast' if amp else ''}; {'CPU' if clock is time.process_time else 'wall'} clock, "
          f"{args.steps} steps x {args.rounds} rounds, median; torch {torch.__version__}")
    print()
    print("| method | images/s | ms/step | vs vanilla |")
    print("|---|---:|---:|---:|")
    ref = statistics.median(runs["vanilla"]["rates"])
    for name in names:
        rate = statistics.median(runs[name]["rates"])
        print(f"| {name} | {rate:.1f} | {1000 * args.batch_size / rate:.1f} | {rate / ref:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
