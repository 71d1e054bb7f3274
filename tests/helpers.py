"""Shared by the tests that kill a training run and resume it: `mixbench run` in a child process,
a SIGKILL once a condition holds (e.g. the first epoch checkpoint is on disk), and the comparison
of a resumed run with an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

TIMING = {"epoch_time_s", "epoch_cpu_time_s", "train_images_per_s"}
RESULT_KEYS = ("run_id", "status", "epochs", "final_top1", "final_top5", "final_test_loss", "best_top1",
               "best_epoch", "last10_median_top1", "method_params", "num_params")


def mixbench_run(out: Path, *args: str, cwd: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.Popen:
    """``python -m mixbench run ARGS --out OUT`` in a child process (one thread; stdout and stderr piped)."""
    cmd = [sys.executable, "-m", "mixbench", "run", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_checkpoint(out: Path) -> Optional[Path]:
    """The run folder under ``out`` whose epoch checkpoint is complete (its checksum written), or None."""
    found = list(Path(out).rglob("checkpoint.pt.sha256"))
    return found[0].parent if found else None


def kill_9_when(proc: subprocess.Popen, ready: Callable[[], Any], *, timeout: float = 240.0, settle: float = 0.0,
                pid: Optional[Callable[[Any], int]] = None) -> Any:
    """Poll ``ready()`` every 20 ms while ``proc`` runs; once it returns something true, wait ``settle``
    seconds (e.g. into the next epoch) and SIGKILL ``pid(found)``, by default ``proc`` itself, which must
    then die of it. Returns what ``ready`` returned; fails (killing ``proc``) if it never did."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = ready()
        if found:
            time.sleep(settle)
            if pid is not None:
                os.kill(pid(found), signal.SIGKILL)
                return found
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
            return found
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    raise AssertionError(f"not ready to be killed within {timeout:.0f} s (exit code {proc.returncode}):\n{err}")


def metrics(run_dir: Path) -> list:
    """metrics.jsonl without the timing entries (they differ between two runs of the same cell)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def result(run_dir: Path) -> dict:
    r = json.loads((Path(run_dir) / "result.json").read_text())
    return {k: r[k] for k in RESULT_KEYS}


def weights(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same run: metrics, result and weights equal (timings left out)."""
    assert metrics(a) == metrics(b)
    assert result(a) == result(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resumed_epoch(err: str) -> int:
    """The epoch a rerun resumed from, read from its ``resuming RUN_DIR from epoch N`` line."""
    resumed = [line for line in err.splitlines() if "resuming" in line]
    assert resumed, err
    return int(resumed[0].rsplit(" ", 1)[1])
