"""Every registered method trains: two SGD steps on each model kind of ``model_kinds`` (synthetic 16x16 batch).

One model per kind serves all methods (built once per module: building costs as much as the steps);
each test checks that its own two steps change the weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mixbench.losses import soft_cross_entropy
from mixbench.methods import create_method, get_method, list_methods
from model_kinds import KINDS, build


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list_methods())
def test_method_trains_two_steps(name, kind, models, tmp_path):
    cls = get_method(name)
    params = {"workers": 0} if "workers" in cls.default_params() else {}  # no process pool for two steps
    if name == "attentivemix":  # its pretrained extractor is a parameter: a tiny one written here
        from test_attentivemix import write_extractor

        params.update(write_extractor(tmp_path))
    elif not cls.available():
        pytest.skip(cls.unavailable_reason())
    method = create_method(name, **params)
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    if kind not in models:
        models[kind] = build(kind)
    model = models[kind].train()
    method.bind(model)  # the harness's generic hooks: a method's own modules and their parameter groups
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for group in method.param_groups():
        opt.add_param_group(group)
    own = [p.detach().clone() for g in opt.param_groups[1:] for p in g["params"]]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, 16, generator=g)  # an odd batch
    y = F.one_hot(torch.tensor([0, 1, 2, 3, 4]), 5).float()
    try:
        for step in range(2):
            out = method(model, x, y)
            assert out.logits.shape == (5, 5)
            torch.testing.assert_close(out.target.sum(1), torch.ones(5))
            loss = soft_cross_entropy(out.logits, out.target)
            if out.extra_loss is not None:
                loss = loss + out.extra_loss
            assert math.isfinite(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(model, step, 2)
    finally:
        method.close()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "no weight changed"
    now = [p for g in opt.param_groups[1:] for p in g["params"]]
    assert not own or any(not torch.equal(b, p) for b, p in zip(own, now)), "the method's own weights did not change"
