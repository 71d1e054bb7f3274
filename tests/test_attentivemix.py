"""AttentiveMix: the top-k mask by hand, label weights = realised areas, the extractor, availability, openmixup.

The tests write their own small extractor checkpoint (a narrow timm ResNet-18). With
``OPENMIXUP_REFERENCE=/path/to/openmixup`` a test also runs openmixup's ``attentivemix`` on the
same features and draws and checks that the mixed images are the same.
"""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.methods import create_method, get_method
from mixbench.methods import attentivemix as am
from mixbench.models import create_model
from mixbench.benchmark import expand_benchmark
from mixbench.spec import parse_methods
from model_kinds import KINDS, build

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)  # a narrow timm resnet18


@pytest.fixture(autouse=True)
def no_configured_extractor(monkeypatch):
    monkeypatch.delenv(am.ENV, raising=False)


def write_extractor(folder):
    """Write a checkpoint of a narrow resnet18 built for 32 px (CIFAR stem: a 4x4 last feature map);
    returns the method parameters that use it (other test modules import this)."""
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=10, image_size=32, **TINY)
    path = Path(folder) / "resnet18_tiny.pth"
    torch.save(model.state_dict(), path)
    return {"extractor": str(path), "extractor_kwargs": dict(TINY), "feat_size": 32}


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return Path(write_extractor(tmp_path_factory.mktemp("extractor"))["extractor"])


def make(extractor, seed=0, channels=3, **kw):
    kw = {"extractor_kwargs": TINY, "feat_size": 32, **kw}
    method = create_method("attentivemix", extractor=str(extractor), **kw)
    method.setup(seed=seed, num_classes=5, mean=(0.5,) * channels, std=(0.25,) * channels)
    return method


def linear_model(side=16, channels=3, classes=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * side * side, classes))


# -- the core -------------------------------------------------------------------------


def test_mask_by_hand():
    # 2x2 cells; channel means: sample 0 (1, 4, 3, 2), sample 1 (5, 0, 0, 6).
    means = torch.tensor([[1.0, 4.0, 3.0, 2.0], [5.0, 0.0, 0.0, 6.0]]).view(2, 1, 2, 2)
    feats = torch.cat([means - 1, means + 1], 1)  # two channels whose mean is `means`
    mask = am.attentive_mask(feats, 2, (4, 4))
    assert mask.shape == (2, 1, 4, 4)
    cells0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # top-2 of sample 0: cells 1 (4) and 2 (3)
    cells1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # top-2 of sample 1: cells 3 (6) and 0 (5)
    assert torch.equal(mask[0, 0], cells0.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(mask[1, 0], cells1.repeat_interleave(2, 0).repeat_interleave(2, 1))
    x = torch.randn(2, 3, 4, 4)
    perm = torch.tensor([1, 0])
    mixed, own = am.attentivemix(x, perm, mask)
    torch.testing.assert_close(mixed, mask * x + (1 - mask) * x[perm], rtol=0, atol=0)
    assert own.tolist() == [0.5, 0.5]


def test_top_k_rule():
    assert am.top_k_from_lambda(0.0, 49) == 1
    assert am.top_k_from_lambda(0.5, 49) == 24
    assert am.top_k_from_lambda(0.999, 49) == 48
    assert am.top_k_from_lambda(1.0, 49) == 49


def test_own_area_per_sample_when_cells_are_unequal():
    # 7 cells on 16 px: nearest upsampling gives cells of 2 or 3 pixels, so equal counts of cells
    # cover different areas; each sample's label weight is its own area (openmixup: sample 0's).
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(4, 3, 7, 7, generator=g)
    mask = am.attentive_mask(feats, 10, (16, 16))
    assert (mask.view(4, -1).sum(1) > 0).all()
    x = torch.randn(4, 3, 16, 16, generator=g)
    _, own = am.attentivemix(x, torch.tensor([1, 2, 3, 0]), mask)
    torch.testing.assert_close(own, mask.mean((1, 2, 3)))
    assert len(set(own.tolist())) > 1, "this case should have unequal areas"


def test_all_cells_is_a_no_op(extractor):
    x = torch.randn(3, 3, 16, 16)
    mask = am.attentive_mask(torch.rand(3, 4, 4, 4), 16, (16, 16))
    mixed, own = am.attentivemix(x, torch.tensor([2, 0, 1]), mask)
    assert torch.equal(mixed, x) and own.tolist() == [1.0] * 3
    method = make(extractor, top_k=10**6)  # more than the cells: every cell is the sample's own
    y = F.one_hot(torch.arange(3), 5).float()
    out = method(linear_model(), x, y)
    assert torch.equal(out.target, y)


# -- the method ----------------------------------------------------------------------


def test_labels_follow_the_realised_area(extractor):
    method = make(extractor, seed=2)
    model = linear_model()
    x = torch.randn(5, 3, 16, 16)
    y = F.one_hot(torch.arange(5), 5).float()
    rng = np.random.default_rng(2)  # order: lambda (top_k is None), then the permutation
    feats = method.features(x)
    assert feats.shape == (5, 64, 4, 4)
    for _ in range(3):
        top_k = am.top_k_from_lambda(float(rng.beta(2.0, 2.0)), 16)
        perm = torch.from_numpy(rng.permutation(5))
        mask = am.attentive_mask(feats, top_k, (16, 16))
        mixed, own = am.attentivemix(x, perm, mask)
        out = method(model, x, y)
        torch.testing.assert_close(out.logits, model(mixed), rtol=0, atol=0)
        want = own[:, None] * y + (1 - own[:, None]) * y[perm]
        torch.testing.assert_close(out.target, want, rtol=0, atol=0)
        torch.testing.assert_close(out.target.sum(1), torch.ones(5))
        assert torch.allclose(own, torch.full((5,), top_k / 16))


@pytest.mark.parametrize("n", [1, 3])
def test_batch_sizes_one_channel_and_determinism(extractor, n):
    model = linear_model(channels=1)
    x = torch.randn(n, 1, 16, 16)
    y = F.one_hot(torch.arange(n) % 5, 5).float()
    a, b = make(extractor, seed=4, channels=1), make(extractor, seed=4, channels=1)
    for _ in range(3):
        oa, ob = a(model, x, y), b(model, x, y)
        assert oa.logits.shape == (n, 5) and oa.extra_loss is None
        assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.target, ob.target)
        torch.testing.assert_close(oa.target.sum(1), torch.ones(n))


def test_extractor_is_frozen_in_eval_mode(extractor):
    method = make(extractor)
    net = method.extractor_net("cpu")
    running = net.bn1.running_mean.clone()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    feats = method.features(x)
    assert not feats.requires_grad and torch.equal(net.bn1.running_mean, running)
    # The input is resized to feat_size (32) before the extractor.
    want = net.forward_features(F.interpolate(x.detach(), size=(32, 32), mode="bilinear"))
    torch.testing.assert_close(feats, want)


def test_checkpoint_formats(extractor, tmp_path):
    state = torch.load(extractor, weights_only=True)
    plain = make(extractor).features(torch.ones(2, 3, 16, 16))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    torch.testing.assert_close(make(wrapped).features(torch.ones(2, 3, 16, 16)), plain)
    mixbench_style = tmp_path / "model.pt"
    torch.save({"model": state}, mixbench_style)
    torch.testing.assert_close(make(mixbench_style).features(torch.ones(2, 3, 16, 16)), plain)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, partial)
    with pytest.raises(UsageError, match=r"lacks \d+ weight\(s\) of 'resnet18': layer4"):
        make(partial)
    with pytest.raises(UsageError, match="does not fit"):
        make(extractor, extractor_kwargs=None)  # full-width resnet18: shape mismatch
    with pytest.raises(UsageError, match="is not a file"):
        make(tmp_path / "nowhere.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="cannot read it"):
        make(tmp_path / "junk.pt")


@pytest.mark.parametrize("kind", KINDS)
def test_trains_on_every_model_kind(extractor, kind):
    """Two SGD steps on each model kind (tests/test_methods_train.py skips attentivemix: no extractor there)."""
    model = build(kind).train()
    method = make(extractor, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(5, 3, 16, 16), F.one_hot(torch.arange(5), 5).float()
    for _ in range(2):
        out = method(model, x, y)
        loss = torch.sum(-out.target * out.logits.log_softmax(-1), -1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(out.target.sum(1), torch.ones(5))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# -- availability --------------------------------------------------------------------


def test_unavailable_without_an_extractor(monkeypatch, capsys, extractor):
    cls = get_method("attentivemix")
    assert not cls.available()
    assert "MIXBENCH_ATTENTIVEMIX_EXTRACTOR" in cls.unavailable_reason()
    assert "\n" not in cls.unavailable_reason()
    with pytest.raises(UsageError, match="needs a pretrained feature extractor"):
        create_method("attentivemix")
    with pytest.raises(UsageError, match="needs a pretrained feature extractor"):
        expand_benchmark({"dataset": "synthetic", "methods": ["mixup", "attentivemix"]})
    names = parse_methods("all")
    assert "attentivemix" not in names and "vanilla" in names
    assert "skipping attentivemix: attentivemix needs a pretrained feature extractor" in capsys.readouterr().err
    # the checkpoint as a method parameter of the spec, without the environment variable
    assert cls.available(extractor=str(extractor))
    (cell,) = expand_benchmark({"dataset": "synthetic", "methods": {"attentivemix": {
        "method_params": {"extractor": str(extractor)}}}})
    assert cell.method_params["extractor"] == str(extractor)
    with pytest.raises(UsageError, match="missing.pt is not a file"):
        expand_benchmark({"dataset": "synthetic", "methods": {"attentivemix": {
            "method_params": {"extractor": str(extractor.parent / "missing.pt")}}}})
    monkeypatch.setenv(am.ENV, str(extractor.parent / "missing.pt"))
    assert not cls.available() and "is not a file" in cls.unavailable_reason()
    monkeypatch.setenv(am.ENV, str(extractor))
    assert cls.available() and "attentivemix" in parse_methods("all")
    assert cls.default_params()["extractor"] == str(extractor)  # recorded in the run's parameters
    method = create_method("attentivemix", extractor_kwargs=TINY, feat_size=32)
    assert method.extractor == str(extractor)


def test_bad_parameters(extractor):
    with pytest.raises(UsageError, match="top_k"):
        make(extractor, top_k=0)
    with pytest.raises(UsageError, match="feat_size"):
        create_method("attentivemix", extractor=str(extractor), feat_size=0)


# -- against openmixup (only with a local copy of Westlake-AI/openmixup) -------------

REFERENCE = os.environ.get("OPENMIXUP_REFERENCE")


def load_reference():
    path = Path(REFERENCE) / "openmixup" / "models" / "augments" / "attentivemix.py"
    spec = importlib.util.spec_from_file_location("openmixup_attentivemix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not REFERENCE, reason="set OPENMIXUP_REFERENCE to a checkout of Westlake-AI/openmixup")
def test_same_as_openmixup(monkeypatch):
    ref = load_reference()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the reference is CUDA-only
    rng = np.random.default_rng(0)
    cases = [(32, 7, None), (16, 7, None), (28, 7, None), (224, 7, None), (32, 4, None), (32, 8, 6), (64, 2, None)]
    for side, cells, top_k in cases:
        n = 5
        g = torch.Generator().manual_seed(side + cells)
        x = torch.randn(n, 3, side, side, generator=g)
        feats = torch.rand(n, 8, cells, cells, generator=g)
        y = F.one_hot(torch.from_numpy(rng.integers(10, size=n)), 10).float()
        lam, perm = float(rng.beta(2.0, 2.0)), torch.from_numpy(rng.permutation(n))
        monkeypatch.setattr(ref.np.random, "beta", lambda a, b: lam)
        monkeypatch.setattr(ref.torch, "randperm", lambda k, *a, **kw: perm.clone())
        want_x, (y_a, y_b, want_lam) = ref.attentivemix(x.clone(), y, alpha=2.0, features=feats, top_k=top_k)
        k = top_k if top_k is not None else am.top_k_from_lambda(lam, cells * cells)
        mask = am.attentive_mask(feats, k, (side, side))
        got_x, own = am.attentivemix(x, perm, mask)
        assert torch.equal(got_x, want_x), (side, cells)
        assert own[0].item() == want_lam  # openmixup's lam is sample 0's area; mixbench's own areas per sample
        assert torch.equal(y_b, y[perm])
