"""Per-run locks (mixbench.lock): stale locks taken over, live ones respected, and launchers that
skip a cell locked elsewhere; two concurrent launchers train every cell exactly once."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from mixbench.launchers.local import run_local
from mixbench.lock import LOCK_NAME, RunLock, RunLocked, _proc_start
from mixbench.spec import RunSpec

GRID = ["--dataset", "synthetic", "--train-subset", "128", "--batch-size", "32", "--device", "cpu", "--no-progress"]


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


@pytest.mark.slow
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
