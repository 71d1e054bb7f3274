"""Every method and every evaluation suite with the model and data on a second device.

On a GPU, a tensor left on the host fails the first time it meets a device tensor; on this CPU-only
machine it would pass unseen. :class:`fake_device.FakeGpu` gives the CPU a second device with CUDA's
placement rules, so these tests fail where a GPU run would (see ``tests/fake_device.py``). First the
device itself is checked to fail where CUDA fails.
"""
import json

import pytest
import torch

from fake_device import DEVICE, DeviceMismatch, FakeGpu, on_device
from method_checks import Trainer, batches, method_params, tiny_model
import mixbench.train as train
from mixbench import evaluate as ev
from mixbench.cli import main
from mixbench.methods import get_method, list_methods
from mixbench.spec import RunSpec
from mixbench.train import train_run


def test_the_fake_device_fails_where_cuda_fails():
    model = torch.nn.Linear(4, 2)
    with FakeGpu():
        x = torch.randn(3, 4, device=DEVICE)
        assert on_device(x) and x.device == DEVICE
        with pytest.raises(DeviceMismatch, match="host tensors of shapes"):
            model(x)  # the model was left on the host
        model.to(DEVICE)
        out = model(x)
        assert on_device(out) and all(on_device(p) for p in model.parameters())
        out.sum().backward()
        assert on_device(model.weight.grad)
        with pytest.raises(DeviceMismatch):
            out + torch.ones(2)  # a host tensor of one dimension
        assert on_device(out * torch.tensor(2.0))  # a 0-dim host tensor is a scalar, as on CUDA
        with pytest.raises(DeviceMismatch, match="numpy"):
            out.detach().numpy()
        assert out.detach().cpu().numpy().shape == (3, 2) and not on_device(out.cpu())
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.rand(2, device=DEVICE, generator=torch.Generator())
        assert on_device(x[torch.tensor([0, 2])])  # host indices are allowed, as on CUDA
        assert on_device(torch.zeros(2).to(x)) and on_device(torch.zeros(2).to(x.device))
        model.to("cpu")
        assert not any(on_device(p) for p in model.parameters())


# Host syncs a method's step may make (copies to the host, .item()): each is its algorithm's own.
SYNCS_PER_STEP = {
    "puzzlemix": 1,  # the saliency, the costs and the draws to the graph-cut solver, one batched copy
    "saliencymix": 1,  # the images to OpenCV's saliency (steps that mix)
    "comixup": 2,  # the block saliency and the distance matrix to the solver
    "alignmix": 100,  # Sinkhorn's stopping test after each round (at most max_iter = 100), as the reference
}


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_with_the_model_and_data_on_a_device(name, tmp_path):
    """Twelve harness steps with the model and batches in channels_last on the device, as a CUDA run
    has them: the method's own modules on the device, the first three losses those of contiguous
    tensors on the host (to 1e-4; rounding grows over the steps), and no host sync beyond the
    method's own (``SYNCS_PER_STEP``)."""
    params = method_params(name, tmp_path)
    assert get_method(name).available(**params), get_method(name).unavailable_reason(**params)
    host_model = tiny_model()
    host = Trainer(name, host_model, host_model, params)
    host_losses = [host.step(x, y) for x, y in batches(12)]
    host.method.close()
    with FakeGpu() as device:
        model = tiny_model().to(DEVICE, memory_format=torch.channels_last)
        trainer = Trainer(name, model, model, params)
        losses = [trainer.step(x.to(DEVICE, memory_format=torch.channels_last), y.to(DEVICE)) for x, y in batches(12)]
        assert all(on_device(loss) for loss in losses)
        trainer.method.close()
    for module in trainer.method.owned_modules().values():
        assert all(on_device(p) for p in module.parameters()), f"{name}: a module of the method stayed on the host"
    torch.testing.assert_close(torch.stack(losses[:3]), torch.stack(host_losses[:3]), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(torch.stack(losses)).all()
    assert sum(device.syncs.values()) <= 12 * SYNCS_PER_STEP.get(name, 0), dict(device.syncs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "--methods", "vanilla", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "128",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    (found,) = list(out.rglob("result.json"))
    return found.parent


def test_every_evaluation_suite_runs_with_the_model_on_a_device(finished_run, tmp_path):
    """``mixbench evaluate`` with every suite, the model and images on the device (small settings)."""
    options = {"corruption": {"corruptions": ["gaussian_noise", "glass_blur", "contrast", "jpeg_compression"],
                              "severities": [2]},
               "loss_landscape": {"points": 3, "directions": 1}}
    with FakeGpu():
        result = ev.evaluate_run(finished_run, list(ev.SUITES), max_samples=16, batch_size=8, device=str(DEVICE),
                                 options=options, cache_dir=tmp_path, log=lambda msg: None)
    assert set(result["eval"]) == set(ev.SUITES)
    assert all(meta["device"] == str(DEVICE) for meta in result["eval_meta"].values())


@pytest.fixture
def runs_on_the_device(monkeypatch):
    """``train_run`` resolves a run's device to the fake one (a spec and the CLI take real devices only)."""
    monkeypatch.setattr(train, "resolve_device", lambda name, warn=False: DEVICE)


class Killed(BaseException):
    pass


def _spec(method, params):
    return RunSpec.from_dict(dict(method=method, method_params=params, dataset="synthetic", seed=5, epochs=2,
                                  batch_size=64, train_subset=128, device="cpu",
                                  checkpoint_every_min=0)).resolved()


@pytest.mark.slow
@pytest.mark.parametrize("method, params", [("mixup", {}), ("manifold_mixup", {}), ("puzzlemix", {"workers": 0}),
                                            ("automix", {})])
def test_the_training_loop_trains_and_resumes_on_a_device(method, params, tmp_path, monkeypatch, capsys,
                                                         runs_on_the_device):
    """``train_run`` on the device: a whole run, and one killed after its first epoch, then resumed from the
    checkpoint (model, optimizer, the method's state and modules back on the device), end equal."""
    spec = _spec(method, params)
    with FakeGpu():
        train_run(spec, tmp_path / "ref", progress=False)
        real_metrics, calls = train.test_metrics, []

        def killed_in_epoch_2(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise Killed()
            return real_metrics(*args, **kwargs)

        monkeypatch.setattr(train, "test_metrics", killed_in_epoch_2)
        with pytest.raises(Killed):
            train_run(spec, tmp_path / "run", progress=False)
        monkeypatch.setattr(train, "test_metrics", real_metrics)
        capsys.readouterr()
        train_run(spec, tmp_path / "run", progress=False)
        assert "from epoch 1" in capsys.readouterr().err
    ref, run = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("ref", "run"))
    assert ref["status"] == run["status"] == "complete"
    assert (ref["final_top1"], ref["final_test_loss"]) == (run["final_top1"], run["final_test_loss"])
    wa, wb = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("ref", "run"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_training_loop_waits_for_the_device_per_epoch_not_per_step(tmp_path, runs_on_the_device):
    """The loop keeps its step losses on the device: 4 times as many steps, the same host syncs."""
    syncs = []
    for subset in (128, 512):  # 2 and 8 steps of 64
        spec = RunSpec.from_dict(dict(method="vanilla", dataset="synthetic", seed=5, epochs=1, batch_size=64,
                                      train_subset=subset, device="cpu")).resolved()
        with FakeGpu() as device:
            train_run(spec, tmp_path / str(subset), progress=False)
        syncs.append(dict(device.syncs))
    assert syncs[0] == syncs[1] and sum(syncs[0].values()) <= 8, syncs


def test_a_streamed_image_folder_trains_and_evaluates_on_a_device(tmp_path, monkeypatch, runs_on_the_device):
    """The streaming loader (image files decoded a batch at a time) feeds the device, for training and for
    the evaluation suites."""
    from test_evaluate_stream import write_folder

    monkeypatch.setenv("MIXBENCH_WORKERS", "0")
    root = write_folder(tmp_path / "pets")
    with FakeGpu():
        assert main(["run", "--methods", "puzzlemix", "--dataset", f"imagefolder:{root}", "--model",
                     "preactresnet18_w16", "--image-size", "32", "--data-mode", "stream", "--epochs", "1",
                     "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
        (found,) = list((tmp_path / "runs").rglob("result.json"))
        result = ev.evaluate_run(found.parent, ["adversarial", "corruption", "calibration"], max_samples=6,
                                 batch_size=4, device=str(DEVICE), cache_dir=tmp_path / "cache", log=lambda m: None,
                                 options={"corruption": {"corruptions": ["fog", "contrast"], "severities": [2]}})
    assert set(result["eval"]) == {"adversarial", "corruption", "calibration"}
