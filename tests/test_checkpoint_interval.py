"""Checkpoints every N minutes: only at the end with a long interval, exact resume from the last written
epoch after a kill, and the last finished epoch written on the preemption signal or an interrupt."""
import json
from pathlib import Path

import pytest
import torch

import mixbench.checkpoint as ckpt
import mixbench.train as train
from mixbench.checkpoint import Checkpointer, load_checkpoint
from mixbench.launchers.slurm import RunTask
from mixbench.spec import RunSpec
from mixbench.train import train_run

EPOCHS = 5
MINUTES_PER_EPOCH = 4.0  # with a 10-minute interval: written after epochs 3 and 5 (the last)


def spec_(**kw):
    options = dict(method="mixup", dataset="synthetic", seed=5, epochs=EPOCHS, batch_size=64, train_subset=128,
                   device="cpu", checkpoint_every_min=10.0)
    return RunSpec.from_dict({**options, **kw}).resolved()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Killed(BaseException):
    pass


@pytest.fixture
def harness(monkeypatch):
    """A fake clock that advances MINUTES_PER_EPOCH per epoch, a log of checkpoint writes, and an action
    run at the end of a chosen epoch's test metrics (before its checkpoint decision)."""
    clock = Clock()
    monkeypatch.setattr(ckpt, "_clock", clock)
    writes, actions = [], {}
    real_save, real_metrics = train.save_checkpoint, train.test_metrics
    epoch = [0]

    def save(run_dir, state):
        writes.append(state["epoch"])
        real_save(run_dir, state)

    def test_metrics(*args, **kwargs):
        out = real_metrics(*args, **kwargs)
        clock.now += MINUTES_PER_EPOCH * 60
        action = actions.pop(epoch[0], None)
        epoch[0] += 1
        if action:
            action()
        return out

    def reset(start_epoch=0):
        epoch[0] = start_epoch
        writes.clear()

    monkeypatch.setattr(train, "save_checkpoint", save)
    monkeypatch.setattr(train, "test_metrics", test_metrics)
    return {"writes": writes, "actions": actions, "reset": reset, "clock": clock}


def records(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timing = {"epoch_time_s", "epoch_cpu_time_s", "train_images_per_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def assert_same(a, b):
    assert records(a) == records(b)
    ra, rb = (json.loads((Path(d) / "result.json").read_text()) for d in (a, b))
    for key in ("final_top1", "final_test_loss", "best_top1", "best_epoch", "run_id"):
        assert ra[key] == rb[key], key
    wa, wb = (torch.load(Path(d) / "model.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_long_interval_checkpoints_only_at_the_last_epoch(tmp_path, harness):
    train_run(spec_(checkpoint_every_min=1e6), tmp_path / "run", progress=False)
    assert harness["writes"] == [EPOCHS]
    harness["reset"]()
    train_run(spec_(checkpoint_every_min=0), tmp_path / "every", progress=False)
    assert harness["writes"] == [1, 2, 3, 4, 5]
    harness["reset"]()
    train_run(spec_(), tmp_path / "ten", progress=False)
    assert harness["writes"] == [3, 5]


@pytest.mark.slow
def test_a_kill_resumes_from_the_last_written_epoch_and_ends_equal(tmp_path, harness, monkeypatch, capsys):
    ref = tmp_path / "ref"
    train_run(spec_(checkpoint_every_min=0), ref, progress=False)

    # kill -9 during epoch 5 (after 4 finished): nothing runs on the way out, so no pending state is written
    harness["reset"]()
    run = tmp_path / "run"

    def kill():
        monkeypatch.setattr(Checkpointer, "flush", lambda self: False)
        raise Killed()

    harness["actions"][3] = kill  # inside the 4th epoch's end, before its checkpoint decision
    with pytest.raises(Killed):
        train_run(spec_(), run, progress=False)
    assert harness["writes"] == [3] and load_checkpoint(run)["epoch"] == 3
    assert len(records(run)) == 3  # epoch 4's record was not written yet either
    monkeypatch.undo()  # the real flush again (and the real writes and evaluation)
    monkeypatch.setattr(ckpt, "_clock", harness["clock"])

    capsys.readouterr()
    train_run(spec_(), run, progress=False)
    assert f"resuming {run} from epoch 3" in capsys.readouterr().err
    assert_same(ref, run)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["signal", "interrupt"])
def test_preemption_writes_the_last_finished_epoch(tmp_path, harness, capsys, how):
    ref = tmp_path / "ref"
    train_run(spec_(checkpoint_every_min=0), ref, progress=False)
    harness["reset"]()
    run = tmp_path / "run"

    def preempt():
        if how == "signal":  # what submitit's USR2 handler calls before requeueing and exiting
            RunTask(spec_().to_dict(), str(run)).checkpoint()
            raise Killed()
        raise KeyboardInterrupt()

    # The end of epoch 2 (index 1) was kept in memory only; epoch 3 is in progress when the signal comes.
    harness["actions"][2] = preempt
    with pytest.raises(Killed if how == "signal" else KeyboardInterrupt):
        train_run(spec_(), run, progress=False)
    assert harness["writes"] == [2] and load_checkpoint(run)["epoch"] == 2
    capsys.readouterr()
    harness["reset"]()
    train_run(spec_(), run, progress=False)
    assert f"resuming {run} from epoch 2" in capsys.readouterr().err
    assert harness["writes"] == [5]  # 8 minutes after the resume, then the last epoch
    assert_same(ref, run)


def test_checkpointer_keeps_a_copy_not_a_reference(tmp_path):
    written = []
    c = Checkpointer(tmp_path, every_min=1e6, save=lambda d, s: written.append(s))
    w = torch.zeros(3)
    assert not c.epoch_end(lambda: {"epoch": 1, "w": w})
    w += 1  # training goes on in place
    with c:
        assert ckpt.flush_pending(log=lambda m: None) == 1
    assert written[0]["epoch"] == 1 and torch.equal(written[0]["w"], torch.zeros(3))
    assert not c.flush() and ckpt.flush_pending() == 0  # nothing pending, and no longer registered
