"""PuzzleMix (Kim, Choo, Song, ICML 2020, arXiv 2009.06962).

Each sample is mixed with a partner from a random permutation of the batch
through a block mask found by a graph cut, after the salient blocks of both
images have been moved (transported) to where the mask shows them:

1. Saliency: the gradient of the clean batch's cross-entropy with respect to
   the input only, with the model in eval mode (train mode with ``clean_lam > 0``);
   ``saliency = sqrt(mean_c grad^2)``, one map (H, W) per image.
2. Per batch: a grid of ``block_num`` blocks per side drawn uniformly from
   ``grid_sizes``, ``lam ~ Beta(alpha, alpha)`` and one permutation.
3. Mask: per sample, a labelling of the grid with ``n_labels`` mixing levels
   minimising unary terms (the saliency each image loses, plus a prior that
   pulls the mean label towards ``lam``, weight ``eta``), a label smoothness
   term (``beta``) and a data-local term (``gamma``: how much the two images
   disagree across a block border, pooled over ``neigh_size`` pixels). It is
   solved with alpha-beta swap by the gco-wrapper package (import name ``gco``).
4. Transport: in ``t_size``-pixel blocks, each image's salient blocks are moved
   to the places where the mask shows that image, by the authors' greedy
   assignment (cost ``t_eps * squared distance - saliency``).
5. Each sample's target weight is the mean of its final mask.

Optionally a random-start FGSM perturbation is added to either image with
probability ``adv_p`` (``adv_eps`` in units of the pixel range), and
``clean_lam > 0`` adds a clean-input loss (the saliency forward pass is then
made in train mode and its loss is returned as the extra loss term).

``puzzle_mix`` is the pure core (no randomness inside) with the arguments of
the authors' ``mixup_graph`` (snu-mllab/PuzzleMix, mixup.py); on identical
inputs it gives the same masks and mixed images. Faster than that code:

- the graph cuts of a batch run in parallel in a pool of worker processes
  (:class:`GraphCutPool`) that lives as long as the method (``close()`` ends
  it); the integer graph-cut costs are computed for the whole batch at once;
- the transport is vectorised on the training device with O(N n^2) work per
  assignment round beyond one arg-min over the cost matrix (the reference
  builds and multiplies several dense (N, n^2, n^2) plans per round), and
  moves blocks by a gather instead of a matrix product; cost matrices are
  built once per grid size and device.

Defaults are the reference's CIFAR-100 command for (plain) PuzzleMix with
PreActResNet-18 (``--mixup_alpha 1.0 --graph True --n_labels 3 --eta 0.2 --beta
1.2 --gamma 0.5 --neigh_size 4 --transport True --t_size 4 --t_eps 0.8``; the
reference's ``--adv_p`` defaults to 0, no clean-input loss). Adversarial PuzzleMix
is ``adv_p=0.1`` (``adv_eps`` stays 10/255), the reference's second command.

Image sides: grid sizes that do not divide the image side are left out of the
draw. At 16x16 (the ``digits`` data set) the 16-block grid has one pixel per
block, which is what the reference does with a 16x16 input (``neigh_size`` and
``t_size`` shrink to the block size, as in the reference). Sides that are not a
power of two (28x28 Fashion-MNIST: blocks of 14 and 7 pixels) take the largest
divisor of the block size not above ``neigh_size`` for the pairwise term, where
the reference would fail; wherever the reference runs the value is its own.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError

from ._pool import ChunkPool, chunk_bounds, default_workers
from ._registry import MixMethod, MixOutput, input_gradient_saliency, mix_targets, register_method


def install_hint(method: str = "puzzlemix") -> str:
    """The one-line reason why ``method`` (a graph-cut method) is unavailable without gco."""
    return (
        f"{method} needs the graph-cut package gco-wrapper (import name gco), which could not be imported; "
        "install it with `pip install gco-wrapper` (binary wheels exist for CPython 3.9-3.11 on x86-64 "
        "Linux, macOS and Windows; elsewhere it builds from source and needs a C++ compiler)"
    )


INSTALL_HINT = install_hint("puzzlemix")


def gco_available() -> bool:
    """Whether the graph-cut package can be imported."""
    try:
        import gco  # noqa: F401
    except ImportError:
        return False
    return True


def _import_gco(method: str = "puzzlemix"):
    try:
        import gco
    except ImportError as exc:
        raise UsageError(f"{install_hint(method)} ({exc})") from None
    return gco


# ---------------------------------------------------------------------------
# Graph cut


def _cut_chunk(unary: np.ndarray, pw_v: np.ndarray, pw_h: np.ndarray, smooth: np.ndarray) -> np.ndarray:
    """Alpha-beta swap on a chunk of grids: int32 costs in, labels (k, n*n) out. Runs in worker processes."""
    gco = _import_gco()
    return np.stack([
        gco.cut_grid_graph(unary[i], smooth, pw_v[i], pw_h[i], algorithm="swap") for i in range(len(unary))
    ])


class GraphCutPool(ChunkPool):
    """The shared :class:`~._pool.ChunkPool` applied to graph cuts: a batch is cut in contiguous chunks.

    ``workers`` processes plus the calling process each take a chunk of the
    batch. Batches whose grids are smaller than ``min_grid`` are solved in the
    calling process (their cuts take less than the round trip).
    """

    def __init__(self, workers: int, min_grid: int = 8):
        super().__init__(workers, name="puzzlemix", preload=[__name__])
        self.min_grid = min_grid

    def solve(self, unary: np.ndarray, pw_v: np.ndarray, pw_h: np.ndarray, smooth: np.ndarray) -> np.ndarray:
        n, grid = unary.shape[0], unary.shape[1]
        if self.workers == 0 or grid < self.min_grid or n < 2:
            return _cut_chunk(unary, pw_v, pw_h, smooth)
        bounds = chunk_bounds(n, self.workers + 1)
        chunks = [(unary[a:b], pw_v[a:b], pw_h[a:b], smooth) for a, b in zip(bounds[:-1], bounds[1:])]
        return np.concatenate(self.run(_cut_chunk, chunks))


def _neigh_penalty(a: torch.Tensor, b: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean |a - b| across each block border (a on the upper/left side), pooled along the border."""
    v = (a[:, :, :-1, :] - b[:, :, 1:, :])[:, :, k - 1 :: k, :]
    h = (a[:, :, :, :-1] - b[:, :, :, 1:])[:, :, :, k - 1 :: k]
    return F.avg_pool2d(v.abs().mean(1), kernel_size=(1, k)), F.avg_pool2d(h.abs().mean(1), kernel_size=(k, 1))


def block_saliency(saliency: torch.Tensor, block_size: int) -> torch.Tensor:
    """Saliency (N, H, W) pooled over blocks and normalised to sum 1 per sample.

    Deviation: a sample whose saliency is all zero (its loss gradient vanished,
    e.g. a confidently right prediction late in training) gets a uniform
    distribution; the reference divides 0 by 0 and hands NaN to the graph cut.
    """
    pooled = F.avg_pool2d(saliency, block_size)
    total = pooled.reshape(pooled.shape[0], -1).sum(1).reshape(-1, 1, 1)  # the reference's reduction order
    uniform = torch.full_like(pooled, 1.0 / pooled[0].numel())
    return torch.where(total > 0, pooled / total.clamp_min(torch.finfo(pooled.dtype).tiny), uniform)


def graph_cut_costs(
    x: torch.Tensor,
    saliency: torch.Tensor,
    perm: torch.Tensor,
    lam: float,
    block_num: int,
    *,
    mean=None,
    std=None,
    beta: float = 1.2,
    gamma: float = 0.5,
    eta: float = 0.2,
    neigh_size: int = 4,
    n_labels: int = 3,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every sample's integer graph-cut problem: unaries (N, n, n, L), vertical and horizontal edge weights, label cost.

    Label l shows the sample's own image with weight ``1 - l / (L - 1)``. The
    arithmetic follows the reference step by step (float32 on the device,
    float64 for the integer conversion), so the integers are the same.
    """
    n, _, _, width = x.shape
    block_num = int(block_num)
    block_size = width // block_num
    # The reference takes min(neigh_size, block_size), which must divide the block (it does for the
    # power-of-two sides it supports). Other sides (28 px: blocks of 14 and 7) use the largest divisor
    # of the block size not above that: the same value wherever the reference runs.
    neigh_size = max(d for d in range(1, min(neigh_size, block_size) + 1) if block_size % d == 0)
    beta = float(beta) / block_num / 16
    mean, std = _stats(x, mean, std)

    unary_own = block_saliency(saliency, block_size)
    unary_partner = unary_own[perm]

    img_own = F.avg_pool2d(x * std + mean, neigh_size)
    img_partner = img_own[perm]
    k = block_size // neigh_size
    scale = beta * gamma
    # [a][b]: the upper/left block shows image a, the lower/right one image b (0: partner, 1: own).
    imgs = (img_partner, img_own)
    pv, ph = {}, {}
    for a in (0, 1):
        for b in (0, 1):
            v, h = _neigh_penalty(imgs[a], imgs[b], k)
            pv[a, b], ph[a, b] = scale * v, scale * h

    # Fold the label-dependent part of the pairwise term into the unaries (as the reference does).
    # cost_own: the cost of showing the sample's own image in a block (the partner's saliency lost
    # there), cost_partner: the cost of showing the partner.
    cost_own, cost_partner = unary_partner.clone(), unary_own.clone()
    cost_own[:, :-1, :] += (pv[1, 0] + pv[1, 1]) / 2.0
    cost_partner[:, :-1, :] += (pv[0, 1] + pv[0, 0]) / 2.0
    cost_own[:, 1:, :] += (pv[0, 1] + pv[1, 1]) / 2.0
    cost_partner[:, 1:, :] += (pv[1, 0] + pv[0, 0]) / 2.0
    cost_own[:, :, :-1] += (ph[1, 0] + ph[1, 1]) / 2.0
    cost_partner[:, :, :-1] += (ph[0, 1] + ph[0, 0]) / 2.0
    cost_own[:, :, 1:] += (ph[0, 1] + ph[1, 1]) / 2.0
    cost_partner[:, :, 1:] += (ph[1, 0] + ph[0, 0]) / 2.0
    pw_v = (pv[1, 0] + pv[0, 1] - pv[1, 1] - pv[0, 0]) / 2
    pw_h = (ph[1, 0] + ph[0, 1] - ph[1, 1] - ph[0, 0]) / 2
    cost_own, cost_partner, pw_v, pw_h = _to_host(cost_own, cost_partner, pw_v, pw_h)

    # Integer costs. The dtypes follow the reference's numpy expressions: the unaries are combined in
    # float64, the edge weights in float32 (Python scalars do not promote a float32 array).
    lam, large = float(lam), 1000 * block_num**2
    if n_labels == 2:
        probs = [lam, 1 - lam]
    elif n_labels == 3:
        probs = [lam**2, 2 * lam * (1 - lam), (1 - lam) ** 2]
    elif n_labels == 4:
        probs = [lam**3, 3 * lam**2 * (1 - lam), 3 * lam * (1 - lam) ** 2, (1 - lam) ** 3]
    else:
        raise UsageError(f"puzzlemix n_labels must be 2, 3 or 4, got {n_labels!r}")
    # Label l shows the own image with weight 1 - l / (L - 1); its prior is -log P(l) under Binomial(L - 1, 1 - lam).
    prior = eta * np.array([-np.log(p + 1e-8) for p in probs]) / block_num**2
    levels = np.linspace(0, 1, n_labels)
    unary = (1 - levels) * cost_own.astype(np.float64)[..., None] + levels * cost_partner.astype(np.float64)[..., None]
    unary = (large * (unary + prior)).astype(np.int32)
    pw_v = (large * (pw_v + beta)).astype(np.int32)
    pw_h = (large * (pw_h + beta)).astype(np.int32)
    idx = np.arange(n_labels)
    smooth = ((idx[:, None] - idx[None, :]) ** 2 / (n_labels - 1) ** 2).astype(np.float32)
    return unary, pw_v, pw_h, smooth


def _to_host(*tensors: torch.Tensor) -> Tuple[np.ndarray, ...]:
    """The tensors as numpy arrays, in one device-to-host copy when they share a dtype (the same values)."""
    if len({t.dtype for t in tensors}) != 1:
        return tuple(t.detach().cpu().numpy() for t in tensors)
    n = tensors[0].shape[0]
    flat = torch.cat([t.detach().reshape(n, -1) for t in tensors], 1).cpu().numpy()
    out, start = [], 0
    for t in tensors:
        size = t[0].numel()
        out.append(flat[:, start:start + size].reshape(t.shape))
        start += size
    return tuple(out)


def graph_cut_masks(x, saliency, perm, lam, block_num, *, pool: Optional[GraphCutPool] = None, **hyper) -> torch.Tensor:
    """Per-sample masks (N, 1, n, n) in [0, 1]: the weight of the sample's own image in each block."""
    n_labels = hyper.get("n_labels", 3)
    unary, pw_v, pw_h, smooth = graph_cut_costs(x, saliency, perm, lam, block_num, **hyper)
    labels = pool.solve(unary, pw_v, pw_h, smooth) if pool is not None else _cut_chunk(unary, pw_v, pw_h, smooth)
    mask = 1.0 - labels / (n_labels - 1)
    return torch.tensor(mask.reshape(-1, 1, block_num, block_num), dtype=torch.float32, device=x.device)


# ---------------------------------------------------------------------------
# Transport

_COST_MATRICES: Dict[Tuple[int, str], torch.Tensor] = {}


def cost_matrix(side: int, device) -> torch.Tensor:
    """Squared distances between the blocks of a ``side`` x ``side`` grid over ``(side - 1)^2``; cached per device."""
    key = (side, str(torch.device(device)))
    if key not in _COST_MATRICES:
        i, j = np.divmod(np.arange(side * side), side)
        d = ((i[:, None] - i[None, :]) ** 2 + (j[:, None] - j[None, :]) ** 2).astype(np.float32)
        _COST_MATRICES[key] = torch.from_numpy(d / np.float32(max(side - 1, 1) ** 2)).to(device)
    return _COST_MATRICES[key]


def transport_plan(mask: torch.Tensor, unary: torch.Tensor, t_eps: float,
                   partial_argmin: Optional[bool] = None) -> torch.Tensor:
    """The reference's greedy transport: for each destination block, the source block moved there, -1 for none.

    mask (N, 1, n, n) (destinations where it is > 0 reward salient sources),
    unary (N, n, n) the normalised saliency. Each round every source picks its
    cheapest destination; for each destination the first cheapest claimant
    wins (it loses to the first non-claimant if no claimant's cost is below
    zero, exactly as the reference's dense ``min`` over ``plan * cost``); the
    losers' costs for that destination grow by one. ``n`` rounds; the last
    round's winners are the plan.

    ``partial_argmin`` (default: on the CPU only) re-takes the arg-min of only the
    rows whose cost changed when they are few, which needs their count and
    indices on the host each round; otherwise every round re-takes all rows'
    arg-min without any host synchronisation. The plans are the same: a row
    whose source did not lose keeps its values, hence its arg-min.
    """
    n_batch, side = mask.shape[0], mask.shape[-1]
    n2 = side * side
    z = (mask > 0).float()
    cost = t_eps * cost_matrix(side, mask.device)[None] - unary.reshape(-1, n2, 1) * z.reshape(-1, 1, n2)
    rows = torch.arange(n2, device=mask.device).expand(n_batch, n2)
    inf = torch.full((n_batch, n2), math.inf, device=mask.device, dtype=cost.dtype)
    none = torch.full((n_batch, n2), n2, device=mask.device, dtype=torch.long)
    if partial_argmin is None:
        partial_argmin = mask.device.type == "cpu"
    best = cost.min(-1).indices  # (N, n2): each source's cheapest destination
    for step in range(side):
        if step:  # only the losers' rows changed: re-take their arg-min (alone when they are few)
            if not partial_argmin or lost.sum() * 4 > lost.numel():
                best = cost.min(-1).indices
            else:
                redo = lost.nonzero(as_tuple=True)
                best = best.index_put(redo, cost[redo].min(-1).indices)
        chosen = cost.gather(-1, best[..., None]).squeeze(-1)
        claims = torch.zeros_like(best).scatter_add_(-1, best, torch.ones_like(best))
        col_min = inf.scatter_reduce(-1, best, chosen, "amin", include_self=True)
        has_other = claims < n2  # some source did not claim this destination: its 0 is in the fight
        fight_min = torch.where(has_other, col_min.clamp(max=0), col_min)
        at_min = chosen == fight_min.gather(-1, best)
        first_claim = none.scatter_reduce(-1, best, torch.where(at_min, rows, none), "amin", include_self=True)
        # First non-claimant of each destination: row 0, except for row 0's own choice where it is
        # the length of the leading run of rows that chose the same destination.
        lead = best[:, :1]
        run = (best == lead).long().cumprod(-1).sum(-1, keepdim=True)
        first_other = torch.zeros_like(best).scatter_(-1, lead, run)
        zero_fight = has_other & (fight_min == 0)
        winner = torch.where(zero_fight & (first_other < first_claim), -1, first_claim)
        winner = torch.where(winner >= n2, -1, winner)
        lost = winner.gather(-1, best) != rows
        cost.scatter_add_(-1, best[..., None], lost[..., None].to(cost.dtype))
    return winner


def transport_blocks(x: torch.Tensor, winner: torch.Tensor, side: int) -> torch.Tensor:
    """Move whole blocks: destination block j of each image becomes its source block ``winner[j]`` (zeros for -1)."""
    n, c, h, w = x.shape
    bs = h // side
    blocks = x.reshape(n, c, side, bs, side, bs).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, c * bs * bs)
    blocks = torch.cat([blocks, blocks.new_zeros(n, 1, c * bs * bs)], 1)
    src = torch.where(winner < 0, side * side, winner)
    moved = blocks.gather(1, src[..., None].expand(-1, -1, c * bs * bs))
    return moved.reshape(n, side, side, c, bs, bs).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


# ---------------------------------------------------------------------------
# The core


def _stats(x: torch.Tensor, mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    def shaped(v, fill):
        v = torch.as_tensor(fill if v is None else v, dtype=x.dtype, device=x.device)
        return v.reshape(1, -1, 1, 1) if v.dim() <= 1 else v

    return shaped(mean, 0.0), shaped(std, 1.0)


def puzzle_mix(
    x: torch.Tensor,
    saliency: torch.Tensor,
    perm: torch.Tensor,
    lam: float,
    block_num: int,
    *,
    mean=None,
    std=None,
    beta: float = 1.2,
    gamma: float = 0.5,
    eta: float = 0.2,
    neigh_size: int = 4,
    n_labels: int = 3,
    transport: bool = True,
    t_eps: float = 0.8,
    t_size: int = 4,
    noise: Optional[torch.Tensor] = None,
    adv_mask1: bool = False,
    adv_mask2: bool = False,
    pool: Optional[GraphCutPool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mix the normalised batch ``x`` with ``x[perm]``; returns ``(mixed_x, ratio)``.

    Same meaning as the reference's ``mixup_graph``: ``saliency`` (N, H, W),
    ``lam`` the prior's mixing ratio (the reference's ``alpha``), ``block_num``
    graph-cut blocks per side, ``mean``/``std`` the normalisation of ``x``,
    ``noise`` an adversarial perturbation in pixel units added to the sample
    (``adv_mask1``) and/or its partner (``adv_mask2``, as ``noise[perm]``).
    ``ratio`` (N,) is the weight of each sample's own image (its mask mean).
    ``pool`` solves the graph cuts in parallel; without it they run serially.
    """
    n, _, height, width = x.shape
    if height != width:
        raise UsageError(f"puzzlemix needs square images, got {height}x{width}")
    if block_num < 1 or width % block_num:
        raise UsageError(f"puzzlemix block_num {block_num} must divide the image side {width}")
    x = x.detach()
    saliency = saliency.detach()
    partner = x[perm]
    if block_num == 1:  # the reference does not mix then
        return x.clone(), torch.ones(n, device=x.device)
    block_size = width // block_num
    t_size = min(t_size, block_size)

    mask = graph_cut_masks(
        x, saliency, perm, lam, block_num, mean=mean, std=std, beta=beta, gamma=gamma, eta=eta,
        neigh_size=neigh_size, n_labels=n_labels, pool=pool,
    )

    if noise is not None and (adv_mask1 or adv_mask2):
        m, s = _stats(x, mean, std)
        if adv_mask1:
            x = ((x * s + m + noise).clamp(0, 1) - m) / s
        if adv_mask2:
            partner = ((partner * s + m + noise[perm]).clamp(0, 1) - m) / s

    if transport:
        if t_size == -1:
            side = block_num
        elif t_size < block_size:
            side = width // t_size
            mask = F.interpolate(mask, size=side)
        else:
            side = block_num
        unary = block_saliency(saliency, width // side)
        # Both images of every pair in one batch of 2N: half the number of (small) device operations.
        winner = transport_plan(torch.cat([mask, 1 - mask]), torch.cat([unary, unary[perm]]), t_eps)
        x, partner = transport_blocks(torch.cat([x, partner]), winner, side).chunk(2)

    mask = F.interpolate(mask, size=width)
    ratio = mask.reshape(n, -1).mean(-1)
    return mask * x + (1 - mask) * partner, ratio


# ---------------------------------------------------------------------------
# The method


@register_method
class PuzzleMix(MixMethod):
    """PuzzleMix; ``workers`` graph-cut processes (None: one per core, less one; 0: serial)."""

    name = "puzzlemix"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.2,
        gamma: float = 0.5,
        eta: float = 0.2,
        neigh_size: int = 4,
        n_labels: int = 3,
        transport: bool = True,
        t_eps: float = 0.8,
        t_size: int = 4,
        adv_p: float = 0.0,
        adv_eps: float = 10 / 255,
        clean_lam: float = 0.0,
        grid_sizes: Sequence[int] = (2, 4, 8, 16),
        workers: Optional[int] = None,
    ):
        super().__init__()
        _import_gco()
        if n_labels not in (2, 3, 4):
            raise UsageError(f"puzzlemix n_labels must be 2, 3 or 4, got {n_labels!r}")
        if not 0 <= adv_p <= 1:
            raise UsageError(f"puzzlemix adv_p must be in [0, 1], got {adv_p!r}")
        if not grid_sizes or any(int(g) != g or g < 1 for g in grid_sizes):
            raise UsageError(f"puzzlemix grid_sizes must be positive integers, got {grid_sizes!r}")
        if workers is not None and (int(workers) != workers or workers < 0):
            raise UsageError(f"puzzlemix workers must be None or an integer >= 0, got {workers!r}")
        self.alpha, self.beta, self.gamma, self.eta = alpha, beta, gamma, eta
        self.neigh_size, self.n_labels = neigh_size, n_labels
        self.transport, self.t_eps, self.t_size = transport, t_eps, t_size
        self.adv_p, self.adv_eps, self.clean_lam = adv_p, adv_eps, clean_lam
        self.grid_sizes = tuple(int(g) for g in grid_sizes)
        self.workers = workers
        self._pool: Optional[GraphCutPool] = None

    @classmethod
    def available(cls, **params: Any) -> bool:
        return gco_available()

    @classmethod
    def unavailable_reason(cls, **params: Any) -> str:
        return INSTALL_HINT

    @property
    def pool(self) -> GraphCutPool:
        if self._pool is None:
            self._pool = GraphCutPool(default_workers() if self.workers is None else self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def hyper(self) -> dict:
        """The keyword arguments of :func:`puzzle_mix` this instance uses."""
        return dict(
            beta=self.beta, gamma=self.gamma, eta=self.eta, neigh_size=self.neigh_size, n_labels=self.n_labels,
            transport=self.transport, t_eps=self.t_eps, t_size=self.t_size,
        )

    def saliency(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(saliency (N, H, W), input gradient, clean loss or None), without weight gradients.

        In float32 even under autocast, like the reference's float32 pass; in eval mode, or in
        train mode with ``clean_lam > 0`` (then its loss is kept for the extra term).
        """
        clean = self.clean_lam > 0
        saliency, grad, loss = input_gradient_saliency(model, x, y, train_mode=clean, keep_graph=clean)
        return saliency, grad, (2 * self.clean_lam * loss if clean else None)

    def forward(self, model, x, y):
        n, width = x.shape[0], x.shape[-1]
        grids = [g for g in self.grid_sizes if width % g == 0]
        if not grids:
            raise UsageError(f"puzzlemix grid_sizes {list(self.grid_sizes)}: none divides the image side {width}")
        adv1 = adv2 = False
        if self.adv_p > 0:
            adv1 = bool(self.rng.binomial(1, self.adv_p))
            adv2 = bool(self.rng.binomial(1, self.adv_p))
        mean, std = self.stats(x)
        noise, x_in = None, x
        if adv1 or adv2:  # random start inside the eps-ball, in pixel units
            noise = torch.from_numpy(self.rng.uniform(-self.adv_eps, self.adv_eps, size=tuple(x.shape)))
            noise = noise.to(x.device, x.dtype)
            pixels = x * std + mean
            noisy = (pixels + noise).clamp(0, 1)
            noise = noisy - pixels
            x_in = (noisy - mean) / std  # as the reference's train(): the clamped pixels, not pixels + noise
        saliency, grad, extra = self.saliency(model, x_in, y)
        if noise is not None:  # one FGSM step from the random start, scaled by a random factor
            noise = (noise + (self.adv_eps + 2 / 255) * grad.sign()).clamp(-self.adv_eps, self.adv_eps)
            noise = float(self.rng.uniform(0, 1)) * noise
        block_num = grids[int(self.rng.integers(len(grids)))]
        perm = self.draw_perm(n, x.device)
        lam = self.draw_lambda(self.alpha)
        with torch.no_grad():
            mixed, ratio = puzzle_mix(
                x, saliency, perm, lam, block_num, mean=mean, std=std, noise=noise, adv_mask1=adv1,
                adv_mask2=adv2, pool=self.pool, **self.hyper(),
            )
        return MixOutput(model(mixed), mix_targets(y, perm, ratio), extra)
