"""Hidden-stage mixing on any timm CNN: find the stages, replace one stage's output.

Feature-level methods (Manifold Mixup, Catch-up Mix) mix the activations after
one stage of the network. This module does that for every timm model that has a
``feature_info`` (the list timm keeps of the modules whose outputs are the
model's feature maps), with no model-specific code.

Mixing points
-------------
A model's mixing points are ``["input"] + stage_names(model)``, numbered from 0:

- point 0 is the input batch;
- point k >= 1 is the output of the module ``feature_info[k - 1]``.

timm's ``feature_info`` starts with the stem (the stride-2 level of an ImageNet
model, kept as the first entry when the CIFAR stem removes the stride), followed
by one entry per stage. So for every timm CNN, point 1 is the output of the
stem and point 2 + s is the output of the residual stage s (0-based):

============  =========  ==========  ==========  ==========  ==========  ==========
model         0          1           2           3           4           5
============  =========  ==========  ==========  ==========  ==========  ==========
resnet18      input      act1        layer1      layer2      layer3      layer4
resnetv2_18   input      stem.conv   stages.0    stages.1    stages.2    stages.3
regnetx_002   input      stem        s1          s2          s3          s4
============  =========  ==========  ==========  ==========  ==========  ==========

``replace_stage_output(model, k, fn)`` is a context manager that installs a
one-shot hook: in the next forward pass the output ``h`` of point k is replaced
by ``fn(h)`` (for k = 0, a forward pre-hook on the model replaces the input).
Later forward passes inside the context, and all passes after it, are
untouched; leaving the context removes the hook and checks that it fired.

``torch.compile``: a compiled model does not see hooks added after compilation
(dynamo does not guard on them). :func:`install_mixing_hooks`, called once
before compiling, puts one persistent hook on every mixing point; each reads a
small :class:`MixingState` (the point to mix at, -1 for none, and the mixing
function of the current call). :func:`forward_mixed` arms that state for one
forward pass of the model as given, compiled or not. Under ``torch.compile``
the hook at the armed point calls the opaque operator ``mixbench::stage_mix``,
which runs the call's mixing function eagerly at run time (its own small
autograd graph, back-propagated by ``mixbench::stage_mix_backward``): the
graphs see neither the function nor its Python numbers (lambda, the partner
permutation), so dynamo traces one graph per mixing point and none per step.
Without installed hooks, :func:`forward_mixed` mixes at a hidden point with a
one-shot hook on the eager module behind a compiled wrapper (the graph stays
unused for that call).
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mixbench import UsageError

StageFn = Callable[[torch.Tensor], torch.Tensor]
Points = Union[str, Sequence[int]]


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def stage_names(model: nn.Module) -> List[str]:
    """Module names of the model's stages, in forward order, from timm's ``feature_info``."""
    info = getattr(unwrap(model), "feature_info", None)
    if not info:
        raise UsageError(
            f"{type(unwrap(model)).__name__} has no feature_info; hidden-stage mixing needs a timm CNN "
            "with feature_info (e.g. resnet18, resnetv2_18, regnetx_002)"
        )
    return [entry["module"] for entry in info]


def mixing_points(model: nn.Module) -> List[str]:
    """``["input"] + stage_names(model)``: the name of each mixing point, indexed by k."""
    return ["input"] + stage_names(model)


def resolve_points(model: nn.Module, points: Points) -> Tuple[int, ...]:
    """Validate a method's ``mix_points`` against ``model``; ``"all"`` means every point."""
    names = mixing_points(model)
    if isinstance(points, str):
        if points != "all":
            raise UsageError(f"mix_points {points!r}: give 'all' or a list of point indices 0..{len(names) - 1}")
        return tuple(range(len(names)))
    resolved = tuple(int(k) for k in points)
    if not resolved:
        raise UsageError("mix_points is empty; give 'all' or a list of point indices")
    bad = [k for k in resolved if not 0 <= k < len(names)]
    if bad:
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise UsageError(f"mix_points {bad} out of range for {type(unwrap(model)).__name__}; valid: {choices}")
    return resolved


def check_points(points: Points) -> Points:
    """Constructor-time check of ``mix_points`` (the model is not known yet): 'all' or non-negative ints."""
    if isinstance(points, str):
        if points != "all":
            raise UsageError(f"mix_points {points!r}: give 'all' or a list of point indices (0 = input)")
        return points
    try:
        resolved = tuple(int(k) for k in points)
    except (TypeError, ValueError):
        raise UsageError(f"mix_points {points!r}: give 'all' or a list of point indices (0 = input)") from None
    if not resolved or any(k < 0 for k in resolved):
        raise UsageError(f"mix_points {points!r}: give 'all' or a non-empty list of point indices >= 0")
    return resolved


@contextlib.contextmanager
def replace_stage_output(model: nn.Module, k: int, fn: StageFn) -> Iterator[None]:
    """In the next forward pass of ``model``, replace the output ``h`` of point ``k`` by ``fn(h)``.

    One-shot: only the first call of the stage module inside the context is
    changed. On a normal exit the hook must have fired, otherwise the stage did
    not run and a ``RuntimeError`` says so.
    """
    names = mixing_points(model)
    if not 0 <= k < len(names):
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise UsageError(f"mixing point {k} out of range; valid: {choices}")
    module = unwrap(model)
    fired = [False]

    if k == 0:
        def pre_hook(_module, args, kwargs):
            if fired[0]:
                return None
            fired[0] = True
            return (fn(args[0]),) + tuple(args[1:]), kwargs

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(_module, _args, output):
            if fired[0]:
                return None
            fired[0] = True
            return fn(output)

        handle = module.get_submodule(names[k]).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if not fired[0]:
        raise RuntimeError(f"mixing point {k} ({names[k]}) did not run in the forward pass")


# ---------------------------------------------------------------------------
# Persistent hooks for compiled models


class MixingState:
    """What the hooks of :func:`install_mixing_hooks` read: the armed point (-1: none) and its function.

    ``fired`` says whether the armed hook ran; ``saved`` holds the input and output of the last
    opaque call (:func:`_stage_mix`) for its backward.
    """

    def __init__(self, names: Sequence[str]):
        self.id = next(_STATE_IDS)
        self.names = list(names)
        self.point = -1
        self.fn: Optional[StageFn] = None
        self.fired = False
        self.saved: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        _STATES[self.id] = self


_STATE_IDS = itertools.count()
_STATES: "weakref.WeakValueDictionary[int, MixingState]" = weakref.WeakValueDictionary()
_STATE_ATTR = "_mixbench_mixing"


def mixing_state(model: nn.Module) -> Optional[MixingState]:
    """The state of the hooks installed on ``model`` (or on the module behind a compiled wrapper), if any."""
    return unwrap(model).__dict__.get(_STATE_ATTR)


def install_mixing_hooks(model: nn.Module) -> MixingState:
    """Put one persistent forward hook on every hidden mixing point of ``model`` (idempotent).

    Call it before ``torch.compile``: the compiled graphs then contain the hooks. A hook does nothing
    unless :func:`forward_mixed` armed its point.
    """
    module = unwrap(model)
    state = mixing_state(module)
    if state is not None:
        return state
    names = mixing_points(module)
    state = MixingState(names)
    for k in range(1, len(names)):
        module.get_submodule(names[k]).register_forward_hook(_point_hook(state, k))
    module.__dict__[_STATE_ATTR] = state  # a plain attribute: not a submodule, not in the state dict
    return state


def _point_hook(state: MixingState, k: int):
    state_id = state.id

    def hook(_module, _args, output):
        if state.point != k:  # dynamo guards on this: one graph per armed point
            return None
        if torch.compiler.is_compiling():
            return torch.ops.mixbench.stage_mix(output, state_id, k)
        state.point = -1  # eager: one-shot
        state.fired = True
        return state.fn(output)

    return hook


@contextlib.contextmanager
def armed(state: MixingState, k: int, fn: StageFn) -> Iterator[None]:
    """Mix the output of point ``k`` with ``fn`` in the next forward pass of the hooked model.

    Eager models mix once (the hook disarms itself); a compiled model mixes in every forward pass
    inside the context, so make one. On a normal exit the hook must have fired.
    """
    if not 1 <= k < len(state.names):
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(state.names))
        raise UsageError(f"mixing point {k} out of range for the installed hooks; valid: {choices}")
    if state.point != -1:
        raise RuntimeError(f"mixing point {state.point} is already armed (nested mixing is not supported)")
    state.point, state.fn, state.fired = k, fn, False
    try:
        yield
    finally:
        state.point, state.fn = -1, None
    if not state.fired:
        raise RuntimeError(f"mixing point {k} ({state.names[k]}) did not run in the forward pass")


def forward_mixed(model: nn.Module, x: torch.Tensor, k: int, fn: StageFn) -> torch.Tensor:
    """``model(x)`` with the output of point ``k`` replaced by ``fn(output)``.

    k = 0 calls ``model(fn(x))`` (a compiled model stays compiled). For k >= 1, a model with
    installed hooks (:func:`install_mixing_hooks`) is called as given, compiled or not, with point
    ``k`` armed; otherwise the eager module runs under :func:`replace_stage_output`.
    """
    if k == 0:
        return model(fn(x))
    state = mixing_state(model)
    if state is not None:
        with armed(state, k, fn):
            return model(x)
    with replace_stage_output(model, k, fn):
        return unwrap(model)(x)


# The opaque operator of a compiled hook. At run time it calls the armed function eagerly on a
# detached input with autograd on (custom-op kernels run below autograd; the guard below lifts
# that), keeps the input and output for the backward operator, and returns a tensor laid out like
# its input (what the fake kernel promises the compiler).
def _autograd_enabled():
    keys = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        keys = keys.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), keys)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``ref`` and no storage shared with ``ref``."""
    if t.stride() != ref.stride() or t.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr():
        return torch.empty_like(ref).copy_(t)
    return t


@torch.library.custom_op("mixbench::stage_mix", mutates_args=())
def _stage_mix(h: torch.Tensor, state_id: int, point: int) -> torch.Tensor:
    state = _STATES[state_id]
    if state.point != point or state.fn is None:
        raise RuntimeError(f"mixbench::stage_mix: point {point} is not armed")
    with _autograd_enabled(), torch.enable_grad():
        h_in = h.detach().requires_grad_(h.is_floating_point())
        out = state.fn(h_in)
    if out.shape != h.shape or out.dtype != h.dtype or out.device != h.device:
        raise RuntimeError(f"the mixing function at point {point} changed its input's shape, dtype or device "
                           f"({tuple(h.shape)} {h.dtype} -> {tuple(out.shape)} {out.dtype})")
    state.fired = True
    state.saved = (h_in, out) if out.requires_grad else None
    return _like(out.detach(), h)


@_stage_mix.register_fake
def _(h, state_id, point):
    return torch.empty_like(h)


@torch.library.custom_op("mixbench::stage_mix_backward", mutates_args=())
def _stage_mix_backward(grad: torch.Tensor, state_id: int, point: int) -> torch.Tensor:
    state = _STATES[state_id]
    saved, state.saved = state.saved, None
    if saved is None:
        return torch.zeros_like(grad)  # the mixing function did not depend on its input
    h_in, out = saved
    with _autograd_enabled():
        (g,) = torch.autograd.grad(out, h_in, grad, allow_unused=True)
    return torch.zeros_like(grad) if g is None else _like(g, grad)


@_stage_mix_backward.register_fake
def _(grad, state_id, point):
    return torch.empty_like(grad)


def _stage_mix_setup(ctx, inputs, output):
    ctx.state_id, ctx.point = inputs[1], inputs[2]


def _stage_mix_grad(ctx, grad):
    return torch.ops.mixbench.stage_mix_backward(grad, ctx.state_id, ctx.point), None, None


_stage_mix.register_autograd(_stage_mix_grad, setup_context=_stage_mix_setup)
