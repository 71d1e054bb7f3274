"""Benchmarks: YAML files that describe a grid of runs (``mixbench run --config BENCHMARK.yaml``).

A benchmark is a mapping. Every key is optional::

    name: cifar100_preactresnet18      # free text, for people
    description: ...
    out: results/runs/cifar100         # default results folder (--out overrides)
    plugins: [my_mix.py]               # methods/suites of your own: files (relative to the benchmark) or modules
    datasets: [cifar100]               # or `dataset: cifar100`
    models: [preactresnet18]           # or `model: ...` (default: the data set's)
    seeds: [0, 1, 2]                   # or `seed: 0`
    methods: all                       # `all`, a list, or a mapping name -> overrides (`all:` among
                                       # the names: every available method, these with overrides)
    epochs: 200                        # any run option (see RunSpec): applies to every cell
    grid:                              # run options to sweep (cartesian product)
      lr: [0.1, 0.05]
      method_params.alpha: [0.2, 1.0]  # a dotted key sets one entry of a dict option

With ``methods`` as a mapping, each method's value is a mapping of run options
(and optionally its own ``grid``) that override the benchmark's for that method::

    methods:
      vanilla:
      mixup: {method_params: {alpha: 1.0}}
      manifold_mixup: {method_params: {alpha: 2.0}, epochs: 2000}

Precedence, lowest first: the data set's defaults, the benchmark's options, the
benchmark's ``grid``, the method's options, the method's ``grid``, then the command
line (which also replaces the benchmark's methods, seeds, dataset and model lists).
``method_params`` and ``model_kwargs`` are merged key by key across these
levels. Cells that resolve to the same run are kept once.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from mixbench import UsageError
from mixbench.data import normalise_dataset_name
from mixbench.methods import check_method_params, get_method, list_methods
from mixbench.plugins import load_plugins, split_refs
from mixbench.spec import RunSpec

META_KEYS = ("name", "description", "out", "metric", "plugins")  # metric: the top-1 rule of `run`'s summary
LIST_KEYS = {"methods": "method", "datasets": "dataset", "models": "model", "seeds": "seed"}
_FIELDS = [f.name for f in dataclasses.fields(RunSpec)]
# `plugins` is a top-level key (imported before the benchmark is read); `method_source` is computed.
OPTION_KEYS = [f for f in _FIELDS if f not in LIST_KEYS.values() and f not in ("plugins", "method_source")]
_MERGED = ("method_params", "model_kwargs")


def load_benchmark(path: Path) -> Dict[str, Any]:
    """Read a benchmark file (YAML); a missing file or a non-mapping is a usage error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"benchmark {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"benchmark {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"benchmark {str(path)!r} must be a mapping of keys, got {type(data).__name__}")
    if data.get("plugins") is not None:  # files relative to the benchmark's folder, imported before its methods
        try:
            data["plugins"] = load_plugins(data["plugins"], base=path.resolve().parent)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None
    check_benchmark(data, where=str(path))
    return data


def check_benchmark(benchmark: Mapping[str, Any], where: str = "benchmark") -> None:
    """Reject unknown keys (top level, per method, grids) with the key's name and the valid ones."""
    valid = list(META_KEYS) + ["grid"] + list(LIST_KEYS) + list(LIST_KEYS.values()) + OPTION_KEYS
    for key in benchmark:
        if key not in valid:
            raise UsageError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")
    if benchmark.get("metric", "final") not in ("final", "best", "last10"):
        raise UsageError(f"{where}: metric must be one of final, best, last10, got {benchmark['metric']!r}")
    for plural, singular in LIST_KEYS.items():
        if plural in benchmark and singular in benchmark:
            raise UsageError(f"{where}: give either {plural!r} or {singular!r}, not both")
    _check_grid(benchmark.get("grid"), f"{where}: grid")
    methods = benchmark.get("methods")
    if isinstance(methods, dict):
        for name, overrides in methods.items():
            if name == "all":
                if overrides is not None:
                    raise UsageError(f"{where}: methods.all takes no options (give them under the method's name)")
                continue
            get_method(str(name))
            if overrides is None:
                continue
            if not isinstance(overrides, dict):
                raise UsageError(f"{where}: methods.{name} must be a mapping of run options, got {overrides!r}")
            for key in overrides:
                if key not in OPTION_KEYS + ["grid"]:
                    raise UsageError(
                        f"{where}: unknown key {key!r} in methods.{name}; "
                        f"valid keys: {', '.join(OPTION_KEYS + ['grid'])}"
                    )
            _check_grid(overrides.get("grid"), f"{where}: methods.{name}.grid")


def _check_grid(grid: Any, where: str) -> None:
    if grid is None:
        return
    if not isinstance(grid, dict):
        raise UsageError(f"{where} must be a mapping of option -> list of values, got {grid!r}")
    for key, values in grid.items():
        head = str(key).split(".", 1)[0]
        if head not in OPTION_KEYS or ("." in str(key) and head not in _MERGED):
            raise UsageError(f"{where}: unknown key {key!r}; valid keys: {', '.join(OPTION_KEYS)} "
                             f"(and {'.NAME, '.join(_MERGED)}.NAME)")
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}.{key} must be a non-empty list of values, got {values!r}")


def _as_list(benchmark: Mapping[str, Any], plural: str) -> Optional[List[Any]]:
    singular = LIST_KEYS[plural]
    if singular in benchmark:
        return [benchmark[singular]]
    if plural not in benchmark:
        return None
    value = benchmark[plural]
    if isinstance(value, (list, tuple)):
        if not value:
            raise UsageError(f"{plural} is empty")
        return list(value)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return [int(v) if plural == "seeds" and v.isdigit() else v for v in items]
    return [value]


def _combos(grid: Optional[Mapping[str, List[Any]]]) -> List[Dict[str, Any]]:
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _apply(options: Dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Set ``layer``'s options on ``options``: dict options merge, dotted keys set one entry."""
    for key, value in layer.items():
        if key == "grid":
            continue
        if "." in key:
            head, sub = key.split(".", 1)
            options[head] = {**(options.get(head) or {}), sub: value}
        elif key in _MERGED:
            if value is not None and not isinstance(value, dict):
                raise UsageError(f"{key} must be a mapping, got {value!r}")
            options[key] = {**(options.get(key) or {}), **(value or {})}
        else:
            options[key] = value


def expand_benchmark(benchmark: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> List[RunSpec]:
    """Every cell of ``benchmark`` as a resolved RunSpec, with ``overrides`` (the command line) applied last.

    ``overrides`` may hold run options and the list keys ``methods``, ``seeds``,
    ``datasets``/``dataset`` and ``models``/``model``.
    """
    overrides = dict(overrides or {})
    load_plugins(list(split_refs(benchmark.get("plugins"))) + list(split_refs(overrides.get("plugins"))))
    check_benchmark(benchmark)
    method_overrides: Dict[str, Dict[str, Any]] = {}
    raw_methods = benchmark.get("methods", benchmark.get("method"))
    if isinstance(raw_methods, dict):
        method_overrides = {str(k): dict(v or {}) for k, v in raw_methods.items()}

    def listed(plural: str, default: List[Any]) -> List[Any]:
        singular = LIST_KEYS[plural]
        for source in (overrides, benchmark):
            if plural in source or singular in source:
                if source is benchmark and plural == "methods" and isinstance(raw_methods, dict):
                    return list(method_overrides)
                return _as_list(source, plural)
        return default

    methods = listed("methods", ["all"])
    if methods == ["all"]:  # every registered method whose optional dependencies are installed
        from mixbench.spec import parse_methods

        methods = parse_methods("all")
    elif "all" in methods:  # a mapping with `all:` and overrides for some methods
        methods = _every_available(benchmark, method_overrides)
    for name in methods:
        get_method(str(name))  # an unknown name fails here; availability is checked per cell, with its parameters
    seeds = listed("seeds", [0])
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UsageError(f"seeds must be non-negative integers, got {seed!r}")
    datasets = listed("datasets", ["digits"])
    models = listed("models", [None])
    base = {k: v for k, v in benchmark.items() if k in OPTION_KEYS}
    cli = {k: v for k, v in overrides.items() if k in OPTION_KEYS}

    cells: List[RunSpec] = []
    seen = set()
    for dataset, model, method in itertools.product(datasets, models, methods):
        mo = method_overrides.get(method, {})
        for g_bench, g_method in itertools.product(_combos(benchmark.get("grid")), _combos(mo.get("grid"))):
            options: Dict[str, Any] = {"method": method, "dataset": dataset}
            if model is not None:
                options["model"] = model
            for layer in (base, g_bench, mo, g_method, cli):
                _apply(options, layer)
            options["dataset"] = _normalise_dataset(str(options["dataset"]), options.get("data_dir"))
            check_method_params(method, options.get("method_params") or {})
            _check_available(method, options.get("method_params") or {})
            for seed in seeds:
                cell = RunSpec.from_dict({**options, "seed": seed}).resolved()
                key = (cell.dataset, cell.model, cell.method, cell.seed, cell.run_id)
                if key not in seen:
                    seen.add(key)
                    cells.append(cell)
    return cells


def _normalise_dataset(name: str, data_dir: Optional[str]) -> str:
    return normalise_dataset_name(name, data_dir)


def _every_available(benchmark: Mapping[str, Any], method_overrides: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """``methods: {all: , name: {...}}``: every registered method in registry order, each checked for
    availability with its method parameters from the benchmark (the unavailable ones skipped with a note)."""
    names = []
    for name in list_methods():
        params = {**(benchmark.get("method_params") or {}),
                  **(method_overrides.get(name, {}).get("method_params") or {})}
        cls = get_method(name)
        if cls.available(**params):
            names.append(name)
        else:
            print(f"mixbench: skipping {name}: {cls.unavailable_reason(**params)}", file=sys.stderr)
    return names


def _check_available(method: str, params: Mapping[str, Any]) -> None:
    cls = get_method(method)
    if not cls.available(**params):
        raise UsageError(cls.unavailable_reason(**params))


def check_models(specs: Iterable[RunSpec]) -> None:
    """Resolve every distinct model name now, so a typo fails before anything is trained or submitted."""
    from mixbench.models import resolve_model_name

    for model in sorted({str(s.model) for s in specs}):
        resolve_model_name(model)


def describe(specs: Sequence[RunSpec]) -> str:
    """A one-line summary of a grid: counts per axis."""
    def n(attr: str) -> int:
        return len({getattr(s, attr) for s in specs})

    return (f"{len(specs)} runs: {n('method')} method(s) x {n('dataset')} dataset(s) x {n('model')} model(s) "
            f"x {n('seed')} seed(s)")


def benchmark_out(benchmark: Mapping[str, Any], default: Path) -> Path:
    return Path(benchmark["out"]) if benchmark.get("out") else Path(default)


__all__: Tuple[str, ...] = ("load_benchmark", "check_benchmark", "expand_benchmark", "check_models", "describe",
                            "benchmark_out")
