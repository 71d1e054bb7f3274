"""The pure cores of the input-level methods against hand-computed cases."""
import pytest
import torch

from mixbench import UsageError

from mixbench.methods import create_method, list_methods
from mixbench.methods._registry import mix_targets
from mixbench.methods.cutmix import cutmix, cutmix_box
from mixbench.methods.mixup import mixup


def test_mixup_is_the_convex_combination():
    x = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    perm = torch.tensor([2, 0, 1])
    out = mixup(x, perm, 0.25)
    expected = torch.tensor([[75.25, 150.5], [3.25, 6.5], [32.5, 65.0]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(x, torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])), "input must not change"


def test_mix_targets_rows_sum_to_one_and_weights():
    y = torch.eye(3)
    t = mix_targets(y, torch.tensor([1, 2, 0]), 0.7)
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    torch.testing.assert_close(t[0], torch.tensor([0.7, 0.3, 0.0]))
    per_sample = mix_targets(y, torch.tensor([1, 2, 0]), torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(per_sample, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("lam, cy, cx, box", [
    (0.75, 4, 4, (2, 6, 2, 6)),   # side 8*sqrt(.25) = 4, centred: no clipping
    (0.75, 0, 0, (0, 2, 0, 2)),   # clipped at the top-left corner
    (0.75, 7, 1, (5, 8, 0, 3)),   # clipped at the bottom and the left
    (1.0, 3, 3, (3, 3, 3, 3)),    # lam 1: empty box
])
def test_cutmix_box_hand_computed(lam, cy, cx, box):
    assert cutmix_box(8, 8, lam, cy, cx) == box


def test_cutmix_lambda_is_the_unboxed_area():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    perm = torch.tensor([1, 0])
    box = cutmix_box(8, 8, 0.75, 0, 0)  # clipped to 2x2 = 4 pixels
    out, lam = cutmix(x, perm, box)
    assert lam == pytest.approx(1 - 4 / 64)
    pasted = (out != x).float().mean().item()
    assert pasted == pytest.approx(1 - lam)
    assert torch.equal(out[0, :, :2, :2], x[1, :, :2, :2])
    assert torch.equal(out[0, :, 2:, :], x[0, :, 2:, :])


def test_registry_order_and_unknown_parameter():
    assert list_methods()[:3] == ["vanilla", "mixup", "cutmix"]
    with pytest.raises(ValueError, match="unknown parameter.*beta.*valid: alpha"):
        create_method("mixup", beta=1.0)
    with pytest.raises(ValueError, match="unknown method 'mixupp'; choose from: vanilla"):
        create_method("mixupp")


@pytest.mark.parametrize("name", ["vanilla", "mixup", "cutmix"])
def test_methods_return_soft_targets_and_are_seeded(name):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.nn.functional.one_hot(torch.arange(6) % 5, 5).float()

    def call(seed):
        m = create_method(name)
        m.setup(seed=seed, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        return m(model, x, y)

    out = call(3)

    logits, target = out.logits, out.target
    assert logits.shape == (6, 5)
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    _out = call(3)
    logits2, target2 = _out.logits, _out.target
    assert torch.equal(logits, logits2) and torch.equal(target, target2)


def test_method_rng_state_round_trip():
    m = create_method("mixup")
    m.setup(seed=1, num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    m.draw_lambda(1.0)
    state = m.state_dict()
    a = [m.draw_lambda(1.0) for _ in range(3)]
    m.load_state_dict(state)
    assert a == [m.draw_lambda(1.0) for _ in range(3)]


def test_puzzlemix_box_hand_computed():
    from mixbench.methods.cutmix import puzzlemix_box

    # side sqrt(0.5) * 32 = 22.627: rows int(16 - 11.31) = 4 .. int(16 + 11.31) = 27, columns clipped at 0 .. int(15.01)
    assert puzzlemix_box(32, 32, 0.5, 16.0, 3.7) == (4, 27, 0, 15)
    y1, y2, x1, x2 = puzzlemix_box(32, 32, 1.0, 7.5, 9.2)  # lam = 1: an empty box, the batch is unchanged
    assert y1 == y2 and x1 == x2


def test_cutmix_box_rules_draw_in_their_own_way():
    x = torch.randn(4, 3, 16, 16)
    y = torch.eye(4)
    for rule in ("puzzlemix", "clovaai"):
        m = create_method("cutmix", box=rule)
        m.setup(seed=0, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
        out = m(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)), x, y)
        torch.testing.assert_close(out.target.sum(1), torch.ones(4))
    with pytest.raises(UsageError, match="cutmix box must be one of puzzlemix, clovaai"):
        create_method("cutmix", box="round")
