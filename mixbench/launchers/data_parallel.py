"""Launchers of data-parallel runs (:mod:`mixbench.distributed`): on this machine with PyTorch's
elastic launcher (torchrun's engine) and as ranks of an external ``torchrun`` (Slurm tasks:
:mod:`mixbench.launchers.slurm`). Every rank runs :func:`mixbench.launchers.cell.train_and_evaluate`.

Every worker process of a data-parallel run first calls :func:`mixbench.distributed.init_worker`.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mixbench.distributed import Parallel, destroy_process_group, init_process_group, init_worker
from mixbench.launchers.cell import train_and_evaluate
from mixbench.launchers.local import available_cpus, run_local
from mixbench.launchers.record import local_launch_info, now, record_launch, record_ranks


# ---------------------------------------------------------------------------
# Worker start-up


def local_cpus() -> int:
    """This rank's share of the machine's cores: the available ones over the ranks on this machine."""
    return max(1, available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    Each rank gets ``cores / nproc`` cores. When a rank dies or raises, the launcher stops the others and
    this raises :class:`RankFailed` naming the rank, its exit code or signal; the next launch resumes the
    run from its last checkpoint. Returns rank 0's summary (``status``, ``error``).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = spec.nproc
    cpus = max(1, available_cpus() // n)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"mixbench-{spec.run_id}-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0, monitor_interval=0.1,
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
    """Train a grid on this machine, one cell after the other: data-parallel cells (``nproc > 1``)
    with :func:`launch_local`, the others in this process (:func:`mixbench.launchers.local.run_local`).

    A cell whose rank died is reported (launch.json gets the error) and the grid goes on; a rerun
    resumes it from its last checkpoint. Returns the results of the cells (as ``run_local`` does).
    """
    from mixbench.results import is_complete, read_result

    results: List[Dict[str, Any]] = []
    for i, spec in enumerate(specs, 1):
        label = f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}"
        run_dir = spec.run_dir(out)
        if spec.nproc == 1:
            results += run_local([spec], out, progress=progress)
            continue
        if is_complete(run_dir) and not spec.eval:
            print(f"{label}: already complete in {run_dir}, skipped", file=sys.stderr)
            results.append(read_result(run_dir))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {**local_launch_info(spec, spec.device), "nproc": spec.nproc}
        record_launch(run_dir, info)
        try:
            summary = launch_local(spec, run_dir, progress=progress, desc=f"{label} x{spec.nproc}")
        except RankFailed as exc:
            record_launch(run_dir, {**info, "error": str(exc), "failed_at": now()})
            print(f"mixbench: {label}: {exc}", file=sys.stderr)
            results.append({"status": "failed", "method": spec.method, "seed": spec.seed, "run_dir": str(run_dir),
                            "error": str(exc)})
            continue
        if summary.get("status") == "running":
            print(f"{label}: running elsewhere ({summary.get('error')}), skipped", file=sys.stderr)
            results.append({"status": "running", "method": spec.method, "seed": spec.seed, "run_dir": str(run_dir),
                            "error": summary.get("error")})
            continue
        result = read_result(run_dir) if (run_dir / "result.json").exists() else None
        if result and result.get("status") == "failed":
            record_launch(run_dir, {**info, "error": result.get("error"), "failed_at": now()})
            print(f"{label}: FAILED: {result.get('error')} (result.json in {run_dir}); the grid goes on",
                  file=sys.stderr)
        results.append(result or {"status": "failed", "method": spec.method, "seed": spec.seed,
                                  "run_dir": str(run_dir), "error": "no result.json"})
    return results
