"""Failures that must not cost finished work: non-finite loss, errors in a run, locked cells, a bad --out."""
import errno
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import mixbench.checkpoint as checkpoint
import mixbench.train as train
from mixbench.cli import main
from mixbench.launchers.local import run_local
from mixbench.lock import LOCK_NAME, RunLock, RunLocked, _proc_start
from mixbench.methods import MixMethod, MixOutput
from mixbench.methods._registry import _METHODS
from mixbench.spec import RunSpec

GRID = ["--dataset", "synthetic", "--train-subset", "128", "--batch-size", "32", "--device", "cpu", "--no-progress"]


class NaNAt(MixMethod):
    """Test-only: plain training, but the logits of optimiser step ``step`` (counted over the run) are NaN."""

    name = "test_nan_at"

    def __init__(self, step: int = 7):
        super().__init__()
        self.step = step
        self.calls = 0

    def forward(self, model, x, y):
        logits = model(x)
        if self.calls == self.step:
            logits = logits * float("nan")
        self.calls += 1
        return MixOutput(logits, y)

    def state_dict(self):
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.calls = state["calls"]


class Boom(MixMethod):
    """Test-only: raises at its second call, like a method with a bug."""

    name = "test_boom"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, model, x, y):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom in the method")
        return MixOutput(model(x), y)


@pytest.fixture
def test_methods():
    """Register the test-only methods for one test (never left in the registry for other tests)."""
    for cls in (NaNAt, Boom):
        _METHODS[cls.name] = cls
    yield
    for cls in (NaNAt, Boom):
        _METHODS.pop(cls.name, None)


def run_dir_of(out, method):
    return next(Path(out).rglob(f"{method}/seed0-*"))


# ---------------------------------------------------------------------------
# non-finite loss
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("check_every", [2, 100])
def test_nan_loss_fails_the_run_and_the_grid_goes_on(tmp_path, monkeypatch, capsys, test_methods, check_every):
    # 128 images / batch 32 = 4 steps per epoch: step 7 is epoch 1, step 3. With check_every=2 the
    # run stops inside the epoch (the interval check), with 100 at its end: the same first bad step.
    monkeypatch.setattr(train, "NONFINITE_CHECK_EVERY", check_every)
    out = tmp_path / "runs"
    rc = main(["run", "--methods", "test_nan_at,vanilla", "--epochs", "3", "--out", str(out), *GRID])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    where = "at epoch 1, step 3 (global step 7)"
    assert f"FAILED: non-finite training loss (nan) {where}" in captured.err
    assert "1 run(s) failed" in captured.err

    bad = run_dir_of(out, "test_nan_at")
    result = json.loads((bad / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == f"non-finite training loss (nan) {where}"
    assert (result["failed_epoch"], result["failed_step"], result["failed_global_step"]) == (1, 3, 7)
    assert result["epochs_completed"] == 1 and result["method"] == "test_nan_at" and result["seed"] == 0
    assert not (bad / "model.pt").exists() and not (bad / LOCK_NAME).exists()
    assert checkpoint.load_checkpoint(bad)["epoch"] == 1  # the last good checkpoint is kept
    assert [json.loads(line)["epoch"] for line in (bad / "metrics.jsonl").read_text().splitlines()] == [0]

    good = run_dir_of(out, "vanilla")
    assert json.loads((good / "result.json").read_text())["status"] == "complete"
    # The summary of `mixbench run` lists the failed run with its reason.
    assert "vanilla" in captured.out and f"failed: test_nan_at seed 0: non-finite training loss (nan) {where}" \
        in captured.out

    # ... and so does `mixbench report`.
    assert main(["report", str(out), "--no-plots", "--out", str(tmp_path / "report")]) == 0
    report = capsys.readouterr().out
    assert "failed" in report and f"non-finite training loss (nan) {where}" in report

    if check_every == 100:
        # Rerunning retries the failed run from its last good checkpoint: deterministic, the same failure.
        rc = main(["run", "--methods", "test_nan_at,vanilla", "--epochs", "3", "--out", str(out), *GRID])
        captured = capsys.readouterr()
        assert rc == 1 and f"resuming {bad} from epoch 1" in captured.err
        assert "vanilla seed 0: already complete" in captured.err
        assert json.loads((bad / "result.json").read_text())["error"].endswith(where)


def test_an_error_inside_a_run_fails_that_run_only(tmp_path, capsys, test_methods):
    out = tmp_path / "runs"
    rc = main(["run", "--methods", "test_boom,vanilla", "--epochs", "1", "--out", str(out), *GRID])
    captured = capsys.readouterr()
    assert rc == 1
    assert "RuntimeError: boom in the method" in captured.err and "Traceback" in captured.err
    result = json.loads((run_dir_of(out, "test_boom") / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == "RuntimeError: boom in the method"
    assert "raise RuntimeError" in result["traceback"]
    assert json.loads((run_dir_of(out, "vanilla") / "result.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------
@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(run_dir, age_s=0.0, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"token": "theirs", **owner}))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


HOST = socket.gethostname()


@pytest.mark.parametrize("case", ["dead_pid", "reused_pid", "old_heartbeat_elsewhere", "slurm_requeue", "torn_old"])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, other_process, case):
    run = tmp_path / "run"
    if case == "dead_pid":
        write_lock(run, host=HOST, pid=dead_pid())
    elif case == "reused_pid":  # the pid is alive, but it is another process than the one that locked
        write_lock(run, host=HOST, pid=other_process.pid, proc_start="1")
    elif case == "old_heartbeat_elsewhere":
        write_lock(run, age_s=3600, host="gone-node", pid=123)
    elif case == "slurm_requeue":  # the same array task, requeued; its first run may still be exiting
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        write_lock(run, host=HOST, pid=other_process.pid, slurm={"job": "77_3", "procid": "0", "restart": "0"})
    else:
        (run).mkdir()
        (run / LOCK_NAME).write_text('{"host": "x", "pi')
        t = time.time() - 60
        os.utime(run / LOCK_NAME, (t, t))
    messages = []
    with RunLock(run, log=messages.append) as lock:
        owner = json.loads((run / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == HOST and owner["token"] == lock.token
        assert "taking over the stale lock" in messages[0]
    assert not (run / LOCK_NAME).exists()
    assert not list(run.glob(LOCK_NAME + ".stale*"))


@pytest.mark.parametrize("case", ["live_pid", "fresh_heartbeat_elsewhere", "torn_fresh"])
def test_live_locks_are_respected(tmp_path, other_process, case):
    run = tmp_path / "run"
    if case == "live_pid":
        path = write_lock(run, age_s=3600, host=HOST, pid=other_process.pid, proc_start=_proc_start(other_process.pid))
    elif case == "fresh_heartbeat_elsewhere":
        path = write_lock(run, host="node-b", pid=123, started_at="2026-01-01T00:00:00+00:00")
    else:
        run.mkdir()
        path = run / LOCK_NAME
        path.write_text("")
    before = path.read_bytes()
    with pytest.raises(RunLocked) as info:
        RunLock(run).acquire()
    assert path.read_bytes() == before
    if case == "live_pid":
        assert f"locked by pid {other_process.pid} on {HOST}" in str(info.value)
    if case == "fresh_heartbeat_elsewhere":
        assert "pid 123 on node-b since 2026-01-01" in str(info.value) and f"delete {path}" in str(info.value)


def test_lock_is_exclusive_reentrant_and_beats(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, heartbeat_s=0.05) as outer:
        t0 = (run / LOCK_NAME).stat().st_mtime
        with RunLock(run):  # the same process may lock again (a launcher calling train_run)
            pass
        assert outer.held()
        time.sleep(0.3)
        assert (run / LOCK_NAME).stat().st_mtime > t0  # the heartbeat refreshes it
        code = f"from mixbench.lock import RunLock, RunLocked\ntry:\n RunLock({str(run)!r}).acquire()\n" \
               "except RunLocked as e:\n print('LOCKED', e)"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert f"LOCKED {run} is locked by pid {os.getpid()}" in other.stdout, other.stderr
    assert not (run / LOCK_NAME).exists()


def test_launcher_skips_a_cell_running_elsewhere_and_takes_it_once_free(tmp_path, capsys, other_process):
    out = tmp_path / "runs"
    spec = RunSpec.from_dict(dict(method="vanilla", dataset="synthetic", epochs=1, batch_size=32, train_subset=64,
                                  device="cpu")).resolved()
    run = spec.run_dir(out)
    write_lock(run, host=HOST, pid=other_process.pid, proc_start=_proc_start(other_process.pid))
    [result] = run_local([spec], out, progress=False)
    err = capsys.readouterr().err
    assert result["status"] == "running" and f"running elsewhere: pid {other_process.pid}" in result["error"]
    assert err.count("running elsewhere") == 2  # first pass, then the second look at the end
    assert not (run / "result.json").exists() and not (run / "metrics.jsonl").exists()
    other_process.kill()
    other_process.wait()
    [result] = run_local([spec], out, progress=False)
    assert result["status"] == "complete"
    assert "taking over the stale lock" in capsys.readouterr().err


def test_two_concurrent_launchers_train_every_cell_exactly_once(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mixbench", "run", "--methods", "vanilla,mixup", "--seeds", "0,1", "--epochs", "1",
           "--out", str(out), *GRID]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    run_dirs = sorted(p.parent for p in out.rglob("spec.yaml"))
    assert len(run_dirs) == 4
    trained = [line.split("training ", 1)[1] for _, err in outputs for line in err.splitlines()
               if line.startswith("mixbench: training ")]
    assert sorted(trained) == sorted(map(str, run_dirs)), outputs  # every cell trained, none twice
    for run_dir in run_dirs:
        assert json.loads((run_dir / "result.json").read_text())["status"] == "complete"
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
        assert not (run_dir / LOCK_NAME).exists()
    # Each launcher's summary accounts for the whole grid: complete, or still running in the other launcher.
    for stdout, _ in outputs:
        complete = sum(int(m.group(1)) for m in re.finditer(r"^(?:vanilla|mixup)\s+(\d+)\s", stdout, re.M))
        running = len(re.findall(r"^running: ", stdout, re.M))
        assert complete + running == 4, stdout


# ---------------------------------------------------------------------------
# errors of the environment: one line, non-zero exit, nothing recorded as a failed run
# ---------------------------------------------------------------------------
def error_lines(err):
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mixbench: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "runs"
    assert main(["run", "--methods", "vanilla", "--epochs", "1", "--out", str(out), *GRID]) == 1
    assert error_lines(capsys.readouterr().err) == f"mixbench: error: Not a directory: {out}"


def test_read_only_out(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root ignores file modes: fail the write the way it fails for a user
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == out:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        assert main(["run", "--methods", "vanilla", "--epochs", "1", "--out", str(out), *GRID]) == 1
    finally:
        out.chmod(0o755)
    assert error_lines(capsys.readouterr().err) == f"mixbench: error: Permission denied: {out}"
    assert not list(out.iterdir())


def test_disk_full_during_training_stops_the_grid_with_one_line(tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", no_space)  # the first checkpoint write
    out = tmp_path / "runs"
    assert main(["run", "--methods", "vanilla,mixup", "--epochs", "2", "--out", str(out), *GRID]) == 1
    line = error_lines(capsys.readouterr().err)
    assert line == f"mixbench: error: No space left on device: {out}; free some space or choose another --out"
    assert not list(out.rglob("result.json"))  # not recorded as a failed run, and the grid stopped
    assert not list(out.rglob("mixup/*")) and not list(out.rglob(LOCK_NAME))
