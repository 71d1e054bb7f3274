"""SmoothMix: the Gaussian mask by hand, label weights = blended shares, the method protocol, and openmixup.

``OPENMIXUP_REFERENCE=/path/to/openmixup pytest tests/test_smoothmix.py`` also runs openmixup's
``smoothmix`` on the same inputs and draws and checks that the mask and mixed images are the same.
"""
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.methods import create_method
from mixbench.methods import smoothmix as sm


def setup(method, seed=0, classes=5):
    method.setup(seed=seed, num_classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    return method


def linear_model(side=8, classes=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, classes))


def test_mask_by_hand():
    # 4x4, no shift: centre at (4 - 1/2 - 2, same) = (1.5, 1.5); sigma 2 -> exp(-d^2 / 8).
    mask = sm.smooth_mask(4, 4, 0, 0, torch.tensor([2.0]))
    for r in range(4):
        for c in range(4):
            d2 = (r - 1.5) ** 2 + (c - 1.5) ** 2
            assert mask[r, c].item() == pytest.approx(math.exp(-d2 / 8), rel=1e-6)
    # A shift moves the centre: shift_h = -1, shift_w = 1 -> centre (0.5, 2.5).
    moved = sm.smooth_mask(4, 4, -1, 1, torch.tensor([2.0]))
    assert moved[0, 2] == moved[1, 3] == moved.max()
    assert moved.argmax().item() in (2, 3, 6, 7)
    # Odd and non-square sides: centre row 5 - 1/2 - 2 = 2.5, column 8 - 1/2 - 4 = 3.5.
    odd = sm.smooth_mask(5, 8, 0, 0, torch.tensor([1.5]))
    assert odd.shape == (5, 8)
    assert odd[2, 3] == odd[3, 4] == odd.max()


def test_sigma_is_the_float32_range():
    assert sm.smooth_sigma(0.0, 32).item() == 8.0
    assert sm.smooth_sigma(0.5, 32).item() == 12.0
    assert sm.smooth_sigma(0.5, 10, (0.1, 0.3)).item() == pytest.approx(2.0)
    assert sm.smooth_sigma(0.3, 32).dtype == torch.float32


def test_label_weights_are_the_blended_shares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 8, generator=g)
    perm = torch.tensor([1, 2, 3, 4, 0])
    mask = sm.smooth_mask(8, 8, 2, -3, sm.smooth_sigma(0.7, 8))
    mixed, share = sm.smoothmix(x, perm, mask)
    torch.testing.assert_close(mixed, (1 - mask) * x + mask * x[perm], rtol=0, atol=0)
    assert share.item() == pytest.approx(mask.mean().item(), rel=1e-6)
    assert 0 < share < 1
    # The method: the sample weighted by mask gets the label weight mean(mask).
    method = setup(create_method("smoothmix"))
    method.draw_mask = lambda n, h, w, device: (perm, mask)
    y = F.one_hot(torch.arange(5), 5).float()
    out = method(linear_model(), x, y)
    torch.testing.assert_close(out.target, (1 - share) * y + share * y[perm])
    torch.testing.assert_close(out.target.sum(1), torch.ones(5))


def test_identity_partner_is_a_no_op():
    x = torch.randn(4, 3, 8, 8)
    mask = sm.smooth_mask(8, 8, 0, 0, sm.smooth_sigma(0.2, 8))
    mixed, share = sm.smoothmix(x, torch.arange(4), mask)
    torch.testing.assert_close(mixed, x)
    method = setup(create_method("smoothmix"))
    method.draw_mask = lambda n, h, w, device: (torch.arange(n), mask)
    y = F.one_hot(torch.arange(4), 5).float()
    torch.testing.assert_close(method(linear_model(), x, y).target, y)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_batch_sizes_and_odd_sides(n):
    method = setup(create_method("smoothmix"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 7 * 9, 5))
    x = torch.randn(n, 3, 7, 9)
    y = F.one_hot(torch.arange(n) % 5, 5).float()
    for _ in range(3):
        out = method(model, x, y)
        assert out.logits.shape == (n, 5) and out.extra_loss is None
        torch.testing.assert_close(out.target.sum(1), torch.ones(n))
        assert (out.target >= 0).all()


def test_draws_follow_the_seeded_generator():
    method = setup(create_method("smoothmix"), seed=11)
    model = linear_model()
    x = torch.randn(6, 3, 8, 8)
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    rng = np.random.default_rng(11)  # order: permutation, column offset, row offset, sigma
    for _ in range(4):
        perm = torch.from_numpy(rng.permutation(6))
        shift_w = int(int(rng.integers(8)) - 4)
        shift_h = int(int(rng.integers(8)) - 4)
        mask = sm.smooth_mask(8, 8, shift_h, shift_w, sm.smooth_sigma(float(rng.random()), 8))
        mixed, share = sm.smoothmix(x, perm, mask)
        out = method(model, x, y)
        torch.testing.assert_close(out.logits, model(mixed), rtol=0, atol=0)
        torch.testing.assert_close(out.target, (1 - share) * y + share * y[perm], rtol=0, atol=0)


def test_deterministic_given_the_seed_and_state_round_trip():
    x = torch.randn(6, 3, 8, 8)
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    model = linear_model()
    a = setup(create_method("smoothmix"), seed=3)
    b = setup(create_method("smoothmix"), seed=3)
    for _ in range(3):
        oa, ob = a(model, x, y), b(model, x, y)
        assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.target, ob.target)
    state = a.state_dict()
    first = a(model, x, y).target
    a.load_state_dict(state)
    assert torch.equal(a(model, x, y).target, first)


def test_bad_sigma():
    with pytest.raises(UsageError, match="sigma"):
        create_method("smoothmix", sigma=(0.5, 0.25))
    with pytest.raises(UsageError, match="sigma"):
        create_method("smoothmix", sigma=0.3)


# -- against openmixup (only with a local copy of Westlake-AI/openmixup) -------------

REFERENCE = os.environ.get("OPENMIXUP_REFERENCE")


def load_reference(monkeypatch):
    """openmixup's smoothmix.py alone (the package needs mmcv): a stub for its one import."""
    utils = types.ModuleType("openmixup.models.utils")
    utils.batch_shuffle_ddp = None
    for name in ("openmixup", "openmixup.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "openmixup.models.utils", utils)
    path = Path(REFERENCE) / "openmixup" / "models" / "augments" / "smoothmix.py"
    spec = importlib.util.spec_from_file_location("openmixup_smoothmix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not REFERENCE, reason="set OPENMIXUP_REFERENCE to a checkout of Westlake-AI/openmixup")
def test_same_as_openmixup(monkeypatch):
    ref = load_reference(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the reference is CUDA-only
    rng = np.random.default_rng(0)
    for side in (16, 28, 32, 32, 32, 64):
        n = 6
        x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(side))
        y = F.one_hot(torch.from_numpy(rng.integers(10, size=n)), 10).float()
        perm = torch.from_numpy(rng.permutation(n))
        kw, kh = int(rng.integers(side)), int(rng.integers(side))
        u = torch.tensor([rng.random()], dtype=torch.float32)  # what torch.rand(1) returns
        queue = [torch.tensor([kw]), torch.tensor([kh])]
        monkeypatch.setattr(ref.torch, "randperm", lambda k, *a, **kw_: perm.clone())
        monkeypatch.setattr(ref.torch, "randint", lambda *a, **k: queue.pop(0))
        monkeypatch.setattr(ref.torch, "rand", lambda *a, **k: u.clone())
        monkeypatch.setattr(ref.np.random, "beta", lambda a, b: 0.5)  # drawn but unused by the reference
        want_x, (y_a, y_b, want_lam) = ref.smoothmix(x.clone(), y, alpha=1.0)
        assert not queue
        mask = sm.smooth_mask(side, side, int(kh - side / 2), int(kw - side / 2), sm.smooth_sigma(u.item(), side))
        got_x, share = sm.smoothmix(x, perm, mask)
        assert torch.equal(got_x, want_x)
        assert torch.equal(share, want_lam)
        assert torch.equal(y_b, y[perm])
        # Deviation: openmixup pairs want_lam (the partner's share) with y_a; mixbench with y[perm].
