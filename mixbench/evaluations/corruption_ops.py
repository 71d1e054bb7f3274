"""The 19 corruptions of CIFAR-10-C / ImageNet-C as algorithms, and CIFAR-10-C's parameters for them.

Each corruption is ``fn(x, c, rng) -> tensor``: ``x`` float (N, C, H, W) in [0, 1] holding uint8 pixels
/ 255, ``c`` the parameter tuple of one severity, ``rng`` the random source (a ``torch.Generator`` for
the ones computed on whole batches in torch, a numpy ``RandomState`` for those computed per image with
numpy/scipy/OpenCV; ``None`` for deterministic ones). The result may leave [0, 1]: ``corrupt`` clamps
and quantises.

The algorithms are those of the ``imagecorruptions`` package (Michaelis et al. 2019, ImageNet-C
without ImageMagick: its motion blur kernel, its zoom, its snow and frost crops). With
``imagecorruptions``' own ImageNet-C parameters they give its results (tests/test_corruptions.py);
:data:`CIFAR_PARAMS` holds the CIFAR-10-C parameters of Hendrycks & Dietterich's ``make_cifar_c.py``.
Per-image random draws come from the ``RandomState`` in the order ``imagecorruptions`` draws from
``np.random`` (image after image). Deviations (all documented in the README):

- ``pixelate`` upsamples with NEAREST (imagecorruptions); make_cifar_c.py uses BOX both ways.
- ``motion_blur`` and ``snow`` use imagecorruptions' Gaussian shift kernel, not ImageMagick's.
- ``elastic_transform`` adds CIFAR-10-C's random affine step (imagecorruptions has none; with
  ``affine = 0`` the algorithm is imagecorruptions'); its CIFAR parameters scale with the image side.
- ``frost`` crops the frost photograph rescaled by ``scale`` x side / 32 (CIFAR-10-C: 0.2 at 32 px,
  cubic as in imagecorruptions, where make_cifar_c.py resizes bilinearly); ``scale=None`` is
  imagecorruptions' rule (1.1 x the size that covers the image).
- ``spatter`` leaves an image without liquid unchanged where imagecorruptions divides by zero.
- ``saturate`` leaves 1-channel images unchanged (as imagecorruptions' grey path does).
- Pixel-sized parameters (blur radii, glass-blur shifts) are CIFAR's, not rescaled for 16 or 28 px images.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.evaluations._image_ops import (
    _clipped_zoom,
    _gaussian,
    _motion_blur,
    _pixels,
    _plasma_fractal,
    _rgb2gray,
    _tensor,
)
from mixbench.evaluations.base import filter2d, gaussian_kernel1d

# ---------------------------------------------------------------------------
# noise (torch, whole batches)


def gaussian_noise(x, c, g):
    return x + torch.randn(x.shape, generator=g) * c


def shot_noise(x, c, g):
    return torch.poisson(x * c, generator=g) / c


def impulse_noise(x, c, g):
    hit = torch.rand(x.shape, generator=g) < c
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def speckle_noise(x, c, g):
    return x + x * torch.randn(x.shape, generator=g) * c


# ---------------------------------------------------------------------------
# blur


def gaussian_blur(x, c, g):
    k = gaussian_kernel1d(c)
    return filter2d(x, k[:, None] * k[None, :], "replicate")


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The anti-aliased disk kernel: a binary disk on a 17x17 grid (radius <= 8, else 2 radius + 1),
    normalised, then a 3x3 (5x5) Gaussian blur with reflected borders (OpenCV's GaussianBlur)."""
    r = 8 if radius <= 8 else int(radius)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    half = 1 if radius <= 8 else 2
    g = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / alias_blur) ** 2)
    g = (g / g.sum()).float()
    blurred = filter2d(disk[None, None], g[:, None] * g[None, :], "reflect")[0, 0]
    support = blurred.abs().sum(0) > 1e-12  # the all but zero border (Gaussian tails) adds nothing: cut
    k = max(int(support.nonzero().max()) - r, 1)
    return blurred[r - k:r + k + 1, r - k:r + k + 1]


def defocus_blur(x, c, g):
    return filter2d(x, _disk(*c), "reflect")


def glass_blur(x, c, rng):
    """Blur, shuffle pixels locally (each position takes a pixel up to ``delta`` away, in raster order from
    the bottom right, as the reference's in-place "swap" does), blur again. c = (sigma, delta, iterations)."""
    sigma, delta, iterations = c
    u = (_gaussian(_pixels(x) / 255.0, sigma, (1, 2)) * 255).astype(np.uint8)
    n, h, w = u.shape[:3]
    every = np.arange(n)
    for _ in range(iterations):
        for hh in range(h - delta, delta, -1):
            for ww in range(w - delta, delta, -1):
                d = rng.randint(-delta, delta, size=(n, 2))
                u[every, hh, ww] = u[every, hh + d[:, 1], ww + d[:, 0]]
    return _tensor(np.clip(_gaussian(u / 255.0, sigma, (1, 2)), 0, 1))


def motion_blur(x, c, rng):
    """c = (radius, sigma); one random angle in [-45, 45) degrees per image."""
    out = []
    for image in _pixels(x):
        angle = rng.uniform(-45, 45)
        out.append(np.clip(_motion_blur(image, c[0], c[1], angle), 0, 255) / 255.0)
    return _tensor(np.stack(out))


def zoom_blur(x, c, g):
    """The mean of the image and its centre zooms by every factor of ``np.arange(*c)`` (linear)."""
    h, w = x.shape[-2:]
    factors = np.arange(*c)
    out = torch.zeros_like(x)
    for z in factors:
        ch0, ch1 = int(np.ceil(h / float(z))), int(np.ceil(w / float(z)))
        top0, top1 = (h - ch0) // 2, (w - ch1) // 2
        crop = x[..., top0:top0 + ch0, top1:top1 + ch1]
        size = (int(round(ch0 * z)), int(round(ch1 * z)))  # scipy.ndimage.zoom's output shape
        zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)[..., :h, :w]
        out[..., :zoomed.shape[-2], :zoomed.shape[-1]] += zoomed
    return (x + out) / (len(factors) + 1)


# ---------------------------------------------------------------------------
# weather


def snow(x, c, rng):
    """c = (mean, std, zoom, threshold, blur radius, blur sigma, image weight)."""
    out = []
    for image in _pixels(x):
        im = image.astype(np.float32) / 255.0
        h, w = im.shape[:2]
        layer = rng.normal(size=(h, w), loc=c[0], scale=c[1])
        layer = _clipped_zoom(layer[..., np.newaxis], c[2])
        layer[layer < c[3]] = 0
        layer = np.clip(layer.squeeze(), 0, 1)
        layer = _motion_blur(layer, c[4], c[5], rng.uniform(-135, -45))
        layer = (np.round(layer * 255).astype(np.uint8) / 255.0)[..., np.newaxis][:h, :w, :]
        if im.shape[2] == 3:
            import cv2

            gray = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).reshape(h, w, 1)
        else:
            gray = im
        im = c[6] * im + (1 - c[6]) * np.maximum(im, gray * 1.5 + 0.5)
        snowed = im.astype(np.float64)
        snowed[:layer.shape[0], :layer.shape[1]] += layer + np.rot90(layer, k=2)
        out.append(np.clip(snowed, 0, 1))
    return _tensor(np.stack(out))


_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_FROST_CACHE: Dict[Tuple[int, Optional[float], int, int], np.ndarray] = {}
FROST_INSTALL = "pip install --no-deps imagecorruptions"


def frost_dir() -> Path:
    """The folder of frost photographs shipped by the ``imagecorruptions`` package (not imported: it
    needs scikit-image)."""
    import importlib.util

    spec = importlib.util.find_spec("imagecorruptions")
    folder = Path(list(spec.submodule_search_locations)[0]) / "frost" if spec and spec.submodule_search_locations \
        else None
    if folder is None or not (folder / _FROST_FILES[0]).exists():
        raise UsageError(f"the frost corruption needs the frost images of the imagecorruptions package: {FROST_INSTALL}")
    return folder


def _frost_image(idx: int, scale: Optional[float], h: int, w: int) -> np.ndarray:
    """Frost photograph ``idx`` (BGR uint8) rescaled (cubic): by ``scale`` x side / 32, or with
    ``scale=None`` by imagecorruptions' rule (1.1 x what covers the image)."""
    key = (idx, scale, h, w)
    if key not in _FROST_CACHE:
        import cv2

        frost = cv2.imread(str(frost_dir() / _FROST_FILES[idx]))
        fh, fw = frost.shape[:2]
        if scale is None:
            factor = 1.0
            if fh < h and fw >= w:
                factor = h / fh
            elif fh >= h and fw < w:
                factor = w / fw
            elif fh < h and fw < w:
                factor = max(h / fh, w / fw)
            factor *= 1.1
        else:
            factor = scale * max(h, w) / 32
        size = (int(np.ceil(fw * factor)), int(np.ceil(fh * factor)))
        _FROST_CACHE[key] = cv2.resize(frost, dsize=size, interpolation=cv2.INTER_CUBIC)
    return _FROST_CACHE[key]


def frost(x, c, rng):
    """c = (image weight, frost weight, frost scale); a random photograph (of the first five) and crop per image."""
    out = []
    for image in _pixels(x):
        h, w = image.shape[:2]
        frost_img = _frost_image(rng.randint(5), c[2], h, w)
        top, left = rng.randint(0, frost_img.shape[0] - h), rng.randint(0, frost_img.shape[1] - w)
        crop = frost_img[top:top + h, left:left + w]
        crop = crop[..., [2, 1, 0]] if image.shape[2] == 3 else _rgb2gray(crop)[..., np.newaxis]
        out.append(np.clip(c[0] * image + c[1] * crop, 0, 255) / 255.0)
    return _tensor(np.stack(out))


def fog(x, c, rng):
    """c = (amount, wibble decay); a plasma fractal per image, the size of the next power of two."""
    images = _pixels(x) / 255.0
    n, h, w = images.shape[:3]
    mapsize = 1 << (max(h, w, images.shape[3]) - 1).bit_length()
    out = []
    for image in images:
        max_val = image.max()
        fogged = image + c[0] * _plasma_fractal(mapsize, c[1], rng)[:h, :w][..., np.newaxis]
        out.append(np.clip(fogged * max_val / (max_val + c[0]), 0, 1))
    return _tensor(np.stack(out))


def spatter(x, c, rng):
    """c = (mean, std, sigma, threshold, intensity, mud): water drops (mud=0) or mud (mud=1)."""
    import cv2

    out = []
    for image in _pixels(x):
        im = image.astype(np.float32) / 255.0
        h, w, channels = im.shape
        liquid = rng.normal(size=(h, w), loc=c[0], scale=c[1])
        liquid = _gaussian(liquid, c[2], (0, 1))
        liquid[liquid < c[3]] = 0
        if c[5] == 0:
            liquid = (liquid * 255).astype(np.uint8)
            dist = 255 - cv2.Canny(liquid, 50, 150)
            dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
            dist = cv2.equalizeHist(dist)
            ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
            dist = cv2.filter2D(dist, cv2.CV_8U, ker)
            dist = cv2.blur(dist, (3, 3)).astype(np.float32)
            m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
            top = np.max(m, axis=(0, 1))
            m = np.divide(m, top, out=np.zeros_like(m), where=top > 0) * c[4]
            color = np.concatenate([v / 255.0 * np.ones_like(m[..., :1]) for v in (175, 238, 238)], axis=2)
            color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
            if channels == 3:
                result = cv2.cvtColor(np.clip(cv2.cvtColor(im, cv2.COLOR_BGR2BGRA) + m * color, 0, 1),
                                      cv2.COLOR_BGRA2BGR)
            else:
                add = _rgb2gray(cv2.cvtColor(np.clip(m * color, 0, 1), cv2.COLOR_BGRA2BGR))
                result = np.clip(im + add[..., np.newaxis], 0, 1)
        else:
            m = np.where(liquid > c[3], 1, 0)
            m = _gaussian(m.astype(np.float32), c[4], (0, 1))
            m[m < 0.8] = 0
            color = np.concatenate([v / 255.0 * np.ones((h, w, 1)) for v in (63, 42, 20)], axis=2)
            color *= m[..., np.newaxis]
            im = im * (1 - m[..., np.newaxis])
            result = np.clip(im + (color if channels == 3 else _rgb2gray(color)[..., np.newaxis]), 0, 1)
        out.append(result.reshape(h, w, channels))
    return _tensor(np.stack(out))


# ---------------------------------------------------------------------------
# digital


def contrast(x, c, g):
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def brightness(x, c, g):
    """Add ``c`` to the HSV value: RGB scales with V at fixed hue and saturation; black becomes grey ``c``."""
    v = x.amax(dim=1, keepdim=True)
    scaled = x * ((v + c).clamp(max=1) / v.clamp(min=1e-12))
    return torch.where(v > 0, scaled, torch.full_like(x, min(c, 1.0)))


def saturate(x, c, g):
    """HSV saturation ``S * c[0] + c[1]`` (clipped to [0, 1]) at fixed hue and value; a grey pixel
    (hue 0) turns red-ish when ``c[1] > 0``. 1-channel images are unchanged."""
    if x.shape[1] != 3:
        return x
    x = x.double()
    v = x.amax(dim=1, keepdim=True)
    lo = x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - lo) / v.clamp(min=1e-300), torch.zeros_like(v))
    s_new = (s * c[0] + c[1]).clamp(0, 1)
    coloured = v - (v - x) * (s_new / s.clamp(min=1e-300))
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)  # hue 0: (V, V(1-S), V(1-S))
    return torch.where(s > 0, coloured, grey).float()


def jpeg_compression(x, c, g):
    from PIL import Image

    out = []
    for image in _pixels(x):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="JPEG", quality=c)
        out.append(np.asarray(Image.open(buf)).reshape(image.shape))
    return _tensor(np.stack(out) / 255.0)


def pixelate(x, c, g):
    """PIL: BOX down to ``int(side * c)``, NEAREST back up."""
    from PIL import Image

    out = []
    for image in _pixels(x):
        h, w = image.shape[:2]
        im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        im = im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.NEAREST)
        out.append(np.asarray(im).reshape(image.shape))
    return _tensor(np.stack(out) / 255.0)


def elastic_transform(x, c, rng):
    """c = (alpha, sigma, affine, max_delta), in pixels: with ``affine > 0`` first a random affine map moving
    three points by up to ``affine`` (CIFAR-10-C), then a displacement field uniform in +-``max_delta``,
    smoothed (Gaussian ``sigma``, reflected, truncated at 3 sigma) and scaled by ``alpha``; linear,
    reflected borders."""
    import cv2
    from scipy.ndimage import map_coordinates

    alpha, sigma, affine, max_delta = c
    out = []
    for image in _pixels(x):
        im = image.astype(np.float32) / 255.0
        shape = im.shape
        if affine > 0:
            center = np.float32(shape[:2]) // 2
            square = min(shape[:2]) // 3
            pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
            pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
            warped = cv2.warpAffine(im, cv2.getAffineTransform(pts1, pts2), shape[1::-1],
                                    borderMode=cv2.BORDER_REFLECT_101)
            im = warped.reshape(shape)
        dx = (_gaussian(rng.uniform(-max_delta, max_delta, size=shape[:2]), sigma, (0, 1), "reflect", 3)
              * alpha).astype(np.float32)[..., np.newaxis]
        dy = (_gaussian(rng.uniform(-max_delta, max_delta, size=shape[:2]), sigma, (0, 1), "reflect", 3)
              * alpha).astype(np.float32)[..., np.newaxis]
        xx, yy, zz = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
        indices = np.reshape(yy + dy, (-1, 1)), np.reshape(xx + dx, (-1, 1)), np.reshape(zz, (-1, 1))
        out.append(np.clip(map_coordinates(im, indices, order=1, mode="reflect").reshape(shape), 0, 1))
    return _tensor(np.stack(out))


# ---------------------------------------------------------------------------
# the parameters


@dataclass(frozen=True)
class PerSide:
    """Parameters given as fractions of a side of ``reference`` pixels, scaled to the image's side."""

    values: Tuple[float, ...]
    scaled: Tuple[bool, ...]
    reference: int = 32

    def resolve(self, side: int) -> Tuple[float, ...]:
        return tuple(v * side / self.reference if s else v for v, s in zip(self.values, self.scaled))


def _elastic(alpha: float, sigma: float, affine: float) -> PerSide:
    # make_cifar_c.py: (IMSIZE * a, IMSIZE * b, IMSIZE * c) with IMSIZE 32, displacement uniform in +-1
    return PerSide((32 * alpha, 32 * sigma, 32 * affine, 1.0), (True, True, True, False))


@dataclass(frozen=True)
class Corruption:
    fn: Callable[..., torch.Tensor]
    params: Sequence[Any]  # severities 1..5
    rng: Optional[str]  # "torch", "numpy" or None (deterministic)


# name -> the algorithm, CIFAR-10-C's parameters (make_cifar_c.py) for severities 1..5, its random source.
# The 15 standard corruptions in ImageNet-C's order, then the 4 extra (validation) ones.
CORRUPTIONS: Dict[str, Corruption] = {
    "gaussian_noise": Corruption(gaussian_noise, [0.04, 0.06, 0.08, 0.09, 0.10], "torch"),
    "shot_noise": Corruption(shot_noise, [500, 250, 100, 75, 50], "torch"),
    "impulse_noise": Corruption(impulse_noise, [0.01, 0.02, 0.03, 0.05, 0.07], "torch"),
    "defocus_blur": Corruption(defocus_blur, [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)], None),
    "glass_blur": Corruption(glass_blur, [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)], "numpy"),
    "motion_blur": Corruption(motion_blur, [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)], "numpy"),
    "zoom_blur": Corruption(zoom_blur, [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01),
                                        (1, 1.26, 0.01)], None),
    "snow": Corruption(snow, [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                              (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                              (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)], "numpy"),
    "frost": Corruption(frost, [(1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2), (0.75, 0.45, 0.2)],
                        "numpy"),
    "fog": Corruption(fog, [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)], "numpy"),
    "brightness": Corruption(brightness, [0.05, 0.1, 0.15, 0.2, 0.3], None),
    "contrast": Corruption(contrast, [0.75, 0.5, 0.4, 0.3, 0.15], None),
    "elastic_transform": Corruption(elastic_transform, [_elastic(0, 0, 0.08), _elastic(0.05, 0.2, 0.07),
                                                        _elastic(0.08, 0.06, 0.06), _elastic(0.1, 0.04, 0.05),
                                                        _elastic(0.1, 0.03, 0.03)], "numpy"),
    "pixelate": Corruption(pixelate, [0.95, 0.9, 0.85, 0.75, 0.65], None),
    "jpeg_compression": Corruption(jpeg_compression, [80, 65, 58, 50, 40], None),
    # the extra (validation) corruptions
    "speckle_noise": Corruption(speckle_noise, [0.06, 0.1, 0.12, 0.16, 0.2], "torch"),
    "gaussian_blur": Corruption(gaussian_blur, [0.4, 0.6, 0.7, 0.8, 1.0], None),
    "spatter": Corruption(spatter, [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                                    (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                                    (0.65, 0.1, 0.5, 0.68, 0.6, 1)], "numpy"),
    "saturate": Corruption(saturate, [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)], None),
}
STANDARD_CORRUPTIONS: List[str] = list(CORRUPTIONS)[:15]
EXTRA_CORRUPTIONS: List[str] = list(CORRUPTIONS)[15:]
