"""A local grid of data-parallel cells on every visible GPU: the GPUs split into groups of nproc, one worker
per group, each cell's ranks pinned to its group; on the CPU the cells still train one after the other."""
from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
from pathlib import Path

import pytest
import torch

from mixbench import UsageError
from mixbench.cli import main
from mixbench.launchers import data_parallel, local
from mixbench.launchers.data_parallel import gpu_groups, group_slots, run_groups, visible_gpus
from mixbench.spec import RunSpec


def _spec(**kw) -> RunSpec:
    base = dict(method="vanilla", dataset="synthetic", epochs=1, batch_size=32, train_subset=64,
                checkpoint_every_min=0, nproc=2)
    return RunSpec.from_dict({**base, **kw}).resolved()


def test_gpu_groups_split_the_visible_gpus_into_disjoint_groups_of_nproc():
    eight = [str(i) for i in range(8)]
    assert gpu_groups(eight, 2) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert gpu_groups(eight, 3) == [["0", "1", "2"], ["3", "4", "5"]]  # 6 and 7 idle
    assert gpu_groups(eight, 8) == [eight]
    assert gpu_groups("3,5,6".split(","), 2) == [["3", "5"]]
    assert gpu_groups(["GPU-aa", " GPU-bb"], 1) == [["GPU-aa"], ["GPU-bb"]]
    with pytest.raises(UsageError, match=r"--nproc-per-run 4 needs 4 GPUs, one per process, and this machine sees "
                                         r"3 \(3,5,6\)"):
        gpu_groups("3,5,6".split(","), 4)
    with pytest.raises(UsageError, match="sees 0;"):
        gpu_groups([], 2)


def test_visible_gpus_are_the_parents_list_or_every_device():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5,6"}, count=3) == ["3", "5", "6"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5,6"}, count=2) == ["3", "5"]  # CUDA saw only 2 of them
    assert visible_gpus({}, count=4) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=0) == []


def test_group_slots_pin_each_worker_to_its_group_and_share_the_cores():
    slots = group_slots([["3", "5"], ["6", "7"]], environ={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3,5,6,7"},
                        cpus=16)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env, _ in slots] == ["3,5", "6,7"]
    assert [where for _, _, where in slots] == ["GPUs 3,5", "GPUs 6,7"]
    for device, env, _ in slots:
        # "auto": the worker itself never starts CUDA; its ranks do, after the pin
        assert device == "auto" and env["MIXBENCH_CPUS"] == "8" and env["OMP_NUM_THREADS"] == "8"
        assert "MIXBENCH_WORKERS" not in env and env["PATH"] == "/bin"  # each rank takes its own share
    assert group_slots([[]], environ={"MIXBENCH_WORKERS": "2"}, cpus=4)[0][1]["MIXBENCH_WORKERS"] == "2"
    cpu = group_slots([[], []], environ={"CUDA_VISIBLE_DEVICES": "0"}, cpus=4)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env, _ in cpu] == ["0", "0"]  # a CPU group keeps the parent's


class _FakeProcess:
    """Records what a spawned worker would start with: its target, arguments and the environment at start()."""
    started: list = []

    def __init__(self, target, args):
        self.target, self.args, self.env = target, args, None

    def start(self):
        self.env = dict(os.environ)
        _FakeProcess.started.append(self)

    def join(self):
        pass


class _FakeContext:
    Process = _FakeProcess

    @staticmethod
    def Queue():
        return queue_module.Queue()


def test_each_concurrent_cell_is_launched_on_its_group_with_its_own_rendezvous(tmp_path, monkeypatch):
    """4 visible GPUs, --nproc-per-run 2, 3 cells: 2 workers, pinned to GPUs 0,1 and 2,3; each launch asks for
    2 spawned ranks, a port the kernel assigns at bind time (never a port picked in advance) hosted by
    its own launcher, and 1/4 of the cores per rank. The workers are recorded, then run here one after the
    other with the elastic launcher stubbed."""
    import torch.distributed.launcher.api as launcher_api

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # a 16-core machine
    monkeypatch.delenv("MIXBENCH_CPUS", raising=False)
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: _FakeContext)
    monkeypatch.setattr(_FakeProcess, "started", [])
    launched = []

    def fake_elastic_launch(config, entrypoint):
        def run(spec_dict, run_dir, progress, desc, cpus):
            launched.append({"run_dir": run_dir, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "omp": os.environ["OMP_NUM_THREADS"], "cpus": cpus, "endpoint": config.rdzv_endpoint,
                             "configs": dict(config.rdzv_configs), "nproc": config.nproc_per_node,
                             "start": config.start_method, "run_id": config.run_id})
            return {0: {"status": "complete"}}
        return run

    monkeypatch.setattr(launcher_api, "elastic_launch", fake_elastic_launch)
    specs = [_spec(seed=s) for s in range(3)]
    data_parallel.run_grid_local(specs, tmp_path, progress=False)

    workers = _FakeProcess.started
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0,1", "2,3"]
    assert all(w.env["MIXBENCH_CPUS"] == "8" for w in workers)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "MIXBENCH_CPUS" not in os.environ  # the parent's own
    threads = torch.get_num_threads()
    try:
        for w in workers:
            with local._environment(w.env):
                w.target(*w.args)
    finally:
        torch.set_num_threads(threads)
    by_dir = {Path(x["run_dir"]): x for x in launched}
    assert sorted(by_dir) == sorted(s.run_dir(tmp_path) for s in specs)
    # each worker starts with a cell of its own: seed 0 on GPUs 0,1, seed 1 on GPUs 2,3; seed 2 from the queue
    assert by_dir[specs[0].run_dir(tmp_path)]["cuda"] == "0,1"
    assert by_dir[specs[1].run_dir(tmp_path)]["cuda"] == "2,3"
    for x in launched:
        assert x["nproc"] == 2 and x["start"] == "spawn" and x["omp"] == "4" and x["cpus"] == 4
        assert x["endpoint"] == "127.0.0.1:0" and x["configs"]["is_host"] is True
    assert len({x["run_id"] for x in launched}) == 3
    info = json.loads((specs[1].run_dir(tmp_path) / "launch.json").read_text())
    assert info["cuda_visible_devices"] == "2,3" and info["nproc"] == 2


def test_one_group_trains_the_cells_one_after_the_other_in_this_process(tmp_path, monkeypatch):
    """3 visible GPUs and nproc 2: one group, no worker processes; the launch sees the parent's GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    monkeypatch.setattr(data_parallel, "run_groups", lambda *a, **k: pytest.fail("no groups with one group"))
    seen = []
    monkeypatch.setattr(data_parallel, "launch_local",
                        lambda spec, run_dir, **kw: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]) or {})
    data_parallel.run_grid_local([_spec(seed=0), _spec(seed=1)], tmp_path, progress=False)
    assert seen == ["3,5,6", "3,5,6"]


def test_fewer_gpus_than_nproc_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code = main(["run", "--methods", "vanilla", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32",
                 "--train-subset", "64", "--nproc-per-run", "2", "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--nproc-per-run 2 needs 2 GPUs, one per process, and this machine sees 1 (0)" in err


def _grid(out: Path, seeds: str = "0,1") -> list:
    return ["run", "--methods", "vanilla", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32",
            "--train-subset", "64", "--seeds", seeds, "--nproc-per-run", "2", "--checkpoint-every-min", "0",
            "--no-progress", "--out", str(out)]


@pytest.mark.slow
def test_cpu_grid_of_two_data_parallel_cells_completes_one_after_the_other(tmp_path, monkeypatch, capsys):
    """No GPU: the two 2-process cells train on Gloo, one after the other, in this launcher."""
    monkeypatch.setattr(data_parallel, "run_groups", lambda *a, **k: pytest.fail("the CPU trains cell by cell"))
    assert main(_grid(tmp_path / "out") + ["--device", "cpu"]) == 0
    results = sorted((tmp_path / "out").rglob("result.json"))
    assert len(results) == 2
    for path in results:
        result = json.loads(path.read_text())
        assert result["status"] == "complete" and result["spec"]["nproc"] == 2


@pytest.mark.slow
def test_two_cpu_groups_train_two_data_parallel_cells_at_once(tmp_path):
    """The group workers for real, on the CPU (two groups without GPUs): two 2-rank cells at the same time,
    each launcher hosting its own rendezvous; both complete, then a rerun skips them."""
    specs = [_spec(seed=s, device="cpu") for s in (0, 1)]
    results = run_groups(specs, tmp_path, [[], []], progress=False)
    assert [r["status"] for r in results] == ["complete", "complete"]
    infos = [json.loads((s.run_dir(tmp_path) / "launch.json").read_text()) for s in specs]
    assert len({i["pid"] for i in infos}) == 2  # two workers
    assert all(len(i["ranks"]) == 2 for i in infos)
    assert run_groups(specs, tmp_path, [[], []], progress=False) == results
