"""PuzzleMix: hand-checked properties of the core, the method protocol, and the missing-gco path."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixbench import UsageError
from mixbench.methods import create_method, get_method
from mixbench.methods import puzzlemix as pm
from mixbench.benchmark import expand_benchmark
from mixbench.spec import parse_methods


def blocks_of(img: torch.Tensor, side: int) -> torch.Tensor:
    """(C, H, W) -> (side * side, C * bs * bs), row-major blocks."""
    c, h, _ = img.shape
    bs = h // side
    return img.reshape(c, side, bs, side, bs).permute(1, 3, 0, 2, 4).reshape(side * side, -1)


def batch(n=6, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, width, width, generator=g)
    saliency = torch.rand(n, width, width, generator=g) ** 2 + 1e-3
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return x, saliency, perm


# -- transport ----------------------------------------------------------------------


def test_transport_moves_whole_blocks():
    x, saliency, _ = batch()
    side = 4
    mask = (torch.rand(6, 1, side, side, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    pooled = torch.nn.functional.avg_pool2d(saliency, 4)
    unary = pooled / pooled.sum((1, 2), keepdim=True)
    winner = pm.transport_plan(mask, unary, 0.8)
    out = pm.transport_blocks(x, winner, side)
    assert (winner >= 0).any()
    for i in range(6):
        src, dst = blocks_of(x[i], side), blocks_of(out[i], side)
        used = [int(w) for w in winner[i] if w >= 0]
        assert len(used) == len(set(used)), "a source block was used twice"
        for j in range(side * side):
            if winner[i, j] >= 0:  # destination j holds exactly source block winner[j]
                assert torch.equal(dst[j], src[winner[i, j]])
            else:  # the reference's greedy plan may leave a destination empty: zeros
                assert torch.equal(dst[j], torch.zeros_like(dst[j]))


def test_transport_keeps_blocks_home_when_the_whole_grid_is_shown():
    x, saliency, _ = batch()
    pooled = torch.nn.functional.avg_pool2d(saliency, 4)
    unary = pooled / pooled.sum((1, 2), keepdim=True)
    winner = pm.transport_plan(torch.ones(6, 1, 4, 4), unary, 0.8)
    assert torch.equal(winner, torch.arange(16).expand(6, 16))
    assert torch.equal(pm.transport_blocks(x, winner, 4), x)


def test_transport_moves_the_salient_block_to_the_shown_region():
    # 2x2 grid; block 0 holds nearly all the saliency, only block 3 is shown (mask > 0).
    # Round 1: source 0 pays 0.2 * 2 - 0.97 < 0 to move to 3 and beats source 3 (-0.01) there.
    unary = torch.tensor([[[0.97, 0.01], [0.01, 0.01]]])
    mask = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    winner = pm.transport_plan(mask, unary, 0.2)
    assert int(winner[0, 3]) == 0
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = pm.transport_blocks(x, winner, 2)
    assert torch.equal(out[0, 0, 2:, 2:], x[0, 0, :2, :2])


def test_cost_matrix_is_cached_and_scaled():
    c = pm.cost_matrix(4, "cpu")
    assert c is pm.cost_matrix(4, "cpu")
    assert c.shape == (16, 16) and c[0, 15] == 1.0 * (9 + 9) / 9 and c[5, 6] == pytest.approx(1 / 9)


# -- graph cut and the core ---------------------------------------------------------


def test_graph_cut_shows_each_image_where_it_is_salient():
    # Two images, 2x2 grid, no smoothness: image 0 is salient in block 0, image 1 in block 3.
    x = torch.zeros(2, 3, 8, 8)
    saliency = torch.full((2, 8, 8), 0.01)
    saliency[0, :4, :4] = 1.0
    saliency[1, 4:, 4:] = 1.0
    perm = torch.tensor([1, 0])
    mask = pm.graph_cut_masks(x, saliency, perm, 0.5, 2, beta=0.0, gamma=0.0, eta=0.2, n_labels=2)
    assert mask.shape == (2, 1, 2, 2)
    assert mask[0, 0, 0, 0] == 1 and mask[0, 0, 1, 1] == 0  # sample 0 keeps its block 0, shows its partner's block 3
    assert mask[1, 0, 0, 0] == 0 and mask[1, 0, 1, 1] == 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_lambda_prior_decides_flat_saliency():
    x, _, perm = batch(width=8)
    flat = torch.ones(6, 8, 8)
    own = pm.graph_cut_masks(x, flat, perm, 0.999, 4, eta=1.0)
    partner = pm.graph_cut_masks(x, flat, perm, 0.001, 4, eta=1.0)
    assert torch.equal(own, torch.ones_like(own)) and torch.equal(partner, torch.zeros_like(partner))


def test_zero_saliency_counts_as_flat_not_nan():
    # A sample whose loss gradient vanished has all-zero saliency; it must behave like flat saliency.
    x, saliency, perm = batch(width=8)
    zero, flat = saliency.clone(), saliency.clone()
    zero[2], flat[2] = 0.0, 1.0
    assert torch.equal(pm.block_saliency(zero, 2)[2], torch.full((4, 4), 1 / 16))
    with np.errstate(invalid="raise"):  # a NaN cast to int would raise here
        masks = pm.graph_cut_masks(x, zero, perm, 0.6, 4)
    assert torch.equal(masks, pm.graph_cut_masks(x, flat, perm, 0.6, 4))
    mixed, ratio = pm.puzzle_mix(x, zero, perm, 0.6, 4)
    assert torch.isfinite(mixed).all() and ((ratio >= 0) & (ratio <= 1)).all()


def test_sides_that_are_not_powers_of_two_mix():
    # 28 px (Fashion-MNIST): blocks of 14 and 7 pixels are not multiples of neigh_size 4.
    x, saliency, perm = batch(width=28)
    for block_num in (2, 4):
        mixed, ratio = pm.puzzle_mix(x, saliency, perm, 0.5, block_num)
        assert mixed.shape == x.shape and torch.isfinite(mixed).all()
        assert ((ratio >= 0) & (ratio <= 1)).all()


def test_ratio_is_the_mask_mean_and_mixing_is_per_pixel():
    x, saliency, perm = batch()
    mixed, ratio = pm.puzzle_mix(x, saliency, perm, 0.4, 4, transport=False)
    mask = pm.graph_cut_masks(x, saliency, perm, 0.4, 4)
    full = torch.nn.functional.interpolate(mask, size=16)
    assert set(mask.unique().tolist()) <= {0.0, 0.5, 1.0}
    assert torch.allclose(ratio, full.mean((1, 2, 3)))
    assert torch.allclose(mixed, full * x + (1 - full) * x[perm])
    assert 0 < ratio.mean() < 1


def test_transported_mix_shows_blocks_of_the_two_images():
    x, saliency, perm = batch(n=4, width=16, seed=3)
    mixed, ratio = pm.puzzle_mix(x, saliency, perm, 0.5, 2, t_size=4)
    mask = torch.nn.functional.interpolate(pm.graph_cut_masks(x, saliency, perm, 0.5, 2), size=16)
    assert torch.allclose(ratio, mask.mean((1, 2, 3)))
    for i in range(4):
        own, other = blocks_of(x[i], 4), blocks_of(x[perm[i]], 4)
        m = blocks_of(mask[i], 4)[:, 0]
        for b, blk in enumerate(blocks_of(mixed[i], 4)):
            if m[b] == 1:  # a fully own block is one of the own image's blocks (or empty)
                assert any(torch.equal(blk, o) for o in own) or not blk.any()
            elif m[b] == 0:
                assert any(torch.equal(blk, o) for o in other) or not blk.any()


def test_adversarial_noise_is_added_in_pixel_space_and_clamped():
    x, saliency, perm = batch(n=4, width=8)
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    noise = torch.full_like(x, 10 / 255)
    kw = dict(mean=mean, std=std, transport=False, n_labels=2)  # masks in {0, 1}: clamping commutes with mixing
    clean, _ = pm.puzzle_mix(x, saliency, perm, 0.5, 2, **kw)
    both, _ = pm.puzzle_mix(x, saliency, perm, 0.5, 2, noise=noise, adv_mask1=True, adv_mask2=True, **kw)
    expect = ((clean * 0.25 + 0.5 + 10 / 255).clamp(0, 1) - 0.5) / 0.25
    assert torch.allclose(both, expect, atol=1e-5)


def test_bad_block_num_is_a_usage_error():
    x, saliency, perm = batch(width=12)
    with pytest.raises(UsageError, match="block_num 8 must divide the image side 12"):
        pm.puzzle_mix(x, saliency, perm, 0.5, 8)


def test_pool_gives_the_serial_answer():
    x, saliency, perm = batch(n=8, width=16, seed=5)
    pool = pm.GraphCutPool(1, min_grid=2)
    try:
        a = pm.puzzle_mix(x, saliency, perm, 0.3, 8, pool=pool)
        b = pm.puzzle_mix(x, saliency, perm, 0.3, 8)
        assert pool._executor is not None
    finally:
        pool.close()
    assert pool._executor is None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- the method ---------------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 5),
    )


def test_method_targets_sum_to_one_and_follow_the_mask():
    method = create_method("puzzlemix", adv_p=0.5, workers=0)
    method.setup(seed=3, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = tiny_model().train()
    x, _, _ = batch(n=8, width=16)
    y = torch.nn.functional.one_hot(torch.arange(8) % 5, 5).float()
    for _ in range(4):
        out = method(model, x, y)
        assert out.extra_loss is None
        logits, target = out.logits, out.target
        assert logits.shape == (8, 5) and target.shape == (8, 5)
        assert torch.allclose(target.sum(1), torch.ones(8))
        assert (target >= 0).all() and model.training
        assert not x.requires_grad
    method.close()


def test_saliency_uses_eval_mode_and_no_weight_gradients():
    method = create_method("puzzlemix", workers=0)
    model = tiny_model().train()
    x, _, _ = batch(n=4, width=8)
    y = torch.nn.functional.one_hot(torch.arange(4), 5).float()
    running = model[1].running_mean.clone()
    sal, grad, extra = method.saliency(model, x, y)
    assert sal.shape == (4, 8, 8) and torch.allclose(sal, grad.pow(2).mean(1).sqrt()) and extra is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, running), "saliency pass ran in train mode"
    assert model.training
    clean = create_method("puzzlemix", clean_lam=1.0, workers=0)
    _, _, extra = clean.saliency(model, x, y)
    extra.backward()  # the clean loss is returned for the training loop, with its graph kept
    assert model[0].weight.grad is not None


def test_method_is_deterministic_given_the_seed():
    def run():
        method = create_method("puzzlemix", workers=0)
        method.setup(seed=7, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        model = tiny_model().train()
        x, _, _ = batch(n=6, width=16)
        y = torch.nn.functional.one_hot(torch.arange(6) % 5, 5).float()
        return [method(model, x, y).target for _ in range(3)]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_grid_sizes_that_do_not_divide_the_side_are_skipped():
    method = create_method("puzzlemix", grid_sizes=(3, 16), workers=0, adv_p=0.0)
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = tiny_model()
    x = torch.randn(4, 3, 12, 12)
    y = torch.nn.functional.one_hot(torch.arange(4), 5).float()
    method(model, x, y)  # only 3 divides 12
    with pytest.raises(UsageError, match="none divides the image side 10"):
        method(model, torch.randn(4, 3, 10, 10), y)


# -- without gco --------------------------------------------------------------------


def test_missing_gco_is_a_clear_error_and_all_skips_puzzlemix(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gco", None)  # makes `import gco` raise ImportError
    assert not get_method("puzzlemix").available()
    with pytest.raises(UsageError, match="pip install gco-wrapper"):
        create_method("puzzlemix")
    with pytest.raises(UsageError, match="pip install gco-wrapper"):
        expand_benchmark({"dataset": "synthetic", "methods": ["mixup", "puzzlemix"]})
    names = parse_methods("all")
    assert "puzzlemix" not in names and "vanilla" in names
    assert "skipping puzzlemix" in capsys.readouterr().err


# -- against the reference (only with a local copy of snu-mllab/PuzzleMix) ----------

REFERENCE = os.environ.get("PUZZLEMIX_REFERENCE")


@pytest.mark.skipif(not REFERENCE, reason="set PUZZLEMIX_REFERENCE to a checkout of snu-mllab/PuzzleMix")
def test_same_as_reference_mixup_graph():
    spec = importlib.util.spec_from_file_location("puzzlemix_reference", os.path.join(REFERENCE, "mixup.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    mean = torch.tensor([0.507, 0.487, 0.441]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.267, 0.256, 0.276]).reshape(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    for width, block_num in ((32, 2), (32, 4), (32, 8), (32, 16), (16, 16)):
        x = torch.nn.functional.avg_pool2d((torch.rand(8, 3, width, width) - mean) / std, 3, 1, 1)
        saliency = torch.rand(8, width, width) ** 3
        perm, lam = rng.permutation(8), float(rng.beta(1, 1))
        hyper = dict(beta=1.2, gamma=0.5, eta=0.2, neigh_size=4, n_labels=3, transport=True, t_eps=0.8, t_size=4)
        want = ref.mixup_graph(x.clone(), saliency.clone(), perm, block_num=block_num, alpha=lam, mean=mean, std=std,
                               device="cpu", **hyper)
        got = pm.puzzle_mix(x, saliency, torch.from_numpy(perm), lam, block_num, mean=mean, std=std, **hyper)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
