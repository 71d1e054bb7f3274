"""``torch.compile`` for training: hidden-stage mixing inside the compiled graphs, one input layout.

On CUDA a run is compiled by default (:func:`mixbench.train.train_run`); on the CPU with ``compile``.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from mixbench import UsageError


class CompiledModel(torch.nn.Module):
    """A ``torch.compile``d model whose 4-d input is first put in one memory format.

    Compiled graphs are specialised on the input's strides, and a method's mixed batch may come in
    another layout than the loader's (PuzzleMix's transported blocks do, depending on the grid):
    without this, such a batch would compile another graph. The eager module stays reachable as
    ``_orig_mod`` (what :func:`mixbench.hooks.unwrap` returns), and its attributes through this one.
    """

    compiled_wrapper = True  # methods that must run the eager module look for this (e.g. AutoMix)

    def __init__(self, model: torch.nn.Module, compiled: Any, memory_format: torch.memory_format):
        super().__init__()
        self._orig_mod = model
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: no second copy of the weights
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return self._compiled(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


def compile_model(model: torch.nn.Module, backend: Optional[str] = None,
                  memory_format: torch.memory_format = torch.contiguous_format) -> CompiledModel:
    """``torch.compile(model)`` with hidden-stage mixing inside the graphs.

    The mixing hooks go in first (:func:`mixbench.hooks.install_mixing_hooks`; skipped for a model
    without ``feature_info``); shapes are static (the last, smaller test batch gets its own graph),
    inputs are put in ``memory_format`` (:class:`CompiledModel`), and the recompile limit leaves room
    for the fixed set of graphs of a run: train and eval, each mixing point, the saliency pass of
    saliency-based methods. ``backend`` defaults to ``$MIXBENCH_COMPILE_BACKEND``, else torch's
    (inductor).
    """
    from torch import _dynamo

    from mixbench.hooks import install_mixing_hooks

    try:
        install_mixing_hooks(model)
    except UsageError:
        pass
    cfg = _dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), COMPILE_GRAPH_LIMIT))
    backend = backend or os.environ.get("MIXBENCH_COMPILE_BACKEND")
    compiled = torch.compile(model, dynamic=False, **({"backend": backend} if backend else {}))
    return CompiledModel(model, compiled, memory_format)


COMPILE_GRAPH_LIMIT = 64
