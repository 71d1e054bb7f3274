"""Vanilla training: no mixing, the baseline every table is read against."""
from ._registry import MixMethod, MixOutput, register_method


@register_method
class Vanilla(MixMethod):
    """Plain empirical risk minimisation on the (augmented) batch."""

    name = "vanilla"

    def forward(self, model, x, y):
        return MixOutput(model(x), y)
