"""FMix: the mask's properties, the method's draws, and equality with the authors' ``sample_mask``.

``FMIX_REFERENCE=/path/to/FMix pytest tests/test_fmix.py`` also runs the reference's ``fmix.py``
(``sample_mask`` and ``sample_and_apply``) on the same draws.
"""
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from method_checks import linear_batch
from mixbench.methods import create_method
from mixbench.methods import fmix as fm


def draws(seed, side, lam=None):
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(1, 1)) if lam is None else lam
    return lam, rng.standard_normal(fm.noise_shape(side, side)), bool(rng.random() > 0.5)


@pytest.mark.parametrize("side", [16, 28, 32, 15])
def test_mask_is_binary_with_the_drawn_share(side):
    for seed in range(6):
        lam, noise, take_ceil = draws(seed, side)
        mask = fm.fmix_mask(noise, lam, take_ceil, side, side)
        assert mask.shape == (1, side, side)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        kept = int(mask.sum())
        assert kept == (math.ceil if take_ceil else math.floor)(lam * side * side)
        assert abs(mask.mean() - lam) <= 1 / side**2  # the label weight is within one pixel of the area


def test_noise_shape_follows_the_reference_slicing():
    assert fm.noise_shape(32, 32) == (1, 32, 17, 2)
    assert fm.noise_shape(28, 28) == (1, 28, 15, 2)
    assert fm.noise_shape(15, 15) == (1, 15, 9, 2)  # odd width: W // 2 + 2 columns


def test_mask_keeps_the_brightest_pixels_and_the_low_frequency_image_spans_0_1():
    lam, noise, _ = draws(0, 32, lam=0.3)
    image = fm.low_freq_image(noise, 3.0, 32, 32)
    assert image.min() == 0.0 and image.max() == 1.0
    mask = fm.fmix_mask(noise, lam, True, 32, 32)
    assert image[mask == 1].min() >= image[mask == 0].max()


def test_soft_mask_has_a_linear_band():
    lam, noise, _ = draws(1, 16, lam=0.5)
    mask = fm.fmix_mask(noise, lam, False, 16, 16, max_soft=0.1)
    band = int(256 * 0.1)
    assert ((mask > 0) & (mask < 1)).sum() == 2 * band - 2  # the band's end points are exactly 1 and 0
    assert mask.mean() == pytest.approx(0.5, abs=1 / 256)


def test_lambda_one_is_a_no_op_and_zero_takes_the_partner():
    x = torch.randn(3, 3, 16, 16)
    perm = torch.tensor([2, 0, 1])
    _, noise, coin = draws(2, 16)
    one = torch.from_numpy(fm.fmix_mask(noise, 1.0, coin, 16, 16)).float()
    zero = torch.from_numpy(fm.fmix_mask(noise, 0.0, coin, 16, 16)).float()
    assert torch.equal(fm.fmix(x, perm, one), x)
    assert torch.equal(fm.fmix(x, perm, zero), x[perm])


def test_mixed_pixels_follow_the_mask():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([1, 2, 3, 0])
    lam, noise, coin = draws(3, 16, lam=0.4)
    mask = torch.from_numpy(fm.fmix_mask(noise, lam, coin, 16, 16)).float()
    out = fm.fmix(x, perm, mask)
    own = mask[0].bool()
    assert torch.equal(out[:, :, own], x[:, :, own]) and torch.equal(out[:, :, ~own], x[perm][:, :, ~own])


@pytest.mark.parametrize("n", [1, 3, 6])
def test_method_draw_order_batch_sizes_and_determinism(n):
    x, y, model = linear_batch(n)
    method = create_method("fmix")
    method.setup(seed=9, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(9)  # order: lam, noise, ceil/floor coin, perm
    with torch.no_grad():
        for _ in range(4):
            out = method(model, x, y)
            lam = float(rng.beta(1.0, 1.0))
            noise = rng.standard_normal((1, 16, 9, 2))
            coin = bool(rng.random() > 0.5)
            perm = torch.from_numpy(rng.permutation(n))
            mask = torch.from_numpy(fm.fmix_mask(noise, lam, coin, 16, 16)).float()
            assert torch.equal(out.logits, model(fm.fmix(x, perm, mask)))
            torch.testing.assert_close(out.target, lam * y + (1 - lam) * y[perm])
            torch.testing.assert_close(out.target.sum(1), torch.ones(n))
    again = create_method("fmix")
    again.setup(seed=9, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    first = create_method("fmix")
    first.setup(seed=9, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        a, b = first(model, x, y), again(model, x, y)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.target, b.target)


# -- equality with the authors' code ----------------------------------------------------

REFERENCE = os.environ.get("FMIX_REFERENCE")


def load_reference():
    path = Path(REFERENCE) / "fmix.py"
    spec = importlib.util.spec_from_file_location("fmix_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not REFERENCE, reason="set FMIX_REFERENCE to a checkout of ecs-vlc/FMix")
@pytest.mark.filterwarnings("ignore:`axes` should not be `None`:DeprecationWarning")  # the reference's irfftn call
@pytest.mark.parametrize("side", [32, 28, 16, 15])
@pytest.mark.parametrize("max_soft", [0.0, 0.1])
def test_matches_reference(monkeypatch, side, max_soft):
    ref = load_reference()
    queue = {}
    monkeypatch.setattr(ref.beta, "rvs", lambda a, b: queue["lam"])
    monkeypatch.setattr(ref.np.random, "randn", lambda *shape: queue["noise"].reshape(shape))
    monkeypatch.setattr(ref.random, "random", lambda: queue["u"])
    monkeypatch.setattr(ref.np.random, "permutation", lambda k: queue["perm"])

    n = 5
    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(side))
    y = F.one_hot(torch.arange(n) % 4, 4).float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 4))
    method = create_method("fmix", max_soft=max_soft)
    method.setup(seed=side, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(side)
    for step in range(8):
        lam = float(rng.beta(1.0, 1.0))
        noise = rng.standard_normal(fm.noise_shape(side, side))
        u = rng.random()
        perm = rng.permutation(n)
        queue.update(lam=lam, noise=noise, u=u, perm=perm)
        # the reference's numpy path: sample_mask then the mix of sample_and_apply
        ref_mixed, ref_index, ref_lam = ref.sample_and_apply(x.numpy(), 1.0, 3, (side, side), max_soft, False)
        queue.update(lam=lam, noise=noise, u=u)
        ref_lam2, ref_mask = ref.sample_mask(1.0, 3, (side, side), max_soft, False)
        ours = fm.fmix_mask(noise, lam, u > 0.5, side, side, 3.0, max_soft)
        assert np.array_equal(ours, ref_mask) and ref_lam == ref_lam2 == lam
        # the torchbearer binding's float32 mix and its loss weights
        mask32 = torch.from_numpy(ref_mask).float()
        ref_x = mask32 * x + (1 - mask32) * x[torch.from_numpy(ref_index)]
        with torch.no_grad():
            out = method(model, x, y)
            assert torch.equal(out.logits, model(ref_x))
        assert np.abs(ref_x.numpy() - ref_mixed).max() <= 1e-6
        torch.testing.assert_close(out.target, ref_lam * y + (1 - ref_lam) * y[torch.from_numpy(ref_index)],
                                   rtol=0, atol=1e-6)
