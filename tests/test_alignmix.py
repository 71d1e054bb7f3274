"""AlignMix: the Sinkhorn plan and the aligned mix on hand-made maps, targets, lambda = 1, small and odd
batches, every model kind, the seeded draws, and (with ALIGNMIX_REFERENCE) the authors' functions.

``ALIGNMIX_REFERENCE=/path/to/AlignMixup_CVPR22 pytest tests/test_alignmix.py`` also runs the authors'
``SinkhornDistance``, ``mixup_aligned``, ``mixup_process`` and ``Resnet_classifier.forward`` (CIFAR code)
on the same maps and draws as mixbench's core.
"""
import math
import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.hooks import mixing_points, replace_stage_output
from mixbench.methods import alignmix as am
from mixbench.methods import create_method
from mixbench.methods.mixup import mixup
from method_checks import assert_same_seed_same_mix
from model_kinds import KINDS, build


def maps(n=4, c=8, side=3, seed=0):
    """Non-negative activations, like the output of a ReLU stage."""
    return torch.relu(torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed)))


def plan_of(h, perm):
    n, c = h.shape[:2]
    a = h.reshape(n, c, -1).permute(0, 2, 1)
    return am.sinkhorn_plan(a, a[perm])


# -- the core ---------------------------------------------------------------------------


def test_hand_case_swaps_positions_instead_of_blending():
    # Two maps of 1 channel at 2 positions: sample 0 is (0, 10), sample 1 is (10, 0). The optimal plan
    # matches position 0 of one with position 1 of the other, so aligning undoes the swap: both
    # directions give a map of the layout of the sample that is not moved, whatever lambda.
    h = torch.tensor([[[[0.0, 10.0]]], [[[10.0, 0.0]]]])
    perm = torch.tensor([1, 0])
    plan = plan_of(h, perm)
    torch.testing.assert_close(plan, torch.tensor([[0.0, 0.5], [0.5, 0.0]]).expand(2, 2, 2), rtol=0, atol=1e-6)
    for lam in (0.3, 0.8):
        torch.testing.assert_close(am.align_mix_features(h, perm, lam, 0), h, rtol=0, atol=1e-5)
        torch.testing.assert_close(am.align_mix_features(h, perm, lam, 1), h[perm], rtol=0, atol=1e-5)
    # Plain mixup would blend them: (3, 7) and (7, 3) for lam = 0.3.
    assert not torch.allclose(mixup(h, perm, 0.3), h, atol=1)


def test_alignment_recovers_a_spatial_rearrangement():
    # Sample 1 is sample 0 with its 9 positions shuffled: aligning it to sample 0 gives sample 0 back.
    h = maps(3, 16, 3)
    sigma = torch.tensor([4, 7, 0, 8, 2, 1, 6, 3, 5])
    h[1] = h[0].reshape(16, 9)[:, sigma].reshape(16, 3, 3)
    perm = torch.tensor([1, 2, 0])
    mixed = am.align_mix_features(h, perm, 0.25, 0)
    torch.testing.assert_close(mixed[0], h[0], rtol=0, atol=1e-4)
    # R's columns sum to 1 (the last update is v's); its rows only roughly: the reference's stopping
    # rule (change of u below 0.1 in the batch mean) ends the iterations before the rows converge.
    plan = plan_of(h, perm) * 9
    torch.testing.assert_close(plan.sum(1), torch.ones(3, 9), rtol=0, atol=1e-5)
    assert torch.equal(plan[0].argmax(1), torch.argsort(sigma))  # position i of sample 0 <- position j of 1


def test_directions_and_lambda_extremes():
    h, perm = maps(5), torch.tensor([2, 0, 4, 1, 3])
    n, c = h.shape[:2]
    r = plan_of(h, perm) * 9
    # Direction 0 at lam = 1 is a no-op; direction 1 at lam = 0 is the partner unchanged.
    assert torch.equal(am.align_mix_features(h, perm, 1.0, 0), h)
    assert torch.equal(am.align_mix_features(h, perm, 0.0, 1), h[perm])
    # lam = 0 in direction 0: the partner aligned to the sample, A' R^T; lam = 1 in direction 1: A R.
    partner_aligned = torch.matmul(h[perm].reshape(n, c, 9), r.transpose(1, 2)).view_as(h)
    own_aligned = torch.matmul(h.reshape(n, c, 9), r).view_as(h)
    torch.testing.assert_close(am.align_mix_features(h, perm, 0.0, 0), partner_aligned, rtol=0, atol=0)
    torch.testing.assert_close(am.align_mix_features(h, perm, 1.0, 1), own_aligned, rtol=0, atol=0)
    torch.testing.assert_close(am.align_mix_features(h, perm, 0.3, 0), 0.3 * h + 0.7 * partner_aligned)
    torch.testing.assert_close(am.align_mix_features(h, perm, 0.3, 1), 0.3 * own_aligned + 0.7 * h[perm])
    assert not torch.allclose(own_aligned, h, atol=1e-3)
    with pytest.raises(ValueError, match="direction"):
        am.align_mix_features(h, perm, 0.5, 2)


def test_gradients_reach_both_samples_not_the_plan():
    h0, perm = maps(4), torch.tensor([1, 2, 3, 0])
    w = torch.randn(h0.shape, generator=torch.Generator().manual_seed(5))
    r = (plan_of(h0, perm) * 9).detach()
    for direction in (0, 1):
        h = h0.clone().requires_grad_(True)
        (am.align_mix_features(h, perm, 0.6, direction) * w).sum().backward()
        g = h0.clone().requires_grad_(True)
        a, b = g.reshape(4, 8, 9), g[perm].reshape(4, 8, 9)
        want = (0.6 * a + 0.4 * (b @ r.transpose(1, 2))) if direction == 0 else (0.6 * (a @ r) + 0.4 * b)
        (want.view_as(g) * w).sum().backward()
        torch.testing.assert_close(h.grad, g.grad)
        assert (h.grad.abs().sum((1, 2, 3)) > 0).all()


def test_early_stop_and_iteration_cap():
    h, perm = maps(6, 8, 4, seed=1), torch.tensor([5, 4, 3, 2, 1, 0])
    a = h.reshape(6, 8, 16).permute(0, 2, 1)
    one_round = am.sinkhorn_plan(a, a[perm], max_iter=1)
    assert torch.equal(am.sinkhorn_plan(a, a[perm], thresh=math.inf), one_round)
    converged = am.sinkhorn_plan(a, a[perm])
    assert not torch.equal(converged, one_round)
    # Column marginals hold exactly after each round; the stopping rule bounds the change of u.
    torch.testing.assert_close(converged.sum(1), torch.full((6, 16), 1 / 16), rtol=0, atol=1e-6)


def test_chunked_cost_equals_one_piece(monkeypatch):
    a = torch.randn(7, 9, 12, generator=torch.Generator().manual_seed(2))
    b = torch.randn(7, 9, 12, generator=torch.Generator().manual_seed(3))
    whole = am.cost_matrix(a, b)
    torch.testing.assert_close(whole, torch.cdist(a, b) ** 2, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(am, "_COST_CHUNK_ELEMENTS", 9 * 9 * 12 * 2)  # chunks of 2 samples
    assert torch.equal(am.cost_matrix(a, b), whole)


def test_one_by_one_maps_are_plain_mixup():
    h, perm = maps(5, 6, 1), torch.tensor([3, 4, 0, 1, 2])
    assert torch.equal(plan_of(h, perm), torch.ones(5, 1, 1))
    for direction in (0, 1):
        torch.testing.assert_close(am.align_mix_features(h, perm, 0.7, direction), 0.7 * h + 0.3 * h[perm])


def test_batch_of_one_aligns_a_map_with_itself():
    # The plan of a map with itself is nearly diagonal (entropic smoothing and the early stop leave a
    # little mass off the diagonal), so mixing a lone sample with itself nearly keeps it.
    h = maps(1, 8, 4)
    assert torch.equal(plan_of(h, torch.tensor([0]))[0].argmax(1), torch.arange(16))
    for direction in (0, 1):
        torch.testing.assert_close(am.align_mix_features(h, torch.tensor([0]), 0.4, direction), h, rtol=0, atol=5e-3)


def test_bf16_and_channels_last():
    h, perm = maps(4, 8, 3), torch.tensor([1, 0, 3, 2])
    want = am.align_mix_features(h, perm, 0.35, 1)
    cl = am.align_mix_features(h.contiguous(memory_format=torch.channels_last), perm, 0.35, 1)
    assert torch.equal(cl, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = am.align_mix_features(h.bfloat16(), perm, 0.35, 1)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), want, rtol=0.02, atol=0.02)


# -- the method -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_mixes_the_last_stage(kind):
    model = build(kind).eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = F.one_hot(torch.tensor([0, 1, 2, 3, 4]), 5).float()
    perm, lam = torch.tensor([2, 0, 4, 1, 3]), 0.4
    assert len(mixing_points(model)) == 6  # point 5, the default, is the last stage
    with torch.no_grad():
        for direction in (0, 1):
            captured = []
            with replace_stage_output(model, 5, lambda h: captured.append(h.clone()) or h):
                plain = model(x)
            mixed = am.align_mix_features(captured[0], perm, lam, direction)
            with replace_stage_output(model, 5, lambda h: mixed):
                want = model(x)
            out = am.alignmix(model, x, y, 5, lam, perm, direction)
            torch.testing.assert_close(out.logits, want)
            torch.testing.assert_close(out.target, lam * y + (1 - lam) * y[perm])
            assert not torch.allclose(out.logits, plain)
        out = am.alignmix(model, x, y, 0, lam, perm)
        torch.testing.assert_close(out.logits, model(mixup(x, perm, lam)))
        torch.testing.assert_close(out.target, lam * y + (1 - lam) * y[perm])


def test_lambda_one_is_a_no_op_at_the_input_and_in_direction_zero():
    model = build("preact").eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = F.one_hot(torch.tensor([0, 1, 2]), 5).float()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        plain = model(x)
        for k in (0, 5):
            out = am.alignmix(model, x, y, k, 1.0, perm, 0)
            assert torch.equal(out.logits, plain) and torch.equal(out.target, y)
        method = create_method("alignmix", alpha=0.0, mix_points=(0,))  # alpha <= 0: lambda = 1
        method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        out = method(model, x, y)
        assert torch.equal(out.logits, plain) and torch.equal(out.target, y)


@pytest.mark.parametrize("n", [1, 5])
def test_small_and_odd_batches_train(n):
    model = build("preact").train()
    method = create_method("alignmix", mix_points=(5,))
    method.setup(seed=1, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
    y = F.one_hot(torch.arange(n) % 5, 5).float()
    out = method(model, x, y)
    assert out.logits.shape == (n, 5)
    torch.testing.assert_close(out.target.sum(1), torch.ones(n))
    (-(out.target * out.logits.log_softmax(1)).sum(1).mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_draws_follow_the_seeded_generator():
    model = build("resnet18").eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = F.one_hot(torch.arange(4), 5).float()
    method = create_method("alignmix")
    method.setup(seed=7, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(7)  # draw order: point, lambda, permutation, then the direction at point 5
    seen = set()
    with torch.no_grad():
        for _ in range(12):
            k = (0, 5)[int(rng.integers(2))]
            lam = float(rng.beta(2.0, 2.0))
            perm = torch.from_numpy(rng.permutation(4))
            direction = int(rng.integers(2)) if k else 0
            seen.add((k, direction))
            want = am.alignmix(model, x, y, k, lam, perm, direction)
            got = method(model, x, y)
            assert torch.equal(got.logits, want.logits) and torch.equal(got.target, want.target)
    assert seen == {(0, 0), (5, 0), (5, 1)}
    assert_same_seed_same_mix("alignmix", model, x, y)


def test_bad_parameters_are_usage_errors():
    for bad in (dict(eps=0), dict(eps=-1.0), dict(max_iter=0), dict(max_iter=2.5), dict(thresh=-1),
                dict(thresh=float("nan")), dict(mix_points="last"), dict(mix_points=(-1,))):
        with pytest.raises(UsageError, match="alignmix|mix_points"):
            create_method("alignmix", **bad)
    method = create_method("alignmix", mix_points=(0, 9))
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(UsageError, match=r"\[9\].*0=input"):
        method(build("preact"), torch.randn(2, 3, 16, 16), torch.eye(5)[:2])


# -- against the reference (only with a local copy of shashankvkt/AlignMixup_CVPR22) ----------

REFERENCE = os.environ.get("ALIGNMIX_REFERENCE")


@pytest.fixture
def reference(monkeypatch):
    """The authors' CIFAR modules, imported from the checkout; ``.cuda()`` is a no-op while a test runs."""
    if not REFERENCE:
        pytest.skip("set ALIGNMIX_REFERENCE to a checkout of shashankvkt/AlignMixup_CVPR22")
    names = ("utils", "utils.OT", "models", "models.resnet", "models.resnet18_classifier")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    monkeypatch.syspath_prepend(os.path.join(REFERENCE, "cifar10_100"))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # the reference moves to CUDA
    import models.resnet18_classifier as classifier
    from utils import OT

    yield OT, classifier
    for name in names:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.mark.parametrize("n,c,side", [(8, 512, 4), (5, 64, 4), (1, 32, 4), (6, 16, 2), (4, 32, 8)])
def test_same_as_reference_sinkhorn_and_mixup_aligned(reference, n, c, side):
    OT, classifier = reference
    h = maps(n, c, side, seed=n + c + side) * 2
    a = h.reshape(n, c, -1).permute(0, 2, 1)
    for seed in range(4):
        perm = np.random.default_rng(seed).permutation(n)
        want = OT.SinkhornDistance(eps=0.1, max_iter=100, reduction=None)(a, a[perm])
        assert torch.equal(am.sinkhorn_plan(a, a[torch.from_numpy(perm)]), want)
        np.random.seed(seed)
        random.seed(seed)
        lam = float(np.random.beta(2.0, 2.0))
        want, y_a, y_b = classifier.mixup_aligned(h, torch.arange(n), lam)
        np.random.seed(seed)  # the reference's draws, replayed: the permutation, then the direction
        random.seed(seed)
        np.random.beta(2.0, 2.0)
        perm = torch.from_numpy(np.random.permutation(n))
        direction = random.randint(0, 1)
        assert torch.equal(am.align_mix_features(h, perm, lam, direction), want)
        assert torch.equal(y_b, perm)


def test_same_as_reference_classifier_forward(reference):
    """The authors' training forward (input mixup or aligned mixup after layer4, drawn 50/50) against
    mixbench's functions applied at the same places of the authors' own network."""
    _, classifier = reference
    torch.manual_seed(0)
    net = classifier.Resnet_classifier(10).train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([0, 1, 2, 3])
    branches = set()
    for seed in range(6):
        lam = float(np.random.default_rng(seed).beta(2.0, 2.0))
        random.seed(seed)
        np.random.seed(seed)
        state = torch.get_rng_state()
        with torch.no_grad():
            logits, t_a, t_b = net(x, targets, lam, mode="train")
        random.seed(seed)
        np.random.seed(seed)
        layer_mix = random.randint(0, 1)
        perm = torch.from_numpy(np.random.permutation(4))
        direction = random.randint(0, 1) if layer_mix else 0
        branches.add(layer_mix)
        torch.set_rng_state(state)
        with torch.no_grad():
            if layer_mix == 0:
                feats = net.encoder(mixup(x, perm, lam))
            else:
                feats = am.align_mix_features(net.encoder(x), perm, lam, direction)
            want = net.classifier(F.avg_pool2d(feats, 4).flatten(1))
        torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(t_b, targets[perm])
    assert branches == {0, 1}
