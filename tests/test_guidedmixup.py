"""GuidedMixup (guided_sr, guided_ap): pairing, masks and targets by hand, the method protocol, and the authors' code.

``GUIDEDMIXUP_REFERENCE=/path/to/GuidedMixup pytest tests/test_guidedmixup.py`` also runs the authors'
``spectral_residual.py``, ``pairing.pyx`` (compiled with pyximport into a temporary folder, or run as Python
with its ``cdef`` declarations stripped where no compiler is found) and the guided branch of ``mixup.py``'s
``mixup_process`` on the same inputs and draws, and checks saliency, pairing, mixed batch and targets.
"""
import importlib.util
import os
import re
import shutil
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.methods import create_method, input_gradient_saliency
from mixbench.methods import guidedmixup as gm
from method_checks import assert_same_seed_same_mix, linear_batch
from model_kinds import build

METHODS = ("guided_sr", "guided_ap")


def onecycle_cover_numpy(x: np.ndarray) -> np.ndarray:
    """The authors' ``onecycle_cover`` (pairing.pyx) transcribed to NumPy, for the always-running checks."""
    x = x.astype(np.float32).copy()
    n = x.shape[0]
    out = np.zeros(n, dtype=np.int64)
    np.fill_diagonal(x, -np.inf)
    k = int(np.argmax(x))
    row, col = k // n, k % n
    first = row
    out[row] = col
    x[:, row] = -np.inf
    for _ in range(n - 2):
        row = col
        col = int(np.argmax(x[row]))
        out[row] = col
        x[:, row] = -np.inf
    out[col] = first
    return out


def is_one_cycle(perm) -> bool:
    perm = [int(p) for p in perm]
    seen, i = set(), 0
    for _ in perm:
        seen.add(i)
        i = perm[i]
    return i == 0 and len(seen) == len(perm)


# -- the pure core --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17])
def test_greedy_pairing_is_the_authors_one_cycle(n):
    g = torch.Generator().manual_seed(n)
    for trial in range(4):
        if trial < 2:
            d = torch.rand(n, n, generator=g)
        else:  # many ties: first index wins, row-major for the start, as np.argmax
            d = torch.randint(0, 3, (n, n), generator=g).float()
        want = onecycle_cover_numpy(d.numpy())
        got = gm.greedy_pairing(d)
        assert got.dtype == torch.long and got.tolist() == want.tolist()
        assert is_one_cycle(got)
        if n >= 2:
            assert not bool((got == torch.arange(n)).any()), "a sample paired with itself"


def test_greedy_pairing_by_hand():
    # Farthest pair (0, 2) starts; from 2 the farthest unvisited is 1 (0 is visited); 1 closes on 0.
    d = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 2.0], [5.0, 2.0, 0.0]])
    assert gm.greedy_pairing(d).tolist() == [2, 0, 1]


@pytest.mark.parametrize("n, side", [(1, 4), (2, 5), (7, 6), (33, 16), (100, 32)])
def test_distances_are_the_full_l2_expression_bit_for_bit(n, side, monkeypatch):
    sc = torch.rand(n, side, side, generator=torch.Generator().manual_seed(n)) ** 3
    flat = sc.reshape(n, -1)
    full = (flat.unsqueeze(1) - flat.unsqueeze(0)).norm(dim=-1)  # the authors' distance_function
    assert torch.equal(gm.saliency_distances(sc), full)
    monkeypatch.setattr(gm, "_DISTANCE_CHUNK", 1)  # one row per block
    assert torch.equal(gm.saliency_distances(sc), full)
    exact = ((flat.double().unsqueeze(1) - flat.double().unsqueeze(0)) ** 2).sum(-1).sqrt()
    torch.testing.assert_close(full.double(), exact, rtol=1e-5, atol=1e-7)


def test_masks_targets_are_the_realised_shares():
    x, y, _ = linear_batch(7, side=12)
    sal = torch.rand(7, 12, 12, generator=torch.Generator().manual_seed(3)) ** 3
    mixed, target, perm, mask, ratio = gm.guided_mixup(x, y, sal)
    assert is_one_cycle(perm)
    torch.testing.assert_close(target.sum(1), torch.ones(7))
    sc = gm.smooth_saliency(sal)
    torch.testing.assert_close(sc.sum(dim=[1, 2]), torch.ones(7))
    torch.testing.assert_close(mask, sc / (sc + sc[perm]))
    # The mask recovered from the mixed pixels; its mean is the target weight of each sample.
    xa, xb = x, x[perm]
    realised = ((mixed - xb) / (xa - xb))[:, 0]
    torch.testing.assert_close(realised, mask, rtol=1e-3, atol=1e-3)
    labels, partner = y.argmax(1), y.argmax(1)[perm]
    for i in range(7):
        share = target[i, labels[i]] if labels[i] != partner[i] else None
        if share is not None:
            torch.testing.assert_close(share, mask[i].mean())
            torch.testing.assert_close(target[i, partner[i]], 1 - mask[i].mean())
    torch.testing.assert_close(ratio, mask.mean(dim=[1, 2]))
    assert bool((mask > 0).all() and (mask < 1).all())


def test_no_op_cases():
    x, y, _ = linear_batch(1)
    sal = torch.rand(1, 16, 16)
    mixed, target, perm, mask, ratio = gm.guided_mixup(x, y, sal)  # batch of 1: its own partner
    assert perm.tolist() == [0] and torch.equal(mixed, x) and torch.equal(target, y)
    x, y, _ = linear_batch(4)
    same = x[:1].expand(4, -1, -1, -1).contiguous()  # identical images: mixing changes no pixel
    mixed, _, _, _, _ = gm.guided_mixup(same, y, torch.rand(4, 16, 16))
    torch.testing.assert_close(mixed, same)


def test_zero_saliency_gives_no_nan():
    x, y, _ = linear_batch(3)
    sal = torch.zeros(3, 16, 16)
    sal[1, :4, :4] = 1.0  # one map with a small support (zero after the blur far away), two all-zero maps
    mixed, target, _, mask, _ = gm.guided_mixup(x, y, sal)
    assert torch.isfinite(mixed).all() and torch.isfinite(target).all() and torch.isfinite(mask).all()
    torch.testing.assert_close(target.sum(1), torch.ones(3))
    mixed, _, _, mask, _ = gm.guided_mixup(x, y, sal, blur=0)  # unblurred: pixels where both maps are 0
    assert torch.isfinite(mixed).all() and bool((mask == 0.5).any())


def test_spectral_residual_saliency_shapes_and_properties():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = gm.spectral_residual_saliency(x)
    assert s.shape == (3, 32, 32) and bool((s > 0).all())
    # Grey level only: a colour change that keeps the grey level keeps the map.
    w = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    shift = torch.tensor([1.0, -0.2989 / 0.587, 0.0]).view(1, 3, 1, 1)
    assert abs(float((w * shift).sum())) < 1e-6
    torch.testing.assert_close(gm.spectral_residual_saliency(x + 0.1 * shift), s, rtol=1e-3, atol=1e-4)
    assert gm.spectral_residual_saliency(x[:, :1]).shape == (3, 32, 32)  # one channel
    big = gm.spectral_residual_saliency(torch.randn(2, 3, 160, 144))  # resized to 128 and back
    assert big.shape == (2, 160, 144) and torch.isfinite(big).all()
    with pytest.raises(UsageError):
        gm.spectral_residual_saliency(torch.randn(2, 2, 8, 8))


def test_guided_ap_saliency_is_the_train_mode_input_gradient():
    model = build("preact")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = F.one_hot(torch.arange(4), 5).float()
    method = create_method("guided_ap")
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got, extra = method.saliency(model, x, y)
    assert extra is None and model.training
    # The authors' lines: train-mode forward, mean cross-entropy, backward, sqrt(mean_c grad^2).
    model.load_state_dict(state)
    xv = x.clone().requires_grad_(True)
    F.cross_entropy(model(xv), y.argmax(1)).backward()
    torch.testing.assert_close(got, torch.sqrt(torch.mean(xv.grad**2, dim=1)))
    model.zero_grad(set_to_none=True)
    clean = create_method("guided_ap", clean_lam=1.0)
    clean.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    _, extra = clean.saliency(model, x, y)
    assert extra is not None and extra.requires_grad


# -- the methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_methods_batch_sizes_targets_and_determinism(name, n):
    x, y, model = linear_batch(n)
    method = create_method(name, prob=1.0)
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    for _ in range(3):
        out = method(model, x, y)
        assert out.logits.shape == (n, 5)
        torch.testing.assert_close(out.target.sum(1), torch.ones(n))
    assert_same_seed_same_mix(name, model, x, y, prob=0.5)


@pytest.mark.parametrize("name", METHODS)
def test_prob_zero_is_a_no_op_and_the_coin(name):
    x, y, model = linear_batch(4)
    method = create_method(name, prob=0.0)
    method.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = method(model, x, y)
    assert torch.equal(out.target, y) and torch.equal(out.logits, model(x))
    # prob p: mixes when p >= u for the generator's uniform u, one draw per batch.
    method = create_method(name, prob=0.5)
    method.setup(seed=3, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    coins = np.random.default_rng(3).random(20)
    for u in coins:
        out = method(model, x, y)
        assert torch.equal(out.target, y) == bool(0.5 < u)


def test_random_condition_uses_the_drawn_permutation():
    x, y, model = linear_batch(6)
    method = create_method("guided_sr", prob=1.0, condition="random")
    method.setup(seed=5, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = method(model, x, y)
    rng = np.random.default_rng(5)
    rng.random()
    perm = torch.from_numpy(rng.permutation(6))
    _, target, _, _, _ = gm.guided_mixup(x, y, gm.spectral_residual_saliency(x), perm)
    assert torch.equal(out.target, target)


def test_defaults_and_bad_parameters():
    assert create_method("guided_sr").params() == dict(
        prob=0.5, condition="greedy", blur=7, blur_sigma=3.0, sr_blur=7, sr_sigma=3.0, sr_kernel_size=3)
    assert create_method("guided_ap").params() == dict(prob=0.8, condition="greedy", blur=7, blur_sigma=3.0,
                                                       clean_lam=0.0)
    for name, bad in [("guided_sr", dict(prob=1.5)), ("guided_ap", dict(condition="bruteforce")),
                      ("guided_sr", dict(blur=4)), ("guided_sr", dict(sr_kernel_size=2)),
                      ("guided_ap", dict(clean_lam=-1.0))]:
        with pytest.raises(UsageError):
            create_method(name, **bad)
    with pytest.raises(UsageError, match="saliency of shape"):
        gm.guided_mixup(torch.zeros(2, 3, 8, 8), torch.eye(2), torch.zeros(2, 4, 4))


# -- against the authors' code (only with a local copy of 3neutronstar/GuidedMixup) ------------

REFERENCE = os.environ.get("GUIDEDMIXUP_REFERENCE")
needs_reference = pytest.mark.skipif(not REFERENCE, reason="set GUIDEDMIXUP_REFERENCE to a checkout of "
                                                           "3neutronstar/GuidedMixup")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pairing_module(tmp):
    """The authors' pairing.pyx, compiled (pyximport, build files under ``tmp``) or run as Python."""
    src = os.path.join(REFERENCE, "pairing.pyx")
    try:
        import pyximport

        shutil.copy(src, tmp / "pairing.pyx")
        hooks = pyximport.install(setup_args={"include_dirs": np.get_include()}, build_dir=str(tmp / "build"),
                                  language_level=3)
        sys.path.insert(0, str(tmp))
        try:
            sys.modules.pop("pairing", None)
            import pairing  # noqa: F401
            return sys.modules.pop("pairing")
        finally:
            sys.path.remove(str(tmp))
            pyximport.uninstall(*hooks)
    except Exception:  # no Cython or no compiler: the same function as Python
        text = open(src).read()
        text = re.sub(r"^(#cython.*|cimport .*|np\.import_array\(\))$", "", text, flags=re.M)
        text = re.sub(r"^(\s*)cdef\s+(np\.ndarray\[[^\]]*\]|\w+)\s+", r"\1", text, flags=re.M)
        text = re.sub(r"np\.ndarray\[[^\]]*\]\s+", "", text)  # the argument's type
        module = types.ModuleType("pairing")
        exec(compile(text, src, "exec"), module.__dict__)
        return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pytest.importorskip("gco", reason="the authors' mixup.py imports gco (gco-wrapper)")
    pairing = _pairing_module(tmp_path_factory.mktemp("pairing"))
    saved = {k: sys.modules.get(k) for k in ("pairing", "comixup", "comixup.match")}
    sys.modules["pairing"] = pairing
    sys.path.insert(0, REFERENCE)
    try:
        mixup = _load("guidedmixup_reference_mixup", os.path.join(REFERENCE, "mixup.py"))
        sr = _load("guidedmixup_reference_sr", os.path.join(REFERENCE, "spectral_residual.py"))
    finally:
        sys.path.remove(REFERENCE)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return SimpleNamespace(mixup=mixup, sr=sr, onecycle_cover=pairing.onecycle_cover)


def _args(condition):
    return SimpleNamespace(mixup_alpha=None, in_batch=False, mean=None, std=None, box=False, graph=False, beta=1.2,
                           gamma=0.5, eta=0.2, neigh_size=4, n_labels=3, transport=True, t_eps=0.8, t_size=-1,
                           guided=True, condition=condition, comixup=False, block_num=None)


def _sr_reference(reference, x, monkeypatch):
    """The authors' SpectralResidual() on the CPU, with torchvision's pre-0.17 tensor resize (no antialiasing)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    sr = reference.sr.SpectralResidual(device="cpu")
    sr.resize = T.Resize((128, 128), antialias=False)
    monkeypatch.setattr(reference.sr, "TF", SimpleNamespace(resize=lambda img, size: TF.resize(
        img, size, antialias=False)))
    return sr.transform_spectral_residual(x)


@needs_reference
@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (5, 3, 16, 16), (3, 3, 64, 64), (2, 3, 144, 160)])
def test_spectral_residual_same_as_reference(reference, shape, monkeypatch):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x = F.avg_pool2d(x, 3, 1, 1)
    assert torch.equal(gm.spectral_residual_saliency(x), _sr_reference(reference, x, monkeypatch))


@needs_reference
@pytest.mark.parametrize("n", [2, 3, 8, 31, 100])
def test_greedy_pairing_same_as_reference(reference, n):
    g = torch.Generator().manual_seed(n)
    for sal in (torch.rand(n, 32, 32, generator=g) ** 3, torch.randint(0, 2, (n, 4, 4), generator=g).float() + 0.5):
        sc = gm.smooth_saliency(sal, 7 if sal.shape[-1] > 4 else 0)
        want = reference.mixup.pairing(sc.clone(), condition="greedy", distance_metric="l2")
        d = reference.mixup.distance_function(sc, sc, "l2")
        assert torch.equal(gm.saliency_distances(sc), d)
        assert gm.greedy_pairing(gm.saliency_distances(sc)).tolist() == [int(i) for i in want]
        assert [int(i) for i in reference.onecycle_cover(d.numpy().copy())] == onecycle_cover_numpy(d.numpy()).tolist()


@needs_reference
@pytest.mark.parametrize("condition", ["random", "greedy"])
@pytest.mark.parametrize("saliency_kind", ["sr", "ap"])
def test_mix_same_as_reference_mixup_process(reference, condition, saliency_kind, monkeypatch):
    """``mixup_process``'s guided branch against ``guided_mixup``: mixed batch and targets, bit for bit.

    The authors' ``--condition greedy`` calls ``pairing(condition='greedy_c')``, which falls through to a
    random permutation; for ``greedy`` the shim routes that call to the greedy branch (``onecycle_cover``).
    """
    n = 10
    g = torch.Generator().manual_seed(7)
    x = F.avg_pool2d(torch.randn(n, 3, 32, 32, generator=g), 3, 1, 1)
    y = F.one_hot(torch.randint(0, 100, (n,), generator=g), 100).float()
    if saliency_kind == "sr":
        sal = _sr_reference(reference, x, monkeypatch)
        assert torch.equal(sal, gm.spectral_residual_saliency(x))
    else:
        sal = torch.rand(n, 32, 32, generator=g) ** 4  # the shape of an input-gradient map
    if condition == "greedy":
        original = reference.mixup.pairing
        monkeypatch.setattr(reference.mixup, "pairing", lambda sc, condition, distance_metric: original(
            sc, condition="greedy", distance_metric=distance_metric))
    np.random.seed(11)
    want_x, want_t = reference.mixup.mixup_process(x.clone(), y.clone(), args=_args("greedy"), grad=sal.clone())
    if condition == "random":  # the draws of mixup_process: block_num, an unused permutation, the pairing
        np.random.seed(11)
        np.random.randint(1, 5)
        np.random.permutation(n)
        perm = torch.from_numpy(np.random.permutation(n))
    else:
        perm = None
    mixed, target, got_perm, _, _ = gm.guided_mixup(x, y, sal, perm)
    assert torch.equal(mixed, want_x)
    assert torch.equal(target, want_t)
    if condition == "greedy":
        assert is_one_cycle(got_perm)
