"""SnapMix: CAM label weights by hand, the loss identity, the method protocol, and the authors' code.

``SNAPMIX_REFERENCE=/path/to/SnapMix pytest tests/test_snapmix.py`` also runs the authors'
``snapmix`` (utils/mixmethod.py) on the same model, batch and draws and checks the mixed images,
the label weights and the loss.
"""
import importlib.util
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench.methods import create_method
from mixbench.methods import snapmix as sn
from mixbench.methods.cutmix import cutmix_box
from model_kinds import build


class FixedFeatures(nn.Module):
    """A timm-like model whose last feature map is given: for hand-computed CAMs."""

    def __init__(self, fms, weight, bias):
        super().__init__()
        self.fms = fms
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward_features(self, x):
        return self.fms

    def get_classifier(self):
        return self.fc


def test_semantic_percent_map_by_hand():
    # Features (1, 2, 2, 2), classes 2: class 1's CAM = 2 * f0 - f1 + 1.
    fms = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]], [[1.0, -1.0], [2.0, 0.0]]]])
    model = FixedFeatures(fms, torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([0.0, 1.0]))
    spm = sn.semantic_percent_map(model, torch.zeros(1, 3, 2, 2), torch.tensor([1]))
    # ReLU first: f1 -> [[1, 0], [2, 0]]; CAM = [[2, 5], [-1, 7]]; minus min -> [[3, 6], [0, 8]]; / 17.
    torch.testing.assert_close(spm, torch.tensor([[[3.0, 6.0], [0.0, 8.0]]]) / 17)


def test_semantic_percent_map_of_a_timm_model_is_the_cam():
    model = build("resnet18").eval()
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 4, 2])
    spm = sn.semantic_percent_map(model, x, labels)
    assert spm.shape == (3, 16, 16) and (spm >= 0).all()
    torch.testing.assert_close(spm.sum((1, 2)), torch.ones(3))
    with torch.no_grad():
        cam = torch.einsum("nchw,nc->nhw", F.relu(model.forward_features(x)), model.fc.weight[labels])
        cam = cam + model.fc.bias[labels][:, None, None]
        cam = F.interpolate(cam[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        cam = cam - cam.amin((1, 2), keepdim=True)
    torch.testing.assert_close(spm, cam / cam.sum((1, 2), keepdim=True))


def test_label_weights_by_hand():
    x = torch.randn(3, 1, 4, 4)
    spm = torch.zeros(3, 4, 4)
    spm[0, 0, 0] = 1.0          # sample 0: all its CAM in pixel (0, 0), inside its box
    spm[1] = 1 / 16             # sample 1: flat
    spm[2, 3, 3] = 1.0          # sample 2: all in (3, 3), outside every box below
    labels = torch.tensor([0, 1, 2])
    perm = torch.tensor([1, 2, 0])
    box, box_b = (0, 2, 0, 2), (0, 2, 0, 4)  # own box 2x2, partner box 2x4 resized into it
    mixed, lam_a, lam_b = sn.snapmix_core(x, spm, labels, perm, box, box_b)
    # lam_a = 1 - own CAM in the box; lam_b = partner's CAM in its box.
    torch.testing.assert_close(lam_a, torch.tensor([0.0, 0.75, 1.0]))
    torch.testing.assert_close(lam_b, torch.tensor([0.5, 0.0, 1.0]))
    want = F.interpolate(x[perm, :, 0:2, 0:4], size=(2, 2), mode="bilinear", align_corners=True)
    assert torch.equal(mixed[:, :, :2, :2], want) and torch.equal(mixed[:, :, 2:], x[:, :, 2:])
    # Same label: both weights become lam_a + lam_b; a constant CAM (NaN) falls back to the area.
    same = torch.tensor([0, 0, 0])
    _, lam_a, lam_b = sn.snapmix_core(x, spm, same, perm, box, box_b)
    torch.testing.assert_close(lam_a, torch.tensor([0.5, 0.75, 2.0]))
    torch.testing.assert_close(lam_b, lam_a)
    nan_spm = spm.clone()
    nan_spm[1] = float("nan")
    _, lam_a, lam_b = sn.snapmix_core(x, nan_spm, labels, perm, box, box_b)
    assert lam_a[1].item() == 0.75 and lam_b[0].item() == 0.25


def test_targets_sum_to_one_and_the_loss_is_the_authors():
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    perm = torch.tensor([1, 0, 3, 2])
    lam_a = torch.tensor([0.2, 0.0, 1.0, 0.7])
    lam_b = torch.tensor([0.5, 0.0, 0.6, 0.3])
    target, scale = sn.weighted_targets(y, perm, lam_a, lam_b)
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    assert torch.equal(target[1], y[1]) and scale[1] == 0  # s = 0: weight 0 either way
    logits = torch.randn(4, 5)
    ce = sn.soft_cross_entropy_per_sample
    ours = ce(logits, target).mean() + ((scale - 1) * ce(logits, target)).mean()
    authors = (lam_a * ce(logits, y) + lam_b * ce(logits, y[perm])).mean()
    torch.testing.assert_close(ours, authors)


def test_empty_box_is_a_no_op():
    method = create_method("snapmix")
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    method.draw_boxes = lambda n, h, w, device: (torch.arange(n).flip(0), (3, 3, 3, 3), (0, 4, 0, 4))
    model = build("resnet18").eval()
    x, y = torch.randn(4, 3, 16, 16), F.one_hot(torch.arange(4), 5).float()
    out = method(model, x, y)
    assert torch.equal(out.target, y) and out.extra_loss is None
    torch.testing.assert_close(out.logits, model(x))
    assert create_method("snapmix", alpha=0.0).draw_lambda(0.0) == 1.0  # lambda 1: an empty box


@pytest.mark.parametrize("n", [1, 3, 7])
def test_batch_sizes_determinism_and_draws(n):
    model = build("preact").train()  # a 1x1-convolution classifier
    x = torch.randn(n, 3, 16, 16)
    y = F.one_hot(torch.arange(n) % 5, 5).float()

    def run():
        torch.manual_seed(0)
        method = create_method("snapmix")
        method.setup(seed=5, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        return [method(model, x, y) for _ in range(3)]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert a.logits.shape == (n, 5)
        assert torch.equal(a.target, b.target) and torch.equal(a.logits, b.logits)
        torch.testing.assert_close(a.target.sum(1), torch.ones(n))
        assert (a.target >= 0).all()
    # Draw order: lambda, lambda_b, permutation, own box centre (row, column), partner's.
    rng = np.random.default_rng(5)
    lam, lam_b = rng.beta(5.0, 5.0), rng.beta(5.0, 5.0)
    perm = rng.permutation(n)
    box = cutmix_box(16, 16, lam, int(rng.integers(16)), int(rng.integers(16)))
    box_b = cutmix_box(16, 16, lam_b, int(rng.integers(16)), int(rng.integers(16)))
    method = create_method("snapmix")
    method.setup(seed=5, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    got = method.draw_boxes(n, 16, 16, "cpu")
    assert got[0].tolist() == perm.tolist() and got[1] == box and got[2] == box_b


def test_prob_and_bad_classifier():
    method = create_method("snapmix", prob=0.0)
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = build("resnet18").eval()
    x, y = torch.randn(2, 3, 16, 16), F.one_hot(torch.arange(2), 5).float()
    assert torch.equal(method(model, x, y).target, y)
    with pytest.raises(UsageError, match="prob"):
        create_method("snapmix", prob=1.5)
    model.fc = nn.Sequential(nn.Linear(64, 5))
    model.get_classifier = lambda: model.fc
    with pytest.raises(UsageError, match="get_classifier.*Sequential"):
        sn.semantic_percent_map(model, x, torch.tensor([0, 1]))


# -- against the authors' code (only with a local copy of Shaoli-Huang/SnapMix) ------

REFERENCE = os.environ.get("SNAPMIX_REFERENCE")


def load_reference(monkeypatch):
    """utils/custom_ops.py and utils/mixmethod.py alone (utils/__init__ needs cv2 and more)."""
    monkeypatch.setattr(np, "int", int, raising=False)  # the authors' code uses np.int (gone in NumPy 1.24)
    base = Path(REFERENCE) / "utils"
    modules = {}
    for name in ("custom_ops", "mixmethod"):
        spec = importlib.util.spec_from_file_location(f"snapmix_{name}", base / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        if name == "mixmethod":
            monkeypatch.setitem(sys.modules, "utils", types.SimpleNamespace(rand_bbox=modules["custom_ops"].rand_bbox))
        spec.loader.exec_module(modules[name])
    return modules["mixmethod"]


class AuthorsModel(nn.Module):
    """The authors' model interface over a timm model: (logits, last feature map, None), .module.classifier."""

    def __init__(self, timm_model):
        super().__init__()
        self.net = timm_model
        self.module = SimpleNamespace(classifier=timm_model.get_classifier())

    def forward(self, x):
        fms = self.net.forward_features(x)
        return self.net.forward_head(fms), fms, None


@pytest.mark.skipif(not REFERENCE, reason="set SNAPMIX_REFERENCE to a checkout of Shaoli-Huang/SnapMix")
@pytest.mark.parametrize("kind", ["resnet18", "regnet"])
def test_same_as_the_authors_snapmix(monkeypatch, kind):
    ref = load_reference(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the reference is CUDA-only
    model = build(kind).train()
    side, n, classes = 32, 8, 5
    conf = SimpleNamespace(prob=1.0, beta=5.0, cropsize=side, netname="resnet")
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, side, side, generator=g)
        labels = torch.randint(classes, (n,), generator=g)
        labels[1] = labels[0]  # at least one same-label pair for some permutations
        y = F.one_hot(labels, classes).float()
        method = create_method("snapmix")
        method.setup(seed=seed, num_classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3)
        replica = np.random.default_rng(seed)  # the method's draws, fed to the reference in its order
        betas = [float(replica.beta(5.0, 5.0)), float(replica.beta(5.0, 5.0))]
        perm = torch.from_numpy(replica.permutation(n))
        centres = [int(replica.integers(side)) for _ in range(4)]
        (lam, lam2), drawn = betas, list(centres)
        monkeypatch.setattr(ref.np.random, "rand", lambda *a: np.array([0.0]))
        queue = list(betas)
        monkeypatch.setattr(ref.np.random, "beta", lambda a, b: queue.pop(0))
        monkeypatch.setattr(ref.np.random, "randint", lambda high: centres.pop(0))
        monkeypatch.setattr(ref.torch, "randperm", lambda k, *a, **kw: perm.clone())
        with torch.no_grad():
            want_x, t_a, t_b, lam_a, lam_b = ref.snapmix(x.clone(), labels, conf, AuthorsModel(model))
            assert not queue and not centres
            out = method(model, x, y)
            want_logits = model(want_x)
        torch.testing.assert_close(out.logits, want_logits, rtol=0, atol=0)  # so the mixed images are equal
        assert torch.equal(t_b, labels[perm])
        ce = sn.soft_cross_entropy_per_sample
        authors = (lam_a * F.cross_entropy(want_logits, t_a, reduction="none")
                   + lam_b * F.cross_entropy(want_logits, t_b, reduction="none")).mean()
        ours = ce(out.logits, out.target).mean() + (out.extra_loss if out.extra_loss is not None else 0)
        torch.testing.assert_close(ours, authors, rtol=1e-6, atol=1e-6)
        # and the core on the same maps and boxes: the same images, weights to float32 rounding
        box, box_b = cutmix_box(side, side, lam, *drawn[:2]), cutmix_box(side, side, lam2, *drawn[2:])
        if (box[1] - box[0]) * (box[3] - box[2]) > 0 and (box_b[1] - box_b[0]) * (box_b[3] - box_b[2]) > 0:
            spm = sn.semantic_percent_map(model, x, labels)
            mixed, got_a, got_b = sn.snapmix_core(x, spm, labels, perm, box, box_b)
            assert torch.equal(mixed, want_x)
            torch.testing.assert_close(got_a, lam_a, rtol=0, atol=1e-6)
            torch.testing.assert_close(got_b, lam_b, rtol=0, atol=1e-6)
