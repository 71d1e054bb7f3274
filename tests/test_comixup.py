"""Co-Mixup: properties of the core, the method protocol, the missing-gco path, and the reference's own code."""
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comixup_reference import load_comixup, reference_draws
from mixbench import UsageError
from mixbench.methods import create_method, get_method
from mixbench.methods import comixup as cm
from mixbench.spec import parse_methods

pytestmark = pytest.mark.skipif(not get_method("comixup").available(), reason=cm.install_hint("comixup"))


def batch(n=8, width=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, width, width, generator=g)
    saliency = F.avg_pool2d(torch.rand(n, 1, width, width, generator=g) ** 4, 3, 1, 1)[:, 0]
    y = F.one_hot(torch.arange(n) % classes, classes).float()
    return x, y, saliency


def draws(n, part, block_num, seed=0, alpha=2.0):
    rng = np.random.default_rng(seed)
    priors, inits = [], []
    for a, b in cm.partition_bounds(n, part):
        priors.append(rng.dirichlet(np.full(b - a, alpha)).astype(np.float32))
        inits.append(rng.integers(0, b - a, size=(b - a, block_num, block_num)))
    return priors, inits


def run(x, y, saliency, block_num=4, part=20, seed=0, **hyper):
    priors, inits = draws(x.shape[0], part, block_num, seed)
    return cm.co_mixup(x, y, saliency, cm.compatibility(saliency), block_num, priors, inits, part=part, **hyper)


def blocks_of(img, b):
    c, h, _ = img.shape
    bs = h // b
    return img.reshape(c, b, bs, b, bs).permute(1, 3, 0, 2, 4).reshape(b, b, -1)


# -- the core -----------------------------------------------------------------------


def test_targets_are_the_realised_shares_and_blocks_come_from_the_inputs():
    x, y, saliency = batch(n=10, width=16)
    mixed, target, shares = run(x, y, saliency, block_num=4, part=5)
    torch.testing.assert_close(shares.sum(1), torch.ones(10))
    torch.testing.assert_close(target.sum(1), torch.ones(10))
    assert torch.equal(target, shares @ y / (shares @ y).sum(1, keepdim=True))
    assert not torch.equal(shares, torch.eye(10)), "nothing was mixed"
    # Mixing stays inside each partition of 5.
    assert shares[:5, 5:].sum() == 0 and shares[5:, :5].sum() == 0
    # Every block is one input's block, or the half/half mix of two; its share counts it.
    for i in range(10):
        realised = torch.zeros(10)
        out = blocks_of(mixed[i], 4)
        srcs = [blocks_of(x[j], 4) for j in range(10)]
        for r in range(4):
            for c in range(4):
                whole = [j for j in range(10) if torch.equal(out[r, c], srcs[j][r, c])]
                if whole:
                    realised[whole[0]] += 1
                    continue
                pairs = [(j, k) for j in range(10) for k in range(j + 1, 10)
                         if torch.equal(out[r, c], 0.5 * srcs[j][r, c] + 0.5 * srcs[k][r, c])]
                assert pairs, f"block ({r}, {c}) of output {i} is neither one input nor a half/half mix"
                realised[pairs[0][0]] += 0.5
                realised[pairs[0][1]] += 0.5
        torch.testing.assert_close(realised / 16, shares[i])


def test_one_sample_partitions_and_a_batch_of_one_stay_unmixed():
    x, y, saliency = batch(n=7, width=16)
    mixed, target, shares = run(x, y, saliency, part=1)
    assert torch.equal(mixed, x) and torch.equal(target, y) and torch.equal(shares, torch.eye(7))
    mixed, target, _ = run(x[:1], y[:1], saliency[:1])
    assert torch.equal(mixed, x[:1]) and torch.equal(target, y[:1])


def test_odd_batch_mixes_all_but_a_last_partition_of_one():
    x, y, saliency = batch(n=7, width=16)
    mixed, target, shares = run(x, y, saliency, part=3)  # partitions of 3, 3 and 1
    assert torch.equal(mixed[6], x[6]) and torch.equal(target[6], y[6])
    assert shares[:6, 6].sum() == 0 and shares[6, 6] == 1
    assert not torch.equal(mixed[:6], x[:6])
    torch.testing.assert_close(target.sum(1), torch.ones(7))


def test_flat_zero_saliency_is_uniform_not_nan():
    x, y, saliency = batch(n=6, width=8)
    zero, flat = saliency.clone(), saliency.clone()
    zero[2], flat[2] = 0.0, 1.0
    a = run(x, y, zero, block_num=2, part=6)
    b = run(x, y, flat, block_num=2, part=6)
    assert torch.isfinite(a[0]).all() and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_identical_peaks_keep_a_finite_compatibility():
    # Every salient peak in one place: A_dist is all zero, which the reference divides by.
    x, y, _ = batch(n=6, width=8)
    saliency = torch.full((6, 8, 8), 1e-3)
    saliency[:, 0, 0] = 1.0
    assert cm.compatibility(saliency).abs().sum() == 0
    mixed, target, _ = run(x, y, saliency, block_num=2, part=6)
    assert torch.isfinite(mixed).all() and torch.isfinite(target).all()


def test_strong_diversity_spreads_inputs_and_the_prior_decides_flat_saliency():
    x, y, _ = batch(n=6, width=8)
    flat = torch.ones(6, 8, 8)
    priors = [np.array([0.999, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002], dtype=np.float32)]
    inits = [np.zeros((6, 2, 2), dtype=np.int64)]
    # No diversity term: with flat saliency every output shows the input the prior favours.
    _, _, shares = cm.co_mixup(x, y, flat, torch.zeros(6, 6), 2, priors, inits, part=6, gamma=0.0, eta=1.0)
    assert torch.equal(shares[:, 0], torch.ones(6))
    # A strong diversity term forbids every output showing the same input.
    _, _, shares = cm.co_mixup(x, y, flat, torch.zeros(6, 6), 2, priors, inits, part=6, gamma=50.0, eta=1.0,
                               thres=0.0)
    assert shares[:, 0].sum() < 6


def test_resolve_identical_matches_the_pairwise_rule():
    assigned = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 1, 0]], bool)
    add = cm.resolve_identical(assigned)
    want = np.zeros((6, 4), np.float32)
    want[0, 0], want[1, 1] = 1, 1  # pair (0, 1): first input of 0, second of 1
    want[2, 1], want[3, 3] = 1, 1  # pair (2, 3)
    assert np.array_equal(add, want)  # outputs 4 and 5 use one input each: left alone


def test_grid_cut_gives_cut_grid_graph_labels():
    import gco

    rng = np.random.default_rng(0)
    cut = cm.GridCut(gco, 4, 4, np.float32(0.32 / 16))
    for n_labels in (5, 6, 8, 23):
        unary = (-rng.random((4, 4, n_labels)) / 8).astype(np.float32)
        pairwise = np.ones((n_labels, n_labels), np.float32) - np.eye(n_labels, dtype=np.float32)
        pairwise[-1, :2] = pairwise[:2, -1] = 0.25
        want = gco.cut_grid_graph(unary, pairwise, cut.cost_v, cut.cost_h, algorithm="swap")
        assert np.array_equal(cut(unary, pairwise), want)


def test_bad_block_num_is_a_usage_error():
    x, y, saliency = batch(n=4, width=12)
    with pytest.raises(UsageError, match="block_num 5 must divide the image side 12"):
        run(x, y, saliency, block_num=5)


@pytest.mark.slow  # starts a worker process (imports torch again)
def test_pool_gives_the_serial_answer():
    x, y, saliency = batch(n=12, width=16, seed=4)
    pool = cm.ChunkPool(1, name="comixup", preload=[cm.__name__])
    try:
        a = run(x, y, saliency, part=4, pool=pool)
        assert pool._executor is not None
    finally:
        pool.close()
    b = run(x, y, saliency, part=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# -- the method ---------------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 5),
    )


def test_method_targets_sum_to_one_and_returns_the_clean_loss():
    method = create_method("comixup", workers=0, part=5)
    method.setup(seed=3, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = tiny_model().train()
    x, y, _ = batch(n=11, width=16)
    for _ in range(2):
        out = method(model, x, y)
        assert out.logits.shape == (11, 5) and out.target.shape == (11, 5)
        torch.testing.assert_close(out.target.sum(1), torch.ones(11))
        assert out.extra_loss is not None and out.extra_loss.requires_grad  # clean_lam=1.0, the default
        assert model.training
    eval_mode = create_method("comixup", workers=0, clean_lam=0.0)
    eval_mode.setup(seed=3, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    for m, updates in ((eval_mode, 1), (method, 2)):  # batch-norm updates: the mixed pass (+ the clean pass)
        before = int(model[1].num_batches_tracked)
        out = m(model, x, y)
        assert int(model[1].num_batches_tracked) - before == updates
        assert (out.extra_loss is None) == (m is eval_mode)


def test_method_is_deterministic_given_the_seed_and_random_block_num_works():
    def go(**kw):
        method = create_method("comixup", workers=0, **kw)
        method.setup(seed=7, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        model = tiny_model().train()
        x, y, _ = batch(n=6, width=16)
        return [method(model, x, y).target for _ in range(3)]

    for a, b in zip(go(), go()):
        assert torch.equal(a, b)
    for a, b in zip(go(block_num=-1), go(block_num=-1)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(block_num=0), dict(part=0), dict(thres_type="x"), dict(alpha=0.0),
                                 dict(workers=-1), dict(niter=0)])
def test_bad_parameters_are_usage_errors(bad):
    with pytest.raises(UsageError, match="comixup"):
        create_method("comixup", **bad)


def test_missing_gco_is_a_clear_error_and_all_skips_comixup(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gco", None)  # makes `import gco` raise ImportError
    assert not get_method("comixup").available()
    with pytest.raises(UsageError, match="comixup needs the graph-cut package gco-wrapper"):
        create_method("comixup")
    names = parse_methods("all")
    assert "comixup" not in names and "vanilla" in names
    assert "skipping comixup" in capsys.readouterr().err


# -- against the reference (only with a local copy of snu-mllab/Co-Mixup) -----------

REFERENCE = os.environ.get("COMIXUP_REFERENCE")


@pytest.mark.skipif(not REFERENCE, reason="set COMIXUP_REFERENCE to a checkout of snu-mllab/Co-Mixup")
@pytest.mark.parametrize("n, width, block_num, part, hyper", [
    (40, 32, 4, 20, {}),
    (40, 32, 2, 20, {}),
    (24, 32, 8, 12, {}),
    (30, 16, 4, 15, dict(m_thres_type="soft", m_niter=3)),
    (20, 32, 4, 10, dict(set_resolve=False, m_beta=0.16, m_thres=0.81)),
])
def test_same_as_reference_mixup_process(monkeypatch, n, width, block_num, part, hyper):
    mixup = load_comixup(REFERENCE, monkeypatch)
    args = dict(m_block_num=block_num, m_part=part, m_beta=0.32, m_gamma=1.0, m_eta=0.05, mixup_alpha=2.0,
                m_thres=0.83, m_thres_type="hard", set_resolve=True, m_niter=4, m_omega=0.001)
    args.update(hyper)
    mean = torch.tensor([0.507, 0.487, 0.441]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.267, 0.256, 0.276]).reshape(1, 3, 1, 1)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = F.avg_pool2d((torch.rand(n, 3, width, width, generator=g) - mean) / std, 3, 1, 1)
        saliency = F.avg_pool2d(torch.rand(n, 1, width, width, generator=g) ** 4, 5, 1, 2)[:, 0]
        y = F.one_hot(torch.randint(0, 100, (n,), generator=g), 100).float()
        A_dist = cm.compatibility(saliency)
        priors, inits = reference_draws(seed, n, part, block_num, args["mixup_alpha"])
        want = mixup.mixup_process(x.clone(), y.clone(), args=types.SimpleNamespace(**args), sc=saliency.clone(),
                                   A_dist=A_dist.clone())
        got = cm.co_mixup(
            x, y, saliency, A_dist, block_num, priors, inits, part=part, beta=args["m_beta"], gamma=args["m_gamma"],
            eta=args["m_eta"], thres=args["m_thres"], thres_type=args["m_thres_type"], omega=args["m_omega"],
            set_resolve=args["set_resolve"], niter=args["m_niter"],
        )
        assert torch.equal(got[0], want[0]), "mixed batch differs"
        assert torch.equal(got[1], want[1]), "mixed targets differ"


@pytest.mark.skipif(not REFERENCE, reason="set COMIXUP_REFERENCE to a checkout of snu-mllab/Co-Mixup")
def test_compatibility_is_the_reference_main_py_distance():
    sys.path.insert(0, REFERENCE)
    try:
        spec = importlib.util.spec_from_file_location("comixup_reference_utils", os.path.join(REFERENCE, "utils.py"))
        utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(utils)
    finally:
        sys.path.remove(REFERENCE)
    _, _, saliency = batch(n=10, width=32)
    # main.py's lines, for a batch of 10
    z = F.avg_pool2d(saliency, kernel_size=8, stride=1)
    idx = torch.argmax(z.reshape(10, -1), dim=1)
    pos = torch.zeros((10, 2))
    pos[:, 0] = idx // z.shape[-1]
    pos[:, 1] = idx % z.shape[-1]
    assert torch.equal(cm.compatibility(saliency), utils.distance(pos, dist_type="l1"))


def test_clean_loss_from_the_saliency_pass_gives_the_weights_the_clean_gradient():
    # Co-Mixup's clean-input term: the weight gradients come from the saliency pass's own backward
    # (weight_grads=True) instead of a second backward through a kept graph; the same gradients.
    from mixbench.methods import input_gradient_saliency

    x, y, _ = batch(n=6, width=8)
    grads = []
    for flag in ("keep_graph", "weight_grads"):
        model = tiny_model().train()
        saliency, grad, loss = input_gradient_saliency(model, x, y, train_mode=True, **{flag: True})
        (0.3 * loss).backward()
        grads.append((saliency, loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (s0, l0, g0), (s1, l1, g1) = grads
    assert torch.equal(s0, s1) and torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
