"""Catch-up Mix: hand-computed channel selections, ties, gradients, targets, and the four model kinds."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.hooks import mixing_points, replace_stage_output
from mixbench.methods import create_method
from mixbench.methods import catchup_mix as cm
from mixbench.methods.cutmix import cutmix, cutmix_box
from model_kinds import KINDS, build

def reference_mask(h, perm, n_own):
    """Per-sample loops in float64: the n_own channels with the lowest RFI, ties by channel index."""
    h = h.double()
    N, C = h.shape[:2]
    norms = [[math.sqrt(float((h[i, c] ** 2).sum())) for c in range(C)] for i in range(N)]
    infl = [[v / sum(row) if sum(row) > 0 else 0.0 for v in row] for row in norms]
    mask = torch.zeros(N, C, dtype=torch.bool)
    for i in range(N):
        rfi = [infl[i][c] - infl[int(perm[i])][c] for c in range(C)]
        for c in sorted(range(C), key=lambda c: (rfi[c], c))[:n_own]:
            mask[i, c] = True
    return mask


def hand_case():
    # Spatial 1x2 maps. Sample 0 channel l2 norms (5, 6, 9), sum 20 -> influence (.25, .30, .45);
    # sample 1 norms (2, 2, 6), sum 10 -> (.2, .2, .6). With perm = (1, 0):
    # RFI_0 = (.05, .10, -.15), RFI_1 = (-.05, -.10, .15).
    h0 = torch.tensor([[[[3.0, 4.0]], [[0.0, 6.0]], [[9.0, 0.0]]]])
    h1 = torch.tensor([[[[2.0, 0.0]], [[0.0, -2.0]], [[6.0, 0.0]]]])
    return torch.cat([h0, h1]), torch.tensor([1, 0])


def test_hand_computed_selection():
    h, perm = hand_case()
    # lam = 0.7, C = 3: floor(2.1) = 2 own channels. Sample 0 keeps its lowest-RFI channels 2 and 0
    # and takes channel 1 from sample 1; sample 1 keeps channels 1 and 0 and takes channel 2.
    # (An l1 norm would give sample 0 channels 2 and 1 instead: influence (7, 6, 9) / 22.)
    mixed, lam = cm.mix_channels(h, perm, 0.7)
    assert lam == pytest.approx(2 / 3)
    expected = torch.stack([
        torch.stack([h[0, 0], h[1, 1], h[0, 2]]),
        torch.stack([h[1, 0], h[1, 1], h[0, 2]]),
    ])
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
    assert cm.own_channel_mask(h, perm, 2).tolist() == [[True, False, True], [True, True, False]]
    # Each channel forwards the weaker map of the pair (lam = 0.5 -> one own channel each here):
    mixed, lam = cm.mix_channels(h, perm, 0.5)
    assert lam == pytest.approx(1 / 3)
    assert cm.own_channel_mask(h, perm, 1).tolist() == [[False, False, True], [False, True, False]]


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3, 0.55, 0.999, 1.0])
def test_keeps_exactly_floor_lam_c_lowest_rfi_channels(lam):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(8, 10, 3, 3, generator=g)
    perm = torch.tensor([3, 5, 0, 7, 1, 2, 4, 6])  # no fixed point, not an involution
    mixed, lam_realised = cm.mix_channels(h, perm, lam)
    n_own = math.floor(lam * 10)
    assert lam_realised == n_own / 10
    own = (mixed == h).all(dim=(2, 3))
    from_partner = (mixed == h[perm]).all(dim=(2, 3))
    assert torch.all(own ^ from_partner)  # every map comes whole from exactly one of the two
    assert own.sum(dim=1).tolist() == [n_own] * 8
    assert torch.equal(own, reference_mask(h, perm, n_own))
    # The channels_last path (a where-select) gives the same tensor.
    mixed_cl, lam_cl = cm.mix_channels(h.contiguous(memory_format=torch.channels_last), perm, lam)
    assert lam_cl == lam_realised and torch.equal(mixed_cl, mixed)


def test_ties_are_broken_by_channel_index():
    # Identical samples: every RFI is 0, so the own channels are the first floor(lam * C).
    h = torch.rand(1, 6, 2, 2).expand(4, 6, 2, 2).contiguous()
    perm = torch.tensor([1, 2, 3, 0])
    assert cm.own_channel_mask(h, perm, 4).tolist() == [[True] * 4 + [False] * 2] * 4
    # A partial tie. Sample 0: norms (1, 1, 1, 1) -> influence (.25, .25, .25, .25); sample 1: norms
    # (1, 2, 1, 1) -> (.2, .4, .2, .2). RFI_0 = (.05, -.15, .05, .05): keeps channel 1, then channel 0
    # of the tied 0, 2, 3. RFI_1 = (-.05, .15, -.05, -.05): keeps 0 and 2 of the tied 0, 2, 3.
    h = torch.ones(2, 4, 1, 1)
    h[1, 1] = 2.0
    mask = cm.own_channel_mask(h, torch.tensor([1, 0]), 2)
    assert mask.tolist() == [[True, True, False, False], [True, False, True, False]]
    # The same inputs give the same mask every time.
    assert torch.equal(mask, cm.own_channel_mask(h, torch.tensor([1, 0]), 2))


def test_all_zero_maps_give_no_nan():
    # Sample 0 is all zero (influence 0, not 0/0); sample 1 has channel c constant c + 1, so its
    # influence is (1, 2, 3, 4) / 10. RFI_0 = -(1, 2, 3, 4) / 10: sample 0 keeps channels 2 and 3
    # (its zero maps replace sample 1's strongest ones); sample 1 keeps channels 0 and 1.
    h = torch.zeros(2, 4, 2, 2)
    h[1] = torch.arange(1.0, 5.0)[:, None, None].expand(4, 2, 2)
    mixed, lam = cm.mix_channels(h, torch.tensor([1, 0]), 0.5)
    assert lam == 0.5 and torch.isfinite(mixed).all()
    assert cm.own_channel_mask(h, torch.tensor([1, 0]), 2).tolist() == [
        [False, False, True, True], [True, True, False, False]]
    torch.testing.assert_close(mixed[0], torch.cat([h[1, :2], h[0, 2:]]))
    torch.testing.assert_close(mixed[1], mixed[0])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gradients_reach_both_samples_selected_maps(layout):
    h, perm = hand_case()
    h = h.clone().contiguous(memory_format=layout).requires_grad_(True)
    w = torch.arange(1.0, 13.0).reshape(2, 3, 1, 2)
    mixed, _ = cm.mix_channels(h, perm, 0.7)
    (mixed * w).sum().backward()
    # mixed[0] = (h0c0, h1c1, h0c2), mixed[1] = (h1c0, h1c1, h0c2).
    grad = torch.zeros(2, 3, 1, 2)
    grad[0, 0] = w[0, 0]
    grad[0, 2] = w[0, 2] + w[1, 2]
    grad[1, 1] = w[0, 1] + w[1, 1]
    grad[1, 0] = w[1, 0]
    torch.testing.assert_close(h.grad, grad)


def test_input_point_is_cutmix():
    model = build("preact").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    perm = torch.tensor([2, 3, 1, 0])
    with torch.no_grad():
        out = cm.catchup_mix(model, x, y, 0, 0.6, perm, centre=(3, 12))
        logits, target = out.logits, out.target
        box = cutmix_box(16, 16, 0.6, 3, 12)
        mixed, lam = cutmix(x, perm, box)
        torch.testing.assert_close(logits, model(mixed))
    assert box == (0, 8, 7, 16) and lam == pytest.approx(1 - 8 * 9 / 256)
    torch.testing.assert_close(target, lam * y + (1 - lam) * y[perm])


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_points_on_four_model_kinds(kind):
    model = build(kind).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    perm = torch.tensor([1, 0, 3, 2])
    lam = 0.4
    for k in range(1, len(mixing_points(model))):
        captured = []

        def capture(h):
            captured.append(h.clone())
            return h

        with torch.no_grad():
            with replace_stage_output(model, k, capture):
                model(x)
            expected_h, expected_lam = cm.mix_channels(captured[0], perm, lam)
            with replace_stage_output(model, k, lambda h: expected_h):
                expected = model(x)
            out = cm.catchup_mix(model, x, y, k, lam, perm)
            logits, target = out.logits, out.target
        channels = captured[0].shape[1]
        assert expected_lam == math.floor(lam * channels) / channels
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(target, expected_lam * y + (1 - expected_lam) * y[perm])
        torch.testing.assert_close(target.sum(1), torch.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_method_trains_on_four_model_kinds(kind, monkeypatch):
    model = build(kind).train()
    method = create_method("catchup_mix")
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    seen = []
    core = cm.catchup_mix

    def spy(model, x, y, k, lam, perm, centre=(0, 0)):
        seen.append(k)
        return core(model, x, y, k, lam, perm, centre)

    monkeypatch.setattr(cm, "catchup_mix", spy)
    x = torch.randn(6, 3, 16, 16)
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    for _ in range(30):
        out = method(model, x, y)
        logits, target = out.logits, out.target
        assert logits.shape == (6, 5)
        torch.testing.assert_close(target.sum(1), torch.ones(6))
    (logits.sum()).backward()
    # Default mixing points: the input plus the stem and every stage.
    assert set(seen) == set(range(len(mixing_points(model))))


def test_draws_follow_the_seeded_generator():
    model = build("preact").eval()
    x = torch.randn(4, 3, 16, 16)
    y = F.one_hot(torch.arange(4), 5).float()
    method = create_method("catchup_mix", mix_points=(0, 1, 2, 3, 4, 5))
    method.setup(seed=7, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(7)  # draw order: k, lam, perm, then the box centre when k = 0
    with torch.no_grad():
        for _ in range(8):
            k = int(rng.integers(6))
            lam = float(rng.beta(1.0, 1.0))
            perm = torch.from_numpy(rng.permutation(4))
            centre = (int(rng.integers(16)), int(rng.integers(16))) if k == 0 else (0, 0)
            _out = cm.catchup_mix(model, x, y, k, lam, perm, centre)
            want_logits, want_target = _out.logits, _out.target
            out = method(model, x, y)
            logits, target = out.logits, out.target
            torch.testing.assert_close(logits, want_logits)
            torch.testing.assert_close(target, want_target)


def test_bad_mix_points():
    with pytest.raises(UsageError, match="mix_points"):
        create_method("catchup_mix", mix_points="stages")
    method = create_method("catchup_mix", mix_points=(0, 9))
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(UsageError, match=r"\[9\].*0=input"):
        method(build("preact"), torch.randn(2, 3, 16, 16), torch.eye(5)[:2])
