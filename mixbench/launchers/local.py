"""Launchers on this machine: every cell in this process, one after the other (``run_local``), or one
worker process per GPU (``run_parallel``). Each cell is :func:`mixbench.launchers.cell.train_and_evaluate`."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from mixbench import UsageError
from mixbench.launchers.cell import train_and_evaluate
from mixbench.launchers.record import local_launch_info, now, record_launch
from mixbench.results import is_complete, read_result
from mixbench.spec import RunSpec


def run_local(specs: Sequence[RunSpec], out: Path, *, progress: bool = True) -> List[Dict[str, Any]]:
    """Train every cell of ``specs`` in this process, one after the other; return their results.

    Work on a cell happens under its lock (``run.lock``, see :mod:`mixbench.lock`):
    a cell that another live launcher holds is skipped and looked at again after
    the other cells; if it has not finished by then its entry has ``status:
    "running"``. A failed cell (non-finite loss, an error in training) gets a
    result.json with ``status: "failed"`` and the grid goes on; a failed cell
    of an earlier launch is retried from its last good checkpoint. Errors of the
    environment (``OSError``: disk full, no permission) and bad input stop the grid.
    """
    from mixbench.lock import RunLock, RunLocked, describe_owner, ensure_writable_dir
    from mixbench.train import RunFailed  # torch-heavy import kept off the CLI's start-up path

    ensure_writable_dir(out)
    launched = now()
    results: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    busy = list(range(len(specs)))
    for second_look in (False, True):
        todo, busy = busy, []
        for i in todo:
            spec = specs[i]
            run_dir = spec.run_dir(out)
            label = f"[{i + 1}/{len(specs)}] {spec.method} seed {spec.seed}"
            done = read_result(run_dir) if (run_dir / "result.json").exists() else None
            # A failed result is retried, unless another launcher wrote it while this one ran.
            if done and (done.get("status") == "complete" or (second_look and done.get("finished_at", "") >= launched)):
                if done.get("status") != "complete" or not spec.eval:
                    print(f"{label}: already {done.get('status')} in {run_dir}, skipped", file=sys.stderr)
                    results[i] = done
                    continue
            try:
                lock = RunLock(run_dir).acquire()  # held through training and evaluation (re-entrant)
            except RunLocked as exc:
                who = describe_owner(exc.owner)
                later = "" if second_look else "; looked at again at the end"
                print(f"{label}: running elsewhere ({who}), skipped{later}", file=sys.stderr)
                results[i] = {"status": "running", "method": spec.method, "seed": spec.seed,
                              "run_dir": str(run_dir), "error": f"running elsewhere: {who} ({exc.path})"}
                busy.append(i)
                continue
            try:
                info = None
                if not is_complete(run_dir):
                    info = local_launch_info(spec, spec.device)
                    record_launch(run_dir, info)
                try:
                    results[i] = train_and_evaluate(spec, run_dir, progress=progress, desc=label)
                except RunFailed as exc:
                    record_launch(run_dir, {**(info or {}), "error": exc.result["error"], "failed_at": now()})
                    if exc.__cause__ is not None:
                        traceback.print_exception(type(exc.__cause__), exc.__cause__, exc.__cause__.__traceback__)
                    print(f"{label}: FAILED: {exc.result['error']} (result.json in {run_dir}); "
                          "the grid goes on", file=sys.stderr)
                    results[i] = exc.result
                except Exception as exc:
                    if info is not None:  # training was launched here
                        record_launch(run_dir, {**info, "error": f"{type(exc).__name__}: {exc}", "failed_at": now()})
                    raise
            finally:
                lock.release()
    return results


# ---------------------------------------------------------------------------
# Local: one run per GPU in parallel
# ---------------------------------------------------------------------------
def available_cpus(environ: Optional[Mapping[str, str]] = None) -> int:
    """The cores this process may use: its CPU affinity, capped by ``$MIXBENCH_CPUS`` when set."""
    env = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        cap = int(env.get("MIXBENCH_CPUS") or 0)
    except ValueError:
        cap = 0
    return max(1, min(cores, cap) if cap > 0 else cores)


def worker_environment(index: int, n_workers: int, gpu: bool = True, environ: Optional[Mapping[str, str]] = None,
                       cpus: Optional[int] = None) -> Dict[str, str]:
    """The environment of parallel worker ``index`` of ``n_workers`` (set before the child imports torch).

    On GPUs the worker sees only its own device: ``CUDA_VISIBLE_DEVICES`` is entry ``index`` of the
    parent's list (``index`` itself when the parent has none), so the worker trains on ``cuda:0`` and
    nothing implicit lands on another run's GPU. Each worker gets an equal share of the cores:
    ``MIXBENCH_CPUS`` (torch's threads, PuzzleMix's graph-cut workers), ``OMP_NUM_THREADS`` and, unless
    set, ``MIXBENCH_WORKERS`` (streaming data loaders, at most 8).
    """
    env = dict(os.environ if environ is None else environ)
    share = max(1, (available_cpus(env) if cpus is None else cpus) // max(1, n_workers))
    if gpu:
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and index >= len(visible):
            raise UsageError(f"GPU worker {index}: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} lists "
                             f"only {len(visible)} device(s)")
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    env["MIXBENCH_CPUS"] = str(share)
    env["OMP_NUM_THREADS"] = str(share)
    if not env.get("MIXBENCH_WORKERS"):
        env["MIXBENCH_WORKERS"] = str(min(8, share))
    return env


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` is ``env`` inside (what a process spawned there inherits), restored after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _parallel_worker(first, queue, device: str, out: str, progress: bool, where: str = "", cell=None) -> None:
    """Worker process of :func:`run_parallel`: train ``first``, then cells from ``queue`` on ``device`` until it is empty.

    Its environment (:func:`worker_environment`) was set before it started: one visible GPU
    (``device`` is then ``cuda:0``) and its share of the cores. ``cell`` (a module-level function,
    :func:`_train_cell` unless given) trains one queued cell.
    """
    import torch

    torch.set_num_threads(available_cpus())
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    where = where or device
    item = first
    while item is not None:
        label, spec_dict = item
        (cell or _train_cell)(label, spec_dict, device, Path(out), progress, where)
        item = queue.get()


def _train_cell(label: str, spec_dict: Dict[str, Any], device: str, out: Path, progress: bool, where: str) -> None:
    """One cell of a :func:`run_parallel` worker, in the worker's process, on ``device``."""
    spec = dataclasses.replace(RunSpec.from_record(spec_dict), device=device)  # imports the run's plugins
    run_dir = spec.run_dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {**local_launch_info(spec, device), "where": where}
    record_launch(run_dir, info)
    try:
        train_and_evaluate(spec, run_dir, progress=progress, desc=f"{label} [{where}]")
    except Exception as exc:  # one failed cell must not stop the other cells
        record_launch(run_dir, {**info, "error": f"{type(exc).__name__}: {exc}", "failed_at": now()})
        traceback.print_exc()
        print(f"mixbench: {label} failed on {where}: {exc}", file=sys.stderr)


def run_parallel(specs: Sequence[RunSpec], out: Path, devices: Sequence[str], *,
                 progress: bool = True) -> List[Dict[str, Any]]:
    """Train the cells of ``specs`` with one worker process per device (e.g. ``cuda:0``, ``cuda:1``).

    Complete cells are skipped; the others resume from their checkpoints. Returns
    the results of the cells that completed (failed cells are reported and skipped).
    """
    todo = []
    for i, spec in enumerate(specs, 1):
        if is_complete(spec.run_dir(out)):
            print(f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}: already complete, skipped", file=sys.stderr)
        else:
            todo.append((f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}", spec.to_dict()))
    chosen = list(devices)[:len(todo)]
    slots = []
    for d in chosen:
        gpu = d.startswith("cuda")
        index = torch_device_index(d) if gpu else len(slots)
        env = worker_environment(index, len(chosen), gpu=gpu)
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpu else f"cpu worker {index}"
        slots.append(("cuda:0" if gpu else "cpu", env, where))
    run_workers(todo, slots, out, progress=progress)
    return collect_results(specs, out)


def collect_results(specs: Sequence[RunSpec], out: Path) -> List[Dict[str, Any]]:
    """The result.json of each cell that has one, after workers trained them; says how many did not complete."""
    results = [read_result(s.run_dir(out)) for s in specs]
    failed = [s for s, r in zip(specs, results) if not r or r.get("status") != "complete"]
    if failed:
        print(f"mixbench: {len(failed)} run(s) did not complete; see `mixbench status {out}`", file=sys.stderr)
    return [r for r in results if r]


def run_workers(todo: Sequence[Any], slots: Sequence[Any], out: Path, *, progress: bool = True, cell=None) -> None:
    """Train the cells ``todo`` (``(label, spec dict)`` pairs) with one spawned worker process per slot,
    ``(device, environment, where)``, and wait for them; ``cell`` is passed to :func:`_parallel_worker`.

    Each worker starts with a cell of its own, so that every slot gets work even when one process is
    slower to start (importing torch, initialising CUDA) than the others need to finish a short cell;
    the rest is shared through a queue. The environment is the worker's from its start: set before it
    imports torch (``CUDA_VISIBLE_DEVICES``, its share of the cores).
    """
    import multiprocessing as mp

    if not todo:
        return
    slots = list(slots)[:len(todo)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for item in todo[len(slots):]:
        queue.put(item)
    for _ in slots:
        queue.put(None)
    workers = [(ctx.Process(target=_parallel_worker, args=(first, queue, device, str(out), progress, where, cell)), env)
               for (device, env, where), first in zip(slots, todo)]
    for w, env in workers:
        with _environment(env):  # a spawned process inherits it: pinned before it imports torch
            w.start()
    for w, _ in workers:
        w.join()


def torch_device_index(name: str) -> int:
    """The index of ``cuda:N`` (0 for plain ``cuda``)."""
    _, _, index = name.partition(":")
    return int(index) if index else 0


def local_devices(specs: Sequence[RunSpec]) -> List[str]:
    """``cuda:0..N-1`` when the grid may use CUDA and several GPUs are visible, else one device (sequential)."""
    wanted = {s.device for s in specs}
    if wanted <= {"auto", "cuda"}:
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return []

