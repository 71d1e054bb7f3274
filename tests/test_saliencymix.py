"""SaliencyMix: the box rule, the label weights, the method's draws, and equality with the authors' code.

``SALIENCYMIX_REFERENCE=/path/to/SaliencyMix pytest tests/test_saliencymix.py`` also runs the
reference's own ``saliency_bbox`` and mixing branch (read from ``SaliencyMix_CIFAR/saliencymix.py``)
on the same batches and draws.
"""
import ast
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbench.methods import create_method, get_method
from mixbench.methods import saliencymix as sm

pytestmark = pytest.mark.skipif(not get_method("saliencymix").available(),
                                reason="OpenCV's contrib saliency module is not installed")


class FixedMap:
    """A stand-in detector that returns a given saliency map."""

    def __init__(self, saliency):
        self.saliency = saliency

    def computeSaliency(self, image):
        return True, self.saliency


def linear(k=5, side=16, channels=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * side * side, k))


@pytest.mark.parametrize("lam, peak, box", [
    (0.75, (8, 8), (4, 12, 4, 12)),    # side int(16 * 0.5) = 8, centred on the peak
    (0.75, (1, 15), (0, 5, 11, 16)),   # clipped at the top and the right
    (0.0, (3, 3), (0, 11, 0, 11)),     # the whole side, clipped
    (1.0, (5, 9), (5, 5, 9, 9)),       # lam 1: an empty box
])
def test_box_hand_computed(lam, peak, box):
    assert sm.saliency_box(16, 16, lam, peak) == box


def test_peak_is_the_first_maximum_of_the_uint8_map():
    saliency = np.zeros((4, 5), np.float32)
    saliency[3, 4] = 1.0      # 255
    saliency[1, 2] = 0.9999   # 254 after the uint8 cast
    assert sm.saliency_peak(np.zeros((4, 5, 3), np.float32), FixedMap(saliency)) == (3, 4)
    saliency[3, 4] = 0.9962   # 254 too: now the first 254 in row-major order wins
    assert sm.saliency_peak(np.zeros((4, 5, 3), np.float32), FixedMap(saliency)) == (1, 2)


def test_peak_of_opencv_map_on_real_images():
    g = torch.Generator().manual_seed(3)
    for shape in [(3, 32, 32), (1, 28, 28), (3, 16, 16)]:
        image = sm.image_for_saliency(torch.randn((2,) + shape, generator=g), 1)
        assert image.shape == shape[1:] + shape[:1] and image.dtype == np.float32
        ok, saliency = sm.saliency_detector().computeSaliency(image)
        row, col = sm.saliency_peak(image)
        assert ok and saliency.shape == shape[1:]
        assert (saliency * 255).astype(np.uint8)[row, col] == (saliency * 255).astype(np.uint8).max()


def test_labels_weigh_the_realised_area_and_lam_one_is_a_no_op():
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([4, 0, 1, 2, 3])
    mixed, lam = sm.saliencymix(x, perm, 0.6, (14, 2))  # side int(16 * sqrt(.4)) = 10, clipped to 7 x 7
    assert lam == pytest.approx(1 - 7 * 7 / 256)
    assert (mixed != x).float().mean().item() == pytest.approx(1 - lam)
    assert torch.equal(mixed[:, :, 9:16, 0:7], x[perm][:, :, 9:16, 0:7])
    same, lam1 = sm.saliencymix(x, perm, 1.0, (7, 7))
    assert lam1 == 1.0 and torch.equal(same, x)


def run(method, x, y, model=None):
    model = model or linear(y.shape[1], x.shape[-1], x.shape[1])
    return method(model, x, y)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_batch_sizes_seeded_and_soft_targets(n):
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
    y = F.one_hot(torch.arange(n) % 5, 5).float()
    outs = []
    for _ in range(2):
        m = create_method("saliencymix", prob=1.0)
        m.setup(seed=11, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
        outs.append([run(m, x, y) for _ in range(3)])
    for a, b in zip(*outs):
        assert a.logits.shape == (n, 5)
        torch.testing.assert_close(a.target.sum(1), torch.ones(n))
        assert torch.equal(a.logits, b.logits) and torch.equal(a.target, b.target)


def test_draws_follow_the_seeded_generator():
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = F.one_hot(torch.arange(6) % 5, 5).float()
    model = linear()
    m = create_method("saliencymix")  # prob 0.5: coin, then lam and perm when the coin says mix
    m.setup(seed=4, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(4)
    mixed_batches = 0
    with torch.no_grad():
        for _ in range(12):
            out = m(model, x, y)
            if rng.random() >= 0.5:
                assert torch.equal(out.target, y) and torch.equal(out.logits, model(x))
                continue
            mixed_batches += 1
            lam = float(rng.beta(1.0, 1.0))
            perm = rng.permutation(6)
            peak = sm.saliency_peak(sm.image_for_saliency(x, int(perm[0])))
            perm = torch.from_numpy(perm)
            want, lam = sm.saliencymix(x, perm, lam, peak)
            torch.testing.assert_close(out.logits, model(want))
            torch.testing.assert_close(out.target, lam * y + (1 - lam) * y[perm])
    assert 0 < mixed_batches < 12


def test_prob_zero_never_mixes_and_the_detector_is_reused():
    x = torch.randn(3, 3, 16, 16)
    y = torch.eye(5)[:3]
    m = create_method("saliencymix", prob=0.0)
    m.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(run(m, x, y).target, y)
    m = create_method("saliencymix", prob=1.0)
    m.setup(seed=0, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    run(m, x, y)
    detector = m._detector
    run(m, x, y)
    assert detector is not None and m._detector is detector


def test_missing_opencv_contrib_is_reported(monkeypatch):
    monkeypatch.setattr(sm, "_saliency_module", lambda: None)
    cls = get_method("saliencymix")
    assert not cls.available()
    assert "pip install opencv-contrib-python-headless" in cls.unavailable_reason()
    with pytest.raises(RuntimeError, match="opencv-contrib-python-headless"):
        sm.saliency_detector()


# -- equality with the authors' code ----------------------------------------------------

REFERENCE = os.environ.get("SALIENCYMIX_REFERENCE")


def reference_code():
    """The reference's ``saliency_bbox`` and the mixing branch of its training loop, compiled."""
    path = Path(REFERENCE) / "SaliencyMix_CIFAR" / "saliencymix.py"
    tree = ast.parse(path.read_text())
    bbox = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "saliency_bbox")
    branch = next(n for n in ast.walk(tree) if isinstance(n, ast.If) and "salmix_prob" in ast.unparse(n.test))
    return (compile(ast.Module([bbox], []), str(path), "exec"),
            compile(ast.Module([branch], []), str(path), "exec"))


@pytest.mark.skipif(not REFERENCE, reason="set SALIENCYMIX_REFERENCE to a checkout of afm-shahab-uddin/SaliencyMix")
@pytest.mark.parametrize("side, n, seed", [(32, 8, 0), (32, 5, 1), (16, 4, 2), (32, 1, 3), (28, 6, 4)])
def test_matches_reference(monkeypatch, side, n, seed):
    bbox_code, branch_code = reference_code()
    queue = {}
    monkeypatch.setattr(np, "int", int, raising=False)  # the reference uses np.int (gone in NumPy >= 1.24)
    monkeypatch.setattr(np.random, "rand", lambda *shape: np.array([queue["r"]]))
    monkeypatch.setattr(np.random, "beta", lambda a, b: queue["lam"])
    monkeypatch.setattr(torch, "randperm", lambda k: queue["perm"].clone())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)

    g = torch.Generator().manual_seed(seed)
    # normalised images with some structure (smoothed noise), so the saliency peak is not trivial
    x = F.avg_pool2d(torch.randn(n, 3, side + 4, side + 4, generator=g), 5, stride=1) * 3
    labels = torch.arange(n) % 10
    y = F.one_hot(labels, 10).float()

    m = create_method("saliencymix", prob=0.5)
    m.setup(seed=seed, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(seed)  # the method's draws, to feed the reference the same ones
    seen = []
    model = linear(10, side)
    for _ in range(10):
        r = rng.random()
        mixes = r < 0.5
        if mixes:
            queue.update(r=r, lam=float(rng.beta(1.0, 1.0)), perm=torch.from_numpy(rng.permutation(n)))
        else:
            queue.update(r=r)
        ns = {"np": np, "torch": torch, "cv2": __import__("cv2"), "args": types.SimpleNamespace(beta=1.0, salmix_prob=0.5),
              "images": x.clone(), "labels": labels.clone(), "cnn": CNNStub(),
              "criterion": lambda pred, t: torch.zeros(())}
        exec(bbox_code, ns)
        ns["r"] = np.random.rand(1)  # the loop's coin, just before the branch
        exec(branch_code, ns)
        with torch.no_grad():
            out = m(model, x, y)
        torch.testing.assert_close(out.logits, model(ns["images"]), rtol=0, atol=0)
        if mixes:
            lam = ns["lam"]
            want = lam * y + (1 - lam) * y[queue["perm"]]
            torch.testing.assert_close(out.target, want, rtol=0, atol=1e-6)
            seen.append((lam, ns["bbx1"], ns["bby1"], ns["bbx2"], ns["bby2"]))
        else:
            assert torch.equal(out.target, y)
    assert seen and any(s[0] < 1 for s in seen)
    assert len({s[1:] for s in seen}) > 1, "the boxes should differ between batches"


class CNNStub:
    def zero_grad(self):
        pass

    def __call__(self, images):
        return torch.zeros(images.shape[0], 10)
