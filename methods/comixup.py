"""Co-Mixup (Kim, Choo, Jeong, Song, ICLR 2021, openreview gvxJzw8kW4b).

The batch is cut into partitions of ``part`` consecutive samples; within each
partition, ``n`` inputs are mixed jointly into ``n`` outputs. Every output is a
labelling of a ``block_num`` x ``block_num`` grid: each block shows one input
(or, after the first sweep, the half/half mix of two), found by minimising

    sum of the negative normalised saliency of what each block shows
    + beta * label changes between neighbouring blocks (smoothness)
    + gamma * overlap of the inputs used by different outputs (supermodular diversity)
    - eta * log Dirichlet(alpha) prior per input,

by the authors' iterative submodular minimisation: ``niter`` sweeps over the
outputs, each output's labelling re-solved by an alpha-beta-swap graph cut
(gco-wrapper) with the diversity term made modular (a penalty, active above
``thres``, on each input from how much the other outputs already use it,
through the input-compatibility matrix ``A`` weighted by ``omega``); before
the last sweep identical outputs are pushed apart (``set_resolve``). The
targets are the realised shares of the inputs' labels in each output.

1. Saliency: the gradient of the clean batch's cross-entropy with respect to
   the input (``input_gradient_saliency``, shared with PuzzleMix), in train mode
   with ``clean_lam > 0`` (the authors' default, its loss ``2 * clean_lam * CE``
   is returned as the extra loss), in eval mode otherwise. As in the authors'
   ``main.py`` (one ``backward`` of the clean loss), the weights' gradients of
   the clean loss come from that same backward pass (``weight_grads=True``):
   the extra loss carries them, so the clean batch is not back-propagated twice.
2. Compatibility: ``A_dist`` is the L1 distance between the argmax positions of
   the saliency map average-pooled with an 8x8 window (stride 1).
3. Per partition: a Dirichlet(alpha) prior and a uniformly random initial
   labelling, drawn in the training process from the method's generator.
4. The labellings (:func:`solve_partition`) run on the CPU, partitions in
   parallel in the shared worker pool (``methods/_pool.py``); then one gather
   mixes the whole batch on the training device.

:func:`co_mixup` is the pure core (no randomness inside): given the batch, the
saliency, ``A_dist`` and the draws, it gives the mixed batch and targets of the
authors' ``mixup_process`` (snu-mllab/Co-Mixup ``mixup.py`` and ``match.py``)
bit for bit on one-hot targets. Faster than that code, with the same results:

- partitions are solved in parallel worker processes (the authors' parallel
  version starts one CUDA process per partition);
- each output's update works on small numpy arrays (the authors' code runs
  some 40 tensor operations per output); the few steps whose float rounding
  depends on the kernel (the matrix-vector products of the modular penalty, the
  soft labels' costs, the objective that decides convergence) use the same
  torch operations on the same shapes;
- the whole batch is mixed by one gather of at most two sources per block (the
  authors multiply an (n, n, C, H, W) one-hot stack per partition), and the
  targets are one (N, N) share matrix times the targets;
- the resolution of identical outputs is vectorised.

Defaults: the authors' CIFAR-100 command (README, ``main.py``): ``--m_part 20
--m_block_num 4 --mixup_alpha 2.0 --clean_lam 1.0 --m_beta 0.32 --m_gamma 1.0
--m_thres 0.83 --m_eta 0.05 --m_omega 0.001`` with ``main.py``'s defaults
``--m_thres_type hard --set_resolve True --m_niter 4``.

Deviations, where the authors' code fails: a partition of one sample (batch
sizes one above a multiple of ``part``) is returned unmixed (the reference
cannot form ``A @ penalty`` there); a sample whose saliency is all zero gets a
uniform saliency (the reference divides 0 by 0); a partition whose
``A_dist`` is all zero (every salient peak at one place) keeps ``A = (1 -
omega) I`` (the reference divides by the zero sum); the 8x8 compatibility
window shrinks to the image side for images smaller than 8 pixels.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError

from ._pool import ChunkPool, chunk_bounds, default_workers
from ._registry import MixMethod, MixOutput, input_gradient_saliency, register_method
from .puzzlemix import _import_gco, gco_available, install_hint

# The soft labels of the extra labels that mix two of the top-3 inputs (authors' ``graphcut_wrapper``).
_SOFT3 = np.array([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]], dtype=np.float32)
_PAIR3 = np.array([[0.25, 0.25, 1.0], [0.25, 1.0, 0.25], [1.0, 0.25, 0.25]], dtype=np.float32)


# ---------------------------------------------------------------------------
# The labelling of one partition (runs in worker processes)


def objective(cost: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """The objective without threshold (authors' ``obj_fn``): unary + smoothness + diversity.

    ``cost`` (n_in, h, w), ``mask`` (n_out, h, w, n_in); the same torch reductions as
    the reference, so the convergence test decides alike.
    """
    n_out, height, width, n_in = mask.shape
    counts = mask.reshape(n_out, height * width, n_in).sum(1)
    loss = torch.sum(cost.permute(1, 2, 0).unsqueeze(0) * mask)
    loss = loss + beta / 2 * (((mask[:, :-1, :, :] - mask[:, 1:, :, :]) ** 2).sum()
                              + ((mask[:, :, :-1, :] - mask[:, :, 1:, :]) ** 2).sum())
    return loss + gamma * (torch.sum(counts.sum(0) ** 2) - torch.sum(counts**2))


def resolve_identical(assigned: np.ndarray) -> np.ndarray:
    """Extra costs that push apart outputs using the same set of inputs (authors' ``resolve_label``).

    For every pair i1 < i2 of outputs with the same set of two or more inputs,
    output i1 pays 1 for its first input and i2 for its second. ``assigned``
    (n_out, n_in) booleans; returns float32 (n_out, n_in).
    """
    n_out, n_in = assigned.shape
    add = np.zeros((n_out, n_in), dtype=np.float32)
    same = (assigned[:, None, :] == assigned[None, :, :]).all(-1)
    i1, i2 = np.nonzero(np.triu(same, 1))
    count = assigned.sum(1)
    keep = count[i1] > 1
    i1, i2 = i1[keep], i2[keep]
    if len(i1):
        order = np.argsort(~assigned, axis=1, kind="stable")  # assigned inputs first, in index order
        add[i1, order[i1, 0]] = 1.0
        add[i2, order[i1, 1]] = 1.0
    return add


class GridCut:
    """Alpha-beta swap on an ``h`` x ``w`` grid with one edge weight: ``gco.cut_grid_graph``'s calls, set up once.

    ``gco.cut_grid_graph`` rebuilds the grid's edge lists and checks its inputs
    on every call; here the edges are built once per grid and the float costs
    are converted to gco's integers exactly as its wrapper does (``cost *
    precision`` in the array's dtype, truncated to C int), so the labels are the
    same (checked against ``cut_grid_graph`` in the tests). Without gco's
    low-level module (another gco-wrapper layout) it calls ``cut_grid_graph``.
    """

    def __init__(self, gco, height: int, width: int, weight: np.float32):
        self.gco, self.shape = gco, (height, width)
        self.cost_v = np.full((height - 1, width), weight, dtype=np.float32)
        self.cost_h = np.full((height, width - 1), weight, dtype=np.float32)
        pygco = getattr(gco, "pygco", None)
        self.lib = getattr(pygco, "_cgco", None)
        if self.lib is not None:
            self.precision = (pygco._UNARY_FLOAT_PRECISION, pygco._PAIRWISE_FLOAT_PRECISION,
                              pygco._SMOOTH_COST_PRECISION)
            idx = np.arange(height * width).reshape(height, width)
            self.edges_from = np.r_[idx[:-1, :].flatten(), idx[:, :-1].flatten()].astype(np.intc)
            self.edges_to = np.r_[idx[1:, :].flatten(), idx[:, 1:].flatten()].astype(np.intc)
            weights = np.r_[self.cost_v.flatten(), self.cost_h.flatten()]
            self.edge_weights = (weights * self.precision[1]).astype(np.intc)
            self.handle = np.empty(1, dtype=np.intc)
            self.energy = np.empty(1, dtype=np.longlong)

    def __call__(self, unary: np.ndarray, pairwise: np.ndarray) -> np.ndarray:
        """Labels (h * w,) minimising the float32 ``unary`` (h, w, L) and label costs ``pairwise`` (L, L)."""
        if self.lib is None:
            return self.gco.cut_grid_graph(np.ascontiguousarray(unary), pairwise, self.cost_v, self.cost_h,
                                           algorithm="swap")
        lib, sites, n_labels = self.lib, self.shape[0] * self.shape[1], unary.shape[-1]
        lib.gcoCreateGeneralGraph(np.intc(sites), np.intc(n_labels), self.handle)
        handle = self.handle[0]
        try:
            data = (np.ascontiguousarray(unary).reshape(sites, n_labels) * self.precision[0]).astype(np.intc)
            lib.gcoSetDataCost(handle, data)
            lib.gcoSetAllNeighbors(handle, self.edges_from, self.edges_to, self.edge_weights,
                                   np.intc(self.edges_from.size))
            smooth = (pairwise * self.precision[2]).astype(np.intc)
            lib.gcoSetSmoothCost(handle, smooth)
            lib.gcoSwap(handle, np.intc(-1), self.energy)
            labels = np.empty(sites, dtype=np.intc)
            lib.gcoGetLabels(handle, labels)
        finally:
            lib.gcoDestroyGraph(handle)
        return labels


@torch.autocast("cpu", enabled=False)  # float32 on the host, as the authors' solver, under any autocast
def solve_partition(
    cost: np.ndarray,
    A: np.ndarray,
    init: np.ndarray,
    *,
    beta: float = 0.32,
    gamma: float = 1.0,
    thres: float = 0.83,
    thres_type: str = "hard",
    set_resolve: bool = True,
    niter: int = 4,
) -> np.ndarray:
    """The labelling of one partition (authors' ``get_onehot_matrix`` after its prior term).

    ``cost`` float32 (n, h, w): the negative normalised block saliency minus the
    prior term; ``A`` float32 (n, n) the compatibility; ``init`` (n, h, w) the
    initial labels. Returns float32 (n, h, w, n): output i's weight of input j
    in each block (1, or 0.5 for each input of a mixed block).
    """
    gco = _import_gco("comixup")
    n, height, width = cost.shape
    hw = height * width
    thres = thres * height * width
    beta = beta / height / width
    gamma = gamma / height / width
    cost_t, A_t = torch.from_numpy(cost), torch.from_numpy(A)
    cost_hwn = np.ascontiguousarray(cost.transpose(1, 2, 0))
    mask = np.eye(n, dtype=np.float32)[init]  # (n, h, w, n)
    mask_t = torch.from_numpy(mask)  # shares memory: tracks the updates
    loss_prev = objective(cost_t, mask_t, beta, gamma)
    penalty = mask.reshape(-1, n).sum(0)
    cut = GridCut(gco, height, width, np.float32(beta))  # the authors' edge weights: beta everywhere
    plain = np.ones((n, n), dtype=np.float32) - np.eye(n, dtype=np.float32)
    eye2, eye3 = np.eye(n + 1, dtype=np.float32), np.eye(n + 3, dtype=np.float32)
    soft3 = torch.from_numpy(_SOFT3)
    add_cost: Optional[np.ndarray] = None

    for it in range(niter):
        for i in range(n):
            label_count = mask[i].reshape(hw, n).sum(0)
            penalty -= label_count
            p = torch.from_numpy(penalty)
            if thres_type == "hard":  # the authors' expression, evaluated left to right
                modular = 2 * gamma * ((A_t @ p > thres).float() * A_t @ p)
            elif thres_type == "soft":
                modular = 2 * gamma * ((A_t @ p > thres).float() * (A_t @ p - thres))
            else:
                raise UsageError(f"comixup thres_type must be 'hard' or 'soft', got {thres_type!r}")
            cp = cost_hwn + modular.numpy()
            if add_cost is not None:
                cp = cp + np.float32(gamma) * add_cost[i]
            n_label = int((label_count > 0).sum()) if it > 0 else 0
            if n_label == 2:  # one extra label: the half/half mix of the two inputs used
                sel = label_count > 0
                add = torch.from_numpy(cp)[:, :, torch.from_numpy(sel)].mean(-1, keepdim=True) - 5e-4
                pairwise = np.ones((n + 1, n + 1), dtype=np.float32) - eye2
                pairwise[-1, :-1][sel] = 0.25
                pairwise[:-1, -1][sel] = 0.25
                labels = cut(np.concatenate([cp, add.numpy()], -1), pairwise)
                onehot = eye2[labels]
                row = onehot[:, :n] + onehot[:, n:] * np.where(sel, np.float32(0.5), np.float32(0))
            elif n_label >= 3:  # three extra labels: the half/half mixes of the three most used inputs
                sel = np.zeros(n, dtype=bool)
                sel[torch.topk(torch.from_numpy(label_count), k=3).indices.numpy()] = True
                add = torch.matmul(torch.from_numpy(cp)[:, :, torch.from_numpy(sel)], soft3) - 5e-4
                pairwise = np.ones((n + 3, n + 3), dtype=np.float32) - eye3
                pairwise[-3:, :-3][:, sel] = _PAIR3
                pairwise[:-3, -3:][sel, :] = _PAIR3
                labels = cut(np.concatenate([cp, add.numpy()], -1), pairwise)
                onehot = eye3[labels]
                spread = np.zeros((3, n), dtype=np.float32)
                spread[:, sel] = _SOFT3
                row = onehot[:, :n] + onehot[:, n:] @ spread
            else:
                labels = cut(cp, plain)
                row = np.eye(n, dtype=np.float32)[labels]
            mask[i] = row.reshape(height, width, n)
            penalty += mask[i].reshape(hw, n).sum(0)

        if it == niter - 2 and set_resolve:
            add_cost = resolve_identical(mask.reshape(n, -1, n).sum(1) > 0)
        loss = objective(cost_t, mask_t, beta, gamma)
        if bool((loss_prev - loss).abs() / loss.abs() < 1e-6):
            break
        loss_prev = loss
    return mask


def _solve_partitions(tasks: Sequence[tuple], hyper: dict) -> List[np.ndarray]:
    """Solve a chunk of partitions one after the other (the unit of work of a pool worker)."""
    return [solve_partition(cost, A, init, **hyper) for cost, A, init in tasks]


# ---------------------------------------------------------------------------
# The core


def compatibility(saliency: torch.Tensor, window: int = 8) -> torch.Tensor:
    """``A_dist`` (N, N): L1 distance between the argmax positions of the window-pooled saliency (authors' main.py)."""
    window = min(window, saliency.shape[-2], saliency.shape[-1])
    z = F.avg_pool2d(saliency, kernel_size=window, stride=1)
    idx = torch.argmax(z.reshape(z.shape[0], -1), dim=1)
    pos = torch.zeros((z.shape[0], 2), device=z.device)
    pos[:, 0] = idx // z.shape[-1]
    pos[:, 1] = idx % z.shape[-1]
    return (pos.unsqueeze(1) - pos.unsqueeze(0)).abs().sum(-1)


def partition_bounds(n: int, part: int) -> List[Tuple[int, int]]:
    """The reference's partitions: ``part`` consecutive samples each, the last one shorter."""
    return [(a, min(a + part, n)) for a in range(0, n, part)]


def partition_problem(sc: torch.Tensor, A_dist: torch.Tensor, prior: np.ndarray, *, eta: float,
                      omega: float) -> Tuple[np.ndarray, np.ndarray]:
    """(cost, A) of one partition as float32 numpy arrays, with the reference's torch arithmetic.

    ``sc`` (n, h, w) the block-pooled saliency of the partition, ``A_dist`` its
    (n, n) block, ``prior`` the (n,) Dirichlet draw.
    """
    n, height, width = sc.shape
    sc, A_dist = sc.detach().float().cpu(), A_dist.detach().float().cpu()
    total = sc.reshape(n, -1).sum(1).reshape(n, 1, 1)
    uniform = torch.full_like(sc, 1.0 / (height * width))
    sc_norm = torch.where(total > 0, sc / total.clamp_min(torch.finfo(sc.dtype).tiny), uniform)
    cost = -sc_norm
    A_sum = torch.sum(A_dist)
    if A_sum > 0:
        A_dist = A_dist / A_sum * n
    A = (1 - omega) * torch.eye(n) + omega * A_dist
    alpha = torch.as_tensor(prior, dtype=torch.float32).reshape(n, 1, 1)
    cost = cost - eta / height / width * torch.log(alpha + 1e-8)
    return cost.contiguous().numpy(), A.contiguous().numpy()


def co_mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    saliency: torch.Tensor,
    A_dist: torch.Tensor,
    block_num: int,
    priors: Sequence[np.ndarray],
    inits: Sequence[np.ndarray],
    *,
    part: int = 20,
    beta: float = 0.32,
    gamma: float = 1.0,
    eta: float = 0.05,
    thres: float = 0.83,
    thres_type: str = "hard",
    omega: float = 0.001,
    set_resolve: bool = True,
    niter: int = 4,
    pool: Optional[ChunkPool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix the batch ``x`` (N, C, H, W) with targets ``y`` (N, K); returns ``(mixed, target, shares)``.

    Same meaning as the authors' ``mixup_process`` with ``get_onehot_matrix``:
    ``saliency`` (N, H, W), ``A_dist`` (N, N) (``main.py``'s compatibility),
    ``priors[p]`` the Dirichlet draw and ``inits[p]`` the (n_p, b, b) initial
    labels of partition p (``partition_bounds(N, part)``). ``shares`` (N, N) is
    the realised share of input j in output i (rows sum to 1), and
    ``target = shares @ y`` renormalised. ``pool`` solves the partitions in
    parallel; without it they run one after the other.
    """
    n, _, height, width = x.shape
    if height != width:
        raise UsageError(f"comixup needs square images, got {height}x{width}")
    if block_num < 1 or width % block_num:
        raise UsageError(f"comixup block_num {block_num} must divide the image side {width}")
    bounds = partition_bounds(n, part)
    if len(priors) != len(bounds) or len(inits) != len(bounds):
        raise ValueError(f"co_mixup needs one prior and one initial labelling per partition ({len(bounds)})")
    block_size = width // block_num
    sc = F.avg_pool2d(saliency.detach(), block_size).float().cpu()  # to the host once (the solver's side)
    A_dist = A_dist.detach().float().cpu()
    hyper = dict(beta=beta, gamma=gamma, thres=thres, thres_type=thres_type, set_resolve=set_resolve, niter=niter)

    tasks, solved = [], []  # partitions of two or more samples are optimised; one alone stays itself
    for (a, b), prior, init in zip(bounds, priors, inits):
        if b - a > 1:
            cost, A = partition_problem(sc[a:b], A_dist[a:b, a:b], prior, eta=eta, omega=omega)
            tasks.append((cost, A, np.asarray(init, dtype=np.int64).reshape(b - a, block_num, block_num)))
            solved.append((a, b))
    masks: List[np.ndarray] = []
    if tasks:
        if pool is None or pool.workers == 0 or len(tasks) < 2:
            masks = _solve_partitions(tasks, hyper)
        else:
            cut = chunk_bounds(len(tasks), pool.workers + 1)
            chunks = [(tasks[c0:c1], hyper) for c0, c1 in zip(cut[:-1], cut[1:])]
            masks = [m for chunk in pool.run(_solve_partitions, chunks) for m in chunk]

    # Block-level sources: for output i and block (r, c), at most two inputs with weights 1 or 1/2 each.
    src = np.repeat(np.arange(n)[:, None, None, None], 2, -1) * np.ones((1, block_num, block_num, 1), np.int64)
    wgt = np.zeros((n, block_num, block_num, 2), dtype=np.float32)
    wgt[..., 0] = 1.0
    shares = np.eye(n, dtype=np.float32) * np.float32(block_num * block_num)
    for (a, b), mask in zip(solved, masks):
        top = np.argsort(-mask, axis=-1, kind="stable")[..., :2]
        src[a:b] = top + a
        wgt[a:b] = np.take_along_axis(mask, top, -1)
        shares[a:b, a:b] = mask.reshape(b - a, -1, b - a).sum(1)
    # One gather per source over the (N * b * b) blocks; the weights are 1 and 0, or 1/2 and 1/2, so
    # w0 * a + w1 * b rounds as the reference's sum over all inputs of its one-hot stack.
    c = x.shape[1]
    cell = torch.arange(block_num * block_num, device=x.device).reshape(1, block_num, block_num)
    src_t = torch.from_numpy(src).to(x.device)
    wgt_t = torch.from_numpy(wgt).to(x.device, x.dtype).reshape(-1, 2)
    blocks = (x.detach().reshape(n, c, block_num, block_size, block_num, block_size).permute(0, 2, 4, 1, 3, 5)
              .reshape(n * block_num * block_num, c * block_size * block_size))
    first = blocks[(src_t[..., 0] * block_num * block_num + cell).reshape(-1)]
    second = blocks[(src_t[..., 1] * block_num * block_num + cell).reshape(-1)]
    mixed = wgt_t[:, 0:1] * first + wgt_t[:, 1:2] * second
    mixed = (mixed.reshape(n, block_num, block_num, c, block_size, block_size).permute(0, 3, 1, 4, 2, 5)
             .reshape(n, c, height, width))

    counts = torch.from_numpy(shares).to(y.device, y.dtype)
    target = counts @ y
    target = target / target.sum(-1, keepdim=True)
    return mixed, target, counts / (block_num * block_num)


# ---------------------------------------------------------------------------
# The method


@register_method
class CoMixup(MixMethod):
    """Co-Mixup; ``workers`` processes solve the partitions (None: one per core, less one; 0: serial)."""

    name = "comixup"

    def __init__(
        self,
        alpha: float = 2.0,
        block_num: int = 4,
        part: int = 20,
        beta: float = 0.32,
        gamma: float = 1.0,
        eta: float = 0.05,
        thres: float = 0.83,
        thres_type: str = "hard",
        omega: float = 0.001,
        set_resolve: bool = True,
        niter: int = 4,
        clean_lam: float = 1.0,
        workers: Optional[int] = None,
    ):
        super().__init__()
        _import_gco("comixup")
        if not alpha > 0:
            raise UsageError(f"comixup alpha (the Dirichlet prior's concentration) must be > 0, got {alpha!r}")
        if block_num != -1 and (int(block_num) != block_num or block_num < 1):
            raise UsageError(f"comixup block_num must be a positive integer or -1 (random), got {block_num!r}")
        if int(part) != part or part < 1:
            raise UsageError(f"comixup part must be a positive integer, got {part!r}")
        if thres_type not in ("hard", "soft"):
            raise UsageError(f"comixup thres_type must be 'hard' or 'soft', got {thres_type!r}")
        if int(niter) != niter or niter < 1:
            raise UsageError(f"comixup niter must be a positive integer, got {niter!r}")
        if clean_lam < 0:
            raise UsageError(f"comixup clean_lam must be >= 0, got {clean_lam!r}")
        if workers is not None and (int(workers) != workers or workers < 0):
            raise UsageError(f"comixup workers must be None or an integer >= 0, got {workers!r}")
        self.alpha, self.block_num, self.part = alpha, int(block_num), int(part)
        self.beta, self.gamma, self.eta, self.thres, self.thres_type = beta, gamma, eta, thres, thres_type
        self.omega, self.set_resolve, self.niter, self.clean_lam = omega, set_resolve, int(niter), clean_lam
        self.workers = workers
        self._pool: Optional[ChunkPool] = None

    @classmethod
    def available(cls, **params: Any) -> bool:
        return gco_available()

    @classmethod
    def unavailable_reason(cls, **params: Any) -> str:
        return install_hint("comixup")

    @property
    def pool(self) -> ChunkPool:
        if self._pool is None:
            workers = default_workers() if self.workers is None else self.workers
            self._pool = ChunkPool(workers, name="comixup", preload=[__name__])
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def hyper(self) -> dict:
        """The keyword arguments of :func:`co_mixup` this instance uses."""
        return dict(
            part=self.part, beta=self.beta, gamma=self.gamma, eta=self.eta, thres=self.thres,
            thres_type=self.thres_type, omega=self.omega, set_resolve=self.set_resolve, niter=self.niter,
        )

    def draws(self, n: int, block_num: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        """Per partition, in order: the Dirichlet(alpha) prior (float32) and the uniform initial labels."""
        priors, inits = [], []
        for a, b in partition_bounds(n, self.part):
            priors.append(self.rng.dirichlet(np.full(b - a, float(self.alpha))).astype(np.float32))
            inits.append(self.rng.integers(0, b - a, size=(b - a, block_num, block_num)))
        return priors, inits

    def forward(self, model, x, y):
        n, width = x.shape[0], x.shape[-1]
        clean = self.clean_lam > 0
        saliency, _, loss = input_gradient_saliency(model, x, y, train_mode=clean, weight_grads=clean)
        extra = 2 * self.clean_lam * loss if clean else None
        block_num = self.block_num
        if block_num == -1:  # the authors' random resolution: 2, 4, 8 or 16 blocks per side
            choices = [g for g in (2, 4, 8, 16) if width % g == 0]
            if not choices:
                raise UsageError(f"comixup block_num=-1: none of 2, 4, 8, 16 divides the image side {width}")
            block_num = choices[int(self.rng.integers(len(choices)))]
        priors, inits = self.draws(n, block_num)
        with torch.no_grad():
            A_dist = compatibility(saliency)
            mixed, target, _ = co_mixup(x, y, saliency, A_dist, block_num, priors, inits, pool=self.pool,
                                        **self.hyper())
        return MixOutput(model(mixed), target, extra)
