"""GuidedMixup speed: mixing time and training-step time against vanilla and the authors' code, in one process.

1. Mixing time per batch (saliency given): smoothing, pairing, masks, mixed batch and targets,
   ``guided_mixup`` against the authors' ``mixup_process`` guided branch (``mixup.py``; its greedy
   pairing ``onecycle_cover`` from ``pairing.pyx``, compiled with pyximport when possible), and the
   pairing alone (the distance matrix plus the greedy cycle).
2. One training step (forward, backward, SGD) of PreActResNet-18 (``preactresnet18``) at 32x32:
   vanilla, mixbench's ``guided_ap`` and ``guided_sr`` (with ``prob=1``: every timed step mixes), and
   the authors' Guided-AP step (``main.py`` 319-386: a train-mode forward, the backward of the mean
   cross-entropy into the weights and the input, ``zero_grad``, then ``mixup_process``) on the same
   model, batch and loss (soft-target cross-entropy).

    GUIDEDMIXUP_REFERENCE=/path/to/GuidedMixup python benchmarks/guidedmixup_speed.py [--batch-size 100]

Times are CPU time of this process (``time.process_time``, all its threads), so other jobs on the
machine add little; step times are the median of alternating steps, mixing times the best of --repeat
on one torch thread (--mix-threads).
Without GUIDEDMIXUP_REFERENCE (or --reference) the authors' columns are left out.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from mixbench.losses import soft_cross_entropy
from mixbench.methods import create_method
from mixbench.methods import guidedmixup as gm
from mixbench.models import create_model

MEAN = torch.tensor([129.3, 124.1, 112.4]).reshape(1, 3, 1, 1) / 255
STD = torch.tensor([68.2, 65.4, 70.4]).reshape(1, 3, 1, 1) / 255


def load_reference(root: str):
    """The authors' mixup.py with their compiled pairing (pyximport; as Python without a compiler)."""
    tmp = tempfile.mkdtemp(prefix="guidedmixup_pairing_")
    kind = "Cython"
    try:
        import pyximport

        shutil.copy(os.path.join(root, "pairing.pyx"), tmp)
        hooks = pyximport.install(setup_args={"include_dirs": np.get_include()}, build_dir=os.path.join(tmp, "b"),
                                  language_level=3)
        sys.path.insert(0, tmp)
        try:
            import pairing  # noqa: F401
        finally:
            sys.path.remove(tmp)
            pyximport.uninstall(*hooks)
    except Exception:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from test_guidedmixup import _pairing_module  # the pyx run as Python
        import pathlib

        os.environ.setdefault("GUIDEDMIXUP_REFERENCE", root)
        sys.modules["pairing"] = _pairing_module(pathlib.Path(tmp))
        kind = "Python"
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location("guidedmixup_reference_mixup", os.path.join(root, "mixup.py"))
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
    finally:
        sys.path.remove(root)
    original = ref.pairing
    # Their CIFAR dispatch sends --condition greedy to pairing(condition='greedy_c'), which falls through to a
    # random permutation; the greedy pairing is what the paper and the FGVC code run, so it is routed there.
    ref.pairing = lambda sc, condition, distance_metric: original(sc, condition="greedy",
                                                                 distance_metric=distance_metric)
    args = SimpleNamespace(mixup_alpha=None, in_batch=False, mean=MEAN, std=STD, box=False, graph=False, beta=1.2,
                           gamma=0.5, eta=0.2, neigh_size=4, n_labels=3, transport=True, t_eps=0.8, t_size=-1,
                           guided=True, condition="greedy", comixup=False, block_num=None)
    return ref, args, kind


def cpu_timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        result = fn()
        times.append(time.process_time() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per variant")
    parser.add_argument("--repeat", type=int, default=20, help="repeats per mixing timing (best of)")
    parser.add_argument("--mix-threads", type=int, default=1,
                        help="torch threads for the mixing timings (default 1: on a busy machine the spin-waits of "
                             "idle threads dominate the CPU time of such small operations)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reference", default=os.environ.get("GUIDEDMIXUP_REFERENCE"),
                        help="a checkout of 3neutronstar/GuidedMixup (default: $GUIDEDMIXUP_REFERENCE)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch_size
    model = create_model("preactresnet18", num_classes=100, image_size=32).train()
    x = F.avg_pool2d((torch.rand(n, 3, 32, 32) - MEAN) / STD, 3, 1, 1)  # some spatial structure
    labels = torch.arange(n) % 100
    y = F.one_hot(labels, 100).float()
    ap = create_method("guided_ap", prob=1.0)
    sr = create_method("guided_sr", prob=1.0)
    for m in (ap, sr):
        m.setup(seed=0, num_classes=100, mean=MEAN.flatten(), std=STD.flatten())
    ref = ref_args = None
    kind = "-"
    if args.reference:
        ref, ref_args, kind = load_reference(args.reference)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"batch {n} x 3 x 32 x 32, CPU time (process_time)")
    if ref is not None:
        print(f"reference: {args.reference} (pairing.pyx as {kind})")
    print()

    saliency, _ = ap.saliency(model, x, y)
    step_threads = torch.get_num_threads()
    torch.set_num_threads(args.mix_threads)
    print(f"mixing time per batch, saliency given (ms, best of {args.repeat}, {args.mix_threads} torch thread(s))")
    print(f"{'':>22} {'mixbench':>9} {'authors':>9}  same result")
    ours_t, ours = cpu_timed(lambda: gm.guided_mixup(x, y, saliency), args.repeat)
    row = f"{'smooth+pair+mix':>22} {1e3 * ours_t:>9.1f}"
    if ref is not None:
        ref_t, want = cpu_timed(lambda: ref.mixup_process(x.clone(), y.clone(), args=ref_args, grad=saliency.clone()),
                                args.repeat)
        row += f" {1e3 * ref_t:>9.1f}  {torch.equal(ours[0], want[0]) and torch.equal(ours[1], want[1])}"
    print(row)
    sc = gm.smooth_saliency(saliency)
    ours_t, perm = cpu_timed(lambda: gm.greedy_pairing(gm.saliency_distances(sc)), args.repeat)
    row = f"{'pairing (dist+greedy)':>22} {1e3 * ours_t:>9.1f}"
    if ref is not None:
        ref_t, want = cpu_timed(lambda: ref.pairing(sc.clone(), "greedy", "l2"), args.repeat)
        row += f" {1e3 * ref_t:>9.1f}  {perm.tolist() == [int(i) for i in want]}"
    print(row)
    sr_t, _ = cpu_timed(lambda: gm.spectral_residual_saliency(x), args.repeat)
    print(f"{'SR saliency':>22} {1e3 * sr_t:>9.1f}")
    torch.set_num_threads(step_threads)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def update(logits, target, extra=None):
        loss = soft_cross_entropy(logits, target) + (0 if extra is None else extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def vanilla():
        update(model(x), y)

    def method_step(method):
        out = method(model, x, y)
        update(out.logits, out.target, out.extra_loss)

    def reference_step():
        # main.py 319-386 for --guided_type ap, clean_lam 0 (train mode, weight gradients computed then zeroed).
        optimizer.zero_grad()
        xv = x.clone().requires_grad_(True)
        loss_batch = F.cross_entropy(model(xv), labels, reduction="none")
        torch.mean(loss_batch, dim=0).backward(retain_graph=True)
        unary = torch.sqrt(torch.mean(xv.grad**2, dim=1))
        optimizer.zero_grad()
        mixed, target = ref.mixup_process(x.clone(), y.clone(), args=ref_args, grad=unary)
        update(model(mixed), target)

    variants = [("vanilla", vanilla), ("guided_ap", lambda: method_step(ap)), ("guided_sr", lambda: method_step(sr))]
    if ref is not None:
        variants.append(("authors' Guided-AP", reference_step))
    for _, fn in variants:  # warm-up
        fn()
    times = {name: [] for name, _ in variants}
    for _ in range(args.steps):  # alternate, so that changes in the machine's load hit all alike
        for name, fn in variants:
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print()
    print(f"training step, PreActResNet-18, 32x32, batch {n}, every step mixed "
          f"(median CPU time of {args.steps} alternating steps, {step_threads} torch thread(s))")
    for name, _ in variants:
        print(f"  {name:<20} {1e3 * med[name]:8.0f} ms   {med[name] / med['vanilla']:.2f}x vanilla")
    r = med["guided_ap"] / med["vanilla"]
    print(f"  guided_ap with its prob 0.8 (a clean step otherwise): {0.2 + 0.8 * r:.2f}x vanilla on average")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
