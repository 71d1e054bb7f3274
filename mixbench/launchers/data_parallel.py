"""Launchers of data-parallel runs (:mod:`mixbench.distributed`): on this machine with PyTorch's
elastic launcher (torchrun's engine) and as ranks of an external ``torchrun`` (Slurm tasks:
:mod:`mixbench.launchers.slurm`). Every rank runs :func:`mixbench.launchers.cell.train_and_evaluate`.

Every worker process of a data-parallel run first calls :func:`mixbench.distributed.init_worker`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from mixbench import UsageError
from mixbench.distributed import Parallel, destroy_process_group, init_process_group, init_worker
from mixbench.launchers.cell import train_and_evaluate
from mixbench.launchers.local import available_cpus, collect_results, run_local, run_workers, worker_environment
from mixbench.launchers.record import local_launch_info, now, record_launch, record_ranks


# ---------------------------------------------------------------------------
# Worker start-up


def local_cpus() -> int:
    """This rank's share of the machine's cores: the available ones over the ranks on this machine."""
    return max(1, available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def _rank_main(spec_dict: Dict[str, Any], run_dir: str, progress: bool, desc: str, cpus: int) -> Dict[str, Any]:
    """One rank of a local data-parallel run (started by PyTorch's elastic launcher)."""
    import signal

    # A forked rank inherits the launcher's Python-level handlers, which could not run while the rank
    # waits in a collective: when the launcher stops the ranks, SIGTERM ends them at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init_worker(cpus)
    from mixbench.lock import RunLocked
    from mixbench.spec import RunSpec
    from mixbench.train import RunFailed

    spec = RunSpec.from_record(spec_dict)  # imports the run's plugins in this (possibly spawned) rank
    device = init_process_group(spec.device)
    spec = dataclasses.replace(spec, device=str(device))
    record_ranks(Path(run_dir))
    try:
        result = train_and_evaluate(spec, Path(run_dir), progress=progress and int(os.environ["RANK"]) == 0,
                                    desc=desc)
        return {"status": result.get("status")}
    except RunLocked as exc:
        return {"status": "running", "error": str(exc)}
    except RunFailed as exc:
        if int(os.environ["RANK"]) != 0:
            raise  # a failure of another rank than the writer's: the launcher reports which one
        return {"status": "failed", "error": exc.result["error"]}
    finally:
        destroy_process_group()


class RankFailed(RuntimeError):
    """A rank of a data-parallel run died or raised; the others were stopped."""


def launch_local(spec: Any, run_dir: Path, *, progress: bool = True, desc: str = "") -> Dict[str, Any]:
    """Train one ``nproc``-process run on this machine with PyTorch's elastic launcher (torchrun's engine).

    Each rank gets ``cores / nproc`` cores (``cores``: :func:`available_cpus`, this process's share when
    several cells run at once). The rendezvous store and the ranks' store (``MASTER_PORT``) listen on
    ports the kernel assigns when they bind (port 0) and that they hold until the run ends, so cells
    launched at the same time on this machine never share one. When a rank dies or raises, the launcher
    stops the others and this raises :class:`RankFailed` naming the rank, its exit code or signal; the
    next launch resumes the run from its last checkpoint. Returns rank 0's summary (``status``, ``error``).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = spec.nproc
    cpus = max(1, available_cpus() // n)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"mixbench-{spec.run_id}-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
        # The launcher hosts the store on the port the kernel gives it: a port in use is an error,
        # never a connection to another launcher's store.
        rdzv_configs={"is_host": True},
        # CPU runs fork (the ranks inherit the imported modules: seconds instead of a minute to start);
        # CUDA runs spawn, as torchrun does (CUDA cannot be used in a forked child).
        start_method="spawn" if _wants_cuda(spec.device) else "fork",
    )
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MIXBENCH_CPUS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MIXBENCH_CPUS"] = str(cpus)  # inherited by the ranks
    try:
        returns = elastic_launch(config, _rank_main)(spec.to_dict(), str(run_dir), progress, desc, cpus)
    except ChildFailedError as exc:
        raise RankFailed(describe_failures(exc, run_dir)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return returns.get(0) or {}


def _wants_cuda(device: str) -> bool:
    return device != "cpu" and (device.startswith("cuda") or torch.cuda.is_available())


def describe_failures(exc: Any, run_dir: Path) -> str:
    """One line per failed rank: which, how (exit code or signal), where its error is."""
    import signal as _signal

    parts = []
    for rank, failure in sorted(exc.failures.items()):
        code = failure.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by signal {_signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        text = failure.message
        while isinstance(text, dict):  # the error file's {"message": {"message": traceback, ...}}
            text = text.get("message", "")
        lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
        message = f": {lines[-1]}" if lines and not lines[-1].startswith("<N/A>") else ""
        parts.append(f"rank {rank} (pid {failure.pid}) {how}{message}")
    return (f"{run_dir}: data-parallel run stopped, " + "; ".join(parts)
            + "; the other ranks were stopped; rerun to resume from the last checkpoint")


def run_grid_as_rank(specs: Sequence[Any], out: Path, *, progress: bool = True) -> List[Dict[str, Any]]:
    """This process is one rank of an external launcher (torchrun): train every cell of the grid
    together with the other ranks, one cell after the other. Returns the results (rank 0's view)."""
    from mixbench.results import read_result
    from mixbench.train import RunFailed

    init_worker(local_cpus())
    device = init_process_group(specs[0].device if specs else "auto")
    par = Parallel.current()
    results = []
    try:
        for i, spec in enumerate(specs, 1):
            spec = dataclasses.replace(spec, device=str(device))
            run_dir = spec.run_dir(out)
            desc = f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}"
            try:
                results.append(train_and_evaluate(spec, run_dir, progress=progress and par.writer, desc=desc))
            except RunFailed as exc:
                if par.writer:
                    print(f"{desc}: FAILED: {exc.result['error']}", file=sys.stderr)
                results.append(read_result(run_dir) or exc.result)
    finally:
        destroy_process_group()
    return results


def under_external_launcher(environ: Optional[Dict[str, str]] = None) -> bool:
    """Whether this process is one rank of an external launcher (torchrun sets these)."""
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE") or 1) > 1 and "RANK" in env and "MASTER_ADDR" in env


def run_grid_local(specs: Sequence[Any], out: Path, *, progress: bool = True) -> List[Dict[str, Any]]:
    """Train a grid on this machine: data-parallel cells (``nproc > 1``) with :func:`launch_local`, the
    others in this process (:func:`mixbench.launchers.local.run_local`).

    On GPUs the visible devices are split into groups of ``nproc`` (:func:`local_gpu_groups`) and, with
    more than one group, the groups train cells at once (:func:`run_groups`); else, and on the CPU, one
    cell after the other. A cell whose rank died is reported (launch.json gets the error) and the grid
    goes on; a rerun resumes it from its last checkpoint. Returns the results of the cells (as
    ``run_local`` does).
    """
    groups = local_gpu_groups(specs)
    if len(groups) > 1 and len(specs) > 1:
        return run_groups(specs, out, groups, progress=progress)
    return [run_cell_local(spec, out, label=f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}", progress=progress)
            for i, spec in enumerate(specs, 1)]


def run_cell_local(spec: Any, out: Path, *, label: str, progress: bool = True) -> Dict[str, Any]:
    """Train one cell here: in this process when ``nproc`` is 1, else with :func:`launch_local`. Returns its result."""
    from mixbench.results import is_complete, read_result

    run_dir = spec.run_dir(out)
    if spec.nproc == 1:
        return run_local([spec], out, progress=progress)[0]
    if is_complete(run_dir) and not spec.eval:
        print(f"{label}: already complete in {run_dir}, skipped", file=sys.stderr)
        return read_result(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {**local_launch_info(spec, spec.device), "nproc": spec.nproc}
    if os.environ.get("CUDA_VISIBLE_DEVICES") and _wants_cuda(spec.device):
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    record_launch(run_dir, info)
    try:
        summary = launch_local(spec, run_dir, progress=progress, desc=f"{label} x{spec.nproc}")
    except RankFailed as exc:
        record_launch(run_dir, {**info, "error": str(exc), "failed_at": now()})
        print(f"mixbench: {label}: {exc}", file=sys.stderr)
        return {"status": "failed", "method": spec.method, "seed": spec.seed, "run_dir": str(run_dir),
                "error": str(exc)}
    if summary.get("status") == "running":
        print(f"{label}: running elsewhere ({summary.get('error')}), skipped", file=sys.stderr)
        return {"status": "running", "method": spec.method, "seed": spec.seed, "run_dir": str(run_dir),
                "error": summary.get("error")}
    result = read_result(run_dir) if (run_dir / "result.json").exists() else None
    if result and result.get("status") == "failed":
        record_launch(run_dir, {**info, "error": result.get("error"), "failed_at": now()})
        print(f"{label}: FAILED: {result.get('error')} (result.json in {run_dir}); the grid goes on",
              file=sys.stderr)
    return result or {"status": "failed", "method": spec.method, "seed": spec.seed, "run_dir": str(run_dir),
                      "error": "no result.json"}


# ---------------------------------------------------------------------------
# Several data-parallel cells at once: one group of GPUs each


def gpu_groups(visible: Sequence[str], nproc: int) -> List[List[str]]:
    """Split the visible GPUs (``CUDA_VISIBLE_DEVICES`` entries: ids or UUIDs) into ``len(visible) // nproc``
    disjoint groups of ``nproc``, in order; the rest stay idle. Fewer GPUs than ``nproc``: UsageError."""
    visible = [str(v).strip() for v in visible]
    if len(visible) < nproc:
        seen = f" ({','.join(visible)})" if visible else ""
        raise UsageError(f"--nproc-per-run {nproc} needs {nproc} GPUs, one per process, and this machine sees "
                         f"{len(visible)}{seen}; lower --nproc-per-run or pass --device cpu")
    return [visible[i * nproc:(i + 1) * nproc] for i in range(len(visible) // nproc)]


def visible_gpus(environ: Optional[Mapping[str, str]] = None, count: Optional[int] = None) -> List[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them for a child: the parent's own
    list (its first ``count`` entries, ``count`` being CUDA's device count) or ``0..count-1`` without one."""
    env = os.environ if environ is None else environ
    count = torch.cuda.device_count() if count is None else count
    if "CUDA_VISIBLE_DEVICES" in env:
        return [v.strip() for v in env["CUDA_VISIBLE_DEVICES"].split(",") if v.strip()][:count]
    return [str(i) for i in range(count)]


def local_gpu_groups(specs: Sequence[Any]) -> List[List[str]]:
    """The GPU groups a local grid trains on: :func:`gpu_groups` of the visible GPUs by the largest
    ``nproc`` when a data-parallel cell of the grid trains on CUDA, else none (the CPU: one cell after
    the other)."""
    cuda = [s.nproc for s in specs if s.nproc > 1 and _wants_cuda(s.device)]
    return gpu_groups(visible_gpus(), max(cuda)) if cuda else []


def run_groups(specs: Sequence[Any], out: Path, groups: Sequence[Sequence[str]], *,
               progress: bool = True) -> List[Dict[str, Any]]:
    """Train the cells of ``specs`` with one worker process per group of GPUs, at once
    (:func:`mixbench.launchers.local.run_workers`): each worker sees only its group
    (``CUDA_VISIBLE_DEVICES``, set before CUDA starts in it and inherited by the ranks it launches, so
    rank r trains on the group's r-th GPU) and gets ``1 / len(groups)`` of the cores. An empty group is
    a worker on the CPU (its environment's ``CUDA_VISIBLE_DEVICES`` untouched). The run locks keep two
    workers, or two launchers, off one cell. Returns the results of the cells that have one.
    """
    from mixbench.results import is_complete

    todo = []
    for i, spec in enumerate(specs, 1):
        label = f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}"
        if is_complete(spec.run_dir(out)) and not spec.eval:
            print(f"{label}: already complete in {spec.run_dir(out)}, skipped", file=sys.stderr)
        else:
            todo.append((label, spec.to_dict()))
    run_workers(todo, group_slots(groups[:len(todo)]), out, progress=progress, cell=_group_cell)
    return collect_results(specs, out)


def group_slots(groups: Sequence[Sequence[str]], environ: Optional[Mapping[str, str]] = None,
                cpus: Optional[int] = None) -> List[Any]:
    """The workers of :func:`run_groups`: ``(device, environment, where)`` for each group."""
    parent = os.environ if environ is None else environ
    slots = []
    for i, group in enumerate(groups):
        env = worker_environment(i, len(groups), gpu=False, environ=parent, cpus=cpus)
        if not parent.get("MIXBENCH_WORKERS"):
            env.pop("MIXBENCH_WORKERS", None)  # each rank takes its own share (init_worker)
        if group:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        slots.append(("auto", env, f"GPUs {','.join(group)}" if group else f"cpu group {i}"))
    return slots


def _group_cell(label: str, spec_dict: Dict[str, Any], device: str, out: Path, progress: bool, where: str) -> None:
    """One cell of a :func:`run_groups` worker (its ``cell``): launched from the worker's process."""
    import traceback

    from mixbench.spec import RunSpec

    try:
        run_cell_local(RunSpec.from_record(spec_dict), out, label=f"{label} [{where}]", progress=progress)
    except Exception as exc:  # one failed cell must not stop the other cells
        traceback.print_exc()
        print(f"mixbench: {label} failed on {where}: {exc}", file=sys.stderr)
