"""The first-GPU-run check: speed of every method, eager and compiled, every evaluation suite, a resume.

On a CUDA machine (about 8 minutes on one H100-class GPU; ``--budget-min`` caps it):

1. training throughput (images/s) of every registered method, bf16 autocast + channels_last, fused SGD,
   without and with ``torch.compile`` (hidden-point methods mix inside the compiled graphs), for
   PreActResNet-18 at 32 px and ResNet-50 at 224 px: peak memory, ratio to vanilla, the graphs compiled
   and any recompilation during the timed steps (there should be none);
2. every evaluation suite once on a tiny trained run (``train_run`` on the GPU, compiled);
3. a resume with fewer visible GPUs: a run on the last GPU with all GPUs visible, stopped right after
   its first checkpoint, is refused on the CPU with a one-line error, then resumes under
   ``CUDA_VISIBLE_DEVICES=<that GPU>`` on ``cuda:0`` and completes;
4. where two GPUs exist, a 2-process data-parallel epoch (``mixbench run --nproc-per-run 2 --sync-bn``:
   NCCL, DistributedDataParallel, torch.compile as a GPU run has it) of vanilla, a hidden-point method
   and a method with its own trainable modules, against the same epoch in one process;
5. the streaming loader's ``--decode gpu`` (nvJPEG, batched) against PIL on generated ImageNet-sized JPEGs:
   the same labels in the same order, the pixels' mean absolute difference, both paths' images/s.

It prints a table and writes everything to a JSON file (after each part, so a cut-off run keeps what it
measured). ``--quick`` runs the same code paths on the CPU in a few minutes at most (tiny models, a few
steps, dynamo without code generation, two Gloo processes), which is what the test suite does.

    python benchmarks/gpu_check.py                     # on the GPU machine
    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from mixbench.hooks import forward_mixed, mixing_points
from mixbench.losses import get_loss
from mixbench.methods import create_method, get_method, list_methods
from mixbench.models import create_model
from mixbench.compiled import compile_model
from mixbench.optim import make_optimizer
from mixbench.train import peak_memory_mb, reset_peak_memory, step_loss

# (label, timm name, model kwargs, image size, batch size, classes)
GPU_MODELS = [
    ("preactresnet18@32", "preactresnet18", {}, 32, 128, 100),
    ("resnet50@224", "resnet50", {}, 224, 64, 1000),
]
QUICK_MODELS = [
    ("preactresnet18_w16@16", "preactresnet18_w16", {}, 16, 16, 10),
    ("resnet18-narrow@32", "resnet18", {"channels": (8, 16, 32, 64), "stem_width": 8}, 32, 8, 10),
]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the same code paths on the CPU, small and fast")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results (default: ./gpu_check.json)")
    p.add_argument("--methods", default="all", help="'all' or a comma-separated list (vanilla is always measured)")
    p.add_argument("--steps", type=int, help="timed steps per method (default: 20; quick: 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per method (default: 3; quick: 1)")
    p.add_argument("--budget-min", type=float, default=8.0,
                   help="stop starting new measurements after this many minutes (default: 8)")
    p.add_argument("--parts", default="throughput,eval,resume,ddp,decode",
                   help="any of throughput, eval, resume, ddp, decode")
    p.add_argument("--backend", help="torch.compile backend (default: inductor; quick: eager, dynamo only)")
    return p.parse_args(argv)


class Budget:
    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.seconds = minutes * 60

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def counting_backend(name: str, log: List[float]):
    """The ``name`` backend, logging the time of each compilation (each new graph)."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(name)

    def backend(gm, example_inputs):
        t0 = time.perf_counter()
        out = inner(gm, example_inputs)
        log.append(time.perf_counter() - t0)
        return out

    return backend


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------
# 1. throughput


def throughput(config, methods: List[str], device: torch.device, compiled: bool, args, budget: Budget,
               backend: str) -> Dict[str, Any]:
    label, name, kwargs, size, batch, classes = config
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, image_size=size, **kwargs).to(device, memory_format=fmt).train()
    compiles: List[float] = []
    from torch import _dynamo

    _dynamo.reset()
    forward = model
    if compiled:
        forward = compile_model(model, backend=counting_backend(backend, compiles), memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    y = F.one_hot(torch.randint(classes, (batch,), generator=g), classes).float().to(device)
    criterion = get_loss("ce")
    out: Dict[str, Any] = {"model": label, "compiled": compiled, "batch": batch, "image_size": size,
                           "methods": {}, "warm_graphs_s": None}
    if compiled:  # one graph per mixing point, compiled once for every method: an identity mix at each point
        t0 = time.perf_counter()
        optimizer = make_optimizer(model, _Opts(), device)
        for k in range(len(mixing_points(model))):
            with autocast():
                logits = forward_mixed(forward, x, k, lambda h: h * 1.0)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        sync(device)
        out["warm_graphs_s"] = time.perf_counter() - t0
        out["warm_graphs"] = len(compiles)
    for method_name in methods:
        if budget.left() < (30 if args.quick else 45):
            out["methods"][method_name] = {"skipped": "time budget"}
            continue
        try:
            method = create_method(method_name, **({"workers": 0} if method_name == "puzzlemix" and args.quick else {}))
            method.setup(seed=0, num_classes=classes, mean=[0.5] * 3, std=[0.25] * 3)
            method.bind(model)  # a method's own modules, as the harness does
            optimizer = make_optimizer(model, _Opts(), device, extra_groups=method.param_groups())
            done = [0]

            def step() -> None:
                loss = step_loss(method, forward, x, y, criterion, criterion.extra_weight(classes), autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                method.after_step(model, done[0], 10**6)
                done[0] += 1

            def timed(n: int):
                """(seconds, graphs compiled) of ``n`` steps, synchronised at the end."""
                before, t0 = len(compiles), time.perf_counter()
                for _ in range(n):
                    step()
                sync(device)
                return time.perf_counter() - t0, len(compiles) - before

            warm_s, warm_compiles = timed(args.warmup)
            reset_peak_memory(device)
            seconds, recompiles = timed(args.steps)
            method.close()
            out["methods"][method_name] = {
                "images_per_s": args.steps * batch / seconds, "ms_per_step": 1000 * seconds / args.steps,
                "peak_mem_mb": peak_memory_mb(device), "warmup_s": warm_s, "graphs_in_warmup": warm_compiles,
                "recompiles_timed": recompiles,
            }
        except Exception as exc:  # one broken method must not hide the others
            out["methods"][method_name] = {"error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc()}
    out["graphs"] = len(compiles)
    ref = out["methods"].get("vanilla", {}).get("images_per_s")
    for r in out["methods"].values():
        if ref and "images_per_s" in r:
            r["vs_vanilla"] = r["images_per_s"] / ref
    _dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return out


class _Opts:  # the run options make_optimizer reads
    lr, momentum, nesterov, weight_decay = 1e-3, 0.9, True, 5e-4


# ---------------------------------------------------------------------------
# 2. every evaluation suite on a tiny trained run


def eval_suites(device: torch.device, args, work: Path) -> Dict[str, Any]:
    from mixbench.evaluate import SUITES, evaluate_run
    from mixbench.spec import RunSpec
    from mixbench.train import train_run

    # Compiled as a GPU run is by default (on the CPU with --quick's backend, $MIXBENCH_COMPILE_BACKEND).
    options = dict(method="vanilla", dataset="synthetic", seed=0, epochs=1, device=str(device),
                   checkpoint_every_min=0, compile=True)
    spec = RunSpec.from_dict(options).resolved()
    run_dir = work / "eval-run"
    t0 = time.perf_counter()
    result = train_run(spec, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    suite_options = {"adversarial": {"pgd_steps": 2 if args.quick else 10},
                     "corruption": {"severities": [1, 3] if args.quick else [1, 2, 3, 4, 5]},
                     "loss_landscape": {"points": 3 if args.quick else 11}}
    done = evaluate_run(run_dir, list(SUITES), max_samples=32 if args.quick else 256, batch_size=64,
                        device=str(device), options=suite_options, cache_dir=work / "corrupted",
                        log=lambda m: print(m, file=sys.stderr))
    return {"train_s": train_s, "compiled": result.get("compiled"), "final_top1": result["final_top1"],
            "suites": {name: {"time_s": done["eval_meta"][name]["time_s"],
                              "device": done["eval_meta"][name]["device"]} for name in SUITES},
            "calibration": {k: done["eval"]["calibration"][k] for k in ("ece", "nll")}}


# ---------------------------------------------------------------------------
# 3. resume with fewer visible GPUs

_STOP_AFTER_FIRST_CHECKPOINT = """
import os, sys
import mixbench.train as t
real = t.save_checkpoint
def save(run_dir, state):
    real(run_dir, state)
    os._exit(17)  # killed right after its first checkpoint
t.save_checkpoint = save
from mixbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


_CLI = "import sys; from mixbench.cli import main; sys.exit(main(sys.argv[1:]))"


def _mixbench(args: List[str], env: Dict[str, str], stop_early: bool = False) -> subprocess.CompletedProcess:
    code = _STOP_AFTER_FIRST_CHECKPOINT if stop_early else _CLI
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def resume_check(device: torch.device, args, work: Path) -> Dict[str, Any]:
    out_dir = work / "resume-runs"
    cuda = device.type == "cuda"
    n = torch.cuda.device_count() if cuda else 0
    base_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda and visible:
        base_env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
    last = max(0, n - 1)
    physical = (visible[last] if visible else str(last)) if cuda else ""
    common = ["run", "--methods", "mixup", "--dataset", "synthetic", "--epochs", "3", "--seeds", "0",
              "--checkpoint-every-min", "0", "--no-compile", "--no-progress", "--out", str(out_dir)]
    report: Dict[str, Any] = {"visible_gpus": n, "first_device": f"cuda:{last}" if cuda else "cpu",
                              "resume_visible": physical if cuda else "(none)"}
    first = _mixbench(common + ["--device", f"cuda:{last}" if cuda else "cpu"], base_env, stop_early=True)
    report["first_exit"] = first.returncode
    run_dirs = [p.parent for p in out_dir.rglob("checkpoint.pt")]
    if first.returncode != 17 or not run_dirs:
        report["error"] = f"the first run did not stop after its checkpoint: {first.stderr[-2000:]}"
        return report
    run_dir = run_dirs[0]
    # The checkpoint on another device type: refused with one line (on the GPU machine: the CPU fallback).
    other = work / "resume-other"
    shutil.copytree(out_dir, other)
    if cuda:
        cpu_env = {**base_env, "CUDA_VISIBLE_DEVICES": ""}
        refused = _mixbench([*common[:-1], str(other), "--device", "auto"], cpu_env)
    else:
        import mixbench.checkpoint as ckpt

        copy_dir = other / run_dir.relative_to(out_dir)
        state = ckpt.load_checkpoint(copy_dir)
        ckpt.save_checkpoint(copy_dir, {**state, "device": "cuda"})
        refused = _mixbench([*common[:-1], str(other), "--device", "cpu"], base_env)
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    report["other_device_exit"] = refused.returncode
    report["other_device_error"] = errors[-1] if errors else refused.stderr[-500:]
    # Resume with only the run's GPU visible (now cuda:0).
    env = {**base_env, "CUDA_VISIBLE_DEVICES": physical if cuda else ""}
    resumed = _mixbench(common + ["--device", "cuda" if cuda else "cpu"], env)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    report.update({
        "resume_exit": resumed.returncode,
        "resumed_from": [line for line in resumed.stderr.splitlines() if "resuming" in line][:1],
        "status": result.get("status"), "final_top1": result.get("final_top1"),
        "ok": resumed.returncode == 0 and result.get("status") == "complete" and refused.returncode == 2
        and any("resuming" in line for line in resumed.stderr.splitlines()),
    })
    if resumed.returncode:
        report["resume_stderr"] = resumed.stderr[-2000:]
    return report


# ---------------------------------------------------------------------------
# 4. a data-parallel epoch in two processes

DDP_METHODS = ["vanilla", "manifold_mixup", "automix"]  # plain, mixing inside the model, own trainable modules


def ddp_check(device: torch.device, args, work: Path) -> Dict[str, Any]:
    """One epoch of each of DDP_METHODS in 2 processes (sync BN), and vanilla's in 1, through the CLI."""
    cuda = device.type == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU visible; the data-parallel step needs 2"}
    methods = [m for m in DDP_METHODS if get_method(m).available()]
    common = ["run", "--dataset", "synthetic", "--epochs", "1", "--seeds", "0", "--checkpoint-every-min", "0",
              "--no-progress", "--device", "cuda" if cuda else "cpu"]
    if cuda:
        common += ["--model", "preactresnet18", "--batch-size", "128"]
    else:  # the tiny default model on 256 images, dynamo without code generation as in the throughput part
        common += ["--compile", "--train-subset", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if not cuda else dict(os.environ)
    report: Dict[str, Any] = {"processes": 2, "backend": "nccl" if cuda else "gloo", "methods": {}}
    for label, nproc, names in (("1 process", 1, ["vanilla"]), ("2 processes", 2, methods)):
        out = work / f"ddp-{nproc}"
        extra = ["--nproc-per-run", "2", "--sync-bn"] if nproc == 2 else []
        t0 = time.perf_counter()
        proc = _mixbench(common + ["--methods", ",".join(names), "--out", str(out)] + extra, env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            report["methods"][label] = {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
            continue
        for result_path in sorted(out.rglob("result.json")):
            result = json.loads(result_path.read_text())
            report["methods"][f"{result['method']} ({label})"] = {
                "status": result.get("status"), "epoch_time_s": result.get("epoch_time_s"),
                "images_per_s": result.get("train_images_per_s"), "final_top1": result.get("final_top1"),
                "compiled": result.get("compiled"), "nproc": nproc, "launch_wall_s": wall}
    one = report["methods"].get("vanilla (1 process)", {}).get("epoch_time_s")
    two = report["methods"].get("vanilla (2 processes)", {}).get("epoch_time_s")
    if one and two:
        report["speedup_vanilla"] = one / two
    report["ok"] = all(r.get("status") == "complete" for r in report["methods"].values()) and \
        len(report["methods"]) == 1 + len(methods)
    return report


# ---------------------------------------------------------------------------
# 5. JPEG decoding on the device

DECODE_TOLERANCE = 3.0  # mean absolute difference from PIL's pixels, 0..255 units (per image)


def decode_check(device: torch.device, args, work: Path) -> Dict[str, Any]:
    """``StreamLoader(decode="gpu")`` on ``device`` against the PIL path, and both paths' throughput."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_throughput import generate_tree, measure

    from mixbench.data import StreamLoader, default_num_workers, imagefolder_files

    root = generate_tree(work / "imagenet", 16 if args.quick else 256)
    size, batch = (32, 8) if args.quick else (224, 64)
    report: Dict[str, Any] = {"decoder": f"decode_jpeg ({device.type})", "ok": True}
    for split, samples in zip(("train", "val"), imagefolder_files(root)):
        kw = dict(image_size=size, batch_size=batch, mean=(0.0,) * 3, std=(1 / 255,) * 3, device=device,
                  train=split == "train", seed=0, num_workers=0)
        pil, dev = list(StreamLoader(samples, **kw)), list(StreamLoader(samples, decode="gpu", **kw))
        same = len(pil) == len(dev) and all(torch.equal(y1, y2) and x1.shape == x2.shape
                                            for (x1, y1), (x2, y2) in zip(pil, dev))
        diff = torch.cat([(x1 - x2).abs().mean(dim=(1, 2, 3)) for (x1, _), (x2, _) in zip(pil, dev)])
        report[split] = {"labels_and_shapes_equal": same, "mean_abs_diff": diff.mean().item(),
                         "max_image_mean_abs_diff": diff.max().item()}
        report["ok"] &= same and diff.max().item() < DECODE_TOLERANCE
    workers = 0 if args.quick else min(4, default_num_workers())
    report["speed"] = [measure(root, workers, 2 if args.quick else 4, batch, size, d, str(device))
                       for d in ("cpu", "gpu")]
    return report


# ---------------------------------------------------------------------------


def table(results: Dict[str, Any]) -> str:
    lines = ["| model | compile | method | images/s | vs vanilla | ms/step | peak MB | recompiles |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for part in results.get("throughput", []):
        for name, r in part["methods"].items():
            if "images_per_s" in r:
                lines.append(f"| {part['model']} | {'yes' if part['compiled'] else 'no'} | {name} | "
                             f"{r['images_per_s']:.0f} | {r.get('vs_vanilla', float('nan')):.2f} | "
                             f"{r['ms_per_step']:.1f} | {r['peak_mem_mb']:.0f} | {r['recompiles_timed']} |")
            else:
                lines.append(f"| {part['model']} | {'yes' if part['compiled'] else 'no'} | {name} | "
                             f"{r.get('skipped') or r.get('error', '?')[:60]} | | | | |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.quick:
        device = torch.device("cpu")
        args.steps = args.steps or 2
        args.warmup = args.warmup or 1
        backend = args.backend or "eager"
        models = QUICK_MODELS
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --quick for the CPU version", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        args.steps = args.steps or 20
        args.warmup = args.warmup or 3
        backend = args.backend or "inductor"
        models = GPU_MODELS
    if args.quick or args.backend:
        os.environ["MIXBENCH_COMPILE_BACKEND"] = backend  # train_run's compiled runs (the eval part)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    methods = [m for m in list_methods() if get_method(m).available()] if args.methods == "all" else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")
    budget = Budget(args.budget_min)
    results: Dict[str, Any] = {
        "quick": args.quick, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
        "cuda": torch.version.cuda, "backend": backend, "steps": args.steps, "warmup": args.warmup,
        "methods": methods, "throughput": [],
    }

    def save() -> None:
        results["elapsed_s"] = budget.elapsed()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        # Order: what matters most first; the big model's compiled graphs last (they take longest).
        # (name, seconds that must be left to start it, the part)
        plan: List[Any] = []

        def speed(config, compiled):
            return lambda: results["throughput"].append(
                throughput(config, methods, device, compiled, args, budget, backend))

        if "throughput" in parts:
            plan.append((f"{models[0][0]} eager", 0, speed(models[0], False)))
        if "eval" in parts:
            plan.append(("eval", 0, lambda: results.__setitem__("eval", eval_suites(device, args, work))))
        if "resume" in parts:
            plan.append(("resume", 0, lambda: results.__setitem__("resume", resume_check(device, args, work))))
        if "ddp" in parts:
            plan.append(("ddp", 0 if args.quick else 60,
                         lambda: results.__setitem__("ddp", ddp_check(device, args, work))))
        if "decode" in parts:
            plan.append(("decode", 0 if args.quick else 30,
                         lambda: results.__setitem__("decode", decode_check(device, args, work))))
        if "throughput" in parts:
            plan.append((f"{models[1][0]} eager", 30, speed(models[1], False)))
            plan.append((f"{models[0][0]} compiled", 0 if args.quick else 120, speed(models[0], True)))
            plan.append((f"{models[1][0]} compiled", 0 if args.quick else 150, speed(models[1], True)))
        for name, needs, part in plan:
            if budget.left() <= needs:
                results.setdefault("skipped_parts", []).append(name)
                continue
            try:
                part()
            except Exception as exc:
                results.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        save()
    print(f"gpu_check on {results['device']}, torch {results['torch']}, backend {backend}, "
          f"{args.steps} timed steps, {results['elapsed_s']:.0f} s")
    print()
    print(table(results))
    if "eval" in results:
        e = results["eval"]
        print(f"\nevaluation suites on a tiny run (trained in {e['train_s']:.1f} s, compiled: {e['compiled']}): "
              + ", ".join(f"{k} {v['time_s']:.1f} s" for k, v in e["suites"].items())
              + f"; calibration ECE {e['calibration']['ece']:.2f}")
    if "resume" in results:
        r = results["resume"]
        print(f"\nresume: {r.get('first_device')} with {r.get('visible_gpus')} GPU(s) visible, stopped after its "
              f"first checkpoint; other device refused (exit {r.get('other_device_exit')}): "
              f"{r.get('other_device_error', '')}; resumed with CUDA_VISIBLE_DEVICES={r.get('resume_visible')}: "
              f"{r.get('resumed_from')} -> {r.get('status')} ({'ok' if r.get('ok') else 'FAILED'})")
    if "ddp" in results:
        d = results["ddp"]
        if "skipped" in d:
            print(f"\ndata-parallel: skipped ({d['skipped']})")
        else:
            print(f"\ndata-parallel ({d['backend']}, sync BN), one epoch ({'ok' if d.get('ok') else 'FAILED'}): "
                  + "; ".join(f"{k}: {v['epoch_time_s']:.2f} s, top-1 {v['final_top1']:.1f}" if "epoch_time_s" in v
                              and v["epoch_time_s"] is not None else f"{k}: {v.get('error', v.get('status'))[:300]}"
                              for k, v in d["methods"].items())
                  + (f"; vanilla 2 processes vs 1: {d['speedup_vanilla']:.2f}x" if "speedup_vanilla" in d else ""))
    if "decode" in results:
        d = results["decode"]
        print(f"\n--decode gpu ({d['decoder']}) vs PIL ({'ok' if d['ok'] else 'FAILED'}): mean abs diff "
              f"train {d['train']['mean_abs_diff']:.3f}, val {d['val']['mean_abs_diff']:.3f} /255; "
              + "; ".join(f"{r['decoder']} {r['workers']} workers: {r['images_per_s']:.0f} images/s, "
                          f"{r['images_per_cpu_s']:.0f} per core" for r in d["speed"]))
    if results.get("skipped_parts"):
        print(f"\nskipped (time budget, --budget-min {args.budget_min:g}): {', '.join(results['skipped_parts'])}")
    for err in results.get("errors", []):
        print(f"\nerror: {err}", file=sys.stderr)
    print(f"\nJSON: {args.out}")
    bad = results.get("errors") or ("resume" in results and not results["resume"].get("ok")) or (
        "ddp" in results and "skipped" not in results["ddp"] and not results["ddp"].get("ok")) or (
        "decode" in results and not results["decode"]["ok"]) or any(
        "error" in r for part in results["throughput"] for r in part["methods"].values()) or any(
        r.get("recompiles_timed") for part in results["throughput"] for r in part["methods"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
