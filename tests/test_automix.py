"""AutoMix: the MixBlock, the masks and mixed batches, the losses, the momentum model, checkpoints,
and equality with openmixup.

``OPENMIXUP_REFERENCE=/path/to/openmixup pytest tests/test_automix.py`` also runs openmixup's
``AutoMixup`` (``openmixup/models/classifiers/automix.py``), ``PixelMixBlock``
(``openmixup/models/heads/pmix_block.py``) and ``CosineScheduleHook``
(``openmixup/core/hooks/momentum_hook.py``), their package imports (mmcv...) stubbed, on the same
weights and draws.
"""
import copy
import importlib.util
import math
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench.hooks import stage_names
from mixbench.losses import soft_cross_entropy
from mixbench.methods import create_method
from mixbench.methods import automix as am
from model_kinds import build


def bound(model, seed=0, **params):
    method = create_method("automix", **params)
    method.setup(seed=seed, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    method.bind(model)
    return method


def batch(n, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), F.one_hot(torch.arange(n) % 5, 5).float()


def total_loss(out):
    return soft_cross_entropy(out.logits, out.target) + out.extra_loss


# -- the pure pieces ----------------------------------------------------------------------

def test_pixel_mix_is_a_per_pixel_convex_combination_and_an_own_mask_is_a_no_op():
    x, _ = batch(3)
    perm = torch.tensor([2, 0, 1])
    share = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.cat([1 - share, share], dim=1)
    torch.testing.assert_close(am.pixel_mix(x, perm, mask), (1 - share) * x + share * x[perm])
    own = torch.cat([torch.ones_like(share), torch.zeros_like(share)], dim=1)  # lambda = 1 everywhere
    assert torch.equal(am.pixel_mix(x, perm, own), x)


def test_mask_loss_hand_computed():
    share = torch.full((2, 1, 4, 4), 0.3)
    mask = torch.cat([1 - share, share], dim=1)
    # |1 - 0.3 - lam| - margin, clipped at 0
    assert am.mask_l1_loss(mask, 0.5, 0.1).item() == pytest.approx(0.1, abs=1e-6)
    assert am.mask_l1_loss(mask, 0.75, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    assert am.mask_l1_loss(mask, 0.2, 0.0).item() == pytest.approx(0.5, abs=1e-6)


def test_momentum_schedule():
    base, end = 0.999, 0.999999
    assert am.momentum_at(0, 1000, base, end, 0.1) == base
    assert am.momentum_at(99, 1000, base, end, 0.1) == base
    assert am.momentum_at(100, 1000, base, end, 0.1) == pytest.approx(end - (end - base) * (math.cos(0.1 * math.pi) + 1) / 2)
    assert am.momentum_at(500, 1000, base, end, 0.1) == pytest.approx((base + end) / 2)
    assert am.momentum_at(1000, 1000, base, end, 0.1) == pytest.approx(end)
    assert am.momentum_at(0, 1000, base, end, 0.0) == 0.0  # openmixup's restart at step 0 when the scope starts at 0


def test_mix_block_mask_is_a_partition_at_the_input_size():
    block = am.PixelMixBlock(8)
    block.reset_parameters(torch.Generator().manual_seed(0))
    feature = torch.randn(3, 8, 4, 4)
    for size in [(16, 16), (15, 17)]:
        mask = block(feature, torch.tensor([1, 2, 0]), size, "nearest")
        assert mask.shape == (3, 2, *size)
        torch.testing.assert_close(mask.sum(1), torch.ones(3, *size))
        assert bool(((mask > 0) & (mask < 1)).all())


def test_bad_parameters():
    for bad in [dict(alpha=0), dict(momentum=0.9999999), dict(mask_layer=-1), dict(upsampling="area"),
                dict(mask_adjust=2), dict(reduction=0), dict(mask_loss=-1)]:
        with pytest.raises(UsageError, match="automix"):
            create_method("automix", **bad)
    with pytest.raises(UsageError, match="mask_layer=7"):
        bound(build("resnet18"), mask_layer=7)


# -- the method ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 6])
def test_draw_order_targets_and_batch_sizes(n):
    model = build("resnet18")
    method = bound(model, seed=4)
    x, y = batch(n)
    for _ in range(3):
        rng = copy.deepcopy(method.rng)
        lam_mb, lam_bb = rng.beta(2.0, 2.0, 2)
        perm_bb, perm_mb = torch.from_numpy(rng.permutation(n)), torch.from_numpy(rng.permutation(n))
        out = method(model, x, y)
        assert out.logits.shape == (n, 5) and out.extra_loss.dim() == 0
        # the label weights are the backbone's lambda (openmixup's rule), not the mask's mean
        torch.testing.assert_close(out.target, lam_bb * y + (1 - lam_bb) * y[perm_bb])
        torch.testing.assert_close(out.target.sum(1), torch.ones(n))
        with torch.no_grad():
            mixed = method.mix(x, method.stage_feature(x), lam_mb, lam_bb, perm_mb, perm_bb)
            torch.testing.assert_close(out.logits, model(mixed["x_bb"]))
        assert math.isfinite(total_loss(out).item())


def test_lam_margin_gives_the_backbone_plain_mixup():
    model = build("preact")
    method = bound(model)
    x, _ = batch(4)
    with torch.no_grad():
        feature = method.stage_feature(x)
        perm = torch.tensor([3, 2, 1, 0])
        for lam_bb in (0.05, 0.95):
            mixed = method.mix(x, feature, 0.5, lam_bb, perm, perm)
            torch.testing.assert_close(mixed["x_bb"], lam_bb * x + (1 - lam_bb) * x[perm])
            assert not torch.equal(mixed["x_mb"], mixed["x_bb"])
        mixed = method.mix(x, feature, 0.5, 0.5, perm, perm)  # same partners: the same learned mask
        torch.testing.assert_close(mixed["x_mb"], mixed["x_bb"])


def test_gradients_reach_the_mix_block_and_the_model_but_not_the_momentum_model():
    model = build("regnet")
    method = bound(model)
    x, y = batch(5)
    total_loss(method(model, x, y)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.mix_block.parameters())
    assert all(p.grad is None for p in method.momentum_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.head_one.parameters())


@pytest.mark.parametrize("kind", ["preact", "resnet18", "efficientnet"])
def test_the_clean_loss_has_its_own_classifier(kind):
    """openmixup's head_one_q: the clean batch's loss reaches the backbone but not the model's classifier
    (head_mix_q, trained by the mixed batch only). Summing both losses on one classifier gives it twice
    the gradient, which diverged on the digits benchmark at lr 0.1 (test loss 3.6e7 after one epoch)."""
    model = build(kind)
    method = bound(model, seed=2)
    fc = model.get_classifier()
    x, y = batch(6)
    rng = copy.deepcopy(method.rng)
    out = method(model, x, y)
    total_loss(out).backward()
    fc_grad = [p.grad.clone() for p in fc.parameters()]
    # the clean term alone: the model's features through head_one, the model's classifier untouched
    model.zero_grad()
    clean = method.clean_logits(model, x)
    pooled = {}
    handle = fc.register_forward_pre_hook(lambda m, args: pooled.setdefault("x", args[0]))
    with torch.no_grad():
        own_logits = model(x)
    handle.remove()
    expected = method.head_one(pooled["x"]).flatten(1)
    torch.testing.assert_close(clean, expected)
    assert not torch.allclose(clean, own_logits)
    soft_cross_entropy(clean, y).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in fc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the model's classifier gets the mixed batch's gradient only
    model.zero_grad()
    lam_mb, lam_bb = rng.beta(2.0, 2.0, 2)
    perm_bb, perm_mb = torch.from_numpy(rng.permutation(6)), torch.from_numpy(rng.permutation(6))
    with torch.no_grad():
        mixed = method.mix(x, method.stage_feature(x), lam_mb, lam_bb, perm_mb, perm_bb)
    soft_cross_entropy(model(mixed["x_bb"]), lam_bb * y + (1 - lam_bb) * y[perm_bb]).backward()
    for a, p in zip(fc_grad, fc.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_momentum_model_follows_the_eager_modules_mode_behind_a_compiled_wrapper():
    from mixbench.compiled import CompiledModel

    model = build("resnet18")
    method = bound(model)
    wrapper = CompiledModel(model, model, torch.contiguous_format)
    wrapper.eval()  # the harness evaluates through the wrapper, then sets the eager model back to train
    model.train()
    seen = []
    method.momentum_model.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    x, y = batch(3)
    method(wrapper, x, y)
    assert seen and all(seen)


def test_momentum_update_and_stage_feature():
    model = build("resnet18")
    method = bound(model)
    k = method.momentum_model
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), k.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    old = [p.clone() for p in k.parameters()]
    method.after_step(model, 500, 1000)
    m = am.momentum_at(500, 1000, 0.999, 0.999999, 0.1)
    for q, kp, o in zip(model.parameters(), k.parameters(), old):
        torch.testing.assert_close(kp, o * m + q * (1 - m))
    x, _ = batch(2)
    seen = {}
    stage = dict(model.named_modules())[stage_names(model)[3]]
    handle = stage.register_forward_hook(lambda mod, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        model(x)
        method.momentum_model.load_state_dict(model.state_dict())
        torch.testing.assert_close(method.stage_feature(x), seen["h"])
    handle.remove()


def test_checkpoint_round_trip_continues_identically():
    torch.manual_seed(0)
    model = build("preact")
    a = bound(model, seed=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for g in a.param_groups():
        opt.add_param_group(g)
    x, y = batch(4)
    for step in range(2):
        opt.zero_grad()
        total_loss(a(model, x, y)).backward()
        opt.step()
        a.after_step(model, step, 10)
    state = copy.deepcopy(a.state_dict())
    assert set(state["modules"]) == {"mix_block", "momentum_model", "head_one"}

    model_b = copy.deepcopy(model)
    b = bound(model_b, seed=123)  # other seed: other MixBlock init, other draws
    assert not torch.equal(b.mix_block.query.weight, a.mix_block.query.weight)
    b.load_state_dict(state)
    for name in ("mix_block", "momentum_model", "head_one"):
        sa, sb = a.owned_modules()[name].state_dict(), b.owned_modules()[name].state_dict()
        assert all(torch.equal(sa[key], sb[key]) for key in sa)
    with torch.no_grad():
        oa, ob = a(model, x, y), b(model_b, x, y)
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.extra_loss, ob.extra_loss)
    with pytest.raises(RuntimeError, match="bind"):
        unbound = create_method("automix")
        unbound.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        unbound.load_state_dict(state)


def test_methods_without_modules_keep_their_state_format():
    method = create_method("mixup")
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    method.bind(build("resnet18"))
    assert method.owned_modules() == {} and method.param_groups() == []
    assert set(method.state_dict()) == {"rng"}


# -- equality with openmixup ------------------------------------------------------------

REFERENCE = os.environ.get("OPENMIXUP_REFERENCE")


class _Registry:
    @staticmethod
    def register_module(cls=None, **kwargs):
        return cls if cls is not None else (lambda c: c)


def _identity_decorator(*args, **kwargs):
    return lambda fn: fn


class _ConvModule(nn.Module):
    """mmcv's ConvModule without norm and activation: a convolution with a bias (bias='auto')."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias="auto",
                 norm_cfg=None, act_cfg=None, **kwargs):
        super().__init__()
        assert norm_cfg is None and act_cfg is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=True)

    def forward(self, x):
        return self.conv(x)


class _Backbone(nn.Module):
    """The model without its classifier as an openmixup backbone: ``[stage output, pooled features]``
    (``out_indices=(mask_layer, -1)``; the classifier is openmixup's head)."""

    def __init__(self, model, stage):
        super().__init__()
        self.model = model
        self.stage = stage
        self._out = {}
        dict(model.named_modules())[stage].register_forward_hook(self._keep)  # a bound method: deepcopy-safe

    def _keep(self, module, inputs, output):
        self._out["h"] = output

    def init_weights(self, pretrained=None):
        pass

    def forward(self, x):
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return [self._out.pop("h"), pooled]


class _Head(nn.Module):
    """openmixup's ClsHead/ClsMixupHead around a copy of a classifier (``fc``, set after building): its
    loss is CrossEntropyLoss(use_soft=False): lam * CE(y_a) + (1 - lam) * CE(y_b)."""

    def init_weights(self, **kwargs):
        pass

    def forward(self, x):
        f = x[-1]
        if isinstance(self.fc, nn.Conv2d):  # timm's ResNetV2: a 1x1 convolution on the pooled map
            return [self.fc(f[:, :, None, None]).flatten(1)]
        return [self.fc(f)]

    def loss(self, pred, labels):
        if isinstance(labels, tuple):
            y_a, y_b, lam = labels
            loss = F.cross_entropy(pred[0], y_a) * lam + F.cross_entropy(pred[0], y_b) * (1 - lam)
        else:
            loss = F.cross_entropy(pred[0], labels)
        return {"loss": loss, "acc": torch.zeros(())}


def _load(monkeypatch, root, rel, name):
    path = Path(root) / rel
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def load_reference(monkeypatch, root):
    """openmixup's PixelMixBlock, AutoMixup and CosineScheduleHook with stubbed package imports."""
    def package(name, **attrs):
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    class BaseModule(nn.Module):
        def __init__(self, init_cfg=None, **kwargs):
            super().__init__()
            self.init_cfg = init_cfg

    def normal_init(m, mean=0.0, std=1.0, bias=0.0):
        nn.init.normal_(m.weight, mean, std)
        nn.init.constant_(m.bias, bias)

    class Hook:
        def every_n_iters(self, runner, n):
            return (runner.iter + 1) % n == 0 if n > 0 else False

    package("mmcv")
    package("mmcv.cnn", ConvModule=_ConvModule, constant_init=None, kaiming_init=None, normal_init=normal_init)
    package("mmcv.runner", BaseModule=BaseModule, force_fp32=_identity_decorator, auto_fp16=_identity_decorator,
            load_checkpoint=None, Hook=Hook)
    package("mmcv.parallel", is_module_wrapper=lambda m: True)
    package("matplotlib")
    package("matplotlib.pyplot")
    package("openmixup")
    package("openmixup.utils", print_log=lambda *a, **k: None)
    builder = package("openmixup.models.builder")
    models = package("openmixup.models", builder=builder)
    package("openmixup.models.registry", HEADS=_Registry, MODELS=_Registry)
    package("openmixup.models.augments", cutmix=None, mixup=None)
    package("openmixup.models.utils", PlotTensor=lambda **k: None)
    package("openmixup.models.heads")
    package("openmixup.models.classifiers")
    package("openmixup.models.classifiers.base_model", BaseModel=BaseModule)
    package("openmixup.core")
    package("openmixup.core.hooks")
    package("openmixup.core.hooks.registry", HOOKS=_Registry)
    pmix = _load(monkeypatch, root, "openmixup/models/heads/pmix_block.py", "openmixup.models.heads.pmix_block")

    def build_head(cfg):
        cfg = dict(cfg)
        kind = cfg.pop("type")
        return pmix.PixelMixBlock(**cfg) if kind == "PixelMixBlock" else _Head()

    builder.build_head = build_head
    builder.build_backbone = lambda cfg: copy.deepcopy(cfg["module"])
    models.builder = builder
    automix = _load(monkeypatch, root, "openmixup/models/classifiers/automix.py",
                    "openmixup.models.classifiers.automix")
    hooks = _load(monkeypatch, root, "openmixup/core/hooks/momentum_hook.py", "openmixup.core.hooks.momentum_hook")
    return automix, hooks


def reference_model(automix, model, method, mask_layer=2, mask_adjust=0.0):
    """openmixup's CIFAR-100 AutoMixup config around ``model``, with ``method``'s MixBlock weights."""
    backbone = _Backbone(copy.deepcopy(model), stage_names(model)[mask_layer + 1])
    channels = model.feature_info[mask_layer + 1]["num_chs"]
    ref = automix.AutoMixup(
        backbone=dict(type="Backbone", module=backbone),
        mix_block=dict(type="PixelMixBlock", in_channels=channels, reduction=2, use_scale=True,
                       unsampling_mode=["nearest"], lam_concat=False, lam_concat_v=False, lam_mul=False,
                       lam_residual=False, lam_mul_k=-1, value_neck_cfg=None, x_qk_concat=False,
                       x_v_concat=False, mask_loss_mode="L1", mask_loss_margin=0.1, frozen=False),
        head_one=dict(type="Head"), head_mix=dict(type="Head"),
        head_weights=dict(head_mix_q=1, head_one_q=1, head_mix_k=1, head_one_k=1),
        alpha=2.0, momentum=0.999, mask_layer=mask_layer, mask_loss=0.1, mask_adjust=mask_adjust,
        lam_margin=0.08, mask_up_override=None, debug=False,
    )
    fc = model.get_classifier()
    for name, source in (("head_mix_q", fc), ("head_mix_k", fc), ("head_one_q", method.head_one),
                         ("head_one_k", method.head_one)):
        head = copy.deepcopy(source)
        head._forward_hooks.clear()
        head.requires_grad_(name.endswith("_q"))
        getattr(ref, name).fc = head
    with torch.no_grad():
        ref.mix_block.value.weight.copy_(method.mix_block.value.weight)
        ref.mix_block.value.bias.copy_(method.mix_block.value.bias)
        ref.mix_block.query.conv.weight.copy_(method.mix_block.query.weight)
        ref.mix_block.query.conv.bias.copy_(method.mix_block.query.bias)
    return ref.train()


needs_reference = pytest.mark.skipif(
    not REFERENCE, reason="set OPENMIXUP_REFERENCE to a checkout of Westlake-AI/openmixup")


@needs_reference
@pytest.mark.parametrize("lams", [(0.3, 0.6), (0.7, 0.05), (0.45, 0.97)])
@pytest.mark.parametrize("adjust", [False, True])
def test_mixed_batches_and_mask_loss_match_openmixup(monkeypatch, lams, adjust):
    automix, _ = load_reference(monkeypatch, REFERENCE)
    monkeypatch.setattr(np.random, "rand", lambda: 0.5)
    model = build("preact")
    method = bound(model, seed=1, mask_adjust=1.0 if adjust else 0.0)
    ref = reference_model(automix, model, method, mask_adjust=1.0 if adjust else 0.0)
    x, y = batch(6, seed=3)
    perm_mb, perm_bb = torch.tensor([5, 3, 0, 1, 2, 4]), torch.tensor([1, 0, 3, 2, 5, 4])
    with torch.no_grad():
        feature = method.stage_feature(x)
    ours = method.mix(x, feature, *lams, perm_mb, perm_bb, adjust=adjust)
    theirs = ref.pixel_mixup(x, y.argmax(1), list(lams), [perm_mb, perm_bb], feature)
    torch.testing.assert_close(ours["x_mb"], theirs["img_mix_mb"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["x_bb"], theirs["img_mix_bb"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["mask_loss"], theirs["mask_loss"], rtol=0, atol=1e-6)


@needs_reference
@pytest.mark.parametrize("kind, side, n", [("preact", 16, 6), ("resnet18", 32, 5), ("preact", 16, 1)])
def test_training_steps_match_openmixup(monkeypatch, kind, side, n):
    """Three steps: the losses, every gradient, the SGD step and the momentum update agree."""
    automix, hooks = load_reference(monkeypatch, REFERENCE)
    queue = {}
    monkeypatch.setattr(np.random, "beta", lambda a, b, size: queue["beta"])
    monkeypatch.setattr(torch, "randperm", lambda k: queue["perm"].pop(0))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    model = build(kind)
    ours_model = copy.deepcopy(model).train()
    method = bound(ours_model, seed=n)
    ref = reference_model(automix, model, method)
    hook = hooks.CosineScheduleHook(end_momentum=0.999999, adjust_scope=[0.1, 1.0], warming_up="constant",
                                    update_interval=1)
    runner = types.SimpleNamespace(iter=0, max_iters=20, model=types.SimpleNamespace(module=ref))
    hook.before_run(runner)
    x, y = batch(n, side=side, seed=n)
    labels = y.argmax(1)
    def split(net):  # the parameters without the classifier's, and the classifier's
        fc = {id(p) for p in net.get_classifier().parameters()}
        return [p for p in net.parameters() if id(p) not in fc], list(net.get_classifier().parameters())

    ours_params = sum(split(ours_model), []) + list(method.mix_block.parameters()) + list(method.head_one.parameters())
    ref_params = (split(ref.backbone_q.model)[0] + list(ref.head_mix_q.fc.parameters())
                  + list(ref.mix_block.parameters()) + list(ref.head_one_q.fc.parameters()))
    assert len(ours_params) == len(ref_params)
    for step in (0, 1, 2):  # steps 0, 1 keep the base momentum; step 2 (>= int(0.1 * 20)) follows the cosine
        rng = copy.deepcopy(method.rng)
        lam = rng.beta(2.0, 2.0, 2)
        queue.update(beta=lam, perm=[torch.from_numpy(rng.permutation(n)), torch.from_numpy(rng.permutation(n))])
        out = method(ours_model, x, y)
        ours_loss = total_loss(out)
        runner.iter = step
        hook.before_train_iter(runner)
        ref_loss = ref.forward_train(x, labels)["loss"]
        assert not queue["perm"]
        torch.testing.assert_close(ours_loss, ref_loss, rtol=0, atol=1e-6)
        for p in ours_params + ref_params:
            p.grad = None
        ours_loss.backward()
        ref_loss.backward()
        for a, b in zip(ours_params, ref_params):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            for a, b in zip(ours_params, ref_params):  # the same SGD step on the reference's own weights
                a.sub_(0.1 * a.grad)
                b.sub_(0.1 * a.grad)
        method.after_step(ours_model, step, 20)
        hook.after_train_iter(runner)
        assert ref.momentum == pytest.approx(am.momentum_at(step, 20, 0.999, 0.999999, 0.1), abs=0)
        ref_k = split(ref.backbone_k.model)[0] + list(ref.head_mix_k.fc.parameters())
        for a, b in zip(sum(split(method.momentum_model), []), ref_k):
            assert torch.equal(a, b)
    assert ref.momentum != 0.999


# -- training in the harness: checkpoints and an exact resume after kill -9 ----------------------------

@pytest.mark.slow
def test_harness_checkpoint_holds_the_method_modules_and_their_optimizer_group(tmp_path, monkeypatch):
    import mixbench.train as train
    from mixbench.spec import RunSpec

    captured = []
    monkeypatch.setattr(train, "save_checkpoint", lambda run_dir, s: captured.append(s))
    spec = RunSpec.from_dict(dict(method="automix", dataset="synthetic", seed=3, epochs=1, batch_size=32,
                                  train_subset=96, device="cpu", checkpoint_every_min=0)).resolved()
    train.train_run(spec, tmp_path / "run", progress=False)
    s = captured[-1]
    assert set(s["method"]["modules"]) == {"mix_block", "momentum_model", "head_one"}
    groups = s["optimizer"]["param_groups"]
    assert len(groups) == 3 and len(groups[1]["params"]) == 4  # the MixBlock: value and query, weight and bias
    assert len(groups[2]["params"]) == 2  # head_one_q: weight and bias
    for g in groups[1:]:
        assert g["lr"] == groups[0]["lr"] and g["weight_decay"] == groups[0]["weight_decay"]
        assert all(i in s["optimizer"]["state"] for i in g["params"])  # its momentum buffers
    assert len(s["scheduler"]["base_lrs"]) == 3


@pytest.mark.slow
def test_kill_9_then_rerun_is_identical(tmp_path):
    from helpers import assert_same_run, first_checkpoint, kill_9_when, metrics, mixbench_run, resumed_epoch

    run = ("--methods", "automix", "--dataset", "synthetic", "--train-subset", "128", "--batch-size", "16",
           "--epochs", "3", "--seeds", "1", "--device", "cpu", "--checkpoint-every-min", "0", "--no-progress")
    ref_proc = mixbench_run(tmp_path / "ref", *run, cwd=tmp_path)
    assert ref_proc.wait(timeout=600) == 0, ref_proc.stderr.read()
    victim = mixbench_run(tmp_path / "run", *run, cwd=tmp_path)
    run_dir = kill_9_when(victim, lambda: first_checkpoint(tmp_path / "run"), timeout=600, settle=0.5)
    killed_at = len(metrics(run_dir))
    assert 1 <= killed_at < 3
    ref_dir = next((tmp_path / "ref").rglob("result.json")).parent
    assert not (run_dir / "result.json").exists()

    again = mixbench_run(tmp_path / "run", *run, cwd=tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert resumed_epoch(err) >= 1, err
    assert_same_run(ref_dir, run_dir)
