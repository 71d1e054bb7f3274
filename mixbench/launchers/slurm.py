"""The Slurm launcher (submitit): one job array, one checkpointable task per cell; each task is
:func:`mixbench.launchers.cell.train_and_evaluate` (on every rank, for a data-parallel cell)."""
from __future__ import annotations

import dataclasses
import getpass
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mixbench import UsageError
from mixbench.launchers.cell import train_and_evaluate
from mixbench.launchers.local import available_cpus
from mixbench.launchers.record import now, read_launch, record_launch, record_ranks
from mixbench.results import is_complete
from mixbench.spec import RunSpec

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
        record_launch(run_dir, {
            "executor": "slurm", "job_id": job.job_id, "submitted_at": now(),
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

