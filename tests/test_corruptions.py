"""The corruption suite's algorithms: shape, dtype, determinism, damage growing with the severity, and
equality with the ``imagecorruptions`` package (Michaelis et al.) under its own ImageNet-C parameters."""
import os
import sys
import types

import numpy as np
import pytest
import torch

from mixbench import UsageError
from mixbench.evaluations.corruption import DEFAULT_CORRUPTIONS, corrupt
from mixbench.evaluations.corruption_ops import CORRUPTIONS, EXTRA_CORRUPTIONS, STANDARD_CORRUPTIONS, frost_dir


def scene(n=3, side=32, channels=3, seed=0):
    """Smooth colour gradients, a disk and a little texture: a fixed image with edges and flat parts."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    images = []
    for i in range(n):
        r = 0.5 + 0.35 * torch.sin(6 * xx + i)
        gr = yy * 0.7 + 0.15
        b = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).float() * 0.6 + 0.2
        images.append(torch.stack([r, gr, b][:channels]) + 0.05 * torch.rand(channels, side, side, generator=g))
    return (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)


def damage(out, images):
    return (out.float() - images.float()).abs().mean().item()


def test_the_full_cifar10c_set():
    assert STANDARD_CORRUPTIONS == [
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"]
    assert EXTRA_CORRUPTIONS == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    assert DEFAULT_CORRUPTIONS == STANDARD_CORRUPTIONS
    assert all(len(c.params) == 5 for c in CORRUPTIONS.values())


# CIFAR-10-C's own severity parameters do not order every corruption by pixel change: elastic_transform's
# severity 1 is a pure random affine map (2.6 px at 32 px) and later ones trade it for local warping; frost
# and glass blur change their weights/iterations unevenly; spatter is water at 1-3 and mud at 4-5; saturate
# removes colour at 1-2 and adds it at 3-5. For those every severity must damage the image.
NOT_MONOTONE = {"elastic_transform", "frost", "glass_blur", "spatter", "saturate"}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("side, channels", [(32, 3), (16, 1)])
def test_corruption_shape_dtype_determinism_and_damage(name, side, channels):
    if name == "frost":
        try:
            frost_dir()
        except UsageError as exc:
            pytest.skip(str(exc))
    images = scene(side=side, channels=channels)
    outs = [corrupt(images, name, s, seed=3) for s in range(1, 6)]
    assert all(o.dtype == torch.uint8 and o.shape == images.shape for o in outs)
    assert torch.equal(corrupt(images, name, 4, seed=3), outs[3])  # the same draws every time
    d = [damage(o, images) for o in outs]
    if name == "saturate" and channels == 1:
        assert d == [0.0] * 5  # no saturation to change in a grey image
    elif name in NOT_MONOTONE:
        assert min(d) > 0.3, d
    elif CORRUPTIONS[name].rng is None:
        assert all(b >= a - 0.1 for a, b in zip(d, d[1:])) and d[4] > d[0], d
    else:  # each severity has its own draws (fog's fractal, snow's flakes): a step may lose a little
        assert all(b >= 0.85 * a for a, b in zip(d, d[1:])) and d[4] > 1.5 * d[0], d
    if CORRUPTIONS[name].rng is not None:  # another seed, other draws
        assert not torch.equal(corrupt(images, name, 5, seed=4), outs[4])


def test_salt_gives_other_draws_and_by_hand_cases():
    images = scene()
    assert not torch.equal(corrupt(images, "snow", 3, 0), corrupt(images, "snow", 3, 0, salt=("batch", 256)))
    flat = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    assert torch.equal(corrupt(flat, "contrast", 5), flat)  # no contrast to reduce
    black = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    assert (corrupt(black, "brightness", 5) == round(0.3 * 255)).all()  # V = 0 + 0.3, grey


def test_frost_without_imagecorruptions_is_a_usage_error(monkeypatch):
    import importlib.util

    from mixbench.evaluate import check_options
    from mixbench.evaluations import corruption_ops

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imagecorruptions" else real(name, *a))
    monkeypatch.setattr(corruption_ops, "_FROST_CACHE", {})
    with pytest.raises(UsageError, match="pip install --no-deps imagecorruptions"):
        check_options("corruption", {"corruptions": ["frost"]})
    check_options("corruption", {"corruptions": ["fog"]})  # the others need nothing more


# ---------------------------------------------------------------------------
# Equality with imagecorruptions (its ImageNet-C parameters, images of >= 32 px)

SIDE = 40
IMAGENET = {  # imagecorruptions' parameters, in our algorithms' parameter forms
    "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [.03, .06, .09, 0.17, 0.27],
    "speckle_noise": [.15, .2, 0.35, 0.45, 0.6],
    "gaussian_blur": [1, 2, 3, 4, 6],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4, None), (0.8, 0.6, None), (0.7, 0.7, None), (0.65, 0.7, None), (0.6, 0.75, None)],
    "fog": [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    "contrast": [0.4, .3, .2, .1, .05],
    "brightness": [.1, .2, .3, .4, .5],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
    "jpeg_compression": [25, 18, 15, 10, 7],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    # alpha, sigma = 1% of the side, no affine step, displacements uniform in +-0.5% of the side
    "elastic_transform": [(250 * a, 0.01 * SIDE, 0, 0.005 * SIDE) for a in (0.05, 0.065, 0.085, 0.1, 0.12)],
}
TORCH_RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"}


@pytest.fixture(scope="module")
def ic():
    """imagecorruptions.corruptions, with the shims today's libraries need: its ``pkg_resources`` import
    (gone from recent setuptools), ``np.float_`` (gone in numpy 2) and skimage's ``multichannel=``
    (now ``channel_axis=-1``)."""
    mp = pytest.MonkeyPatch()
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda mod, rel: os.path.join(os.path.dirname(sys.modules[mod].__file__), rel)
            mp.setitem(sys.modules, "pkg_resources", shim)
    mp.setattr(np, "float_", np.float64, raising=False)
    try:
        import imagecorruptions.corruptions as module
    except ImportError as exc:
        mp.undo()
        pytest.skip(f"imagecorruptions is not importable ({exc}); pip install --no-deps imagecorruptions scikit-image")
    gaussian = module.gaussian

    def compatible(image, sigma=1, multichannel=None, **kw):
        if multichannel:
            kw["channel_axis"] = -1
        return gaussian(image, sigma=sigma, **kw)

    mp.setattr(module, "gaussian", compatible)
    yield module
    mp.undo()


def reference_image(seed):
    return _pixels_of(scene(n=1, side=SIDE, seed=seed))[0]


def _pixels_of(images):
    return images.permute(0, 2, 3, 1).numpy()


def ours(name, image, c, rng):
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return (CORRUPTIONS[name].fn(x, c, rng).clamp(0, 1) * 255)[0].permute(1, 2, 0).double().numpy()


def theirs(module, name, image, severity):
    from PIL import Image

    return np.clip(np.asarray(getattr(module, name)(Image.fromarray(image), severity), dtype=np.float64), 0, 255)


@pytest.mark.parametrize("name", sorted(set(IMAGENET) - TORCH_RANDOM))
def test_equal_to_imagecorruptions(ic, name):
    """Deterministic corruptions on the same image, random ones with the same numpy draws (the global RNG
    seeded for imagecorruptions, a RandomState with that seed for ours): equal to 2e-3 of a grey level
    (float32 against float64 arithmetic); pixelate and JPEG exactly (both PIL)."""
    for severity in range(1, 6):
        image = reference_image(severity)
        np.random.seed(100 + severity)
        want = theirs(ic, name, image, severity)
        got = ours(name, image, IMAGENET[name][severity - 1], np.random.RandomState(100 + severity))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=0, err_msg=f"{name} severity {severity}")


@pytest.mark.parametrize("name", sorted(TORCH_RANDOM))
def test_noise_statistics_match_imagecorruptions(ic, name):
    """Our noise is drawn from a torch generator, imagecorruptions' from numpy's: the same distribution,
    not the same draws. Compared: the mean and standard deviation of the change on a mid-grey image, and
    for impulse noise the share of pixels set to 0 or 255."""
    image = np.full((192, 192, 3), 128, dtype=np.uint8)
    image[::2] = 96
    for severity in (1, 3):
        np.random.seed(severity)
        want = theirs(ic, name, image, severity) - image
        got = ours(name, image, IMAGENET[name][severity - 1], torch.Generator().manual_seed(severity)) - image
        if name == "impulse_noise":
            share = lambda d: np.mean((d + image == 0) | (d + image == 255))  # noqa: E731
            assert share(got) == pytest.approx(share(want), abs=0.02)
        else:
            assert got.mean() == pytest.approx(want.mean(), abs=0.5)
            assert got.std() == pytest.approx(want.std(), rel=0.06)
