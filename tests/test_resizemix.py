"""ResizeMix: the box, the resized paste, the label weights, the draws, and equality with openmixup.

``RESIZEMIX_REFERENCE=/path/to/openmixup pytest tests/test_resizemix.py`` also runs openmixup's
``openmixup/models/augments/resizemix.py`` (its package imports stubbed) on the same batches and draws.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from method_checks import assert_same_seed_same_mix, linear_batch
from mixbench.methods import create_method
from mixbench.methods import resizemix as rm

from openmixup_reference import load_openmixup


@pytest.mark.parametrize("tau, cy, cx, box", [
    (0.5, 8, 8, (4, 12, 4, 12)),     # side int(16 * .5) = 8, centred
    (0.5, 1, 15, (0, 5, 11, 16)),    # clipped at the top and the right
    (0.8, 0, 0, (0, 6, 0, 6)),       # side 12, clipped to the corner
    (0.1, 7, 7, (7, 7, 7, 7)),       # int(1.6) = 1 -> 1 // 2 = 0: an empty box
])
def test_box_hand_computed(tau, cy, cx, box):
    assert rm.resizemix_box(16, 16, tau, cy, cx) == box


def test_paste_is_the_whole_partner_resized_and_labels_weigh_the_area():
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([2, 0, 1])
    out, lam = rm.resizemix(x, perm, (4, 12, 2, 10))
    assert lam == pytest.approx(1 - 64 / 256)
    assert torch.equal(out[:, :, 4:12, 2:10], x[perm][:, :, ::2, ::2])  # nearest, halving: every other pixel
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 2:10] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    clipped, lam = rm.resizemix(x, perm, (0, 5, 11, 16))
    assert lam == pytest.approx(1 - 25 / 256)
    torch.testing.assert_close(clipped[:, :, :5, 11:], F.interpolate(x[perm], size=(5, 5), mode="nearest"))


def test_empty_box_is_a_no_op():
    x = torch.randn(2, 3, 16, 16)
    out, lam = rm.resizemix(x, torch.tensor([1, 0]), rm.resizemix_box(16, 16, 0.11, 5, 5))
    assert lam == 1.0 and torch.equal(out, x)


def test_bilinear_option():
    x = torch.randn(2, 3, 16, 16)
    out, _ = rm.resizemix(x, torch.tensor([1, 0]), (0, 8, 0, 8), "bilinear")
    want = F.interpolate(x[[1, 0]], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :, :8, :8], want)


def test_bad_parameters():
    with pytest.raises(UsageError, match="scope"):
        create_method("resizemix", scope=(0.9, 0.1))
    with pytest.raises(UsageError, match="interpolation"):
        create_method("resizemix", interpolation="cubic")


@pytest.mark.parametrize("use_alpha", [True, False])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_method_draw_order_batch_sizes_and_determinism(n, use_alpha):
    x, y, model = linear_batch(n)
    method = create_method("resizemix", use_alpha=use_alpha)
    method.setup(seed=5, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(5)  # order: perm, tau (beta, then uniform when outside the scope), cx, cy
    with torch.no_grad():
        for _ in range(6):
            out = method(model, x, y)
            perm = torch.from_numpy(rng.permutation(n))
            tau = float(rng.beta(1.0, 1.0)) if use_alpha else -1.0
            if not 0.1 <= tau <= 0.8:
                tau = float(rng.uniform(0.1, 0.8))
            cx, cy = int(rng.integers(16)), int(rng.integers(16))
            want, lam = rm.resizemix(x, perm, rm.resizemix_box(16, 16, tau, cy, cx))
            assert torch.equal(out.logits, model(want))
            torch.testing.assert_close(out.target, lam * y + (1 - lam) * y[perm])
            torch.testing.assert_close(out.target.sum(1), torch.ones(n))
    assert_same_seed_same_mix("resizemix", model, x, y)


# -- equality with openmixup ------------------------------------------------------------

REFERENCE = os.environ.get("RESIZEMIX_REFERENCE")


@pytest.mark.skipif(not REFERENCE, reason="set RESIZEMIX_REFERENCE to a checkout of Westlake-AI/openmixup")
@pytest.mark.parametrize("side, n", [(32, 6), (28, 5), (64, 3), (32, 1)])
def test_matches_openmixup(monkeypatch, side, n):
    ref = load_openmixup(monkeypatch, REFERENCE, "resizemix")
    queue = {}
    monkeypatch.setattr(np.random, "beta", lambda a, b: queue["beta"])
    monkeypatch.setattr(np.random, "uniform", lambda low, high: queue["uniform"])
    monkeypatch.setattr(np.random, "randint", lambda high: queue["randint"].pop(0))
    monkeypatch.setattr(torch, "randperm", lambda k: queue["perm"].clone())

    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(side))
    y = F.one_hot(torch.arange(n) % 4, 4).float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 4))
    method = create_method("resizemix")
    method.setup(seed=side + n, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(side + n)
    redraws = 0
    for _ in range(12):
        perm = torch.from_numpy(rng.permutation(n))
        beta = float(rng.beta(1.0, 1.0))
        uniform = float(rng.uniform(0.1, 0.8)) if not 0.1 <= beta <= 0.8 else None
        redraws += uniform is not None
        cx, cy = int(rng.integers(side)), int(rng.integers(side))
        queue.update(perm=perm, beta=beta, uniform=uniform, randint=[cx, cy])
        ref_x, (y_a, y_b, ref_lam) = ref.resizemix(x.clone(), y, scope=(0.1, 0.8), alpha=1.0, use_alpha=True)
        assert not queue["randint"], "the reference drew the centre differently"
        with torch.no_grad():
            out = method(model, x, y)
            assert torch.equal(out.logits, model(ref_x))
        torch.testing.assert_close(out.target, ref_lam * y_a + (1 - ref_lam) * y_b, rtol=0, atol=1e-6)
    assert redraws > 0, "no draw exercised the out-of-scope second draw"
