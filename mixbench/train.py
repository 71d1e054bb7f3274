"""The one training loop shared by every method.

``train_run(spec, run_dir)`` trains one grid cell: data on the device, a timm
model, the method's ``MixOutput(logits, target, extra_loss)`` for each batch,
the run's loss (``spec.loss``: soft-target cross-entropy or the PuzzleMix code's
softmax binary cross-entropy, :mod:`mixbench.losses`), SGD with a per-step LR schedule, the test metrics after each epoch,
a checkpoint every ``checkpoint_every_min`` minutes, and an atomic result.json at the end. Nothing
here knows which method it runs.

On CUDA the defaults are the fast path: bf16 autocast, channels_last, the model
compiled with ``torch.compile`` (hidden-point mixing inside the compiled graphs,
see :mod:`mixbench.hooks`) and fused SGD. On the CPU the model stays eager
unless ``compile`` is set.

Crash safety: the run directory is locked while it trains (``mixbench.lock``);
a checkpoint holds everything that decides the rest of the run (model,
optimizer, LR scheduler, epoch, best-so-far, the python, numpy, torch CPU RNG
states and the CUDA RNG state of the run's own device, the loader's generator,
the method's state with the modules it owns, the device type), always at the end of an epoch, so that a
rerun after a kill continues exactly where the last checkpointed epoch ended.
Checkpoints are written every ``checkpoint_every_min`` minutes, at the last
epoch, and on a preemption signal, an interrupt or a failure (the last
finished epoch, kept in memory; :class:`mixbench.checkpoint.Checkpointer`). A
checkpoint written on another device type (CPU vs CUDA) is refused with a
usage error. bf16 autocast needs no GradScaler (bf16 has float32's exponent
range), so there is no scaler state to keep. A non-finite loss stops the run
with a ``status: "failed"`` result.json.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import resource
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mixbench import UsageError
from mixbench.checkpoint import (
    Checkpointer, checkpoint_device, remove_checkpoint, remove_partial_writes, save_checkpoint,
)
from mixbench.compiled import compile_model
from mixbench.data import DeviceLoader, make_loaders
from mixbench.devices import resolve_device
from mixbench.distributed import Parallel
from mixbench.evaluations.filter_usage import filter_usage_during_training
from mixbench.losses import Loss, get_loss
from mixbench.methods import create_method
from mixbench.models import count_parameters, create_model
from mixbench.optim import lr_factor, make_optimizer
from mixbench.results import (
    SCHEMA_VERSION,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_yaml,
    environment_info,
    is_complete,
    read_jsonl,
    read_result,
)
from mixbench.spec import RunSpec
from mixbench.tblog import EpochLog


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device: torch.device) -> Dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU and, on CUDA, the run's own device's), in a form
    weights_only loading accepts. Only the run's device: a checkpoint does not depend on how many
    GPUs the machine shows."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if device.type == "cuda" and cuda_state is not None:
        if isinstance(cuda_state, (list, tuple)):  # older checkpoints: every visible device's state
            cuda_state = cuda_state[min(device.index or 0, len(cuda_state) - 1)]
        torch.cuda.set_rng_state(cuda_state, device)


# A diverged run is noticed within this many optimiser steps: the per-step losses stay on the
# device and are checked with one host sync per interval (and at the end of each epoch).
NONFINITE_CHECK_EVERY = 100


class NonFiniteLoss(FloatingPointError):
    def __init__(self, value: float, epoch: int, step: Optional[int], steps_per_epoch: int):
        self.value, self.epoch, self.step = value, epoch, step
        self.global_step = None if step is None else epoch * steps_per_epoch + step
        where = f"epoch {epoch}" + ("" if step is None else f", step {step} (global step {self.global_step})")
        super().__init__(f"non-finite training loss ({value}) at {where}")


class RunFailed(RuntimeError):
    """A run that stopped without finishing; ``result`` is its result.json (``status: "failed"``)."""

    def __init__(self, result: Dict[str, Any], run_dir: Path):
        self.result = result
        self.run_dir = run_dir
        super().__init__(f"{run_dir}: failed: {result['error']}")


def write_failed_result(
    spec: RunSpec, run_dir: Path, error: str, started: str, **details: Any
) -> Dict[str, Any]:
    """Write result.json with ``status: "failed"``, the reason and where it happened; return it."""
    result = {
        "schema_version": SCHEMA_VERSION,
        "run_id": spec.run_id,
        "status": "failed",
        "error": error,
        "failed_epoch": details.pop("epoch", None),
        "failed_step": details.pop("step", None),
        "failed_global_step": details.pop("global_step", None),
        "epochs_completed": len(read_jsonl(Path(run_dir) / "metrics.jsonl")),
        **details,
        "method": spec.method,
        "method_params": spec.method_params,
        "dataset": spec.dataset,
        "model": spec.model,
        "model_kwargs": spec.model_kwargs,
        "seed": spec.seed,
        "epochs": spec.epochs,
        **environment_info(resolve_device(spec.device)),
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
    }
    if Parallel.current().writer:
        atomic_write_json(Path(run_dir) / "result.json", result)
    return result


@torch.no_grad()
def test_metrics(model: torch.nn.Module, loader: DeviceLoader, autocast) -> Dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy on ``loader`` (the test split after every epoch:
    ``test_top1``, ``test_top5``, ``test_loss``); not the evaluation suites of ``mixbench evaluate``."""
    model.eval()
    correct1 = correct5 = loss_sum = torch.zeros((), device=loader.device)
    for x, y in loader:
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 = correct1 + hits[:, 0].sum()
        correct5 = correct5 + hits.any(dim=1).sum()
    n = loader.num_samples
    return {
        "test_top1": 100.0 * correct1.item() / n,
        "test_top5": 100.0 * correct5.item() / n,
        "test_loss": loss_sum.item() / n,
    }


test_metrics.__test__ = False  # not a test: tells pytest, which collects names that start with test_


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak-memory count: CUDA's peak statistics, or on Linux the process's RSS
    high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM), so that runs trained
    one after another in one process each report their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not allowed: peak_memory_mb falls back to the process's peak
        pass


def step_loss(method, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: Loss,
              extra_weight: float, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The loss of one training step: the method's forward (under ``autocast``), then the run's
    loss in float32 outside autocast, plus the method's extra term scaled for that loss."""
    with autocast():
        out = method(model, x, target)
    loss = criterion(out.logits, out.target)
    if out.extra_loss is not None:
        loss = loss + extra_weight * out.extra_loss
    return loss


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or on CPU the peak resident set size since ``reset_peak_memory``
    (the process's lifetime peak where /proc is not available)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def train_run(spec: RunSpec, run_dir: Path, *, progress: bool = True, desc: Optional[str] = None) -> Dict[str, Any]:
    """Train one run to completion (resuming from its last good checkpoint) and return its result.json.

    The run directory is locked meanwhile: ``mixbench.lock.RunLocked`` if another
    live process holds it; a run that another process completed in the meantime
    is returned, not trained again. A non-finite loss, or an exception inside
    training, writes a result.json with ``status: "failed"`` (the reason; for a
    non-finite loss the epoch and step), keeps the last good checkpoint and raises
    ``RunFailed``. Errors of the environment (``OSError``: disk full, no
    permission) and of the input (``UsageError``) propagate unchanged.
    """
    spec = spec.resolved()  # idempotent: a spec from the grid is already resolved
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    par = Parallel.current()  # one process, or this rank of a data-parallel run (mixbench.distributed)
    par.check(spec)
    with par.run_lock(run_dir):  # RunLock(run_dir), held by rank 0
        if par.broadcast(is_complete(run_dir)):
            print(f"mixbench: {run_dir} was completed by another process", file=sys.stderr)
            return read_result(run_dir)
        if par.writer:
            remove_partial_writes(run_dir)
        try:
            return _train(spec, run_dir, progress=progress, desc=desc)
        except (OSError, UsageError):
            raise
        except NonFiniteLoss as exc:
            result = write_failed_result(
                spec, run_dir, str(exc), started, epoch=exc.epoch, step=exc.step, global_step=exc.global_step
            )
            raise RunFailed(result, run_dir) from None
        except Exception as exc:
            result = write_failed_result(
                spec, run_dir, f"{type(exc).__name__}: {exc}", started, traceback=traceback.format_exc()
            )
            raise RunFailed(result, run_dir) from exc


def _train(spec: RunSpec, run_dir: Path, *, progress: bool, desc: Optional[str]) -> Dict[str, Any]:
    """The training itself; ``spec`` is resolved and the caller holds the run's lock."""
    device = resolve_device(spec.device, warn=True)
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # implicit work (streams, compiled kernels) on the run's own GPU
    compiled = spec.compile if spec.compile is not None else cuda
    if compiled:
        from torch import _dynamo

        _dynamo.reset()  # graphs of an earlier run of this process are of another model
    seed_everything(spec.seed)
    channels_last = cuda and spec.channels_last
    # In-memory sets give DeviceLoaders, streamed image files StreamLoaders: the same interface.
    train_loader, test_loader = make_loaders(spec, device, channels_last=channels_last)
    par = Parallel.current()
    train_loader = par.shard_train(train_loader)  # each rank: its shard of every global batch
    info = train_loader.info

    model = create_model(
        spec.model, num_classes=info.num_classes, in_chans=info.in_chans, image_size=info.image_size,
        stem=spec.stem, **spec.model_kwargs,
    ).to(device)
    model = par.prepare_model(model, spec, device)  # synchronised BatchNorm if asked
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = create_method(spec.method, **spec.method_params)
    method.setup(seed=spec.seed, num_classes=info.num_classes, mean=info.mean, std=info.std)
    method.bind(model)  # a method's own trainable modules, built before compiling and the optimizer
    layout = torch.channels_last if channels_last else torch.contiguous_format
    forward = compile_model(model, memory_format=layout) if compiled else model

    criterion = get_loss(spec.loss)
    extra_weight = criterion.extra_weight(info.num_classes)
    steps = len(train_loader)
    optimizer = make_optimizer(model, spec, device, extra_groups=method.param_groups())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, spec, steps))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and spec.amp else contextlib.nullcontext
    forward = par.wrap(model, forward, optimizer, device)  # DistributedDataParallel with several ranks

    # -- resume -----------------------------------------------------------------
    start_epoch, best_top1, best_epoch, elapsed = 0, -1.0, -1, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    state = par.load_checkpoint(run_dir)  # the newest good one (this rank's entries); skips corrupt files
    if state is not None:
        saved_on = checkpoint_device(state)
        if saved_on != device.type:
            raise UsageError(
                f"{run_dir}: its checkpoint (epoch {state['epoch']}) was written on {saved_on} and this run is "
                f"on {device.type}; resume it on {saved_on} (--device {saved_on}), or delete "
                f"{run_dir / 'checkpoint*.pt'} to restart it from epoch 0 on {device.type}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"], device)
        start_epoch, best_top1, best_epoch, elapsed = (
            state["epoch"], state["best_top1"], state["best_epoch"], state["elapsed"]
        )
    # Metrics of epochs after the checkpoint (a crash between the two writes) are dropped.
    history = [m for m in read_jsonl(metrics_path) if m["epoch"] < start_epoch]
    if par.writer:
        atomic_write_bytes(metrics_path, "".join(json.dumps(m) + "\n" for m in history).encode())
        atomic_write_yaml(run_dir / "spec.yaml", spec.to_dict())
    if start_epoch:
        print(f"mixbench: resuming {run_dir} from epoch {start_epoch}", file=sys.stderr)
    else:
        print(f"mixbench: training {run_dir}", file=sys.stderr)

    reset_peak_memory(device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    bar = tqdm(
        total=spec.epochs * steps, initial=start_epoch * steps, desc=desc or spec.method, unit="step",
        disable=not progress, leave=True, dynamic_ncols=True, file=sys.stderr,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    # Written every checkpoint_every_min minutes and at the last epoch; a preemption signal, an interrupt
    # or a failure writes the last finished epoch kept in memory (save_checkpoint looked up at call time).
    # Other ranks write nothing; they take part in gathering their states for rank 0's checkpoint every epoch.
    checkpointer = Checkpointer(run_dir, spec.checkpoint_every_min if par.writer else 0,
                                save=(lambda d, s: save_checkpoint(d, s)) if par.writer else (lambda d, s: None))
    curves = EpochLog(run_dir, start_epoch, enabled=spec.tensorboard and par.writer)  # TensorBoard, when asked for
    try:
        checkpointer.__enter__()
        for epoch in range(start_epoch, spec.epochs):
            model.train()
            t0, c0 = time.perf_counter(), time.process_time()
            step_losses = torch.zeros(steps, device=device)
            for step, (x, y) in enumerate(train_loader):
                target = F.one_hot(y, info.num_classes).float()
                if spec.label_smoothing:
                    target = target * (1 - spec.label_smoothing) + spec.label_smoothing / info.num_classes
                loss = step_loss(method, forward, x, target, criterion, extra_weight, autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                method.after_step(model, epoch * steps + step, spec.epochs * steps)
                scheduler.step()
                step_losses[step] = loss.detach()  # stays on the device: no sync per step
                bar.update(1)
                if (step + 1) % NONFINITE_CHECK_EVERY == 0 and not bool(
                        torch.isfinite(par.mean(step_losses[:step + 1])).all()):  # every rank decides alike
                    break
            if cuda:
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            train_cpu_time = time.process_time() - c0
            step_losses = par.mean(step_losses)  # the global batch's loss
            train_loss = step_losses.sum().item() / steps
            if not math.isfinite(train_loss):
                bad = (~torch.isfinite(step_losses)).nonzero()
                first = int(bad[0, 0]) if len(bad) else None
                value = step_losses[first].item() if first is not None else train_loss
                raise NonFiniteLoss(value, epoch, first, steps)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                **par.test_metrics(test_metrics, forward, test_loader, autocast),
                **filter_usage_during_training(model, test_loader, spec, epoch),
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_time_s": train_time,
                "epoch_cpu_time_s": train_cpu_time,
                "train_images_per_s": train_loader.num_samples / train_time,
            }
            elapsed += time.perf_counter() - t0
            if record["test_top1"] > best_top1:
                best_top1, best_epoch = record["test_top1"], epoch
            if par.writer:
                append_jsonl(metrics_path, record)
            curves.log(record)
            history.append(record)
            checkpointer.epoch_end(lambda: {
                "epoch": epoch + 1, "best_top1": best_top1, "best_epoch": best_epoch, "elapsed": elapsed,
                "device": device.type,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "method": method.state_dict(),
                "loader": train_loader.state_dict(),
                "rng": rng_state(device),
                **par.rank_states(lambda: {"method": method.state_dict(), "loader": train_loader.state_dict(),
                                           "rng": rng_state(device)}),
            }, last=epoch + 1 == spec.epochs)
            bar.set_postfix(loss=f"{train_loss:.3f}", top1=f"{record['test_top1']:.2f}", refresh=False)
    except OSError:
        raise  # the disk or the file system: writing more would fail the same way
    except BaseException:
        try:
            checkpointer.flush()  # the last finished epoch, so that a rerun loses only the one in progress
        except Exception as exc:  # keep the original error; the previous checkpoint stays
            print(f"mixbench: {run_dir}: could not write the last finished epoch's checkpoint ({exc})",
                  file=sys.stderr)
        raise
    finally:
        checkpointer.__exit__(None, None, None)
        curves.close()
        bar.close()
        method.close()
        if compiled:
            from torch import _dynamo

            _dynamo.reset()  # free this run's graphs before the next run of the process

    final = history[-1]
    last10 = [m["test_top1"] for m in history[-10:]]
    epoch_times = [m["epoch_time_s"] for m in history]
    cpu_times = [m["epoch_cpu_time_s"] for m in history if "epoch_cpu_time_s" in m]
    result = {
        "schema_version": SCHEMA_VERSION,
        "run_id": spec.run_id,
        "status": "complete",
        "method": spec.method,
        "method_params": spec.method_params,
        "dataset": spec.dataset,
        "model": spec.model,
        "model_kwargs": spec.model_kwargs,
        "num_params": count_parameters(model),
        "seed": spec.seed,
        "epochs": spec.epochs,
        "train_subset": spec.train_subset,
        "loss": spec.loss,
        "final_top1": final["test_top1"],
        "final_top5": final["test_top5"],
        "final_test_loss": final["test_loss"],
        "best_top1": best_top1,
        "best_epoch": best_epoch,
        "last10_median_top1": statistics.median(last10),
        "wall_time_s": elapsed,
        "epoch_time_s": statistics.median(epoch_times),
        # Process CPU time (user + system, every thread) of the training part of each epoch: on a shared
        # CPU it measures the work, where wall time also counts waiting for the cores.
        "epoch_cpu_time_s": statistics.median(cpu_times) if cpu_times else None,
        "cpu_time_s": sum(cpu_times) if cpu_times else None,
        "num_threads": torch.get_num_threads(),
        "compiled": bool(compiled),
        "train_images_per_s": statistics.median(m["train_images_per_s"] for m in history),
        "peak_mem_mb": peak_memory_mb(device),
        **environment_info(device),
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
    }
    if par.writer:
        weights = io.BytesIO()
        torch.save(model.state_dict(), weights)
        atomic_write_bytes(run_dir / "model.pt", weights.getvalue())
        atomic_write_json(run_dir / "result.json", result)
        remove_checkpoint(run_dir)
    return result
