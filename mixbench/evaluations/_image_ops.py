"""Numpy/SciPy building blocks of the corruptions (:mod:`mixbench.evaluations.corruption_ops`): the
conversions between batches and images, skimage's Gaussian filter, the motion-blur kernel, the centre
zoom and the plasma fractal of ``imagecorruptions``."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _pixels(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats holding pixels / 255 -> (N, H, W, C) uint8."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) floats in [0, 1] -> (N, C, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()


def _gaussian(a: np.ndarray, sigma: float, axes: Sequence[int], mode: str = "nearest",
              truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian: scipy's Gaussian filter over ``axes`` only."""
    from scipy.ndimage import gaussian_filter

    sigmas = [sigma if i in axes else 0 for i in range(a.ndim)]
    return gaussian_filter(a, sigma=sigmas, mode=mode, truncate=truncate)


def _rgb2gray(rgb: np.ndarray) -> np.ndarray:
    return np.dot(rgb[..., :3], [0.2989, 0.5870, 0.1140])


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift by (dx, dy) pixels, repeating the edge row/column into the vacated border."""
    rows = np.clip(np.arange(image.shape[0]) - dy, 0, image.shape[0] - 1)
    cols = np.clip(np.arange(image.shape[1]) - dx, 0, image.shape[1] - 1)
    return image[rows][:, cols]


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """imagecorruptions' motion blur: a one-sided Gaussian kernel of width 2 radius + 1 along ``angle``
    (degrees), as a sum of edge-repeating shifts."""
    width = int(radius * 2 + 1)
    kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel = kernel / kernel.sum()
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    blurred = np.zeros_like(x, dtype=np.float32)
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break  # the motion left the image
        blurred = blurred + kernel[i] * _shift(x, dx, dy)
    return blurred


def _clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """The centre crop of side ceil(side / zoom), zoomed (linear, scipy) by ``zoom``; (H, W, C)."""
    from scipy.ndimage import zoom as scizoom

    ch0 = int(np.ceil(img.shape[0] / float(zoom)))
    top0 = (img.shape[0] - ch0) // 2
    ch1 = int(np.ceil(img.shape[1] / float(zoom)))
    top1 = (img.shape[1] - ch1) // 2
    return scizoom(img[top0:top0 + ch0, top1:top1 + ch1], (zoom, zoom, 1), order=1)


def _plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.RandomState) -> np.ndarray:
    """A diamond-square height map in [0, 1] of side ``mapsize`` (a power of two)."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squares = corners + np.roll(corners, shift=-1, axis=0)
        squares += np.roll(squares, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squares)
        dr = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()
