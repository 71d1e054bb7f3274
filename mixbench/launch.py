"""Running a grid of RunSpecs: skip what is done, train the rest, collect the results."""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mixbench import UsageError
from mixbench.lock import process_alive
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
    from mixbench.train import RunFailed, train_run  # torch-heavy import kept off the CLI's start-up path

    ensure_writable_dir(out)
    launched = _now()
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
                lock = RunLock(run_dir).acquire()
            except RunLocked as exc:
                who = describe_owner(exc.owner)
                later = "" if second_look else "; looked at again at the end"
                print(f"{label}: running elsewhere ({who}), skipped{later}", file=sys.stderr)
                results[i] = {"status": "running", "method": spec.method, "seed": spec.seed,
                              "run_dir": str(run_dir), "error": f"running elsewhere: {who} ({exc.path})"}
                busy.append(i)
                continue
            try:
                if is_complete(run_dir):
                    results[i] = read_result(run_dir)
                else:
                    info = _local_launch_info(spec, spec.device)
                    _record_launch(run_dir, info)
                    try:
                        results[i] = train_run(spec, run_dir, progress=progress, desc=label)
                    except RunFailed as exc:
                        _record_launch(run_dir, {**info, "error": exc.result["error"], "failed_at": _now()})
                        if exc.__cause__ is not None:
                            traceback.print_exception(type(exc.__cause__), exc.__cause__, exc.__cause__.__traceback__)
                        print(f"{label}: FAILED: {exc.result['error']} (result.json in {run_dir}); "
                              "the grid goes on", file=sys.stderr)
                        results[i] = exc.result
                        continue
                    except Exception as exc:
                        _record_launch(run_dir, {**info, "error": f"{type(exc).__name__}: {exc}", "failed_at": _now()})
                        raise
                if spec.eval:  # suites requested with the run (--eval); only those not yet in result.json run
                    from mixbench.evaluate import ensure_evaluated

                    results[i] = ensure_evaluated(run_dir, spec.eval, device=spec.device)
            finally:
                lock.release()
    return results


# ---------------------------------------------------------------------------
# Local: one run per GPU in parallel
# ---------------------------------------------------------------------------
LAUNCH_FILE = "launch.json"


def _record_launch(run_dir: Path, info: Dict[str, Any]) -> None:
    from mixbench.results import atomic_write_json

    atomic_write_json(Path(run_dir) / LAUNCH_FILE, info)


def read_launch(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / LAUNCH_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _local_launch_info(spec: RunSpec, device: str) -> Dict[str, Any]:
    return {"executor": "local", "pid": os.getpid(), "host": socket.gethostname(), "device": device,
            "started_at": _now(), "spec": spec.to_dict()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def train_and_evaluate(spec: RunSpec, run_dir: Path, *, progress: bool, desc: str) -> Dict[str, Any]:
    """Train one cell unless its result is complete, then run its requested evaluation suites."""
    if is_complete(run_dir):
        result = read_result(run_dir)
    else:
        from mixbench.train import train_run

        result = train_run(spec, run_dir, progress=progress, desc=desc)
    if getattr(spec, "eval", None):
        from mixbench.evaluate import ensure_evaluated

        result = ensure_evaluated(run_dir, spec.eval, device=spec.device)
    return result


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


def _parallel_worker(first, queue, device: str, out: str, progress: bool, where: str = "") -> None:
    """Worker process of :func:`run_parallel`: train ``first``, then cells from ``queue`` on ``device`` until it is empty.

    Its environment (:func:`worker_environment`) was set before it started: one visible GPU
    (``device`` is then ``cuda:0``) and its share of the cores.
    """
    import torch

    torch.set_num_threads(available_cpus())
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    where = where or device
    item = first
    while item is not None:
        label, spec_dict = item
        spec = dataclasses.replace(RunSpec.from_record(spec_dict), device=device)  # imports the run's plugins
        run_dir = spec.run_dir(Path(out))
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {**_local_launch_info(spec, device), "where": where}
        _record_launch(run_dir, info)
        try:
            train_and_evaluate(spec, run_dir, progress=progress, desc=f"{label} [{where}]")
        except Exception as exc:  # one failed cell must not stop the other cells
            _record_launch(run_dir, {**info, "error": f"{type(exc).__name__}: {exc}", "failed_at": _now()})
            traceback.print_exc()
            print(f"mixbench: {label} failed on {where}: {exc}", file=sys.stderr)
        item = queue.get()


def run_parallel(specs: Sequence[RunSpec], out: Path, devices: Sequence[str], *,
                 progress: bool = True) -> List[Dict[str, Any]]:
    """Train the cells of ``specs`` with one worker process per device (e.g. ``cuda:0``, ``cuda:1``).

    Complete cells are skipped; the others resume from their checkpoints. Returns
    the results of the cells that completed (failed cells are reported and skipped).
    """
    import multiprocessing as mp

    todo = []
    for i, spec in enumerate(specs, 1):
        if is_complete(spec.run_dir(out)):
            print(f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}: already complete, skipped", file=sys.stderr)
        else:
            todo.append((f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}", spec.to_dict()))
    if todo:
        ctx = mp.get_context("spawn")
        chosen = list(devices)[:len(todo)]
        # Each worker starts with a cell of its own, so that every device gets work even when
        # one process is slower to start (importing torch, initialising CUDA) than the others
        # need to finish a short cell; the rest is shared through the queue.
        queue = ctx.Queue()
        for item in todo[len(chosen):]:
            queue.put(item)
        workers = []
        for d, first in zip(chosen, todo):
            gpu = d.startswith("cuda")
            index = torch_device_index(d) if gpu else len(workers)
            env = worker_environment(index, len(chosen), gpu=gpu)
            where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpu else f"cpu worker {index}"
            workers.append((ctx.Process(target=_parallel_worker,
                                        args=(first, queue, "cuda:0" if gpu else "cpu", str(out), progress, where)), env))
        for _ in workers:
            queue.put(None)
        for w, env in workers:
            with _environment(env):  # a spawned process inherits it: pinned before it imports torch
                w.start()
        for w, _ in workers:
            w.join()
    results = [read_result(s.run_dir(out)) for s in specs]
    failed = [s for s, r in zip(specs, results) if not r or r.get("status") != "complete"]
    if failed:
        print(f"mixbench: {len(failed)} run(s) did not complete; see `mixbench status {out}`", file=sys.stderr)
    return [r for r in results if r]


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


# ---------------------------------------------------------------------------
# Slurm: one job array, one checkpointable task per run
# ---------------------------------------------------------------------------
# Profile keys -> (type, meaning). Documented in the README and slurm/example.yaml.
PROFILE_KEYS: Dict[str, Tuple[type, str]] = {
    "partition": (str, "partition (sbatch --partition)"),
    "account": (str, "account to charge (--account)"),
    "qos": (str, "quality of service (--qos)"),
    "gpus_per_node": (int, "GPUs per node (--gpus-per-node); 0 for CPU-only; a data-parallel run "
                           "(--nproc-per-run N) takes one task per GPU"),
    "nodes": (int, "nodes per run (--nodes; default 1); a data-parallel run of N processes runs N / nodes "
                   "tasks on each"),
    "cpus_per_task": (int, "CPU cores per task (--cpus-per-task)"),
    "mem_gb": (float, "memory per task in GB (--mem)"),
    "timeout_min": (int, "time limit per job in minutes (--time); a run that needs longer is requeued"),
    "array_parallelism": (int, "at most this many array tasks run at once (--array=...%N)"),
    "signal_delay_s": (int, "the preemption/time-limit signal comes this many seconds before the kill"),
    "max_num_timeout": (int, "how many times a run may be requeued after hitting the time limit"),
    "job_name": (str, "job name (--job-name)"),
    "constraint": (str, "node features (--constraint)"),
    "exclude": (str, "nodes to avoid (--exclude)"),
    "additional_parameters": (dict, "any other sbatch options, e.g. {mail-type: END, requeue: true}"),
    "setup": (list, "shell commands run in the job before training (module load, conda activate...)"),
    "python": (str, "the Python command in the job (default: this interpreter, sys.executable)"),
    "log_dir": (str, "submitit folder for logs and pickles (default: OUT/slurm-logs)"),
}
DEFAULT_PROFILE: Dict[str, Any] = {
    "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "timeout_min": 24 * 60, "array_parallelism": 64,
    "signal_delay_s": 120, "max_num_timeout": 30, "job_name": "mixbench",
}


def load_profile(path: Optional[Path]) -> Dict[str, Any]:
    """A Slurm profile (YAML mapping of PROFILE_KEYS) over the defaults; unknown keys are a usage error."""
    import yaml

    profile = dict(DEFAULT_PROFILE)
    if path is None:
        return profile
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Slurm profile {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"Slurm profile {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"Slurm profile {str(path)!r} must be a mapping of keys")
    for key, value in data.items():
        if key not in PROFILE_KEYS:
            raise UsageError(f"{path}: unknown profile key {key!r}; valid keys: {', '.join(PROFILE_KEYS)}")
        kind = PROFILE_KEYS[key][0]
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
        if kind is int and isinstance(value, bool):
            ok = False
        if not ok or (kind in (int, float) and value < 0):
            raise UsageError(f"{path}: profile key {key!r} must be a non-negative {kind.__name__}, got {value!r}")
        profile[key] = value
    if profile.get("setup") and not all(isinstance(s, str) for s in profile["setup"]):
        raise UsageError(f"{path}: 'setup' must be a list of shell commands (strings)")
    return profile


def slurm_parameters(profile: Mapping[str, Any]) -> Dict[str, Any]:
    """submitit SlurmExecutor parameters for a profile."""
    params: Dict[str, Any] = {}
    for key in ("partition", "account", "qos", "cpus_per_task", "job_name", "constraint", "exclude",
                "array_parallelism", "signal_delay_s"):
        if profile.get(key) is not None:
            params[key] = profile[key]
    if profile.get("gpus_per_node"):
        params["gpus_per_node"] = profile["gpus_per_node"]
    if profile.get("mem_gb") is not None:
        params["mem"] = f"{int(math.ceil(profile['mem_gb'] * 1024))}M"
    if profile.get("timeout_min") is not None:
        params["time"] = profile["timeout_min"]
    if profile.get("additional_parameters"):
        params["additional_parameters"] = dict(profile["additional_parameters"])
    if profile.get("setup"):
        params["setup"] = list(profile["setup"])
    return params


def python_command(profile: Mapping[str, Any]) -> str:
    return profile.get("python") or shlex.quote(sys.executable)


def parallel_parameters(profile: Mapping[str, Any], nproc: int) -> Dict[str, Any]:
    """The sbatch options of runs of ``nproc`` processes: ``nodes`` and one task per process on each."""
    nodes = int(profile.get("nodes") or 1)
    if nproc == 1 and nodes == 1:
        return {}
    if nproc % nodes:
        raise UsageError(f"--nproc-per-run {nproc} does not split over the profile's {nodes} nodes")
    per_node = nproc // nodes
    gpus = profile.get("gpus_per_node")
    if gpus and gpus != per_node:
        raise UsageError(f"a run of {nproc} processes on {nodes} node(s) takes {per_node} GPU(s) per node "
                         f"(one per process); the profile asks gpus_per_node: {gpus}")
    return {"nodes": nodes, "ntasks_per_node": per_node}


def sbatch_script(profile: Mapping[str, Any], folder: Path, n_tasks: int, nproc: int = 1) -> str:
    """The sbatch script a grid of ``n_tasks`` runs is submitted with (what `run --dry-run` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python_command(profile)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    params = {**slurm_parameters(profile), **parallel_parameters(profile, nproc)}
    if n_tasks > 1:
        params["map_count"] = n_tasks
    return _make_sbatch_string(command=command, folder=folder, **params)


class RunTask:
    """One Slurm array task: train one run to completion, resuming from its checkpoint.

    submitit's checkpoint protocol: on the preemption or time-limit signal
    (USR2, ``signal_delay_s`` before the kill) submitit calls
    :meth:`checkpoint`, pickles what it returns and requeues the task. The
    training state is already on disk (an atomic checkpoint after every epoch),
    so the requeued task is this same call: it resumes from the last finished
    epoch. A run whose result.json is complete is never trained again.
    """

    def __init__(self, spec: Dict[str, Any], run_dir: str):
        self.spec = spec
        self.run_dir = run_dir

    def __call__(self) -> Dict[str, Any]:
        run_dir = Path(self.run_dir)
        spec = RunSpec.from_record(self.spec)  # imports the run's plugins (recorded as absolute paths)
        if spec.nproc > 1:  # this task is one rank of a data-parallel run
            return _summary(_train_slurm_rank(spec, run_dir))
        if is_complete(run_dir):
            print(f"mixbench: {run_dir} is already complete, not trained again", flush=True)
        else:
            print(f"mixbench: training {spec.method} seed {spec.seed} in {run_dir} ({_job_env()})", flush=True)
        return _summary(train_and_evaluate(spec, run_dir, progress=True, desc=f"{spec.method} seed {spec.seed}"))

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        from mixbench.checkpoint import flush_pending

        flush_pending()  # the last finished epoch, if the interval had not written it yet
        print(f"mixbench: signal received, requeueing; {self.run_dir} resumes from its last epoch checkpoint",
              file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(RunTask(self.spec, self.run_dir))


def record_ranks(run_dir: Path) -> None:
    """Add every rank's host and pid to a data-parallel run's launch.json (``ranks``), written by rank 0."""
    import torch.distributed as dist

    mine = {"rank": dist.get_rank(), "host": socket.gethostname(), "pid": os.getpid()}
    ranks: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        _record_launch(run_dir, {**(read_launch(run_dir) or {}), "ranks": ranks})


def _train_slurm_rank(spec: RunSpec, run_dir: Path) -> Optional[Dict[str, Any]]:
    """This Slurm task is one rank of ``spec``'s data-parallel run (one task per process): the rendezvous
    from Slurm's environment (submitit's ``TorchDistributedEnvironment``: rank 0's host as
    ``MASTER_ADDR``, a port derived from the job id, ranks from ``SLURM_PROCID``), this task's cores
    (``SLURM_CPUS_PER_TASK``), then the run. Returns rank 0's result (None on the other ranks)."""
    import submitit

    from mixbench.distributed import destroy_process_group, init_process_group, init_worker

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    init_worker(int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or available_cpus())
    device = init_process_group(spec.device)
    spec = dataclasses.replace(spec, device=str(device))
    rank = int(os.environ["RANK"])
    try:
        record_ranks(run_dir)
        if rank == 0:
            print(f"mixbench: training {spec.method} seed {spec.seed} in {run_dir}: {spec.nproc} processes, "
                  f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_job_env()})", flush=True)
        result = train_and_evaluate(spec, run_dir, progress=rank == 0, desc=f"{spec.method} seed {spec.seed}")
        return result if rank == 0 else None
    finally:
        destroy_process_group()


def _job_env() -> str:
    try:
        import submitit

        env = submitit.JobEnvironment()
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"job {env.job_id} on {env.hostname}, restart {restarts}"
    except Exception:  # not inside a submitit job
        return f"pid {os.getpid()}"


def _summary(result: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    keys = ("run_id", "method", "dataset", "model", "seed", "epochs", "final_top1", "best_top1")
    return {k: result.get(k) for k in keys} if result else {}


def slurm_queue() -> Optional[Dict[str, str]]:
    """Job id (``123`` or ``123_4``) -> Slurm state for this user's jobs, or None if squeue is unavailable.

    Recently finished jobs are included (``--states=all``, as long as Slurm keeps them, MinJobAge).
    """
    user = os.environ.get("USER") or getpass.getuser()
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", user, "-o", "%i|%T"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    states = {}
    for line in proc.stdout.splitlines():
        if "|" in line:
            job, state = line.strip().split("|", 1)
            states[job] = state
    return states


ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


def submit_slurm(specs: Sequence[RunSpec], out: Path, profile: Mapping[str, Any]) -> Optional[str]:
    """Submit the unfinished cells of ``specs`` as one job array and return its job id (None: nothing to do).

    Complete cells are skipped, cells whose job is still queued or running are
    left alone, the others are (re)submitted and resume from their checkpoints.
    Returns right after submission.
    """
    import submitit

    out = Path(out).resolve()
    queue = slurm_queue() or {}
    todo: List[Tuple[RunSpec, Path]] = []
    done = active = 0
    for spec in specs:
        run_dir = spec.run_dir(out)
        if is_complete(run_dir):
            done += 1
            continue
        launch = read_launch(run_dir) or {}
        job = launch.get("job_id")
        if launch.get("executor") == "slurm" and job and queue.get(str(job)) in ACTIVE_STATES:
            active += 1
            print(f"mixbench: {spec.method} seed {spec.seed} is already {queue[str(job)].lower()} as job {job}, "
                  "not resubmitted", file=sys.stderr)
            continue
        todo.append((spec, run_dir))
    print(f"mixbench: {len(specs)} runs: {done} complete (skipped), {active} already queued/running, "
          f"{len(todo)} to submit", file=sys.stderr)
    if not todo:
        print("nothing to submit: every run is complete or already queued")
        return None
    todo = _download_once([s for s, _ in todo], [d for _, d in todo])
    nprocs = {s.nproc for s, _ in todo}
    if len(nprocs) > 1:
        raise UsageError(f"one job array takes runs of one size; this grid mixes --nproc-per-run {sorted(nprocs)}")
    folder = Path(profile.get("log_dir") or out / "slurm-logs").resolve()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(profile.get("max_num_timeout", 3)),
                                      python=python_command(profile))
    executor.update_parameters(**slurm_parameters(profile), **parallel_parameters(profile, nprocs.pop()))
    with executor.batch():
        jobs = [executor.submit(RunTask(spec.to_dict(), str(run_dir))) for spec, run_dir in todo]
    for job, (spec, run_dir) in zip(jobs, todo):
        run_dir.mkdir(parents=True, exist_ok=True)
        _record_launch(run_dir, {
            "executor": "slurm", "job_id": job.job_id, "submitted_at": _now(),
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "spec": spec.to_dict(),
        })
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted job {array_id}: {len(jobs)} task(s), one per run")
    print("follow it with:")
    print(f"  mixbench status {out}")
    print(f"  squeue -j {array_id}")
    print(f"  logs: {folder}/{array_id}_<task>_0_log.out and .err")
    return array_id


def _download_once(specs: List[RunSpec], dirs: List[Path]) -> List[Tuple[RunSpec, Path]]:
    """Fetch every data set asked with ``download`` here, once, so that array tasks never download concurrently."""
    fetched = set()
    for spec in specs:
        key = (spec.dataset, spec.data_dir)
        if spec.download and key not in fetched:
            from mixbench.data import load_dataset

            print(f"mixbench: fetching {spec.dataset} before submitting", file=sys.stderr)
            load_dataset(spec.dataset, spec.data_dir, True)
            fetched.add(key)
    return [(dataclasses.replace(s, download=False), d) for s, d in zip(specs, dirs)]


# ---------------------------------------------------------------------------
# Status of a grid
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class CellStatus:
    state: str  # done | running | pending | failed
    spec: Dict[str, Any]
    run_dir: Path
    detail: str = ""
    log: Optional[str] = None


def find_run_dirs(root: Path) -> List[Path]:
    """Run directories below ``root``: those with a result.json, spec.yaml or launch.json."""
    root = Path(root)
    found = set()
    for name in ("result.json", "spec.yaml", LAUNCH_FILE):
        for p in root.rglob(name):
            found.add(p.parent)
    return sorted(found)


def _epochs_done(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return sum(1 for line in f if line.endswith("\n"))
    except OSError:
        return 0


def cell_status(run_dir: Path, spec: Optional[Dict[str, Any]] = None,
                queue: Optional[Dict[str, str]] = None) -> CellStatus:
    """The state of one grid cell from its run directory (and Slurm's queue for submitted cells)."""
    import yaml

    run_dir = Path(run_dir)
    launch = read_launch(run_dir)
    if spec is None:
        spec = (launch or {}).get("spec")
        if spec is None and (run_dir / "spec.yaml").exists():
            spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
        spec = spec or {}
    result = read_result(run_dir) if (run_dir / "result.json").exists() else None
    if result and result.get("status") == "complete":
        return CellStatus("done", spec, run_dir, f"top1 {result.get('final_top1', float('nan')):.2f}")
    epochs = spec.get("epochs")
    progress = f"epoch {_epochs_done(run_dir)}/{epochs}" if epochs else f"{_epochs_done(run_dir)} epochs"
    queued = launch and launch.get("executor") == "slurm" and (queue or {}).get(str(launch.get("job_id")))
    if result and result.get("status") == "failed" and queued not in ACTIVE_STATES:
        return CellStatus("failed", spec, run_dir, f"{result.get('error', 'failed')} at {progress}",
                          (launch or {}).get("stderr"))
    if launch is None:
        if (run_dir / "checkpoint.pt").exists() or _epochs_done(run_dir):
            return CellStatus("pending", spec, run_dir, f"stopped at {progress}; rerun to resume")
        return CellStatus("pending", spec, run_dir, "not started")
    if launch.get("executor") == "slurm":
        job = str(launch.get("job_id"))
        log = launch.get("stderr")
        if queue is None:
            return CellStatus("pending", spec, run_dir, f"job {job}, state unknown (squeue unavailable)", log)
        state = queue.get(job)
        if state in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"):
            return CellStatus("running", spec, run_dir, f"job {job}, {progress}", log)
        if state in ACTIVE_STATES:
            return CellStatus("pending", spec, run_dir, f"job {job} {state.lower()}, {progress}", log)
        why = f"job {job} {state.lower()}" if state else f"job {job} left the queue"
        return CellStatus("failed", spec, run_dir, f"{why} without a result at {progress}", log)
    # local
    if launch.get("error"):
        return CellStatus("failed", spec, run_dir, f"{launch['error']} at {progress}")
    if launch.get("host") == socket.gethostname() and _recorded_pid_alive(launch.get("pid")):
        return CellStatus("running", spec, run_dir, f"pid {launch['pid']}, {progress}")
    return CellStatus("pending", spec, run_dir, f"stopped at {progress}; rerun to resume")


def _recorded_pid_alive(pid: Any) -> bool:
    """Whether a pid read from a launch record names a live process (a missing or bad value does not)."""
    try:
        return process_alive(int(pid))
    except (TypeError, ValueError):
        return False


def grid_status(specs: Optional[Sequence[RunSpec]], out: Path) -> List[CellStatus]:
    """Every cell of ``specs`` (or every run directory found under ``out`` when ``specs`` is None)."""
    out = Path(out)
    if specs is not None:
        cells = [(s.run_dir(out), s.to_dict()) for s in specs]
    else:
        cells = [(d, None) for d in find_run_dirs(out)]
    launches = [read_launch(d) for d, _ in cells]
    queue = slurm_queue() if any(la and la.get("executor") == "slurm" for la in launches) else {}
    return [cell_status(d, s, queue) for d, s in cells]


def format_status(cells: Sequence[CellStatus], out: Path) -> str:
    out = Path(out)
    lines = []
    for c in cells:
        s = c.spec
        try:
            where = c.run_dir.relative_to(out)
        except ValueError:
            where = c.run_dir
        line = (f"{c.state:8s} {s.get('method', '?'):16s} {s.get('dataset', '?'):10s} {str(s.get('model', '?')):20s} "
                f"seed {s.get('seed', '?')!s:3s} {c.detail}")
        if c.state in ("failed",) and c.log:
            line += f"  log: {c.log}"
        lines.append(f"{line}  [{where}]")
    counts = {k: sum(c.state == k for c in cells) for k in ("done", "running", "pending", "failed")}
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
