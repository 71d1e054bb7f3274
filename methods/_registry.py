"""The method registry, the base class every method derives from, and the helpers they share."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError, plugins

_METHODS: Dict[str, Type["MixMethod"]] = {}


def register_method(cls: Type["MixMethod"]) -> Type["MixMethod"]:
    """Class decorator: register ``cls`` under ``cls.name`` (built-in methods and plugins alike)."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    if not (isinstance(cls, type) and issubclass(cls, MixMethod)):
        raise TypeError(f"{getattr(cls, '__qualname__', cls)!r}: @register_method needs a MixMethod subclass")
    plugins.note_registration("method", name, cls)  # where it comes from; a plugin's clash is a UsageError
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered")
    _METHODS[name] = cls
    return cls


def list_methods() -> List[str]:
    """Registered method names, in registration (table) order: built-ins, then plugins."""
    plugins.load_entry_points()
    return list(_METHODS)


def method_origin(name: str) -> str:
    """Where a method comes from: ``built-in``, ``plugin PATH``, ``module NAME`` or ``entry point ...``."""
    get_method(name)
    return plugins.origin("method", name)


def get_method(name: str) -> Type["MixMethod"]:
    plugins.load_entry_points()
    try:
        return _METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose from: {', '.join(_METHODS)} "
                         "(a method of your own: --plugins FILE.py, see `mixbench new-method`)") from None


def check_method_params(name: str, params: Mapping[str, Any]) -> Type["MixMethod"]:
    """The registered class of ``name``; unknown hyper-parameters in ``params`` are a usage error."""
    cls = get_method(name)
    valid = cls.default_params()
    bad = sorted(set(params) - set(valid))
    if bad:
        raise UsageError(
            f"unknown parameter(s) {', '.join(bad)} for method {name!r}; valid: {', '.join(valid) or '(none)'}"
        )
    return cls


def create_method(name: str, **params: Any) -> "MixMethod":
    """Instantiate a registered method; unknown hyper-parameters are a usage error."""
    return check_method_params(name, params)(**params)


@dataclass
class MixOutput:
    """What a method returns for one batch.

    ``logits`` (N, K) of the model on the mixed batch; ``target`` (N, K) the soft
    targets of the mixed batch (rows sum to 1); ``extra_loss`` an optional scalar
    term added to the training loss, written in the units of soft-target
    cross-entropy (the harness rescales it for other losses, see
    :mod:`mixbench.losses`).
    """

    logits: torch.Tensor
    target: torch.Tensor
    extra_loss: Optional[torch.Tensor] = None


class MixMethod:
    """Base class: seeded random draws, hyper-parameter introspection, checkpointable state.

    Subclasses set ``name`` and implement ``forward(model, x, y) -> MixOutput``;
    calling the method checks that ``setup`` ran first (a method never draws from
    an unseeded generator or mixes without the data's mean/std).
    """

    name: str = ""

    def __init__(self) -> None:
        self.rng: Optional[np.random.Generator] = None
        # Filled by ``setup``: facts about the data that some methods need.
        self.num_classes: int = 0
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self._stats_on: Dict[Any, Tuple[torch.Tensor, torch.Tensor]] = {}

    # -- harness hooks -------------------------------------------------
    def setup(self, *, seed: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        """Called once per run by the harness before training: the seed and the data's facts."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"{self.name}: setup needs a non-negative integer seed, got {seed!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise UsageError(f"{self.name}: setup needs num_classes >= 2, got {num_classes!r}")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape or not bool((std_t > 0).all()):
            raise UsageError(f"{self.name}: setup needs per-channel mean and positive std of one length, "
                             f"got mean={mean!r}, std={std!r}")
        self.rng = np.random.default_rng(int(seed))
        self.num_classes = int(num_classes)
        self.mean, self.std = mean_t, std_t
        self._stats_on = {}

    def stats(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The data's mean and std shaped (1, C, 1, 1) on ``x``'s device (copied there once)."""
        key = (x.device, x.dtype)
        if key not in self._stats_on:
            shape = (1, -1, 1, 1)
            self._stats_on[key] = (self.mean.to(x.device, x.dtype).view(shape),
                                   self.std.to(x.device, x.dtype).view(shape))
        return self._stats_on[key]

    # -- trainable parts (optional; the defaults: none) -------------------
    # A method may own modules that train with the model (AutoMix's mixing block and its
    # momentum copy of the model). The harness calls, generically for every method:
    #   bind(model)          once, after setup, before compiling, building the optimizer or resuming;
    #   param_groups()       added to the optimizer (the run's LR schedule scales them too);
    #   after_step(...)      after every optimizer step (e.g. a momentum update);
    # and state_dict / load_state_dict carry the owned modules' states in checkpoints.
    def bind(self, model: nn.Module) -> None:
        """Build the method's own modules for ``model`` (the eager module, on the training device).

        Called once per run after :meth:`setup`, before the model is compiled, before the
        optimizer is built and before a checkpoint is loaded. The default does nothing.
        """

    def owned_modules(self) -> Dict[str, nn.Module]:
        """The modules this method owns, by name (default: none). Their ``state_dict``s (parameters
        and buffers) are part of the method's state, so a checkpoint holds and restores them."""
        return {}

    def param_groups(self) -> List[Dict[str, Any]]:
        """Extra optimizer parameter groups (default: none): dicts with ``params`` and any options;
        an option left out takes the run's value (lr, momentum, weight decay...)."""
        return []

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (0-based over the whole run) of ``total_steps``,
        with the eager model. The default does nothing."""

    def state_dict(self) -> Dict[str, Any]:
        self._check_setup()
        state: Dict[str, Any] = {"rng": self.rng.bit_generator.state}
        modules = self.owned_modules()
        if modules:
            state["modules"] = {name: m.state_dict() for name, m in modules.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._check_setup()
        self.rng.bit_generator.state = state["rng"]
        modules = self.owned_modules()
        if modules or "modules" in state:
            saved = state.get("modules", {})
            if set(saved) != set(modules):
                raise RuntimeError(f"method {self.name!r}: the saved state has modules {sorted(saved)}, "
                                   f"this instance {sorted(modules)} (bind(model) before loading a state)")
            for name, m in modules.items():
                m.load_state_dict(saved[name])

    def _check_setup(self) -> None:
        if self.rng is None:
            raise RuntimeError(f"method {self.name!r} used before setup(seed=..., num_classes=..., mean=..., std=...)")

    def close(self) -> None:
        """Release resources (worker pools...) at the end of a run."""

    @classmethod
    def available(cls, **params: Any) -> bool:
        """False when an optional dependency is missing; ``--methods all`` then skips the method.

        ``params`` are the run's method parameters (a method may need one, e.g. a checkpoint path)."""
        return True

    @classmethod
    def unavailable_reason(cls, **params: Any) -> str:
        """One line saying what is missing and how to install it (``params`` as for :meth:`available`)."""
        return f"method {cls.name!r} is not available"

    # -- introspection -------------------------------------------------
    @classmethod
    def default_params(cls) -> Dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in list(sig.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def params(self) -> Dict[str, Any]:
        """The hyper-parameters this instance was built with (JSON-friendly)."""
        return {k: getattr(self, k) for k in self.default_params()}

    # -- helpers shared by methods ------------------------------------
    def draw_lambda(self, alpha: float) -> float:
        """lambda ~ Beta(alpha, alpha); alpha <= 0 means no mixing (lambda = 1)."""
        return float(self.rng.beta(alpha, alpha)) if alpha > 0 else 1.0

    def draw_perm(self, n: int, device: torch.device) -> torch.Tensor:
        """A random permutation giving each sample its partner."""
        return torch.from_numpy(self.rng.permutation(n)).to(device, non_blocking=True)

    def draw_point_lambda_perm(self, points: Sequence[int], alpha: float, n: int,
                               device: torch.device) -> Tuple[int, float, torch.Tensor]:
        """The draws of a hidden-point method, in this order: the mixing point (uniform over
        ``points``), lambda ~ Beta(alpha, alpha) and the partner permutation."""
        k = points[int(self.rng.integers(len(points)))]
        lam = self.draw_lambda(alpha)
        return k, lam, self.draw_perm(n, device)

    # -- the call --------------------------------------------------------
    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> MixOutput:
        """Mix the normalised batch ``x`` (N, C, H, W) with one-hot/soft targets ``y`` (N, K)."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> MixOutput:
        self._check_setup()
        out = self.forward(model, x, y)
        if not isinstance(out, MixOutput):
            raise TypeError(f"method {self.name!r} returned {type(out).__name__}; forward must return a MixOutput")
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def mix_targets(y: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    """lam * y + (1 - lam) * y[perm]; ``lam`` a float or a per-sample (N,) tensor."""
    if torch.is_tensor(lam) and lam.dim() == 1:
        lam = lam.to(y.dtype)[:, None]
    return lam * y + (1 - lam) * y[perm]


def input_gradient_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train_mode: bool = False,
                            keep_graph: bool = False,
                            weight_grads: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Saliency from the gradient of the batch's cross-entropy with respect to the input only.

    Returns ``(saliency, grad, loss)``: ``saliency = sqrt(mean_c grad^2)`` of shape
    (N, H, W) (PuzzleMix's unary, also the saliency of Co-Mixup and GuidedMixup-AP),
    the input gradient and the mean cross-entropy against ``y`` (soft targets).
    The pass runs in float32 even under autocast (the saliency feeds graph cuts
    and sign steps that the references compute in float32), in eval mode unless
    ``train_mode`` (then batch-norm statistics update, as the references' clean-
    loss pass does), and computes no weight gradients. ``keep_graph`` keeps the
    graph so that ``loss`` can be back-propagated to the weights afterwards.

    ``weight_grads`` instead computes the weights' gradients of the loss in the
    same backward pass as the input's (as the references' single
    ``loss.backward()`` of the clean batch does) and frees the graph: ``loss``
    then has the clean loss's value and, back-propagated, gives the weights
    exactly those gradients (times the factor it is scaled by) at the cost of
    one multiply per weight instead of a second backward through the model.
    """
    x = x.detach().requires_grad_(True)
    was_training = model.training
    if not train_mode:
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad] if weight_grads else []
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            loss = torch.sum(-y.float() * F.log_softmax(model(x.float()).float(), dim=-1), dim=-1).mean()
            grads = torch.autograd.grad(loss, [x] + params, retain_graph=keep_graph and not weight_grads,
                                        allow_unused=True)
    finally:
        model.train(was_training)
    grad = grads[0]
    if weight_grads:
        # d/dp sum(p * g) = g: a surrogate with the gradients already computed, and the loss's value.
        linear = sum(((p * g.detach()).sum() for p, g in zip(params, grads[1:]) if g is not None),
                     loss.new_zeros(()))
        loss = loss.detach() + (linear - linear.detach())
    return torch.sqrt(torch.mean(grad**2, dim=1)), grad, loss
