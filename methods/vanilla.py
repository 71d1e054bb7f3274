"""Vanilla training: no mixing, the baseline every table is read against."""
from ._registry import MixMethod, register_method


@register_method
class Vanilla(MixMethod):
    """Plain empirical risk minimisation on the (augmented) batch."""

    name = "vanilla"

    def __call__(self, model, x, y):
        return model(x), y
