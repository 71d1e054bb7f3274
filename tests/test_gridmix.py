"""GridMix: the grid mask, the label weights, the draws, and equality with openmixup.

``GRIDMIX_REFERENCE=/path/to/openmixup pytest tests/test_gridmix.py`` also runs openmixup's
``openmixup/models/augments/gridmix.py`` (its package imports stubbed) on the same batches and draws.
"""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from method_checks import assert_same_seed_same_mix, linear_batch
from mixbench.methods import create_method
from mixbench.methods import gridmix as gm

from openmixup_reference import load_openmixup


def test_mask_hand_computed():
    # 16x16, whole image as crop (area 1, aspect 1): cut 16 x 16 at (0, 0); 4 holes -> patches of 4,
    # lam 0.75 -> holes of int(4 * 0.5) = 2 pixels at the top left of each patch.
    mask = gm.gridmix_mask(16, 16, 0.75, 4, 1.0, 1.0, 1.0, 0.3, 0.9)
    line = np.array([1, 1, 0, 0] * 4, dtype=bool)
    assert np.array_equal(mask, line[:, None] & line[None, :])
    assert mask.mean() == 0.25


def test_mask_offset_crop():
    # area 0.5 of 32x32 = 512, aspect 2: cut_w = int(sqrt(256)) = 16, cut_h = 32; u = 0.5 -> columns 8..24.
    mask = gm.gridmix_mask(32, 32, 0.0, 2, 1.0, 0.5, 2.0, 0.5, 0.0)
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    # patches of 8, holes of 8 - 1 = 7 (at most the patch less one)
    assert cols.tolist() == list(range(8, 15)) + list(range(16, 23))
    assert rows.tolist() == [r for r in range(32) if r % 8 < 7]


def test_tall_crop_uses_the_reference_negative_slices():
    # aspect 2, whole area: cut_w = int(sqrt(1024 / 2)) = 22, cut_h = 44 > 32; v = 0.5 -> row0 = int(-12 * .5) = -6
    mask = gm.gridmix_mask(32, 32, 0.75, 2, 1.0, 1.0, 2.0, 0.0, 0.5)
    ref = np.zeros((32, 32), dtype=bool)
    patch_w = 11
    hole = int(patch_w * 0.5)
    for i in range(3):
        for j in range(5):
            x1, y1 = min(patch_w * i, 22), min(patch_w * j, 44)
            ref[-6 + y1: -6 + min(y1 + hole, 44), x1: min(x1 + hole, 22)] = True
    assert np.array_equal(mask, ref)


def test_lambda_one_leaves_one_pixel_holes_and_labels_weigh_the_area():
    mask = gm.gridmix_mask(16, 16, 1.0, 4, 1.0, 1.0, 1.0, 0.0, 0.0)
    assert mask.sum() == 4 * 4  # one-pixel holes at the corner of each of the 4 x 4 patches
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([1, 2, 0])
    out, lam = gm.gridmix(x, perm, torch.from_numpy(mask))
    assert lam == pytest.approx(1 - 16 / 256)
    assert (out != x).float().mean().item() == pytest.approx(1 - lam)
    m = torch.from_numpy(mask)
    assert torch.equal(out[:, :, m], x[perm][:, :, m]) and torch.equal(out[:, :, ~m], x[:, :, ~m])


def test_many_holes_on_a_small_image_are_held_to_half_the_crop():
    # 16x16 at area 0.5, aspect 2: cut_w = 8, so at most 4 holes (openmixup would assert with 6)
    assert np.array_equal(gm.gridmix_mask(16, 16, 0.5, 6, 1.0, 0.5, 2.0, 0.2, 0.2),
                          gm.gridmix_mask(16, 16, 0.5, 4, 1.0, 0.5, 2.0, 0.2, 0.2))


def test_bad_ranges():
    with pytest.raises(UsageError, match="range"):
        create_method("gridmix", cut_area_ratio=(1.0, 0.5))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_method_draw_order_batch_sizes_and_determinism(n):
    x, y, model = linear_batch(n)
    method = create_method("gridmix")
    method.setup(seed=3, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(3)  # order: lam, holes, hole aspect, crop area, crop aspect, perm, u, v
    with torch.no_grad():
        for _ in range(6):
            out = method(model, x, y)
            lam = float(rng.beta(1.0, 1.0))
            holes = int(rng.integers(2, 7))
            hole_aspect, area, aspect = rng.uniform(1.0, 1.0), rng.uniform(0.5, 1.0), rng.uniform(0.5, 2.0)
            perm = torch.from_numpy(rng.permutation(n))
            u, v = rng.random(), rng.random()
            mask = gm.gridmix_mask(16, 16, lam, holes, hole_aspect, area, aspect, u, v)
            want, lam = gm.gridmix(x, perm, torch.from_numpy(mask))
            assert torch.equal(out.logits, model(want))
            torch.testing.assert_close(out.target, lam * y + (1 - lam) * y[perm])
            torch.testing.assert_close(out.target.sum(1), torch.ones(n))
    assert_same_seed_same_mix("gridmix", model, x, y)


# -- equality with openmixup ------------------------------------------------------------

REFERENCE = os.environ.get("GRIDMIX_REFERENCE")


@pytest.mark.skipif(not REFERENCE, reason="set GRIDMIX_REFERENCE to a checkout of Westlake-AI/openmixup")
@pytest.mark.parametrize("side, n", [(32, 6), (28, 5), (64, 3), (32, 1)])
def test_matches_openmixup(monkeypatch, side, n):
    ref = load_openmixup(monkeypatch, REFERENCE, "gridmix")
    queue = {}
    monkeypatch.setattr(np.random, "beta", lambda a, b: queue["lam"])
    monkeypatch.setattr(random, "randint", lambda a, b: queue["holes"])
    monkeypatch.setattr(np.random, "uniform", lambda low, high: queue["uniform"].pop(0))
    monkeypatch.setattr(np.random, "random", lambda: queue["random"].pop(0))
    monkeypatch.setattr(torch, "randperm", lambda k: queue["perm"].clone())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)

    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(side))
    y = F.one_hot(torch.arange(n) % 4, 4).float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 4))
    method = create_method("gridmix")
    method.setup(seed=side + n, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(side + n)
    tall = 0
    for _ in range(25):
        lam = float(rng.beta(1.0, 1.0))
        holes = int(rng.integers(2, 7))
        uniform = [float(rng.uniform(1.0, 1.0)), float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 2.0))]
        tall += int(int(np.sqrt(int(side * side * uniform[1]) / uniform[2])) * uniform[2]) > side
        perm = torch.from_numpy(rng.permutation(n))
        queue.update(lam=lam, holes=holes, uniform=uniform, perm=perm, random=[rng.random(), rng.random()])
        ref_x, (y_a, y_b, ref_lam) = ref.gridmix(x.clone(), y, alpha=1.0, n_holes=(2, 6), hole_aspect_ratio=1.0,
                                                 cut_area_ratio=(0.5, 1), cut_aspect_ratio=(0.5, 2))
        assert not queue["uniform"] and not queue["random"], "the reference drew differently"
        with torch.no_grad():
            out = method(model, x, y)
            assert torch.equal(out.logits, model(ref_x))
        torch.testing.assert_close(out.target, ref_lam * y_a + (1 - ref_lam) * y_b, rtol=0, atol=1e-6)
    assert tall > 0, "no draw exercised a crop taller than the image"
