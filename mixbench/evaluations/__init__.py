"""Evaluation suites, one module each, registered with ``@register_suite`` (:mod:`._registry`).

``mixbench.evaluate`` runs them on finished runs; each suite declares its options, the checks of their
values and its headline numbers (what the report shows, and whether lower is better).
"""
from mixbench.evaluations._registry import (  # noqa: F401
    SUITES,
    Headline,
    Suite,
    get_suite,
    headline,
    register_suite,
    suite_options,
)
from mixbench.evaluations.base import EvalContext, ImageSet, PixelModel, predict, top1  # noqa: F401

# the built-in suites, in the order `--suite all` runs them
from mixbench.evaluations import adversarial, corruption, deformation, feature_removal  # noqa: E402,F401
from mixbench.evaluations import filter_usage, calibration, loss_landscape  # noqa: E402,F401
from mixbench.evaluations.filter_usage import filter_usage_during_training  # noqa: E402,F401
