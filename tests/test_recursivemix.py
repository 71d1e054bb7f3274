"""RecursiveMix: boxes and targets by hand, the RoI term, the history as checkpointed state, the authors' code.

``RECURSIVEMIX_REFERENCE=/path/to/RecursiveMix-pytorch pytest tests/test_recursivemix.py`` also runs
the authors' training step (utils.recursive_mix and the RoI branch of models_cifar/resnet.py,
with ``--share_fc``) for several steps on the same model and draws and checks every output.
"""
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench.methods import create_method
from mixbench.methods import recursivemix as rm
from mixbench.spec import RunSpec
from model_kinds import build


def setup(method, seed=0, classes=5):
    method.setup(seed=seed, num_classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    return method


def batch(n=4, side=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), F.one_hot(torch.arange(n) % classes, classes).float()


def test_box_by_hand():
    # u * alpha = 0.25 -> side ratio 0.5: 8 x 8 on 16 x 16, centred at (row 4, column 10).
    assert rm.recursive_box(16, 16, 0.5, 0.5, 4, 10) == (0, 8, 6, 14)
    assert rm.recursive_box(16, 16, 0.5, 0.5, 15, 15) == (11, 16, 11, 16)  # clipped
    assert rm.recursive_box(16, 8, 0.5, 0.5, 8, 4) == (4, 12, 2, 6)  # each side in proportion
    assert rm.recursive_box(16, 16, 0.0, 0.5, 3, 3) == (3, 3, 3, 3)  # empty


def test_mix_pastes_the_resized_history_and_mixes_targets_by_area():
    x, y = batch(3, 8)
    old_x, old_y = torch.randn(5, 3, 8, 8), torch.full((5, 5), 0.2)
    box = (2, 6, 0, 4)  # 4 x 4 of 8 x 8
    mixed, target, lam = rm.recursive_mix(x, old_x, y, old_y, box)
    assert lam == 0.75
    assert torch.equal(mixed[:, :, 2:6, 0:4], old_x[:3, :, ::2, ::2])  # nearest: every other pixel
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 0:4] = False
    assert torch.equal(mixed[:, :, outside], x[:, :, outside])
    torch.testing.assert_close(target, 0.75 * y + 0.25 * old_y[:3])
    torch.testing.assert_close(target.sum(1), torch.ones(3))
    same, target, lam = rm.recursive_mix(x, old_x, y, old_y, (3, 3, 1, 5))  # empty box: a no-op
    assert lam == 1.0 and torch.equal(same, x) and torch.equal(target, y)


def test_roi_logits_of_constant_features_are_the_head_of_those_features():
    model = build("resnet18").eval()
    feats = torch.arange(64.0).view(1, 64, 1, 1).expand(2, 64, 4, 4).contiguous()
    with torch.no_grad():
        got = rm.roi_logits(model, feats, (2, 10, 4, 16), 16)
        torch.testing.assert_close(got, model.forward_head(feats))


def test_first_step_has_no_history_then_steps_mix_with_it():
    model = build("resnet18").train()
    method = setup(create_method("recursivemix"), seed=1)
    x0, y0 = batch(4, seed=0)
    out0 = method(model, x0, y0)
    assert out0.extra_loss is None and torch.equal(out0.target, y0)
    assert method.rng.bit_generator.state == np.random.default_rng(1).bit_generator.state, "no draw without history"
    x1, y1 = batch(4, seed=1)
    rng = np.random.default_rng(1)  # order: u, box centre column, box centre row
    u, cx, cy = float(rng.random()), int(rng.integers(16)), int(rng.integers(16))
    box = rm.recursive_box(16, 16, u, 0.5, cy, cx)
    mixed, target, lam = rm.recursive_mix(x1, x0, y1, y0, box)
    assert lam < 1
    out1 = method(model, x1, y1)
    torch.testing.assert_close(out1.target, target, rtol=0, atol=0)
    with torch.no_grad():
        feats = model.forward_features(mixed)
        logits = model.forward_head(feats)
        roi = rm.roi_logits(model, feats, box, 16)
        extra = 0.1 * (1 - lam) * rm.soft_cross_entropy(roi, out0.logits.softmax(-1))
    torch.testing.assert_close(out1.logits, logits)
    torch.testing.assert_close(out1.extra_loss, extra)
    # The next step mixes with this step's mixed batch, mixed targets and logits.
    assert torch.equal(method._history["x"], mixed) and torch.equal(method._history["y"], out1.target)
    assert torch.equal(method._history["logits"], out1.logits.detach())


@pytest.mark.parametrize("n", [1, 3])
def test_batch_sizes_and_a_larger_batch_restarts_the_history(n):
    model = build("regnet").train()
    method = setup(create_method("recursivemix", omega=0.5))
    for step in range(3):
        x, y = batch(n, side=32, seed=step)  # 32 px: a 2x2 last map, so batch norm trains on a batch of 1
        out = method(model, x, y)
        assert out.logits.shape == (n, 5)
        torch.testing.assert_close(out.target.sum(1), torch.ones(n))
        loss = rm.soft_cross_entropy(out.logits, out.target)
        (loss + (out.extra_loss if out.extra_loss is not None else 0)).backward()
    state = method.rng.bit_generator.state
    x, y = batch(n + 2, side=32, seed=9)
    out = method(model, x, y)  # more samples than the history holds: not mixed, no draw
    assert torch.equal(out.target, y) and out.extra_loss is None and method.rng.bit_generator.state == state
    x, y = batch(n, side=32, seed=10)
    assert method(model, x, y).target.shape == (n, 5)  # a smaller batch uses the first rows of the history


def test_deterministic_and_exact_resume_from_state_dict():
    model = build("preact").eval()
    batches = [batch(4, seed=s) for s in range(6)]

    def run(split=None):
        method = setup(create_method("recursivemix"), seed=4)
        outs = []
        for i, (x, y) in enumerate(batches):
            if i == split:  # a checkpoint and a fresh method, as the harness resumes
                buf = io.BytesIO()
                torch.save(method.state_dict(), buf)
                method = setup(create_method("recursivemix"), seed=123)
                method.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            with torch.no_grad():
                outs.append(method(model, x, y))
        return outs

    full, again, resumed = run(), run(), run(split=3)
    for a, b, c in zip(full, again, resumed):
        for out in (b, c):
            assert torch.equal(a.logits, out.logits) and torch.equal(a.target, out.target)
            assert (a.extra_loss is None) == (out.extra_loss is None)
            if a.extra_loss is not None:
                assert torch.equal(a.extra_loss, out.extra_loss)
    assert any(o.extra_loss is not None for o in full)
    state = setup(create_method("recursivemix")).state_dict()
    assert state["history"] is None


@pytest.mark.slow
def test_training_run_resumes_exactly(tmp_path, monkeypatch):
    """Crash after the first epoch's checkpoint; the rerun resumes with the history and ends identical."""
    import mixbench.train as train

    spec = RunSpec.from_dict(dict(method="recursivemix", dataset="synthetic", seed=2, epochs=2, batch_size=16,
                                  train_subset=64, device="cpu", model="preactresnet18_w16",
                                  model_kwargs=dict(channels=[8, 8, 16, 16], stem_chs=8, layers=[1, 1, 1, 1]))
                             ).resolved()
    train.train_run(spec, tmp_path / "ref", progress=False)

    class Killed(BaseException):
        pass

    real_save, saved = train.save_checkpoint, []

    def save_then_die(run_dir, state):
        real_save(run_dir, state)
        saved.append(state["method"])
        raise Killed()

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train.train_run(spec, tmp_path / "run", progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert saved[0]["history"]["x"].shape == (16, 3, 16, 16)
    train.train_run(spec, tmp_path / "run", progress=False)

    def metrics(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith(("time_s", "per_s"))} for r in rows]

    assert metrics(tmp_path / "ref") == metrics(tmp_path / "run")


def test_bad_parameters():
    with pytest.raises(UsageError, match="alpha"):
        create_method("recursivemix", alpha=1.5)
    with pytest.raises(UsageError, match="mode"):
        create_method("recursivemix", mode="bicubic")


# -- against the authors' code (only with a local copy of implus/RecursiveMix-pytorch) --

REFERENCE = os.environ.get("RECURSIVEMIX_REFERENCE")


def load(name, relative):
    spec = importlib.util.spec_from_file_location(name, Path(REFERENCE) / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TimmView(nn.Module):
    """timm's API over the authors' CIFAR ResNet: forward_features, forward_head, get_classifier."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward_features(self, x):
        n = self.net
        return n.conv5_x(n.conv4_x(n.conv3_x(n.conv2_x(n.conv1(x)))))

    def forward_head(self, feats):
        return self.net.fc(self.net.avg_pool(feats).flatten(1))

    def get_classifier(self):
        return self.net.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.skipif(not REFERENCE, reason="set RECURSIVEMIX_REFERENCE to a checkout of implus/RecursiveMix-pytorch")
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_same_as_the_authors_training_step(monkeypatch, mode):
    monkeypatch.setattr(np, "int", int, raising=False)  # the authors' code uses np.int (gone in NumPy 1.24)
    utils = load("recursivemix_utils", "utils.py")
    resnet = load("recursivemix_resnet", "models_cifar/resnet.py")
    torch.manual_seed(0)
    net = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5).train()
    model = TimmView(net)
    alpha, omega, side, n = 0.5, 0.1, 32, 6
    method = setup(create_method("recursivemix", alpha=alpha, omega=omega, mode=mode), seed=7)
    replica = np.random.default_rng(7)
    old = None
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(n, 3, side, side, generator=g)
        y = F.one_hot(torch.randint(5, (n,), generator=g), 5).float()
        with torch.no_grad():
            # the authors' step (main.py, train()), with the method's draws
            if old is not None:
                u, cx, cy = float(replica.random()), int(replica.integers(side)), int(replica.integers(side))
                queue = [cx, cy]
                monkeypatch.setattr(utils.random, "uniform", lambda a, b: a + (b - a) * u)
                monkeypatch.setattr(utils.np.random, "randint", lambda high: queue.pop(0))
                inputs, targets, boxes, lam = utils.recursive_mix(x.clone(), old[0], y.clone(), old[1], alpha, mode)
                assert not queue
            else:
                inputs, targets, lam = x.clone(), y.clone(), 1.0
            if lam < 1.0:
                out, out_roi = net(inputs, boxes, share_fc=True)
                loss_roi = torch.sum(-old[2].softmax(-1)[:n] * out_roi.log_softmax(-1)) / n * omega * (1.0 - lam)
            else:
                out, loss_roi = net(inputs, None, share_fc=True), None
            old = (inputs.clone(), targets.clone(), out.clone())
            # mixbench
            got = method(model, x, y)
        torch.testing.assert_close(got.target, targets, rtol=0, atol=0)
        torch.testing.assert_close(got.logits, out, rtol=1e-6, atol=1e-6)
        if loss_roi is None:
            assert got.extra_loss is None
        else:
            torch.testing.assert_close(got.extra_loss, loss_roi, rtol=1e-6, atol=1e-6)
        assert torch.equal(method._history["x"], inputs)
