"""What a GPU run depends on, checked on the CPU: the run's device in the checkpoint, the CUDA RNG state of
that device only, the clear error on a device change, the loud CPU fallback, the parallel workers'
environment, PuzzleMix's host transfers and saliency dtype."""
import json
import os

import numpy as np
import pytest
import torch

import mixbench.devices as devices
import mixbench.train as train
from mixbench import UsageError
from mixbench.checkpoint import checkpoint_device, load_checkpoint, save_checkpoint
from mixbench.cli import main
from mixbench.launchers.local import _environment, available_cpus, worker_environment
from mixbench.methods import input_gradient_saliency
from mixbench.methods import puzzlemix as pm
from mixbench.models import create_model
from mixbench.spec import RunSpec
from mixbench.devices import gpus_requested, resolve_device
from mixbench.train import rng_state, set_rng_state, train_run


# -- checkpoint: the device and the RNG state of that device only ---------------------------------


def test_rng_state_keeps_only_the_runs_own_cuda_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(device) or torch.ones(16))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("every visible GPU's state: resume would depend on the GPU count"))
    state = rng_state(torch.device("cuda", 3))
    assert calls == [torch.device("cuda", 3)] and torch.equal(state["cuda"], torch.ones(16))
    assert rng_state(torch.device("cpu"))["cuda"] is None

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((s, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restored by index"))
    set_rng_state(state, torch.device("cuda", 0))  # the same state, now the only visible GPU
    assert torch.equal(restored[-1][0], torch.ones(16)) and restored[-1][1] == torch.device("cuda", 0)
    # an older checkpoint with every device's state: the entry of the run's device index
    set_rng_state({**state, "cuda": [torch.zeros(16), torch.full((16,), 2.0)]}, torch.device("cuda", 1))
    assert torch.equal(restored[-1][0], torch.full((16,), 2.0))


def test_checkpoint_device_of_old_and_new_checkpoints():
    assert checkpoint_device({"device": "cuda", "rng": {"cuda": None}}) == "cuda"
    assert checkpoint_device({"rng": {"cuda": [torch.zeros(16)]}}) == "cuda"  # before the `device` entry
    assert checkpoint_device({"rng": {"cuda": None}}) == "cpu"


def small_spec(**kw):
    options = dict(method="mixup", dataset="synthetic", seed=0, epochs=2, batch_size=64, train_subset=128,
                   device="cpu", checkpoint_every_min=0)
    return RunSpec.from_dict({**options, **kw}).resolved()


def stop_after_first_checkpoint(monkeypatch):
    real = train.save_checkpoint

    class Stop(BaseException):
        pass

    def save(run_dir, state):
        real(run_dir, state)
        raise Stop()

    monkeypatch.setattr(train, "save_checkpoint", save)
    return Stop


def test_checkpoint_records_the_device_and_a_device_change_is_a_clear_error(tmp_path, monkeypatch, capsys):
    spec = small_spec()
    run = tmp_path / "run"
    stop = stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(stop):
        train_run(spec, run, progress=False)
    monkeypatch.undo()
    state = load_checkpoint(run)
    assert state["epoch"] == 1 and state["device"] == "cpu" and state["rng"]["cuda"] is None
    assert state["loader"]["generator"].numel() > 16  # a CPU generator's state: CUDA's is 16 bytes

    # The same checkpoint claimed by a CUDA run: resuming it on the CPU is refused, naming both devices.
    save_checkpoint(run, {**state, "device": "cuda"})
    with pytest.raises(UsageError) as err:
        train_run(spec, run, progress=False)
    message = str(err.value)
    assert "written on cuda" in message and "this run is on cpu" in message and "--device cuda" in message
    assert "restart it from epoch 0" in message and "\n" not in message
    assert not (run / "result.json").exists(), "a device change is not a failed run"

    # Through the command line: one line, exit status 2.
    out = tmp_path / "runs"
    args = ["run", "--methods", "mixup", "--dataset", "synthetic", "--train-subset", "128", "--batch-size", "64",
            "--epochs", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    run_dir = small_spec(checkpoint_every_min=10.0).run_dir(out)
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir, {**state, "device": "cuda"})
    capsys.readouterr()
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "written on cuda and this run is on cpu" in errors[0]


# -- --device auto on a machine that was asked for GPUs ---------------------------------------------


def test_gpus_requested_reads_cuda_visible_devices_and_slurm():
    assert gpus_requested({}) is None
    assert gpus_requested({"CUDA_VISIBLE_DEVICES": ""}) is None
    assert gpus_requested({"CUDA_VISIBLE_DEVICES": "-1"}) is None
    assert gpus_requested({"CUDA_VISIBLE_DEVICES": "0,1"}) == "CUDA_VISIBLE_DEVICES=0,1"
    assert gpus_requested({"SLURM_GPUS_ON_NODE": "4"}) == "SLURM_GPUS_ON_NODE=4"
    assert gpus_requested({"SLURM_JOB_GPUS": "0"}) == "SLURM_JOB_GPUS=0"  # GPU index 0
    assert gpus_requested({"SLURM_GPUS_ON_NODE": "0"}) is None  # a count: none
    assert gpus_requested({"SLURM_GPUS_PER_NODE": "a100:2"}) == "SLURM_GPUS_PER_NODE=a100:2"


def test_auto_falling_back_to_the_cpu_warns_loudly_when_gpus_were_asked_for(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_WARNED_CPU_FALLBACK", False)
    for name in list(os.environ):
        if name.startswith("SLURM_") or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    assert resolve_device("auto", warn=True) == torch.device("cpu")
    assert capsys.readouterr().err == ""  # a CPU machine: nothing to say
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    assert resolve_device("auto", warn=True) == torch.device("cpu")
    err = capsys.readouterr().err
    assert "WARNING" in err and "SLURM_JOB_GPUS=0" in err and "training on the CPU" in err
    assert "cannot be resumed on a GPU" in err
    resolve_device("auto", warn=True)
    assert capsys.readouterr().err == "", "once per process"
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda")


# -- parallel runs on one node ------------------------------------------------------------------------


def test_worker_environment_pins_one_gpu_and_shares_the_cores():
    env = worker_environment(2, 4, environ={"PATH": "/bin"}, cpus=32)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["PATH"] == "/bin"
    assert env["MIXBENCH_CPUS"] == "8" and env["OMP_NUM_THREADS"] == "8" and env["MIXBENCH_WORKERS"] == "8"
    # The parent's own list is honoured: worker i gets its i-th entry (ids or UUIDs).
    env = worker_environment(1, 2, environ={"CUDA_VISIBLE_DEVICES": "4,6"}, cpus=5)
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and env["MIXBENCH_CPUS"] == "2" and env["MIXBENCH_WORKERS"] == "2"
    env = worker_environment(0, 2, environ={"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb", "MIXBENCH_WORKERS": "3"},
                             cpus=64)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aa" and env["MIXBENCH_WORKERS"] == "3"
    assert worker_environment(0, 8, environ={}, cpus=4)["MIXBENCH_CPUS"] == "1"
    cpu = worker_environment(1, 2, gpu=False, environ={"CUDA_VISIBLE_DEVICES": "0"}, cpus=4)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "0" and cpu["MIXBENCH_CPUS"] == "2"
    with pytest.raises(UsageError, match="lists only 2"):
        worker_environment(2, 3, environ={"CUDA_VISIBLE_DEVICES": "0,1"})


@pytest.mark.slow
def test_a_spawned_worker_inherits_its_environment_and_the_parent_keeps_its_own(monkeypatch):
    import multiprocessing as mp

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    env = worker_environment(1, 2, cpus=4)
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_report_env, args=(queue,))
    with _environment(env):
        proc.start()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5" and "MIXBENCH_CPUS" not in os.environ
    seen = queue.get(timeout=120)
    proc.join(timeout=120)
    assert seen == {"CUDA_VISIBLE_DEVICES": "5", "MIXBENCH_CPUS": "2", "threads_env": "2"}


def _report_env(queue):
    queue.put({"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "MIXBENCH_CPUS": os.environ.get("MIXBENCH_CPUS"), "threads_env": os.environ.get("OMP_NUM_THREADS")})


def test_puzzlemix_pool_and_torch_threads_use_the_runs_share(monkeypatch):
    monkeypatch.setenv("MIXBENCH_CPUS", "3")
    assert available_cpus() == min(3, len(os.sched_getaffinity(0)))
    assert pm.GraphCutPool.default_workers() == available_cpus() - 1
    monkeypatch.setenv("MIXBENCH_CPUS", "1")
    assert pm.GraphCutPool.default_workers() == 0
    monkeypatch.delenv("MIXBENCH_CPUS")
    assert pm.GraphCutPool.default_workers() == len(os.sched_getaffinity(0)) - 1


# -- PuzzleMix: saliency in float32 under autocast, fewer host synchronisations, same results ----------


def test_saliency_is_float32_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("preactresnet18_w16", num_classes=5, image_size=16).train()
    x = torch.randn(4, 3, 16, 16)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    ref, ref_grad, ref_loss = input_gradient_saliency(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sal, grad, loss = input_gradient_saliency(model, x, y)
    assert sal.dtype == grad.dtype == loss.dtype == torch.float32
    assert torch.equal(sal, ref) and torch.equal(grad, ref_grad) and torch.equal(loss, ref_loss)
    assert model.training  # back in train mode
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast would have given: not the same
        assert model(x).dtype == torch.bfloat16


@pytest.mark.parametrize("side", [2, 4, 8])
def test_transport_without_host_syncs_gives_the_same_plans(side):
    g = torch.Generator().manual_seed(side)
    for trial in range(20):
        n = 7
        mask = (torch.rand(n, 1, side, side, generator=g) > 0.5).float() * torch.rand(n, 1, 1, 1, generator=g)
        if trial % 5 == 0:
            mask = torch.ones_like(mask)
        saliency = torch.rand(n, side, side, generator=g) ** 3
        unary = saliency / saliency.sum((1, 2), keepdim=True)
        for t_eps in (0.2, 0.8):
            partial = pm.transport_plan(mask, unary, t_eps, partial_argmin=True)
            full = pm.transport_plan(mask, unary, t_eps, partial_argmin=False)
            assert torch.equal(partial, full), (side, trial, t_eps)
    assert torch.equal(pm.transport_plan(mask, unary, 0.8), partial)  # the CPU default: partial


def test_one_host_copy_gives_the_same_arrays():
    g = torch.Generator().manual_seed(0)
    parts = (torch.randn(5, 4, 4, generator=g), torch.randn(5, 4, 4, generator=g),
             torch.randn(5, 3, 4, generator=g), torch.randn(5, 4, 3, generator=g))
    for got, t in zip(pm._to_host(*parts), parts):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == tuple(t.shape)
        assert np.array_equal(got, t.numpy())
    mixed = pm._to_host(parts[0], parts[1].double())
    assert mixed[1].dtype == np.float64


def test_puzzlemix_result_does_not_depend_on_the_sync_free_transport(monkeypatch):
    """The method's mixed batch with the transport forced onto the accelerator's path equals the CPU path's."""
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sal = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(2)) + 1e-3
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    outs = []
    real = pm.transport_plan
    for partial in (True, False):
        monkeypatch.setattr(pm, "transport_plan", lambda m, u, t, partial=partial: real(m, u, t, partial))
        for block_num in (2, 4, 8):
            outs.append(pm.puzzle_mix(x, sal, perm, 0.4, block_num))
    half = len(outs) // 2
    for (a, ra), (b, rb) in zip(outs[:half], outs[half:]):
        assert torch.equal(a, b) and torch.equal(ra, rb)


# -- run options ----------------------------------------------------------------------------------------


def test_checkpoint_interval_and_compile_are_not_part_of_the_run_id():
    base = small_spec()
    for change in ({"checkpoint_every_min": 30.0}, {"compile": True}, {"compile": False}, {"compile": None}):
        assert small_spec(**change).run_id == base.run_id
    with pytest.raises(UsageError, match="checkpoint_every_min"):
        small_spec(checkpoint_every_min=-1)
    with pytest.raises(UsageError, match="compile"):
        small_spec(compile="yes")
    assert RunSpec(method="vanilla", dataset="synthetic").compile is None  # auto: on CUDA only


def test_cli_passes_the_new_run_options(capsys):
    from mixbench.cli import _run_overrides, build_parser

    args = build_parser().parse_args(["run", "--checkpoint-every-min", "2.5", "--no-compile"])
    options = _run_overrides(args)
    assert options["checkpoint_every_min"] == 2.5 and options["compile"] is False
    assert "compile" not in _run_overrides(build_parser().parse_args(["run"]))
    assert _run_overrides(build_parser().parse_args(["run", "--compile"]))["compile"] is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--checkpoint-every-min", "-1"])
    capsys.readouterr()


def test_a_cpu_result_records_that_it_was_not_compiled(tmp_path):
    result = train_run(small_spec(epochs=1), tmp_path / "run", progress=False)
    assert result["compiled"] is False
    assert json.loads((tmp_path / "run" / "result.json").read_text())["compiled"] is False
