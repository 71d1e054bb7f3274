"""Exact resume: kill -9 mid-epoch, crashes between writes, truncated and corrupted checkpoints."""
import os
import pickle

import pytest
import torch

from helpers import assert_same_run, first_checkpoint, kill_9_when, metrics, mixbench_run, resumed_epoch
from mixbench import checkpoint as ckpt
from mixbench.checkpoint import CorruptCheckpoint, load_checkpoint, read_checkpoint, save_checkpoint
from mixbench.spec import RunSpec
from mixbench.train import train_run


# ---------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------
def state(epoch):
    return {"epoch": epoch, "w": torch.full((1000,), float(epoch))}


def test_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, state(1))
    assert not (tmp_path / ckpt.PREVIOUS).exists()
    save_checkpoint(tmp_path, state(2))
    assert read_checkpoint(tmp_path / ckpt.CHECKPOINT)["epoch"] == 2
    assert read_checkpoint(tmp_path / ckpt.PREVIOUS)["epoch"] == 1
    save_checkpoint(tmp_path, state(3))
    assert read_checkpoint(tmp_path / ckpt.PREVIOUS)["epoch"] == 2
    assert load_checkpoint(tmp_path)["epoch"] == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "empty"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage):
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    path = tmp_path / ckpt.CHECKPOINT
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "no_sidecar":
        (tmp_path / (ckpt.CHECKPOINT + ".sha256")).unlink()
    else:
        path.write_bytes(b"")
    messages = []
    loaded = load_checkpoint(tmp_path, log=messages.append)
    assert loaded["epoch"] == 1
    text = " ".join(messages)
    assert "unusable checkpoint" in text and "falling back to checkpoint.prev.pt (epoch 1)" in text
    if damage == "truncate":
        assert "truncated" in text
    # The bad file is moved aside, so the next save cannot rotate it over the good one.
    assert not path.exists() and (tmp_path / (ckpt.CHECKPOINT + ".corrupt")).exists()
    save_checkpoint(tmp_path, state(2))
    assert read_checkpoint(tmp_path / ckpt.PREVIOUS)["epoch"] == 1
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_no_good_checkpoint_means_a_fresh_start(tmp_path):
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (tmp_path / name).write_bytes(b"garbage")
    messages = []
    assert load_checkpoint(tmp_path, log=messages.append) is None
    assert "restarts from epoch 0" in messages[-1]
    assert load_checkpoint(tmp_path, log=messages.append) is None  # nothing left to try


class Evil:
    def __reduce__(self):
        return (os.system, ("touch evil-was-run",))


def test_an_unsafe_pickle_is_never_executed(tmp_path, monkeypatch):
    """A file that passes its checksum but holds arbitrary objects is refused by weights_only."""
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"format": ckpt.FORMAT, "epoch": 1, "x": Evil()}, protocol=2)
    (tmp_path / ckpt.CHECKPOINT).write_bytes(payload)
    (tmp_path / (ckpt.CHECKPOINT + ".sha256")).write_bytes(ckpt._sidecar_text(payload))
    with pytest.raises(CorruptCheckpoint, match="not a safe weights-only"):
        read_checkpoint(tmp_path / ckpt.CHECKPOINT)
    assert load_checkpoint(tmp_path, log=lambda m: None) is None
    assert not (tmp_path / "evil-was-run").exists()


def test_a_kill_at_any_point_of_a_save_leaves_a_good_checkpoint(tmp_path, monkeypatch):
    """Interrupt save_checkpoint after each of its file operations: a complete state always loads."""

    class Killed(BaseException):
        pass

    real_write, real_copy = ckpt.atomic_write_bytes, ckpt._replace_with_copy
    for cut in range(4):  # copy payload, copy sidecar, write payload, write sidecar
        run = tmp_path / f"cut{cut}"
        run.mkdir()
        save_checkpoint(run, state(1))
        save_checkpoint(run, state(2))
        calls = []

        def counted(real):
            def op(*args):
                if len(calls) == cut:
                    raise Killed()
                calls.append(args)
                return real(*args)
            return op

        monkeypatch.setattr(ckpt, "atomic_write_bytes", counted(real_write))
        monkeypatch.setattr(ckpt, "_replace_with_copy", counted(real_copy))
        with pytest.raises(Killed):
            save_checkpoint(run, state(3))
        monkeypatch.setattr(ckpt, "atomic_write_bytes", real_write)
        monkeypatch.setattr(ckpt, "_replace_with_copy", real_copy)
        loaded = load_checkpoint(run, log=lambda m: None)
        assert loaded is not None and loaded["epoch"] in (2, 3), cut
        assert torch.equal(loaded["w"], state(loaded["epoch"])["w"])


# ---------------------------------------------------------------------------
# training: in-process crash between the metrics and checkpoint writes
# ---------------------------------------------------------------------------
def small_spec(**kw):
    # A checkpoint after every epoch (checkpoint_every_min 0); tests/test_checkpoint_interval.py covers the interval.
    options = dict(method="mixup", dataset="synthetic", seed=3, epochs=3, batch_size=32, train_subset=192,
                   device="cpu", checkpoint_every_min=0)
    return RunSpec.from_dict({**options, **kw}).resolved()


def test_checkpoint_captures_every_state(tmp_path, monkeypatch):
    import mixbench.train as train

    captured = []
    monkeypatch.setattr(train, "save_checkpoint", lambda run_dir, s: captured.append(s))
    spec = small_spec(epochs=1)
    train_run(spec, tmp_path / "run", progress=False)
    s = captured[-1]
    assert s["epoch"] == 1 and s["best_epoch"] == 0 and s["best_top1"] >= 0
    assert {"model", "optimizer", "scheduler", "method", "loader", "rng"} <= set(s)
    assert set(s["rng"]) == {"python", "numpy", "torch", "cuda"} and s["rng"]["cuda"] is None
    assert s["device"] == "cpu"
    assert s["optimizer"]["state"] and "momentum_buffer" in s["optimizer"]["state"][0]
    assert s["scheduler"]["last_epoch"] == 6  # 192 images / batch 32: 6 optimiser steps
    assert "rng" in s["method"] and "generator" in s["loader"]


@pytest.mark.slow
def test_crash_between_metrics_and_checkpoint_then_truncated_checkpoint(tmp_path, monkeypatch, capsys):
    """Crash right after epoch 2's metrics line, before its checkpoint; then damage the newest checkpoint.

    The rerun falls back to the previous checkpoint (end of epoch 1), drops the metrics of
    the later epochs, and ends bit-identical to an uninterrupted run.
    """
    import mixbench.train as train

    spec = small_spec()
    ref = tmp_path / "ref"
    train_run(spec, ref, progress=False)

    class Killed(BaseException):
        pass

    real_save = train.save_checkpoint
    saves = []

    def save_then_die(run_dir, s):
        if len(saves) == 2:
            raise Killed()
        saves.append(s["epoch"])
        real_save(run_dir, s)

    run = tmp_path / "run"
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_run(spec, run, progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert saves == [1, 2] and len(metrics(run)) == 3 and not (run / "result.json").exists()
    assert not (run / "run.lock").exists()  # released on the way out

    data = (run / ckpt.CHECKPOINT).read_bytes()
    (run / ckpt.CHECKPOINT).write_bytes(data[: len(data) - 1000])
    capsys.readouterr()
    train_run(spec, run, progress=False)
    err = capsys.readouterr().err
    assert "truncated" in err and "falling back to checkpoint.prev.pt (epoch 1)" in err
    assert f"resuming {run} from epoch 1" in err
    assert_same_run(ref, run)
    assert not list(run.glob("checkpoint*")), "checkpoints are removed once the result is written"


# ---------------------------------------------------------------------------
# a real kill -9 of `mixbench run`, mid-epoch
# ---------------------------------------------------------------------------
RUN = ("--methods", "mixup", "--dataset", "synthetic", "--train-subset", "192", "--batch-size", "16", "--epochs", "3",
       "--seeds", "1", "--device", "cpu", "--checkpoint-every-min", "0", "--no-progress")


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_is_identical(tmp_path):
    ref_proc = mixbench_run(tmp_path / "ref", *RUN, cwd=tmp_path)
    victim = mixbench_run(tmp_path / "run", *RUN, cwd=tmp_path)
    run_dir = kill_9_when(victim, lambda: first_checkpoint(tmp_path / "run"), settle=0.3)  # into the next epoch
    killed_at = len(metrics(run_dir))
    assert ref_proc.wait(timeout=240) == 0, ref_proc.stderr.read()
    ref_dir = next((tmp_path / "ref").rglob("result.json")).parent
    assert not (run_dir / "result.json").exists() and (run_dir / "run.lock").exists()
    assert 1 <= killed_at < 3

    again = mixbench_run(tmp_path / "run", *RUN, cwd=tmp_path)
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert "taking over the stale lock" in err and "is no longer running on this host" in err
    assert resumed_epoch(err) >= 1, err
    assert_same_run(ref_dir, run_dir)
    assert not (run_dir / "run.lock").exists()
