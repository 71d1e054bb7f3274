"""``mixbench new-method NAME``: a documented starting file for a method of your own, and its test."""
from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import List

from mixbench import UsageError

METHOD_TEMPLATE = '''"""{name}: <what the method does, in one line> (<authors, venue, arXiv id>).

A mixbench method of your own, loaded as a plugin: nothing to install, no fork of mixbench.

    python -m pytest -q test_{name}.py                                   # its tests
    mixbench run --plugins {name}.py --methods vanilla,mixup,{name} --dataset digits --epochs 3
    mixbench report results/runs                                         # beside the baselines

How a method plugs into the harness:

- The class derives from ``MixMethod`` and is registered with ``@register_method`` under
  ``name`` (it must not clash with a built-in method: see ``mixbench list methods``).
- Its hyper-parameters are the constructor's keyword arguments; the defaults are the values
  of your paper. They are listed by ``mixbench list methods --plugins {name}.py``, are part of
  the run id, and are set per method in a benchmark spec, e.g.
  ``methods: {{{name}: {{method_params: {{alpha: 0.4}}}}}}``.
- ``forward(model, x, y)`` gets the normalised batch ``x`` (N, C, H, W) on the training device
  and its one-hot (or soft) targets ``y`` (N, K). It returns ``MixOutput(logits, target,
  extra_loss=None)``: the model's logits on the mixed batch, the targets of the mixed batch
  (rows sum to 1), and an optional scalar added to the loss (in soft-target cross-entropy units).
- Every random draw comes from ``self.rng`` (a numpy Generator that the harness seeds per run and
  checkpoints): ``self.draw_lambda(alpha)``, ``self.draw_perm(n, device)``. A method with more
  state than that overrides ``state_dict``/``load_state_dict`` so that a resumed run is exact.
- ``self.num_classes``, ``self.mean`` and ``self.std`` (the data's, set by ``setup``) are there if
  the method needs them (e.g. to un-normalise images); ``self.stats(x)`` gives mean and std shaped
  (1, C, 1, 1) on ``x``'s device.
- The mixing itself is a pure function (no randomness, no model) so that it can be tested alone.
- This file's contents are hashed into the run id: after an edit, ``mixbench run`` trains new
  runs instead of reusing the old results. A helper module that this file imports is not hashed.
"""
import torch

from mixbench.methods import MixMethod, MixOutput, register_method


def {name}_mix(x: torch.Tensor, perm: torch.Tensor, lam: float):
    """The pure mixing core: the mixed batch and each sample's own-label weight (N,).

    Replace the body with your mixing rule. This starting point blends each image with its
    partner ``x[perm]`` (as mixup does): the weight of the own label is the share of the own
    image in the mixed one, here ``lam`` for every sample. ``lam == 1`` must return ``x``
    unchanged with weights 1 (the tests check both).
    """
    mixed = x * lam + x[perm] * (1.0 - lam)
    weights = torch.full((x.shape[0],), float(lam), device=x.device, dtype=x.dtype)
    return mixed, weights


@register_method
class {cls}(MixMethod):
    name = "{name}"

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha  # lambda ~ Beta(alpha, alpha); alpha <= 0: no mixing

    def forward(self, model, x, y):
        lam = self.draw_lambda(self.alpha)
        perm = self.draw_perm(x.shape[0], x.device)
        mixed, w = {name}_mix(x, perm, lam)
        w = w.to(y.dtype)[:, None]
        target = w * y + (1.0 - w) * y[perm]
        return MixOutput(model(mixed), target)
'''

TEST_TEMPLATE = '''"""Tests of the {name} method: label weights, the lambda = 1 no-op, odd batches, a training step.

Run with ``python -m pytest -q test_{name}.py``. The method is loaded the way
``mixbench run --plugins {name}.py`` loads it.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixbench.methods import create_method, get_method
from mixbench.plugins import load_plugins

load_plugins([str(Path(__file__).resolve().parent / "{name}.py")])
plugin = sys.modules[get_method("{name}").__module__]


def tiny_model(num_classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def set_up(method, seed=0, num_classes=4):
    method.setup(seed=seed, num_classes=num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return method


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.9])
def test_label_weights_are_the_share_of_each_image(lam):
    # Image 0 is all ones and image 1 all zeros, each the other's partner: the mean of a mixed
    # image is the share of the ones image in it, which the label weights must equal.
    x = torch.stack([torch.ones(3, 16, 16), torch.zeros(3, 16, 16)])
    perm = torch.tensor([1, 0])
    mixed, w = plugin.{name}_mix(x, perm, lam)
    assert mixed.shape == x.shape and w.shape == (2,)
    assert torch.allclose(mixed[0].mean(), w[0], atol=1e-6)
    assert torch.allclose(mixed[1].mean(), 1 - w[1], atol=1e-6)


def test_lambda_one_is_a_no_op():
    x = torch.randn(5, 3, 16, 16)
    perm = torch.randperm(5)
    mixed, w = plugin.{name}_mix(x, perm, 1.0)
    assert torch.equal(mixed, x) and torch.equal(w, torch.ones(5))
    # and through the method: alpha = 0 draws lambda = 1, so the targets are the labels
    method = set_up(create_method("{name}", alpha=0.0))
    y = F.one_hot(torch.arange(5) % 4, 4).float()
    seen = []
    out = method(lambda batch: seen.append(batch) or torch.zeros(len(batch), 4), x, y)
    assert torch.equal(seen[0], x) and torch.equal(out.target, y)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_targets_and_a_training_step(n):
    method = set_up(create_method("{name}"))
    model = tiny_model()
    x = torch.randn(n, 3, 16, 16)
    y = F.one_hot(torch.arange(n) % 4, 4).float()
    out = method(model, x, y)
    assert out.logits.shape == (n, 4) and out.target.shape == (n, 4)
    assert torch.allclose(out.target.sum(1), torch.ones(n), atol=1e-6) and bool((out.target >= 0).all())
    loss = torch.sum(-out.target * F.log_softmax(out.logits, dim=-1), dim=-1).mean()
    if out.extra_loss is not None:
        loss = loss + out.extra_loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_one_seed_one_result():
    x = torch.randn(6, 3, 16, 16)
    y = F.one_hot(torch.arange(6) % 4, 4).float()
    a = set_up(create_method("{name}"), seed=3)(lambda b: b.mean((1, 2, 3))[:, None].repeat(1, 4), x, y)
    b = set_up(create_method("{name}"), seed=3)(lambda b: b.mean((1, 2, 3))[:, None].repeat(1, 4), x, y)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.target, b.target)
'''


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part) or "Method"


def write_method(name: str, folder: Path) -> List[Path]:
    """Write ``folder/NAME.py`` (the method) and ``folder/test_NAME.py`` (its tests); never overwrite."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise UsageError(f"method name {name!r} must be lower case letters, digits and _, starting with a letter")
    from mixbench.methods import list_methods
    from mixbench.plugins import origin

    if name in list_methods():
        raise UsageError(f"a method named {name!r} already exists ({origin('method', name)}); choose another name")
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--dir {str(folder)!r} is not a folder")
    files = [folder / f"{name}.py", folder / f"test_{name}.py"]
    for path in files:
        if path.exists():
            raise UsageError(f"{path} exists; not overwritten (remove it or choose another name or --dir)")
    files[0].write_text(METHOD_TEMPLATE.format(name=name, cls=class_name(name)))
    files[1].write_text(TEST_TEMPLATE.format(name=name))
    return files
