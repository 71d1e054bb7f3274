"""Data-parallel runs: one run over several processes, on torch.distributed and DistributedDataParallel.

A run with ``nproc = N > 1`` trains in N processes (ranks): NCCL on GPUs (one GPU per rank,
``cuda:LOCAL_RANK``), Gloo on CPUs. The process group comes from the standard environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the same
worker runs under

- ``mixbench run --nproc-per-run N`` (PyTorch's elastic launcher, the engine of ``torchrun``, one
  cell at a time per group of N GPUs, no restarts),
- ``torchrun --nproc-per-node N -m mixbench run --nproc-per-run N ...``,
- Slurm through submitit, one task per GPU on one or several nodes, the rendezvous from Slurm's
  environment.

What a data-parallel run does (:class:`Parallel`, used by :mod:`mixbench.train` at a few places):

- **Data.** The global batch is ``batch_size`` (the run's numbers do not depend on N through the
  batch size); rank r trains on its contiguous shard of ``batch_size / N`` rows of each global
  batch. In-memory data sets draw the global batch (order, crop, flip) exactly as one process
  does, from the same generator on every rank, then keep the shard; streamed image folders decode
  only the shard (the per-image augmentation seeds do not depend on the rank). Evaluation is
  sharded the same way and its counts summed over the ranks.
- **Mixing.** Each rank mixes its own shard, as the references' multi-GPU code does (openmixup's
  DDP runs, which seed every rank alike): the method is set up with the run's seed on every rank,
  so its draws (lambda, the mixing point, whether a batch is mixed, box positions) are identical
  across ranks and equal to the single-process run's draws, and the partner permutation is drawn
  over the shard's ``batch_size / N`` samples. So every rank calls the model the same number of
  times per step (which synchronised BatchNorm needs). With N > 1 a sample's partner is always in
  its own shard: that, and batch-norm statistics per shard unless ``sync_bn``, are the differences
  from the single-process run.
- **Gradients.** ``DistributedDataParallel`` averages them (a method's own trainable modules, outside
  the model, have theirs averaged by one all-reduce before each optimiser step). The first training-mode forward with
  autograd of each optimiser step goes through DDP; other passes (saliency in eval mode, passes
  under ``no_grad``, a second forward of the same step) call the module directly, so DDP's
  reducer sees exactly one forward per backward (:class:`DataParallelModel`).
- **Synchronised BatchNorm** (``sync_bn``): torch's ``SyncBatchNorm`` on CUDA (timm's converter,
  which keeps timm's norm+act layers); on the CPU, where torch's SyncBatchNorm has no kernel, the
  same computation with torch.distributed's autograd-aware all-reduce (:class:`CpuSyncBatchNorm`).
- **Files.** Rank 0 alone holds the run's lock and writes metrics, checkpoints, model.pt and
  result.json. At the end of every epoch the ranks' RNG states, loader (sampler) states and method
  states are gathered into rank 0's checkpoint (``ranks``), and each rank resumes from its own
  entry, so a resume is exact. A run whose world size differs from its checkpoint's is refused.
- **Failures.** A rank that dies takes the run down: the launcher stops the other ranks and
  reports which rank failed and how; the next launch resumes from the last checkpoint.

The launchers are in :mod:`mixbench.launchers.data_parallel`; every worker process starts in
:func:`init_worker`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from mixbench import UsageError

# ---------------------------------------------------------------------------
# Worker start-up and the process group


def init_worker(cpus: int) -> None:
    """The first thing every worker process of a data-parallel run does (local ranks, torchrun ranks,
    Slurm tasks), before it builds a run.

    Gives this rank its share of the cores: torch's threads, ``MIXBENCH_CPUS`` (PuzzleMix's graph-cut
    pool: one pool per rank) and ``MIXBENCH_WORKERS`` (the streaming loaders' workers). Code that must
    run in every worker before a run is built (e.g. loading method plugins) belongs here.
    """
    cpus = max(1, int(cpus))
    os.environ["MIXBENCH_CPUS"] = str(cpus)
    os.environ.setdefault("MIXBENCH_WORKERS", str(min(8, cpus)))
    torch.set_num_threads(cpus)


def env_world() -> int:
    """The world size given by a launcher's environment (1 when there is none)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def init_process_group(device: str = "auto", timeout_min: float = 30.0) -> torch.device:
    """Join the process group of the environment (``env://``) and return this rank's device.

    NCCL and ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` allows it, else Gloo on the CPU.
    """
    local = int(os.environ.get("LOCAL_RANK") or 0)
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked, but CUDA is not available")
    if cuda:
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min),
                                **kwargs)
    return dev


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The run's view of the process group


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Parallel:
    """What ``train_run`` asks of the process group; with one process every call is the identity.

    ``Parallel.current()`` is the single-process one unless torch.distributed is initialised.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def current(cls) -> "Parallel":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def writer(self) -> bool:
        """Rank 0 (or the only process): the one that writes the run's files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- checks and agreement -------------------------------------------------
    def check(self, spec: Any) -> None:
        nproc = getattr(spec, "nproc", 1)
        if nproc != self.world:
            how = ("launch it with `mixbench run --nproc-per-run N` (or torchrun, or Slurm with N tasks)"
                   if nproc > 1 else "launch it in one process")
            raise UsageError(f"run {spec.run_id} is a {nproc}-process run and this launch has {self.world} "
                             f"process(es); {how}")
        if self.active and spec.batch_size % self.world:
            raise UsageError(f"batch_size {spec.batch_size} must be divisible by nproc {self.world} "
                             "(each rank trains on batch_size / nproc samples of each global batch)")

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def run_lock(self, run_dir: Path) -> Iterator[None]:
        """The run's lock (``mixbench.lock.RunLock``), held by rank 0; the other ranks wait for it."""
        from mixbench.lock import RunLock, RunLocked

        if not self.active:
            with RunLock(run_dir):
                yield
            return
        lock, error = None, None
        if self.writer:
            try:
                lock = RunLock(run_dir).acquire()
            except RunLocked as exc:
                error = exc
        if self.broadcast(error is None and self.writer) is not True:
            raise error if error is not None else RunLocked(Path(run_dir) / "run.lock", None)  # held elsewhere
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    # -- model ----------------------------------------------------------------
    def prepare_model(self, model: nn.Module, spec: Any, device: torch.device) -> nn.Module:
        """Synchronised BatchNorm when the run asks for it (before the model is wrapped)."""
        if not self.active or not getattr(spec, "sync_bn", False):
            return model
        if device.type == "cpu":
            return convert_cpu_sync_batchnorm(model)
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def wrap(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> nn.Module:
        """``forward`` (the eager or compiled model) under DistributedDataParallel."""
        if not self.active:
            return forward
        from torch.nn.parallel import DistributedDataParallel

        from mixbench.hooks import install_mixing_hooks, mixing_state

        if mixing_state(model) is None:  # hidden-point mixing then goes through the wrapper, hence DDP
            try:
                install_mixing_hooks(model)
            except UsageError:
                pass
        ddp = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped = DataParallelModel(model, forward, ddp)
        optimizer.register_step_post_hook(lambda *_: wrapped.new_step())
        # A method's own trainable modules (MixMethod.param_groups, e.g. AutoMix's mixing block) are outside
        # the model, hence outside DDP: their gradients are averaged over the ranks before each step.
        in_model = {id(p) for p in model.parameters()}
        extra = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in in_model]
        if extra:
            optimizer.register_step_pre_hook(lambda *_: average_gradients(extra, self.world))
        return wrapped

    # -- data -----------------------------------------------------------------
    def shard_train(self, loader: Any) -> Any:
        if not self.active:
            return loader
        loader.shard(self.rank, self.world)  # mixbench.data.BatchLoader: this rank's part of each global batch
        return loader

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (``t`` itself with one process)."""
        if not self.active:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    def test_metrics(self, metrics: Callable, model: nn.Module, loader: Any, autocast: Callable) -> Dict[str, float]:
        """``metrics(model, loader, autocast)`` (:func:`mixbench.train.test_metrics`); with several ranks
        each measures its share of the test set and the counts are summed."""
        if not self.active:
            return metrics(model, loader, autocast)
        part = eval_shard(loader, self.rank, self.world)
        n = part.num_samples
        sums = torch.zeros(4, dtype=torch.float64)
        if n:
            m = metrics(model, part, autocast)
            sums += torch.tensor([round(m["test_top1"] * n / 100), round(m["test_top5"] * n / 100),
                                  m["test_loss"] * n, n], dtype=torch.float64)
        sums = sums.to(loader.device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(sums)
        c1, c5, loss, total = sums.tolist()
        return {"test_top1": 100.0 * c1 / total, "test_top5": 100.0 * c5 / total, "test_loss": loss / total}

    # -- checkpoints ----------------------------------------------------------
    def rank_states(self, make: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """Every rank's ``make()`` (RNG, loader and method states) gathered on rank 0, as checkpoint
        entries (``world_size``, ``ranks``); nothing with one process. Every rank must call it."""
        if not self.active:
            return {}
        mine = _to_cpu(make())
        everyone: Optional[List[Any]] = [None] * self.world if self.writer else None
        dist.gather_object(mine, everyone, dst=0)
        return {"world_size": self.world, "ranks": everyone} if self.writer else {}

    def load_checkpoint(self, run_dir: Path) -> Optional[Dict[str, Any]]:
        """The run's newest good checkpoint, this rank's entries in place of rank 0's.

        Rank 0 reads first (it sets aside corrupt files), then the others; all must find the same epoch.
        """
        from mixbench.checkpoint import load_checkpoint

        if not self.active:
            return load_checkpoint(run_dir)
        state = load_checkpoint(run_dir) if self.writer else None
        dist.barrier()
        if not self.writer:
            state = load_checkpoint(run_dir)
        epochs = [None] * self.world
        dist.all_gather_object(epochs, None if state is None else state["epoch"])
        if len(set(epochs)) > 1:
            raise RuntimeError(f"{run_dir}: the ranks found different checkpoints (epochs {epochs}); is the "
                               "run folder on a file system that every node sees?")
        if state is None:
            return None
        saved = state.get("world_size", 1)
        if saved != self.world or "ranks" not in state:
            raise UsageError(f"{run_dir}: its checkpoint was written by {saved} process(es) and this run has "
                             f"{self.world}; resume it with the same number of processes")
        return {**state, **state["ranks"][self.rank]}


def average_gradients(params: List[torch.Tensor], world: int) -> None:
    """Average the gradients of ``params`` over the ranks (one all-reduce); a parameter without a gradient
    (on every rank alike: the ranks run the same steps) keeps none."""
    have = [p for p in params if p.grad is not None]
    if not have:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in have])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in have:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


# ---------------------------------------------------------------------------
# DDP with one synchronised forward per step


class DataParallelModel(nn.Module):
    """The model under DistributedDataParallel, for the training loop and the methods.

    The first forward of an optimiser step that runs in training mode with autograd goes through
    DDP (whose reducer then averages the gradients of the step's backward over the ranks); every
    other call (eval-mode saliency, ``no_grad`` passes, a second forward of the same step) calls
    the module directly, so that DDP sees one forward per backward. The eager module stays
    reachable as ``_orig_mod`` (what :func:`mixbench.hooks.unwrap` returns), and its attributes
    through this one.
    """

    def __init__(self, model: nn.Module, forward: nn.Module, ddp: nn.Module):
        super().__init__()
        self._orig_mod = model
        object.__setattr__(self, "_forward", forward)  # not submodules: the weights stay counted once
        object.__setattr__(self, "_ddp", ddp)
        object.__setattr__(self, "_synced", False)

    def new_step(self) -> None:
        object.__setattr__(self, "_synced", False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._orig_mod.training and torch.is_grad_enabled() and not self._synced:
            object.__setattr__(self, "_synced", True)
            return self._ddp(*args, **kwargs)
        return self._forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


# ---------------------------------------------------------------------------
# Synchronised BatchNorm on the CPU


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # torch 2.x marks it deprecated, with no autograd-aware replacement yet
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)  # autograd-aware: its backward all-reduces the gradient


def sync_batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Batch norm of ``x`` with the mean and biased variance of the whole global batch (every rank's
    ``x``), gradients through the all-reduces; running statistics updated as torch's SyncBatchNorm does
    (the unbiased variance of the global batch)."""
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=xf.dtype)
    first = _all_reduce(torch.cat([xf.sum(dims), count]))
    n = first[-1]
    mean = first[:-1] / n
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = xf - mean.view(shape)
    var = _all_reduce((centred * centred).sum(dims)) / n  # two passes, as one process computes it
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            unbiased = var * n / (n - 1).clamp(min=1)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.detach() * momentum)
    return y.to(x.dtype)


class CpuSyncBatchNorm(nn.Module):
    """Marker base of the CPU synchronised batch-norm classes made by :func:`convert_cpu_sync_batchnorm`."""


def _cpu_sync_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
        return self._mixbench_local_forward(x)
    y = sync_batch_norm(x, self)
    if hasattr(self, "act") and hasattr(self, "drop"):  # timm's BatchNormAct2d: norm, dropout, activation
        y = self.act(self.drop(y))
    return y


def convert_cpu_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every batch-norm layer of ``model`` (torch's and timm's norm+act ones) synchronised across the
    ranks in training mode, on the CPU; parameters, buffers and state-dict keys stay as they are."""
    from timm.layers import BatchNormAct2d

    made: Dict[type, type] = {}
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, CpuSyncBatchNorm):
            continue
        if not isinstance(module, BatchNormAct2d) and cls not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            raise UsageError(f"sync_bn on the CPU: the batch-norm layer {cls.__name__} is not supported")
        if cls not in made:
            made[cls] = type(f"CpuSync{cls.__name__}", (CpuSyncBatchNorm, cls),
                             {"forward": _cpu_sync_forward, "_mixbench_local_forward": cls.forward})
        module.__class__ = made[cls]
    return model


# ---------------------------------------------------------------------------
# Loaders


def eval_shard(loader: Any, rank: int, world: int) -> Any:
    """A test loader over rank ``rank``'s contiguous share of the test set (made once per loader)."""
    cached = getattr(loader, "_mixbench_shard", None)
    if cached is not None:
        return cached
    part = loader.eval_shard(rank, world)
    loader._mixbench_shard = part
    return part
