"""Data-parallel runs (mixbench.distributed): 2 CPU processes with Gloo against one process, every
method in 2 processes, and kill -9 of one rank then a rerun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import first_checkpoint, kill_9_when
from mixbench import UsageError
from mixbench.launchers.data_parallel import RankFailed, launch_local
from mixbench.methods import get_method, list_methods
from mixbench.spec import RunSpec
from mixbench.train import train_run

REPO = Path(__file__).resolve().parents[1]
SMALL_RESNET = dict(model="resnet18", model_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8})


def _spec(**kw) -> RunSpec:
    base = dict(method="vanilla", dataset="synthetic", epochs=1, batch_size=32, train_subset=64, device="cpu",
                checkpoint_every_min=0)
    return RunSpec.from_dict({**base, **kw}).resolved()


def _weights(run_dir: Path):
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_single_process_run_ids_do_not_move():
    one = _spec()
    assert "nproc" not in one.identity() and "sync_bn" not in one.identity()
    assert _spec(nproc=1, sync_bn=True).run_id == one.run_id  # sync_bn changes nothing in one process
    assert _spec(nproc=2).run_id != one.run_id
    assert _spec(nproc=2, sync_bn=True).run_id != _spec(nproc=2).run_id


def test_bad_parallel_options_are_usage_errors():
    with pytest.raises(UsageError, match="divisible by nproc 3"):
        _spec(nproc=3)
    with pytest.raises(UsageError, match="nproc must be a positive int"):
        _spec(nproc=0)
    with pytest.raises(UsageError, match="2-process run and this launch has 1"):
        train_run(_spec(nproc=2), Path("/nonexistent-never-created"), progress=False)


@pytest.mark.slow
def test_two_ranks_with_sync_bn_equal_one_process_after_20_steps(tmp_path):
    """Vanilla, synchronised BatchNorm, the same global batch of 32: 20 optimiser steps in 2 Gloo processes
    end with the weights of one process (<= 1e-5), and the same test metrics."""
    opts = dict(epochs=2, train_subset=320, lr=0.05, **SMALL_RESNET)  # 10 steps per epoch
    two, one = _spec(nproc=2, sync_bn=True, **opts), _spec(**opts)
    summary = launch_local(two, two.run_dir(tmp_path), progress=False)
    assert summary["status"] == "complete"
    torch.set_num_threads(1)
    r1 = train_run(one, one.run_dir(tmp_path), progress=False)
    r2 = json.loads((two.run_dir(tmp_path) / "result.json").read_text())
    a, b = _weights(one.run_dir(tmp_path)), _weights(two.run_dir(tmp_path))
    assert a.keys() == b.keys()
    params = {k for k in a if "running" not in k and "num_batches" not in k}
    worst = max((a[k] - b[k]).abs().max().item() for k in params)
    assert worst <= 1e-5, worst
    for k in a.keys() - params:  # running statistics: the global batch's, as in one process
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), k
    assert r2["final_top1"] == r1["final_top1"]
    assert r2["final_test_loss"] == pytest.approx(r1["final_test_loss"], rel=1e-4)
    assert r2["spec"]["nproc"] == 2 and r2["train_images_per_s"] > 0
    # rank 0 alone wrote the run's files; the checkpoint is gone once the run is complete
    files = sorted(p.name for p in two.run_dir(tmp_path).iterdir())
    assert files == ["launch.json", "metrics.jsonl", "model.pt", "result.json", "spec.yaml"]
    assert len((two.run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_checkpoint_holds_every_rank_state(tmp_path, monkeypatch):
    """An interrupted 2-rank run leaves a checkpoint with both ranks' RNG, loader and method states."""
    from mixbench import train

    spec = _spec(nproc=2, method="mixup", epochs=2)
    monkeypatch.setattr(train, "remove_checkpoint", lambda run_dir: None)  # the forked ranks inherit it
    launch_local(spec, spec.run_dir(tmp_path), progress=False)
    state = torch.load(spec.run_dir(tmp_path) / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    for entry in state["ranks"]:
        assert set(entry) == {"method", "loader", "rng"}
    # one seed on every rank: the method's draws are identical across ranks, as in openmixup's DDP runs
    assert state["ranks"][0]["method"]["rng"] == state["ranks"][1]["method"]["rng"]


def _rank_pid(out: Path, rank: int):
    """The pid of ``rank`` as the run's launch.json records it (None until rank 0 wrote it)."""
    for path in out.rglob("launch.json"):
        ranks = json.loads(path.read_text()).get("ranks") or []
        for entry in ranks:
            if entry["rank"] == rank:
                return entry["pid"]
    return None


def _cli(out: Path, *extra: str) -> list:
    return [sys.executable, "-m", "mixbench", "run", "--methods", "mixup", "--dataset", "synthetic", "--epochs", "3",
            "--batch-size", "32", "--train-subset", "640", "--device", "cpu", "--nproc-per-run", "2",
            "--checkpoint-every-min", "0", "--no-progress", "--out", str(out), *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_9_of_one_rank_then_rerun_is_identical(tmp_path):
    """kill -9 of rank 1 mid-run: the launch stops with a line naming the rank and the signal; the rerun
    resumes from the last checkpoint and ends exactly as an uninterrupted 2-process run."""
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    victim = subprocess.Popen(_cli(killed_out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def rank_1_after_the_first_checkpoint():
        run_dir = first_checkpoint(killed_out)
        pid = run_dir and _rank_pid(killed_out, 1)
        return pid and (pid, (run_dir / "metrics.jsonl").read_text().count("\n"))

    _, killed_at = kill_9_when(victim, rank_1_after_the_first_checkpoint, timeout=300, pid=lambda found: found[0])
    out, err = victim.communicate(timeout=120)
    assert killed_at < 3, err
    assert victim.returncode != 0
    assert "rank 1" in err and "SIGKILL" in err and "rerun to resume" in err, err
    run_dir = next(killed_out.rglob("metrics.jsonl")).parent
    assert not (run_dir / "result.json").exists() or json.loads((run_dir / "result.json").read_text())["status"] != "complete"
    assert (run_dir / "checkpoint.pt").exists()

    rerun = subprocess.run(_cli(killed_out), env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    clean = subprocess.run(_cli(clean_out), env=_env(), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    clean_dir = next(clean_out.rglob("result.json")).parent
    a, b = json.loads((run_dir / "result.json").read_text()), json.loads((clean_dir / "result.json").read_text())
    for key in ("final_top1", "final_test_loss", "best_top1"):
        assert a[key] == b[key], key
    wa, wb = _weights(run_dir), _weights(clean_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (clean_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]


@pytest.mark.slow
def test_a_rank_that_raises_takes_the_run_down(tmp_path, monkeypatch):
    from mixbench import train

    real = train.test_metrics

    def test_metrics(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1 fails here")
        return real(*args, **kwargs)

    spec = _spec(nproc=2)
    monkeypatch.setattr(train, "test_metrics", test_metrics)  # the forked ranks inherit it
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) exit code 1"):
        launch_local(spec, spec.run_dir(tmp_path), progress=False)


DIGITS_METHODS = [m for m in list_methods() if get_method(m).available() and m != "attentivemix"]


@pytest.mark.slow
@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_every_method_trains_in_two_processes_on_digits(tmp_path, method):
    spec = RunSpec.from_dict(dict(method=method, dataset="digits", epochs=1, batch_size=32, train_subset=128,
                                  device="cpu", nproc=2, sync_bn=True)).resolved()
    assert launch_local(spec, spec.run_dir(tmp_path), progress=False)["status"] == "complete"
    result = json.loads((spec.run_dir(tmp_path) / "result.json").read_text())
    assert result["status"] == "complete" and result["spec"]["nproc"] == 2


# ---------------------------------------------------------------------------
# The ImageNet protocol: an ImageFolder tree of JPEGs, streamed and sharded


def _imagenet_tree(root: Path, classes=("n01440764", "n01443537", "n01484850"), n_train=8, n_val=3) -> Path:
    """A tiny tree in ImageNet's ImageFolder layout: root/{train,val}/<wnid>/<wnid>_<i>.JPEG, varied sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (36 + 3 * i, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", "JPEG")
    return root


def test_streamed_shards_make_the_global_batch(tmp_path):
    """Each rank decodes only its half of every global batch; together the halves are the batch of one process."""
    from mixbench.data import StreamLoader, imagefolder_files

    train, _ = imagefolder_files(_imagenet_tree(tmp_path / "imagenet"))
    kw = dict(image_size=24, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", train=True, seed=3,
              num_workers=0)
    whole = list(StreamLoader(train, **kw))
    halves = []
    for rank in (0, 1):
        loader = StreamLoader(train, **kw)
        loader.shard(rank, 2)
        halves.append(list(loader))
    assert len(whole) == len(halves[0]) == len(halves[1]) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert len(y0) == len(y1) == 4
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    with pytest.raises(UsageError, match="divisible"):
        StreamLoader(train, **kw).shard(0, 3)


def test_imagenet_spec_resolves_on_an_imagefolder_tree(tmp_path, capsys):
    from mixbench.cli import main

    tree = _imagenet_tree(tmp_path / "imagenet")
    assert main(["run", "--config", str(REPO / "benchmarks" / "imagenet_resnet50.yaml"), "--data-dir", str(tree),
                 "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(" resnet50 ") == 5 and f"imagefolder:{tree}" in out and "# 5 runs" in out
    from mixbench.benchmark import expand_benchmark, load_benchmark

    benchmark = load_benchmark(REPO / "benchmarks" / "imagenet_resnet50.yaml")
    specs = expand_benchmark(benchmark, {"data_dir": str(tree)})
    s = specs[0]
    assert (s.nproc, s.batch_size, s.epochs, s.milestones, s.lr, s.data_mode) == (4, 256, 300, [75, 150, 225], 0.1,
                                                                                      "stream")


@pytest.mark.slow
def test_two_ranks_stream_an_imagefolder_tree(tmp_path):
    """A 2-process run streaming JPEGs from an ImageFolder tree (decoding in DataLoader workers)."""
    tree = _imagenet_tree(tmp_path / "imagenet")
    spec = _spec(dataset=f"imagefolder:{tree}", data_mode="stream", image_size=32, batch_size=8, train_subset=None,
                 nproc=2, method="cutmix", **SMALL_RESNET)
    os.environ["MIXBENCH_WORKERS"] = "1"
    try:
        assert launch_local(spec, spec.run_dir(tmp_path / "out"), progress=False)["status"] == "complete"
    finally:
        os.environ.pop("MIXBENCH_WORKERS", None)
    result = json.loads((spec.run_dir(tmp_path / "out") / "result.json").read_text())
    assert result["status"] == "complete" and 0 <= result["final_top1"] <= 100


def test_a_run_locked_by_another_launcher_is_left_alone(tmp_path):
    spec = _spec(nproc=2)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mixbench.lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(run_dir)],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        summary = launch_local(spec, run_dir, progress=False)
        assert summary["status"] == "running" and "is locked by pid" in summary["error"]
        assert not (run_dir / "result.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_methods_own_modules_stay_equal_across_ranks(tmp_path, monkeypatch):
    """AutoMix's mixing block is trained outside the model (outside DDP): its gradients are averaged over the
    ranks, so after training both ranks hold the same block (and the same momentum encoder weights)."""
    from mixbench import train

    spec = _spec(nproc=2, method="automix", epochs=1, train_subset=128)
    monkeypatch.setattr(train, "remove_checkpoint", lambda run_dir: None)  # the forked ranks inherit it
    assert launch_local(spec, spec.run_dir(tmp_path), progress=False)["status"] == "complete"
    state = torch.load(spec.run_dir(tmp_path) / "checkpoint.pt", weights_only=True)
    a, b = (entry["method"]["modules"] for entry in state["ranks"])
    assert a.keys() == b.keys() and a
    checked = 0
    for name in a:
        for key in a[name]:
            if "running_" in key or "num_batches" in key:  # batch-norm statistics of each rank's own shard
                continue
            assert torch.equal(a[name][key], b[name][key]), (name, key)
            checked += 1
    assert checked


@pytest.mark.slow
def test_only_the_writer_rank_evaluates(tmp_path):
    """With --eval, every rank trains and rank 0 alone runs the suites (it alone writes result.json)."""
    probe = tmp_path / "probe.txt"
    plugin = tmp_path / "rank_probe.py"
    plugin.write_text("import os\nfrom mixbench.evaluate import register_suite\n\n\n@register_suite\n"
                      "def rank_probe(ctx):\n"
                      "    with open(os.environ['RANK_PROBE'], 'a') as f:\n"
                      "        f.write(os.environ.get('RANK', '-') + '\\n')\n"
                      "    return {'score': 1.0}\n")
    env = {**_env(), "RANK_PROBE": str(probe)}
    proc = subprocess.run([sys.executable, "-m", "mixbench", "run", "--methods", "vanilla", "--dataset", "synthetic",
                           "--epochs", "1", "--batch-size", "32", "--train-subset", "64", "--device", "cpu",
                           "--nproc-per-run", "2", "--eval", "rank_probe", "--plugins", str(plugin), "--no-progress",
                           "--out", str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe.read_text().split() == ["0"]
    result = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    assert result["eval"]["rank_probe"]["score"] == 1.0
