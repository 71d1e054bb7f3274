"""The registry of evaluation suites and what each declares.

A suite is a function ``suite_NAME(ctx, **options) -> dict`` registered with ``@register_suite``. It
declares, next to its code:

- its options: the keyword parameters of the function and their defaults (what ``--set SUITE.KEY=VALUE``
  may set, and the kind of value each takes);
- ``check(options)``: raises a one-line ``UsageError`` for values the suite cannot use, before any run
  is loaded;
- ``headlines``: the numbers of its result that the report's tables and plots show, each a
  :class:`Headline` with its display name, whether lower is better and its decimals.

The report (:mod:`mixbench.frame`, :mod:`mixbench.report`, :mod:`mixbench.plots`) and ``mixbench
evaluate``'s log read these declarations. A suite that declares no headlines (a plugin's bare
``@register_suite``), or one whose results are read where it is not registered, shows its top-level
numbers, lower being better when the name says so (loss, error, nll, ece, sharpness, gini, ...).

This module imports nothing heavy (no torch), so the report can read the declarations cheaply.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from mixbench import UsageError, plugins


@dataclass(frozen=True)
class Headline:
    """A number of a suite's result shown in the report: ``result["eval"][suite][key]``."""

    key: str  # dotted path inside the suite's result
    lower_is_better: bool = False
    label: Optional[str] = None  # display name; default ``suite.key``
    decimals: int = 2  # in the tables
    percent: bool = False  # plotted with a (%) unit

    @property
    def better(self) -> str:
        """``min`` or ``max``, as the tables rank."""
        return "min" if self.lower_is_better else "max"


# Names of numbers that are better when lower, for suites that declare no headlines.
_LOWER_IS_BETTER = re.compile(r"(^|[._\-])(err|error|loss|loss0|nll|ece|mce|ce|drop|sharpness|gini)s?($|[._\-])", re.I)


def _default_headline(key: str) -> Headline:
    return Headline(key, lower_is_better=bool(_LOWER_IS_BETTER.search(key)), percent=key.endswith(("top1", "auc", "ece")))


class Suite:
    """A registered suite: calling it runs it (``suite(ctx, **options)``); the rest is its declaration."""

    def __init__(self, name: str, fn: Callable[..., Dict[str, Any]], headlines: Optional[Sequence[Headline]],
                 check: Optional[Callable[[Dict[str, Any]], None]]):
        self.name, self.fn, self._check = name, fn, check
        self.declared = headlines is not None
        self.headlines: List[Headline] = [
            h if h.label else Headline(h.key, h.lower_is_better, f"{name}.{h.key}", h.decimals, h.percent)
            for h in (headlines or ())]
        self.__doc__ = fn.__doc__

    def __call__(self, ctx: Any, **options: Any) -> Dict[str, Any]:
        return self.fn(ctx, **options)

    def options(self) -> Dict[str, Any]:
        """The suite's keyword options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}

    def check(self, options: Dict[str, Any]) -> None:
        """Values the suite cannot use (``options`` over the defaults), as a UsageError."""
        if self._check is not None:
            self._check({**self.options(), **options})

    def headline(self, key: str) -> Optional[Headline]:
        """The declaration of ``key`` (a dotted path inside the result) when the report shows it."""
        if self.declared:
            return next((h for h in self.headlines if h.key == key), None)
        return undeclared_headline(self.name, key)

    def summary(self, result: Dict[str, Any]) -> str:
        """The headline numbers of a result, as the evaluate command logs them."""
        shown = self.headlines if self.declared else [
            Headline(k, label=k) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        parts = []
        for h in shown:
            v: Any = result
            for part in h.key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                parts.append(f"{h.key}={v:.4g}")
        return " ".join(parts)


SUITES: Dict[str, Suite] = {}


def register_suite(fn: Optional[Callable[..., Dict[str, Any]]] = None, *, headlines: Optional[Sequence[Headline]] = None,
                   check: Optional[Callable[[Dict[str, Any]], None]] = None):
    """Register ``suite_NAME(ctx: EvalContext, **options) -> dict`` as suite NAME, bare or with declarations::

        @register_suite(headlines=[Headline("ece", lower_is_better=True)], check=_check)
        def suite_calibration(ctx, bins=15): ...

    Plugins register suites the same way (see :mod:`mixbench.plugins`); the returned mapping is merged
    into result.json's ``eval[NAME]`` and its headlines appear in the report.
    """
    def decorate(f: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
        name = f.__name__.replace("suite_", "")
        plugins.note_registration("suite", name, f)  # where it comes from; a plugin's clash is a UsageError
        SUITES[name] = Suite(name, f, headlines, check)
        return f

    return decorate(fn) if fn is not None else decorate


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UsageError(f"unknown evaluation suite {name!r}; choose from: {', '.join(SUITES)}")
    return SUITES[name]


def suite_options(name: str) -> Dict[str, Any]:
    """A suite's keyword options and their defaults."""
    return get_suite(name).options()


def undeclared_headline(suite: str, key: str) -> Optional[Headline]:
    """A suite without declarations shows its top-level numbers."""
    if not key or "." in key:
        return None
    h = _default_headline(key)
    return Headline(h.key, h.lower_is_better, f"{suite}.{key}", percent=h.percent)


def headline(flat_key: str) -> Optional[Headline]:
    """The declaration of a flattened eval metric ``suite.key[.sub...]``, None when the report does not show it."""
    suite, _, rest = flat_key.partition(".")
    if suite in SUITES:
        return SUITES[suite].headline(rest)
    return undeclared_headline(suite, rest)
