"""The Slurm launcher: profiles, the generated sbatch script, grid status, and
integration tests against a real one-node Slurm cluster on this machine.

The integration tests (marked ``slurm``) are skipped only where slurmctld is
not installed. If it is installed but no cluster answers, the fixture starts
slurm/start-local-cluster.sh (and stops it again at the end).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixbench import UsageError
from mixbench.benchmark import expand_benchmark, load_benchmark
from mixbench.cli import main
from mixbench.launchers.record import read_launch
from mixbench.launchers.slurm import RunTask, load_profile, sbatch_script, submit_slurm
from mixbench.launchers.status import cell_status, format_status, grid_status
from mixbench.results import atomic_write_json, find_results, is_complete
from mixbench.spec import RunSpec, expand_grid, parse_methods

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Profiles and the sbatch script (no cluster needed)
# ---------------------------------------------------------------------------
FULL_PROFILE = """
partition: gpu-long
account: proj42
qos: high
gpus_per_node: 2
cpus_per_task: 7
mem_gb: 12.5
timeout_min: 95
array_parallelism: 3
signal_delay_s: 77
job_name: mbtest
constraint: a100
exclude: node07
additional_parameters: {mail-type: FAIL, requeue: true}
setup: [module load cuda/12, echo setup-line-two]
"""


def test_sbatch_script_has_every_profile_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(FULL_PROFILE)
    profile = load_profile(path)
    text = sbatch_script(profile, tmp_path / "logs", n_tasks=5)
    lines = set(text.splitlines())
    for expected in [
        "#SBATCH --partition=gpu-long", "#SBATCH --account=proj42", "#SBATCH --qos=high",
        "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=7", "#SBATCH --mem=12800M",
        "#SBATCH --time=95", "#SBATCH --array=0-4%3", "#SBATCH --signal=USR2@77",
        "#SBATCH --job-name=mbtest", "#SBATCH --constraint=a100", "#SBATCH --exclude=node07",
        "#SBATCH --mail-type=FAIL", "#SBATCH --requeue", "module load cuda/12", "echo setup-line-two",
    ]:
        assert expected in lines, f"{expected!r} missing from:\n{text}"
    # the job runs this interpreter, and its logs go to the log folder, one pair per array task
    assert sys.executable in text
    assert f"#SBATCH --output={tmp_path / 'logs'}/%A_%a_0_log.out" in lines


def test_sbatch_script_defaults_and_single_task(tmp_path):
    text = sbatch_script(load_profile(None), tmp_path, n_tasks=1)
    assert "#SBATCH --array" not in text
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --signal=USR2@120" in text
    assert "#SBATCH --partition" not in text  # the cluster's default partition


def test_local_profile_is_cpu_only(tmp_path):
    profile = load_profile(REPO / "slurm" / "local.yaml")
    text = sbatch_script(profile, tmp_path, n_tasks=4)
    assert "gpus-per-node" not in text and "#SBATCH --cpus-per-task=1" in text
    assert load_profile(REPO / "slurm" / "example.yaml")["account"] == "my-project"


@pytest.mark.parametrize("body, message", [
    ("partitoin: gpu\n", "unknown profile key 'partitoin'"),
    ("cpus_per_task: many\n", "'cpus_per_task' must be a non-negative int"),
    ("mem_gb: -1\n", "'mem_gb' must be a non-negative float"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_profiles(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_profile(path)
    with pytest.raises(UsageError, match="not found"):
        load_profile(tmp_path / "missing.yaml")


def test_cli_profile_needs_slurm_executor(capsys):
    assert main(["run", "--profile", str(REPO / "slurm" / "local.yaml"), "--epochs", "1"]) == 2
    assert "--profile" in capsys.readouterr().err


def test_cli_dry_run_prints_grid_and_sbatch(tmp_path, capsys):
    rc = main(["run", "--config", str(REPO / "benchmarks" / "digits.yaml"), "--executor", "slurm",
               "--profile", str(REPO / "slurm" / "local.yaml"), "--methods", "vanilla,mixup", "--dry-run",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "6 runs: 2 method(s)" in out and "#SBATCH --array=0-5%2" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


# ---------------------------------------------------------------------------
# Checkpoint protocol and status (no cluster needed)
# ---------------------------------------------------------------------------
def _spec(method="vanilla", seed=0, epochs=2):
    return RunSpec.from_dict({"method": method, "dataset": "synthetic", "seed": seed, "epochs": epochs}).resolved()


def test_checkpoint_requeues_the_same_run(tmp_path):
    task = RunTask(_spec().to_dict(), str(tmp_path / "run"))
    delayed = task.checkpoint()
    assert isinstance(delayed.function, RunTask) and delayed.function is not task
    assert delayed.function.spec == task.spec and delayed.function.run_dir == task.run_dir
    assert delayed.args == () and delayed.kwargs == {}


def test_complete_run_is_not_trained_again(tmp_path):
    run_dir = tmp_path / "run"
    atomic_write_json(run_dir / "result.json", {"status": "complete", "method": "vanilla", "final_top1": 12.5})
    before = (run_dir / "result.json").read_bytes()
    summary = RunTask(_spec().to_dict(), str(run_dir))()
    assert summary["final_top1"] == 12.5
    assert (run_dir / "result.json").read_bytes() == before and not (run_dir / "checkpoint.pt").exists()


def test_cell_states(tmp_path):
    specs = expand_grid(["vanilla", "mixup"], [0, 1, 2], dataset="synthetic", epochs=3)
    dirs = [s.run_dir(tmp_path) for s in specs]
    atomic_write_json(dirs[0] / "result.json", {"status": "complete", "final_top1": 50.0})
    for d, job in ((dirs[1], "7_1"), (dirs[2], "7_2"), (dirs[3], "7_3")):
        atomic_write_json(d / "launch.json", {"executor": "slurm", "job_id": job, "stderr": f"/logs/{job}.err",
                                               "spec": specs[0].to_dict()})
    (dirs[1] / "metrics.jsonl").write_text('{"epoch": 0}\n')
    queue = {"7_1": "RUNNING", "7_2": "PENDING", "7_3": "TIMEOUT"}
    states = [cell_status(d, s.to_dict(), queue) for d, s in zip(dirs, specs)]
    assert [c.state for c in states] == ["done", "running", "pending", "failed", "pending", "pending"]
    assert "epoch 1/3" in states[1].detail and states[3].log == "/logs/7_3.err"
    # a job that left the queue without a result failed
    assert cell_status(dirs[2], specs[2].to_dict(), {}).state == "failed"
    text = format_status(states, tmp_path)
    assert "log: /logs/7_3.err" in text
    assert text.splitlines()[-1] == "6 cells: 1 done, 1 running, 3 pending, 1 failed"
    # without the grid, status finds the run directories that exist
    found = grid_status(None, tmp_path)
    assert {c.run_dir for c in found} == set(dirs[:4])


def test_status_cli(tmp_path, capsys):
    spec = REPO / "benchmarks" / "digits.yaml"
    assert main(["status", "--config", str(spec), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = len(expand_benchmark(load_benchmark(spec)))  # attentivemix joins where its extractor file exists
    assert n >= 3 * len(parse_methods("all"))
    assert out.count("not started") == n and out.splitlines()[-1].startswith(f"{n} cells: 0 done")
    assert main(["status", str(tmp_path / "nope")]) == 2


# ---------------------------------------------------------------------------
# A real Slurm cluster
# ---------------------------------------------------------------------------
def _installed() -> bool:
    return bool(shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists())


def _cluster_answers() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and re.search(r"^(idle|mix|alloc|comp)", out.stdout, re.M) is not None


@pytest.fixture(scope="module")
def slurm_cluster():
    if not _installed():
        pytest.skip("slurmctld is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    state_dir = Path(os.environ.get("MIXBENCH_SLURM_DIR", "/tmp/mixbench-slurm"))
    if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
        os.environ["SLURM_CONF"] = str(state_dir / "slurm.conf")
    started = False
    if not _cluster_answers():
        proc = subprocess.run([str(REPO / "slurm" / "start-local-cluster.sh")], capture_output=True, text=True)
        assert proc.returncode == 0, f"could not start the local Slurm cluster:\n{proc.stdout}{proc.stderr}"
        started = True
        if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
            os.environ["SLURM_CONF"] = str(state_dir / "slurm.conf")
    assert _cluster_answers(), "the Slurm cluster does not answer sinfo"
    yield
    if started:
        subprocess.run([str(REPO / "slurm" / "stop-local-cluster.sh")], capture_output=True)


PROFILE = load_profile(REPO / "slurm" / "local.yaml")


def _queue_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job.split("_")[0], "-o", "%i|%T|%r"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        jid, state, reason = line.split("|")
        if jid == job:
            return f"{state}|{reason}"
    return ""


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _logs(run_dir: Path) -> str:
    launch = read_launch(run_dir)
    return "".join(Path(launch[k]).read_text(errors="replace") for k in ("stdout", "stderr")
                   if Path(launch[k]).exists())


@pytest.mark.slow
@pytest.mark.slurm
def test_grid_through_sbatch(slurm_cluster, tmp_path, capsys):
    specs = expand_grid(["vanilla", "mixup"], [0, 1], dataset="synthetic", epochs=1)
    assert main(["run", "--dataset", "synthetic", "--methods", "vanilla,mixup", "--seeds", "0,1", "--epochs", "1",
                 "--executor", "slurm", "--profile", str(REPO / "slurm" / "local.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\d+)", out).group(1)
    assert job and f"submitted job {job}: 4 task(s)" in out and f"mixbench status {tmp_path}" in out
    dirs = [s.run_dir(tmp_path) for s in specs]
    assert [read_launch(d)["job_id"] for d in dirs] == [f"{job}_{i}" for i in range(4)]
    _wait(lambda: all(is_complete(d) for d in dirs), 150, "the 4 array tasks to finish",)
    for spec, d in zip(specs, dirs):
        result = json.loads((d / "result.json").read_text())
        assert result["status"] == "complete" and result["method"] == spec.method and result["seed"] == spec.seed
        assert result["epochs"] == 1 and 0 <= result["final_top1"] <= 100
        assert result["run_id"] == spec.run_id
        assert not (d / "checkpoint.pt").exists()
    assert len(find_results([tmp_path])) == 4
    # resubmitting the same grid submits nothing
    assert submit_slurm(specs, tmp_path, PROFILE) is None
    assert "4 complete (skipped)" in capsys.readouterr().err
    assert [c.state for c in grid_status(specs, tmp_path)] == ["done"] * 4
    assert main(["status", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 cells: 4 done, 0 running, 0 pending, 0 failed"


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_run_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    epochs = 3
    spec = RunSpec.from_dict({"method": "mixup", "dataset": "synthetic", "seed": 3, "epochs": epochs}).resolved()
    run_dir = spec.run_dir(tmp_path)
    job = submit_slurm([spec], tmp_path, PROFILE)
    metrics = run_dir / "metrics.jsonl"
    _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 90, "the first epoch")
    assert not is_complete(run_dir), "the run finished before it could be interrupted; make it longer"
    # Slurm's preemption signal as submitit expects it (USR2): checkpoint, requeue, exit.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = _wait(lambda: (s := _queue_state(job)).startswith("PENDING") and s, 60, "the requeued job")
    # Slurm holds a requeued job for about two minutes (BeginTime); release it now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _wait(lambda: is_complete(run_dir), 120, f"the requeued job to finish (was {state})")
    _wait(lambda: _queue_state(job).startswith("COMPLETED") or not _queue_state(job), 30, "the job to end")

    logs = _logs(run_dir)
    assert "this job is preempted" in logs and "requeueing" in logs, logs
    resumed = re.findall(r"resum\w* .*?from epoch (\d+)", logs)
    assert resumed and 1 <= int(resumed[-1]) < epochs, logs
    # exactly one complete result, no temporary files, every epoch recorded once
    assert [p.name for p in run_dir.iterdir() if "result" in p.name] == ["result.json"]
    assert not list(run_dir.glob(".*.tmp"))
    assert is_complete(run_dir) and json.loads((run_dir / "result.json").read_text())["epochs"] == epochs
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(epochs))
    assert [c.state for c in grid_status([spec], tmp_path)] == ["done"]


@pytest.mark.slow
@pytest.mark.slurm
def test_data_parallel_run_as_two_slurm_tasks(slurm_cluster, tmp_path, capsys):
    """One cell of 2 processes through submitit: 2 tasks of one job (Gloo on the CPU), the rendezvous from
    Slurm's environment, one result.json written by rank 0."""
    assert main(["run", "--dataset", "synthetic", "--methods", "mixup", "--epochs", "2", "--batch-size", "32",
                 "--train-subset", "128", "--device", "cpu", "--nproc-per-run", "2", "--sync-bn",
                 "--executor", "slurm", "--profile", str(REPO / "slurm" / "local.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\d+)", out).group(1)
    spec = RunSpec.from_dict({"method": "mixup", "dataset": "synthetic", "epochs": 2, "batch_size": 32,
                              "train_subset": 128, "device": "cpu", "nproc": 2, "sync_bn": True}).resolved()
    run_dir = spec.run_dir(tmp_path)
    _wait(lambda: is_complete(run_dir), 240, "the 2-task job to finish")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "complete" and result["run_id"] == spec.run_id and result["spec"]["nproc"] == 2
    assert [p.name for p in run_dir.iterdir() if "result" in p.name] == ["result.json"]
    ranks = read_launch(run_dir).get("ranks") or []
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    logs = (tmp_path / "slurm-logs")
    assert sorted(p.name for p in logs.glob(f"{job}_*_log.out")) == [f"{job}_0_log.out", f"{job}_1_log.out"]
    text = (logs / f"{job}_0_log.out").read_text()
    assert "2 processes, rendezvous " in text, text
    assert read_launch(run_dir)["job_id"] == job
