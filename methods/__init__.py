"""Mixing methods, one file each, registered by name.

A method is a class with its hyper-parameters as constructor arguments (the
defaults are the paper's values) and one call::

    method(model, x, y) -> (logits, target)

``x`` is a normalised batch (N, C, H, W) on the training device, ``y`` the
one-hot soft targets (N, K), and ``target`` the soft targets of the mixed batch
(rows sum to 1). A method may return a third element, an extra loss term that
the training loop adds to the soft-target cross-entropy. Random draws come from
``self.rng`` (a ``numpy.random.Generator`` seeded by the harness), so one seed
controls a run and the state can be checkpointed.

The registry keeps registration order, which is the order used in tables:
the imports below put ``vanilla`` first.
"""
from ._registry import MixMethod, create_method, get_method, list_methods, register_method, soft_cross_entropy

# Registration order is table order.
from . import vanilla  # noqa: F401,E402
from . import mixup  # noqa: F401,E402
from . import cutmix  # noqa: F401,E402
from . import manifold_mixup  # noqa: F401,E402
from . import puzzlemix  # noqa: F401,E402
from . import catchup_mix  # noqa: F401,E402

__all__ = [
    "MixMethod",
    "create_method",
    "get_method",
    "list_methods",
    "register_method",
    "soft_cross_entropy",
]
