"""One training step of mixbench equals one step of the PuzzleMix code (snu-mllab/PuzzleMix).

That code (``main.py``'s ``train()``, ``models/preresnet.py``, ``mixup.py``) trained
every baseline of the PuzzleMix, Co-Mixup and Catch-up Mix CIFAR tables. With
``PUZZLEMIX_REFERENCE`` pointing at a checkout of it, each test below loads the same
initial weights into the reference PreActResNet-18 and mixbench's
``preactresnet18``, feeds both the same batch and the same random draws (lambda,
partner permutation, mixing layer, box, grid size, adversarial coins and noise),
and compares the loss and every parameter gradient of one step, in float32 on the
CPU; also the learning rate of every epoch and the model's output. The reference
is written for CUDA: the tests run it on the CPU by turning its ``device='cuda'``
arguments and ``.cuda()`` calls into CPU ones, nothing else.

The tests that need no reference (the protocol's values) always run.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import sys
import types
from collections import defaultdict, deque

import numpy as np
import pytest
import torch

from mixbench.data import get_dataset_info
from mixbench.benchmark import expand_benchmark, load_benchmark
from mixbench.losses import get_loss
from mixbench.methods import create_method, get_method
from mixbench.models import count_parameters, create_model
from mixbench.spec import RunSpec
from mixbench.optim import lr_factor
from mixbench.train import step_loss

REFERENCE = os.environ.get("PUZZLEMIX_REFERENCE")
needs_reference = pytest.mark.skipif(
    not REFERENCE, reason="set PUZZLEMIX_REFERENCE to a checkout of snu-mllab/PuzzleMix"
)
if REFERENCE:
    pytest.importorskip("gco", reason="the PuzzleMix cases need gco-wrapper")

N, K, SIDE = 8, 100, 32
BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cifar100_preactresnet18.yaml")


# -- the protocol's values (always run) -------------------------------------------

def test_cifar100_protocol_values():
    """The reference's CIFAR-100 commands (its README) as mixbench's data set defaults and spec."""
    info = get_dataset_info("cifar100")
    assert info.crop_padding == 2 and info.flip
    assert info.mean == pytest.approx([129.3 / 255, 124.1 / 255, 112.4 / 255], abs=0)
    assert info.std == pytest.approx([68.2 / 255, 65.4 / 255, 70.4 / 255], abs=0)
    cells = expand_benchmark(load_benchmark(BENCHMARK))
    assert {c.method for c in cells} >= {"vanilla", "mixup", "cutmix", "manifold_mixup", "puzzlemix"}
    for c in cells:
        assert (c.model, c.loss, c.epochs, c.batch_size, c.lr, c.momentum, c.nesterov, c.weight_decay) == (
            "preactresnet18", "bce", 1200, 100, 0.1, 0.9, True, 1e-4), c.method
        assert (c.schedule, list(c.milestones), c.gamma, c.warmup_epochs, c.stem) == (
            "multistep", [400, 800], 0.1, 0, "auto")
    params = {c.method: c.method_params for c in cells}
    assert params["puzzlemix"]["adv_p"] == 0.0 and params["puzzlemix"]["t_size"] == 4
    assert params["cutmix"]["box"] == "puzzlemix" and params["cutmix"]["prob"] == 1.0
    assert params["manifold_mixup"]["alpha"] == 2.0 and tuple(params["manifold_mixup"]["mix_points"]) == (0, 2, 3)
    assert get_method("puzzlemix").default_params()["adv_p"] == 0.0  # `--methods all` trains plain PuzzleMix


def test_tiny_imagenet_protocol_values():
    info = get_dataset_info("tiny-imagenet")
    assert info.mean == (0.5,) * 3 and info.std == (0.5,) * 3 and info.crop_padding == 4
    spec = RunSpec(method="vanilla", dataset="tiny-imagenet").resolved()
    assert (spec.stem, spec.loss, spec.lr) == ("cifar-s2", "bce", 0.2)
    tiny = os.path.join(os.path.dirname(BENCHMARK), "tinyimagenet_preactresnet18.yaml")
    for c in expand_benchmark(load_benchmark(tiny)):
        assert (c.stem, c.loss, c.lr, c.epochs, list(c.milestones), c.batch_size, c.weight_decay) == (
            "cifar-s2", "bce", 0.2, 1200, [600, 900], 100, 1e-4), c.method
        if c.method in ("mixup", "cutmix", "manifold_mixup"):
            assert c.method_params["alpha"] == 0.2
        if c.method == "puzzlemix":
            assert (c.method_params["clean_lam"], c.method_params["t_size"]) == (1.0, -1)
    model = create_model("preactresnet18", num_classes=200, image_size=64, stem=spec.stem)
    assert model.stem.conv.stride == (2, 2) and model.stem.conv.kernel_size == (3, 3)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 200)


def test_preactresnet18_is_the_reference_size():
    model = create_model("preactresnet18", num_classes=100, image_size=32)
    assert count_parameters(model) == 11_217_316  # models/preresnet.py's preactresnet18(100)
    assert isinstance(model.norm, torch.nn.Identity)
    timm_model = create_model("resnetv2_18", num_classes=100, image_size=32)
    assert count_parameters(timm_model) == 11_218_340  # timm's keeps its final norm


def test_bce_loss_is_bceloss_of_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    target = torch.softmax(torch.randn(6, 5, generator=g), -1)
    want = torch.nn.BCELoss()(torch.softmax(logits, 1), target)
    torch.testing.assert_close(get_loss("bce")(logits, target), want, rtol=0, atol=0)
    assert get_loss("bce").extra_weight(5) == pytest.approx(0.2) and get_loss("ce").extra_weight(5) == 1.0


# -- the reference, on the CPU ----------------------------------------------------

class _CpuTorch(types.ModuleType):
    """``torch`` as the reference's mixup.py sees it: ``device='cuda'`` becomes the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in ("zeros", "ones", "tensor", "zeros_like", "ones_like", "arange", "full"):
            def on_cpu(*args, _f=value, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return _f(*args, **kwargs)
            return on_cpu
        return value


@pytest.fixture(scope="module")
def ref():
    """The reference's main, mixup and models modules, importable on a CPU-only machine."""
    argv, path = sys.argv, list(sys.path)
    sys.argv = ["main.py", "--dataset", "cifar100", "--arch", "preactresnet18", "--learning_rate", "0.1",
                "--momentum", "0.9", "--decay", "0.0001", "--epochs", "1200", "--schedule", "400", "800",
                "--gammas", "0.1", "0.1", "--mp", "0", "--log_off", "True"]
    sys.path.insert(0, REFERENCE)
    saved = {name: sys.modules.pop(name) for name in ("main", "mixup", "models", "load_data", "logger")
             if name in sys.modules}
    try:
        main = importlib.import_module("main")
        mixup = sys.modules["mixup"]
        models = sys.modules["models"]
    finally:
        sys.argv, sys.path[:] = argv, path
    mixup.torch = _CpuTorch()
    yield types.SimpleNamespace(main=main, mixup=mixup, preresnet=sys.modules["models.preresnet"])
    for name in ("main", "mixup", "models", "models.preresnet", "models.wide_resnet", "load_data", "logger"):
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.fixture
def cpu_cuda(monkeypatch):
    """``tensor.cuda()`` is the identity (the reference moves every batch and constant to the GPU)."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def _map_key(name: str) -> str:
    """A mixbench ``preactresnet18`` parameter name -> the reference's."""
    if name.startswith("stem.conv."):
        return "conv1." + name[len("stem.conv."):]
    if name.startswith("head.fc."):
        return "linear." + name[len("head.fc."):]
    parts = name.split(".")  # stages.S.blocks.B.<module>.<param>
    stage, block, module, rest = int(parts[1]), parts[3], parts[4], ".".join(parts[5:])
    module = {"norm1": "bn1", "norm2": "bn2", "conv1": "conv1", "conv2": "conv2"}.get(module)
    if module is None:  # downsample.conv.weight
        module, rest = "shortcut.0", ".".join(parts[6:])
    return f"layer{stage + 1}.{block}.{module}.{rest}"


def _models(ref, seed=0, stride=1, size=SIDE):
    torch.manual_seed(seed)
    theirs = ref.preresnet.preactresnet18(K, False, stride)
    torch.manual_seed(seed)
    ours = create_model("preactresnet18", num_classes=K, image_size=size, stem="cifar-s2" if stride == 2 else "auto")
    return ours, theirs


def _pairs(ours, theirs):
    mine, refs = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert len(mine) == len(refs)
    return [(mine[k], refs[_map_key(k)], k) for k in mine]


class _Recorder:
    """Wraps a method's numpy Generator and records every draw, in order."""

    def __init__(self, rng):
        self.rng, self.log = rng, []

    def __getattr__(self, name):
        f = getattr(self.rng, name)
        if not callable(f):
            return f

        def record(*args, **kwargs):
            value = f(*args, **kwargs)
            self.log.append((name, value))
            return value
        return record


class _Queue:
    """Stands in for numpy / python random functions: returns queued values per function name."""

    def __init__(self, **queues):
        self.queues = defaultdict(deque, {k: deque(v) for k, v in queues.items()})

    def __call__(self, name):
        def draw(*args, **kwargs):
            assert self.queues[name], f"the reference drew {name}{args} more often than mixbench"
            return self.queues[name].popleft()
        return draw

    def assert_used(self):
        left = {k: list(v) for k, v in self.queues.items() if v}
        assert not left, f"draws the reference did not make: {left}"


class _Grads:
    """The optimizer handed to the reference's train(): records the gradients of its step."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    info = get_dataset_info("cifar100")
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    pixels = torch.nn.functional.avg_pool2d(torch.rand(N, 3, SIDE, SIDE, generator=g), 3, 1, 1)
    y = torch.randint(K, (N,), generator=g)
    return (pixels - mean) / std, y, mean, std


def _mixbench_step(name, params, ours, x, y, seed):
    method = create_method(name, **params)
    info = get_dataset_info("cifar100")
    method.setup(seed=seed, num_classes=K, mean=info.mean, std=info.std)
    rec = _Recorder(method.rng)
    method.rng = rec
    criterion = get_loss("bce")
    ours.train()
    loss = step_loss(method, ours, x, torch.nn.functional.one_hot(y, K).float(), criterion, criterion.extra_weight(K))
    loss.backward()
    method.close()
    return loss.detach(), rec.log


def _reference_queues(name, params, log):
    """The reference's draws, per random function, for the draws mixbench made (``log``)."""
    draws = defaultdict(list)
    for fn, value in log:
        draws[fn].append(value)
    q = defaultdict(list)
    torch_noise = []
    if name in ("mixup", "cutmix", "manifold_mixup", "puzzlemix"):
        # mixup_process draws a grid size for every method: 2 ** randint(1, 5).
        if name == "puzzlemix":
            q["randint"] = [int(np.log2(2 ** int(draws["integers"][-1] + 1)))]
        else:
            q["randint"] = [1]
        q["permutation"] = [np.asarray(v) for v in draws["permutation"]]
        q["beta"] = [float(v) for v in draws["beta"]]
    if name == "cutmix":
        q["uniform"] = [float(v) for v in draws["uniform"]]  # the box centre: row, then column
    if name == "manifold_mixup":
        # mixbench's point k in (0, 2, 3) is the reference's layer_mix 0, 1, 2; python's random.randint draws it.
        k = params.get("mix_points", (0, 2, 3))[int(draws["integers"][0])]
        q["py_randint"] = [{0: 0, 2: 1, 3: 2}[k]]
    if name == "puzzlemix" and params.get("adv_p", 0) > 0:
        q["binomial"] = [int(v) for v in draws["binomial"]]
        if any(q["binomial"]):
            torch_noise.append(torch.as_tensor(draws["uniform"][0]).float())  # the random start
            q["uniform"] = [float(draws["uniform"][1])]  # the FGSM step's scale
    return q, torch_noise


def _reference_step(ref, name, params, theirs, x, y, mean, std, log):
    args = ref.main.args
    args.mean, args.std, args.num_classes = mean, std, K
    args.train = {"vanilla": "vanilla", "manifold_mixup": "mixup_hidden"}.get(name, "mixup")
    args.mixup_alpha = params.get("alpha", 1.0 if name != "manifold_mixup" else 2.0)
    args.box = name == "cutmix"
    args.graph = name == "puzzlemix"
    args.in_batch = False
    if name == "puzzlemix":
        for key in ("beta", "gamma", "eta", "neigh_size", "n_labels", "transport", "t_eps", "t_size",
                    "adv_p", "clean_lam"):
            setattr(args, key, params[key])
        args.adv_eps = params["adv_eps"] * 255  # the reference's adv_eps is in pixel values
    queues, noise = _reference_queues(name, params, log)
    q = _Queue(**queues)
    with pytest.MonkeyPatch.context() as monkeypatch:
        loss, grads = _patched_reference_step(ref, q, noise, theirs, x, y, args, monkeypatch)
    q.assert_used()
    assert not noise, "the reference did not draw its adversarial noise"
    return loss, grads


def _patched_reference_step(ref, q, noise, theirs, x, y, args, monkeypatch):
    monkeypatch.setattr(np.random, "randint", q("randint"))
    monkeypatch.setattr(np.random, "permutation", q("permutation"))
    monkeypatch.setattr(np.random, "beta", q("beta"))
    monkeypatch.setattr(np.random, "uniform", q("uniform"))
    monkeypatch.setattr(np.random, "binomial", q("binomial"))
    monkeypatch.setattr(random, "randint", q("py_randint"))
    if noise:
        real_uniform_ = torch.Tensor.uniform_

        def uniform_(self, *a, **k):  # the random start of the adversarial noise (torch's RNG in the reference)
            if noise and self.shape == noise[0].shape:
                return self.copy_(noise.pop(0))
            return real_uniform_(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, "uniform_", uniform_)
    optimizer = _Grads(theirs.parameters())
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        _, _, loss = ref.main.train([(x.clone(), y.clone())], theirs, optimizer, 0, args, None, mp=None)
    return loss, optimizer.grads


CASES = [
    ("vanilla", {}),
    ("mixup", {"alpha": 1.0}),
    ("cutmix", {"alpha": 1.0}),
    ("manifold_mixup", {"alpha": 2.0}),
    ("puzzlemix", {"workers": 0}),
    ("puzzlemix", {"workers": 0, "adv_p": 1.0}),  # adversarial PuzzleMix with both coins up: the noise path
    ("puzzlemix", {"workers": 0, "adv_p": 0.1}),
    ("puzzlemix", {"workers": 0, "clean_lam": 1.0}),  # the clean-input loss of the Tiny-ImageNet commands
]


@needs_reference
def test_same_initial_weights_and_output(ref):
    for stride, size in ((1, 32), (2, 64)):
        ours, theirs = _models(ref, seed=3, stride=stride, size=size)
        for mine, refs, name in _pairs(ours, theirs):
            assert torch.equal(mine.detach().flatten(), refs.detach().flatten()), name
        assert count_parameters(ours) == count_parameters(theirs)
        x = torch.randn(4, 3, size, size)
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@needs_reference
def test_learning_rate_of_every_epoch(ref):
    spec = RunSpec(method="vanilla", dataset="cifar100", epochs=1200, schedule="multistep",
                   milestones=[400, 800], lr=0.1).resolved()
    steps = 500
    opt = types.SimpleNamespace(param_groups=[{"lr": None}])
    for epoch in range(1200):
        want = ref.main.adjust_learning_rate(opt, epoch, [0.1, 0.1], [400, 800])
        for step in (epoch * steps, epoch * steps + steps - 1):
            assert spec.lr * lr_factor(step, spec, steps) == pytest.approx(want, rel=1e-12, abs=0), epoch


@needs_reference
@pytest.mark.parametrize("name, params", CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items() if k != "workers") or "default")
def test_one_step_equals_the_reference(ref, cpu_cuda, name, params):
    torch.set_num_threads(1)
    x, y, mean, std = _batch()
    for seed in range(4):  # several draws: grid sizes, boxes, mixing layers
        ours, theirs = _models(ref, seed=seed)
        method_params = get_method(name).default_params() | params
        loss_ours, log = _mixbench_step(name, params, ours, x, y, seed)
        loss_ref, grads = _reference_step(ref, name, method_params, theirs, x, y, mean, std, log)
        if not params.get("clean_lam"):  # the reference reports the mixed loss only; its clean term shows in the gradients
            assert abs(loss_ours.item() - loss_ref) <= 1e-5 * abs(loss_ref), (seed, loss_ours.item(), loss_ref)
        ref_grad = {id(p): g for p, g in zip(theirs.parameters(), grads)}
        for mine, refs, pname in _pairs(ours, theirs):
            want = ref_grad[id(refs)].reshape(mine.grad.shape)
            err = (mine.grad - want).abs().max().item()
            assert err <= 1e-4 * max(1.0, want.abs().max().item()), (seed, pname, err)
