"""Manifold Mixup: the convex combination at the chosen stage, the default points, four model kinds."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.hooks import mixing_points, replace_stage_output
from mixbench.methods import create_method
from mixbench.methods import manifold_mixup as mm
from model_kinds import KINDS, build

def preact_by_hand(m, x, k, lam, perm):
    """PreActResNet forward written out, mixing after stem (1), stages.0 (2) or stages.1 (3) as the reference does."""
    mix = lambda h: lam * h + (1 - lam) * h[perm]  # noqa: E731
    h = mix(x) if k == 0 else x
    h = m.stem.conv(h)
    h = mix(h) if k == 1 else h
    h = m.stages[0](m.stem.pool(h))  # the reference's layer1
    h = mix(h) if k == 2 else h
    h = m.stages[1](h)  # layer2
    h = mix(h) if k == 3 else h
    h = m.stages[3](m.stages[2](h))
    return m.forward_head(m.norm(h))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_equals_convex_combination_at_the_chosen_stage(k):
    model = build("preact").eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 16, 16, generator=g)
    y = F.one_hot(torch.tensor([0, 1, 2, 4]), 5).float()
    perm = torch.tensor([2, 0, 3, 1])
    lam = 0.3
    with torch.no_grad():
        out = mm.manifold_mixup(model, x, y, k, lam, perm)
        logits, target = out.logits, out.target
        torch.testing.assert_close(logits, preact_by_hand(model, x, k, lam, perm), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, model(x), atol=1e-3)
    torch.testing.assert_close(target, lam * y + (1 - lam) * y[perm])
    torch.testing.assert_close(target.sum(1), torch.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_four_model_kinds(kind):
    model = build(kind).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    perm = torch.tensor([1, 0, 3, 2])
    lam = 0.65
    for k in range(len(mixing_points(model))):
        captured = []

        def capture(h):
            captured.append(h.clone())
            return h

        with torch.no_grad():
            with replace_stage_output(model, k, capture):
                model(x)
            h = captured[0]
            combined = lam * h + (1 - lam) * h[perm]
            with replace_stage_output(model, k, lambda _: combined):
                expected = model(x)
            out = mm.manifold_mixup(model, x, y, k, lam, perm)
            logits, target = out.logits, out.target
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target.sum(1), torch.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_default_points_are_input_and_after_the_first_two_stages(kind, monkeypatch):
    model = build(kind).train()
    method = create_method("manifold_mixup")
    assert method.alpha == 2.0 and method.mix_points == (0, 2, 3)
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    where = []
    core = mm.manifold_mixup

    def spy(model, x, y, k, lam, perm):
        where.append(mixing_points(model)[k])
        return core(model, x, y, k, lam, perm)

    monkeypatch.setattr(mm, "manifold_mixup", spy)
    x = torch.randn(6, 3, 16, 16)
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    for _ in range(12):
        out = method(model, x, y)
        logits, target = out.logits, out.target
        torch.testing.assert_close(target.sum(1), torch.ones(6))
    logits.sum().backward()
    first, second = {"resnet18": ("layer1", "layer2"), "wide": ("layer1", "layer2"),
                     "preact": ("stages.0", "stages.1"), "regnet": ("s1", "s2"),
                     "efficientnet": ("blocks.1", "blocks.2")}[kind]
    assert set(where) == {"input", first, second}


def test_draws_follow_the_seeded_generator():
    model = build("preact").eval()
    x = torch.randn(4, 3, 16, 16)
    y = F.one_hot(torch.arange(4), 5).float()
    method = create_method("manifold_mixup")
    method.setup(seed=11, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(11)  # draw order: k, lam ~ Beta(2, 2), perm
    with torch.no_grad():
        for _ in range(6):
            k = (0, 2, 3)[int(rng.integers(3))]
            lam = float(rng.beta(2.0, 2.0))
            perm = torch.from_numpy(rng.permutation(4))
            _out = mm.manifold_mixup(model, x, y, k, lam, perm)
            want_logits, want_target = _out.logits, _out.target
            out = method(model, x, y)
            logits, target = out.logits, out.target
            torch.testing.assert_close(logits, want_logits)
            torch.testing.assert_close(target, want_target)


def test_bad_mix_points():
    with pytest.raises(UsageError, match="mix_points"):
        create_method("manifold_mixup", mix_points=[])
    method = create_method("manifold_mixup", mix_points=[0, 6])
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(UsageError, match=r"\[6\].*5=stages.3"):
        method(build("preact"), torch.randn(2, 3, 16, 16), torch.eye(5)[:2])
