"""The generic hidden-stage hook against a hand-written stage-by-stage forward, on four timm CNN kinds."""
import pytest
import torch
from torch import nn

from mixbench import UsageError
from mixbench.hooks import (
    check_points, forward_mixed, mixing_points, replace_stage_output, resolve_points, stage_names, unwrap,
)
from model_kinds import KINDS, build


EXPECTED_STAGES = {
    "resnet18": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "preact": ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3"],
    "wide": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "regnet": ["stem", "s1", "s2", "s3", "s4"],
    "efficientnet": ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"],  # no stem entry in feature_info
}


@pytest.fixture(scope="module")
def models():
    return {kind: build(kind).eval() for kind in KINDS}


def manual_segments(kind, m):
    """The forward pass cut at the mixing points: segment j maps point j-1 to point j; then the head."""
    if kind in ("resnet18", "wide"):
        segs = [lambda x: m.act1(m.bn1(m.conv1(x))), lambda h: m.layer1(m.maxpool(h)), m.layer2, m.layer3, m.layer4]
        return segs, m.forward_head
    if kind == "preact":
        segs = [m.stem.conv, lambda h: m.stages[0](m.stem.pool(h)), m.stages[1], m.stages[2], m.stages[3]]
        return segs, lambda h: m.forward_head(m.norm(h))
    if kind == "efficientnet":
        segs = [lambda x: m.blocks[0](m.bn1(m.conv_stem(x))), m.blocks[1], m.blocks[2], m.blocks[3], m.blocks[4]]
        return segs, lambda h: m.forward_head(m.bn2(m.conv_head(h)))
    segs = [m.stem, m.s1, m.s2, m.s3, m.s4]
    return segs, lambda h: m.forward_head(m.final_conv(h))


def manual_forward(kind, m, x, k=None, fn=None):
    segs, head = manual_segments(kind, m)
    h = fn(x) if k == 0 else x
    for j, seg in enumerate(segs, start=1):
        h = seg(h)
        if j == k:
            h = fn(h)
    return head(h)


def distort(h):
    return h.flip(0) * 1.5 - 0.25


@pytest.mark.parametrize("kind", KINDS)
def test_stage_names_come_from_feature_info(models, kind):
    assert stage_names(models[kind]) == EXPECTED_STAGES[kind]
    assert mixing_points(models[kind]) == ["input"] + EXPECTED_STAGES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_hook_replaces_exactly_stage_k_output(models, kind):
    m = models[kind]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m(x)
        torch.testing.assert_close(manual_forward(kind, m, x), plain, rtol=1e-5, atol=1e-5)
        for k in range(len(mixing_points(m))):
            expected = manual_forward(kind, m, x, k, distort)
            with replace_stage_output(m, k, distort):
                got = m(x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(forward_mixed(m, x, k, distort), expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, plain, atol=1e-3), f"point {k} had no effect"
            # Replacing at point k must differ from replacing at any other point.
            for other in range(len(mixing_points(m))):
                if other != k:
                    assert not torch.allclose(got, manual_forward(kind, m, x, other, distort), atol=1e-4)


def test_hook_fires_once_and_is_removed(models):
    m = models["preact"]
    x = torch.randn(4, 3, 16, 16)
    calls = []

    def fn(h):
        calls.append(h.shape)
        return distort(h)

    with torch.no_grad():
        plain = m(x)
        with replace_stage_output(m, 3, fn):
            first = m(x)
            second = m(x)
        after = m(x)
    assert calls == [(4, 16, 8, 8)]
    assert not torch.allclose(first, plain)
    torch.testing.assert_close(second, plain)
    torch.testing.assert_close(after, plain)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_hook_that_never_fires_is_an_error(models):
    m = models["resnet18"]
    with pytest.raises(RuntimeError, match="layer2"):
        with replace_stage_output(m, 3, distort):
            pass
    assert not m.layer2._forward_hooks


def test_gradients_flow_through_the_replaced_output(models):
    m = models["regnet"]
    x = torch.randn(4, 3, 16, 16)
    forward_mixed(m, x, 2, distort).sum().backward()
    assert m.stem.conv.weight.grad is not None and m.stem.conv.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)


def test_bad_points_are_usage_errors(models):
    m = models["resnet18"]
    assert resolve_points(m, "all") == (0, 1, 2, 3, 4, 5)
    assert resolve_points(m, [0, 2, 3]) == (0, 2, 3)
    with pytest.raises(UsageError, match=r"\[6\].*0=input, 1=act1, 2=layer1"):
        resolve_points(m, (0, 6))
    with pytest.raises(UsageError, match="out of range"):
        with replace_stage_output(m, 7, distort):
            pass
    for bad in ("some", [], [-1], ["a"]):
        with pytest.raises(UsageError, match="mix_points"):
            check_points(bad)
    with pytest.raises(UsageError, match="feature_info"):
        stage_names(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_compiled_wrapper_mixes_on_the_eager_module(models):
    m = models["preact"]

    class Wrapper(nn.Module):  # what torch.compile returns keeps the module as `_orig_mod`
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            raise AssertionError("hidden-point mixing must call the eager module")

    wrapped = Wrapper(m)
    assert unwrap(wrapped) is m and stage_names(wrapped) == EXPECTED_STAGES["preact"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(forward_mixed(wrapped, x, 2, distort), manual_forward("preact", m, x, 2, distort))
