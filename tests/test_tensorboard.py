"""TensorBoard event files of a run (``--tensorboard``), read back with TensorBoard's own reader:
one point per epoch and metric, also after a kill -9 and a resume that trains some epochs again."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

from helpers import first_checkpoint, kill_9_when, mixbench_run  # noqa: E402
from mixbench.spec import RunSpec  # noqa: E402
from mixbench.tblog import EpochLog, scalars  # noqa: E402
from mixbench.train import train_run  # noqa: E402

CURVES = ("train_loss", "test_top1", "test_top5", "test_loss", "lr", "train_images_per_s")


def read_scalars(run_dir: Path) -> dict:
    """tag -> [(step, value)] as TensorBoard shows them (purged points dropped)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(run_dir: Path, tag: str) -> list:
    """Every step written for ``tag`` in every event file, in file order, purged ones included."""
    steps = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_scalars_flattens_nested_numbers_and_skips_the_rest():
    rec = {"epoch": 3, "train_loss": 0.5, "lr": 0.1, "note": "x", "flag": True, "bad": float("nan"),
           "filter_usage": {"layer1": {"gini": 0.2, "channels": 64, "norms": [1, 2]}, "mean_gini": 0.3}}
    assert scalars(rec) == {"train_loss": 0.5, "lr": 0.1, "filter_usage/layer1/gini": 0.2,
                            "filter_usage/layer1/channels": 64.0, "filter_usage/mean_gini": 0.3}


def test_purge_step_drops_the_points_trained_again(tmp_path):
    log = EpochLog(tmp_path, 0)
    for epoch in range(4):
        log.log({"epoch": epoch, "test_top1": 10.0 + epoch})
    log.writer = None  # "killed": no close
    time.sleep(1.1)  # event file names carry the second they were opened in
    log = EpochLog(tmp_path, 2)  # resumed from the checkpoint at the end of epoch 1
    for epoch in range(2, 5):
        log.log({"epoch": epoch, "test_top1": 20.0 + epoch})
    log.close()
    assert raw_steps(tmp_path, "test_top1") == [0, 1, 2, 3, 2, 3, 4]
    assert read_scalars(tmp_path)["test_top1"] == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0), (4, 24.0)]


def test_off_by_default_and_not_part_of_the_run_id(tmp_path):
    spec = RunSpec.from_dict(dict(method="mixup", dataset="synthetic", seed=0, epochs=1, batch_size=32,
                                  train_subset=64, device="cpu")).resolved()
    assert spec.tensorboard is False
    on = RunSpec.from_dict({**spec.to_dict(), "tensorboard": True}).resolved()
    assert on.run_id == spec.run_id
    train_run(spec, tmp_path / "off", progress=False)
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))
    train_run(on, tmp_path / "on", progress=False)
    points = read_scalars(tmp_path / "on")
    assert set(CURVES) <= set(points)
    assert points["test_top1"] == [(0, metrics(tmp_path / "on")[0]["test_top1"])]


def test_bad_value_is_a_usage_error():
    from mixbench import UsageError

    with pytest.raises(UsageError, match="tensorboard must be true or false"):
        RunSpec.from_dict(dict(method="mixup", dataset="synthetic", tensorboard="yes")).resolved()


# ---------------------------------------------------------------------------
# a real kill -9 of `mixbench run --tensorboard`, twice, and a resume
# ---------------------------------------------------------------------------
EPOCHS = 5


def launch(out: Path, every_min: str) -> subprocess.Popen:
    return mixbench_run(out, "--methods", "mixup", "--dataset", "synthetic", "--train-subset", "128", "--batch-size",
                        "16", "--epochs", str(EPOCHS), "--seeds", "1", "--device", "cpu", "--checkpoint-every-min",
                        every_min, "--no-progress", "--tensorboard", "--filter-usage-every", "2", cwd=out.parent)


@pytest.mark.slow
def test_kill_9_and_resume_give_one_point_per_epoch(tmp_path):
    from mixbench.checkpoint import load_checkpoint

    out = tmp_path / "runs"
    out.mkdir()
    # 1. a checkpoint after every epoch: killed once the first one is on disk
    run_dir = kill_9_when(launch(out, "0"), lambda: first_checkpoint(out))
    start = load_checkpoint(run_dir)["epoch"]
    assert 1 <= start < EPOCHS - 2
    time.sleep(1.1)  # each launch's event file is named by a later second
    # 2. no checkpoint for an hour: killed after it logged two epochs past the checkpoint
    kill_9_when(launch(out, "60"), lambda: len(metrics(run_dir)) >= start + 2)
    assert load_checkpoint(run_dir)["epoch"] == start
    time.sleep(1.1)
    # 3. the resume trains those epochs again, and the rest
    again = launch(out, "0")
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert f"resuming {run_dir} from epoch {start}" in err

    raw = raw_steps(run_dir, "test_top1")
    assert len(raw) > EPOCHS and sorted(set(raw)) == list(range(EPOCHS)), raw  # epochs written twice
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 3
    points = read_scalars(run_dir)
    lines = metrics(run_dir)
    assert set(CURVES) <= set(points)
    for tag in CURVES:
        assert [s for s, _ in points[tag]] == list(range(EPOCHS)), tag
        assert [v for _, v in points[tag]] == pytest.approx([m[tag] for m in lines], rel=1e-6), tag
    fu = {tag: [s for s, _ in pts] for tag, pts in points.items() if tag.startswith("filter_usage/")}
    assert fu and all(steps == [0, 2, 4] for steps in fu.values()), fu


def test_benchmark_option_and_flag():
    from mixbench.cli import _run_overrides, build_parser
    from mixbench.benchmark import check_benchmark, expand_benchmark

    benchmark = {"dataset": "synthetic", "methods": ["mixup"], "tensorboard": True}
    check_benchmark(benchmark)
    assert [s.tensorboard for s in expand_benchmark(benchmark, {})] == [True]
    args = build_parser().parse_args(["run", "--tensorboard"])
    assert _run_overrides(args)["tensorboard"] is True
    assert "tensorboard" not in _run_overrides(build_parser().parse_args(["run"]))
