"""Failures that must not cost finished work: non-finite loss, errors in a run, a bad --out (locked cells:
test_lock.py)."""
import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import mixbench.checkpoint as checkpoint
import mixbench.train as train
from mixbench.cli import main
from mixbench.lock import LOCK_NAME
from mixbench.methods import MixMethod, MixOutput
from mixbench.methods._registry import _METHODS

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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
