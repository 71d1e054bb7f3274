"""Mixing methods, one file each, registered by name.

A method is a class with its hyper-parameters as constructor arguments (the
defaults are the paper's values) and one call::

    method.setup(seed=..., num_classes=..., mean=..., std=...)   # once per run, by the harness
    method(model, x, y) -> MixOutput(logits, target, extra_loss=None)

``model`` is an ``nn.Module``, ``x`` a normalised batch (N, C, H, W) on the
training device, ``y`` the one-hot soft targets (N, K); ``target`` holds the
soft targets of the mixed batch (rows sum to 1) and ``extra_loss`` an optional
term that the training loop adds to its loss. Subclasses implement
``forward(model, x, y)``; calling a method before ``setup`` is an error. Random
draws come from ``self.rng`` (a ``numpy.random.Generator`` seeded by
``setup``), so one seed controls a run and the state can be checkpointed.

A method with trainable parts of its own (AutoMix) uses the optional hooks,
which the harness calls for every method (the defaults do nothing)::

    method.bind(model)                            # once, after setup: build the method's modules
    method.param_groups() -> [dict(params=...)]   # extra optimizer groups (the run's options by default)
    method.after_step(model, step, total_steps)   # after every optimizer step (a momentum update)
    method.owned_modules() -> {name: module}      # their states travel in state_dict()

The registry keeps registration order, which is the order used in tables:
the imports below put ``vanilla`` first.
"""
from ._registry import (
    MixMethod,
    MixOutput,
    check_method_params,
    create_method,
    get_method,
    input_gradient_saliency,
    list_methods,
    mix_targets,
    register_method,
)

# Registration order is table order.
from . import vanilla  # noqa: F401,E402
from . import mixup  # noqa: F401,E402
from . import cutmix  # noqa: F401,E402
from . import manifold_mixup  # noqa: F401,E402
from . import puzzlemix  # noqa: F401,E402
from . import catchup_mix  # noqa: F401,E402
from . import saliencymix  # noqa: F401,E402
from . import fmix  # noqa: F401,E402
from . import resizemix  # noqa: F401,E402
from . import gridmix  # noqa: F401,E402
from . import smoothmix  # noqa: F401,E402
from . import attentivemix  # noqa: F401,E402
from . import snapmix  # noqa: F401,E402
from . import recursivemix  # noqa: F401,E402
from . import comixup  # noqa: F401,E402
from . import guidedmixup  # noqa: F401,E402
from . import alignmix  # noqa: F401,E402
from . import automix  # noqa: F401,E402

__all__ = [
    "MixMethod",
    "MixOutput",
    "check_method_params",
    "create_method",
    "get_method",
    "input_gradient_saliency",
    "list_methods",
    "mix_targets",
    "register_method",
]
