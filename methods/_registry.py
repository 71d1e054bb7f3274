"""The method registry and the base class every method derives from."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Type

import numpy as np
import torch
import torch.nn.functional as F

from mixbench import UsageError

_METHODS: Dict[str, Type["MixMethod"]] = {}


def register_method(cls: Type["MixMethod"]) -> Type["MixMethod"]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered")
    _METHODS[name] = cls
    return cls


def list_methods() -> List[str]:
    """Registered method names, in registration (table) order."""
    return list(_METHODS)


def get_method(name: str) -> Type["MixMethod"]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose from: {', '.join(_METHODS)}") from None


def create_method(name: str, **params: Any) -> "MixMethod":
    """Instantiate a registered method; unknown hyper-parameters are a usage error."""
    cls = get_method(name)
    valid = cls.default_params()
    bad = sorted(set(params) - set(valid))
    if bad:
        raise UsageError(
            f"unknown parameter(s) {', '.join(bad)} for method {name!r}; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(**params)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (rows sum to 1), averaged over the batch."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class MixMethod:
    """Base class: seeded random draws, hyper-parameter introspection, checkpointable state.

    Subclasses set ``name`` and implement ``__call__(model, x, y)``.
    """

    name: str = ""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        # Filled by ``setup``: facts about the data that some methods need.
        self.num_classes: int = 0
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    # -- harness hooks -------------------------------------------------
    def setup(self, *, seed: int, num_classes: int, mean=None, std=None) -> None:
        """Called once per run by the harness before training."""
        self.rng = np.random.default_rng(seed)
        self.num_classes = num_classes
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        """Release resources (worker pools...) at the end of a run."""

    @classmethod
    def available(cls) -> bool:
        """False when an optional dependency is missing; ``--methods all`` then skips the method."""
        return True

    @classmethod
    def unavailable_reason(cls) -> str:
        """One line saying what is missing and how to install it."""
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

    def __call__(self, model: Callable, x: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def mix_targets(y: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    """lam * y + (1 - lam) * y[perm]; ``lam`` a float or a per-sample (N,) tensor."""
    if torch.is_tensor(lam) and lam.dim() == 1:
        lam = lam.to(y.dtype)[:, None]
    return lam * y + (1 - lam) * y[perm]
