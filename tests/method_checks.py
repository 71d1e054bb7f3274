"""Small fixtures shared by the per-method tests: a seeded batch with a linear model, and the
check that two instances set up with one seed mix identically."""
import torch
import torch.nn.functional as F

from mixbench.methods import create_method


def linear_batch(n: int, side: int = 16, classes: int = 5):
    """``n`` random 3-channel images (seeded by ``n``), one-hot targets and a seeded linear model."""
    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(n))
    y = F.one_hot(torch.arange(n) % classes, classes).float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, classes))
    return x, y, model


def assert_same_seed_same_mix(name: str, model, x, y, seed: int = 2, **params) -> None:
    a, b = create_method(name, **params), create_method(name, **params)
    for m in (a, b):
        m.setup(seed=seed, num_classes=y.shape[1], mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        oa, ob = a(model, x, y), b(model, x, y)
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.target, ob.target)
