"""Run directories -> one pandas frame: what the report, its statistics and its plots read.

``load_runs`` reads every ``result.json`` below some folders (and lists the runs
that did not complete), ``label_runs`` gives each run its table column
(dataset/model, plus the options that differ between protocols) and row (method,
plus its hyper-parameters when a method ran with several settings), and
``aggregate`` reduces the runs to mean, std and n per cell. Nothing here writes a
file: :mod:`mixbench.report` (tables), :mod:`mixbench.stats` (paired tests, ranks,
budgets) and :mod:`mixbench.plots` build on it, in that direction only.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from mixbench import UsageError
from mixbench.evaluations import headline

# --metric choice -> (result.json field, words for the caption)
METRICS: Dict[str, Tuple[str, str]] = {
    "final": ("final_top1", "at the final epoch"),
    "best": ("best_top1", "at the best epoch"),
    "last10": ("last10_median_top1", "as the median of the last 10 epochs"),
}

# Spec options that identify neither the protocol nor the cell (where and how fast a run went).
# A plugin method's source hash identifies the method, not the protocol: its runs sit beside vanilla's.
_NOT_PROTOCOL = ("method", "method_params", "seed", "dataset", "model", "device", "data_dir", "download", "compile",
                 "method_source", "plugins")
# Written by the launcher into a run folder before the run starts (with the error when it failed).
_LAUNCH_FILE = "launch.json"


def is_headline(key: str) -> bool:
    """Whether the flattened eval metric ``suite.name[.sub...]`` belongs in the table: the suite's declared
    headlines (:mod:`mixbench.evaluations`); every scalar goes to the CSV files."""
    return headline(key) is not None


# ---------------------------------------------------------------------------
# plain-text summary printed by `mixbench run`
# ---------------------------------------------------------------------------
def flatten_eval(value: Any, prefix: str = "") -> Dict[str, float]:
    """Scalar numbers of a nested ``eval`` record, keyed ``a.b.c``; lists, strings and bools are skipped."""
    out: Dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten_eval(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and prefix:
        if math.isfinite(float(value)):
            out[prefix] = float(value)
    return out


def _with_filter_usage_means(ev: Dict[str, Any]) -> Dict[str, Any]:
    """``ev`` with ``filter_usage.mean_gini``/``mean_effective_fraction`` filled in from the per-stage numbers
    when an older evaluation did not write them."""
    fu = ev.get("filter_usage") if isinstance(ev, dict) else None
    if not isinstance(fu, dict) or ("mean_gini" in fu and "mean_effective_fraction" in fu):
        return ev

    gini_, eff = filter_usage_means(fu)
    if not (math.isfinite(gini_) and math.isfinite(eff)):
        return ev
    return {**ev, "filter_usage": {"mean_gini": gini_, "mean_effective_fraction": eff, **fu}}


def eval_settings(result: Dict[str, Any]) -> Dict[str, str]:
    """Per evaluation suite of a result, what decides its numbers besides the weights, as a JSON string:
    the options, the samples and seed of ``eval_meta``, and the names of the result's parts (the
    corruptions, deformations or stages it measured). Runs whose strings differ were not measured alike."""
    meta = result.get("eval_meta") or {}
    out = {}
    for suite, value in (result.get("eval") or {}).items():
        m = meta.get(suite) or {}
        parts = sorted(k for k, v in value.items() if isinstance(v, dict)) if isinstance(value, dict) else []
        out[suite] = json.dumps({"options": m.get("options", {}), "samples": m.get("samples"),
                                 "train_samples": m.get("train_samples"), "seed": m.get("seed"), "parts": parts},
                                sort_keys=True, default=str)
    return out


def _protocol(result: Dict[str, Any]) -> Dict[str, Any]:
    """The options that change a run's numbers, other than the cell (method, seed, dataset, model)."""
    spec = result.get("spec") or {}
    try:  # through RunSpec: options missing from older results get their defaults
        from mixbench.spec import RunSpec

        ident = RunSpec.from_dict(spec).identity() if spec else {}
    except (TypeError, ValueError):  # a spec written by another mixbench version
        ident = {k: v for k, v in spec.items() if k not in _NOT_PROTOCOL}
    proto = {k: v for k, v in ident.items() if k not in _NOT_PROTOCOL}
    if "epochs" in result and proto.get("epochs") is None:
        proto["epochs"] = result["epochs"]
    return proto


def is_cpu_device(device: Any) -> bool:
    """Whether a result's ``device`` names the CPU (``cpu`` or ``cpu (x86_64, 2 threads)``); CUDA devices are
    recorded by their name."""
    return isinstance(device, str) and device.strip().lower().startswith("cpu")


def _number(value: Any) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _num_threads(result: Dict[str, Any]) -> Optional[int]:
    """``num_threads`` of result.json, else the ``N threads`` of a CPU device name."""
    n = _number(result.get("num_threads"))
    if n is None and is_cpu_device(result.get("device")):
        m = re.search(r"(\d+) threads?", result["device"])
        n = float(m.group(1)) if m else None
    return int(n) if n else None


def contention_factor(result: Dict[str, Any]) -> Optional[float]:
    """Wall time x threads / CPU time of a CPU run's epochs: about 1 (or below) when its threads had the cores
    to themselves, larger when they waited for a CPU shared with other work. None on CUDA or without the
    numbers (results written before CPU time was recorded)."""
    if not is_cpu_device(result.get("device")):
        return None
    wall, cpu, threads = _number(result.get("epoch_time_s")), _number(result.get("epoch_cpu_time_s")), _num_threads(result)
    if not (wall and cpu and threads):
        return None
    return wall * threads / cpu


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_spec(run_dir: Path) -> Dict[str, Any]:
    import yaml

    try:
        with open(run_dir / "spec.yaml") as f:
            return yaml.safe_load(f) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


@dataclass
class RunSet:
    """Every run found: ``runs`` (complete, one row each) and ``problems`` (not averaged)."""

    runs: Any  # pandas.DataFrame
    problems: List[Dict[str, Any]] = field(default_factory=list)
    eval_keys: List[str] = field(default_factory=list)  # table metrics (flattened ``eval`` keys)


def shown_path(path: Path) -> str:
    """``path`` as the tables and CSV files show it: relative to the working directory when below it
    (a committed report must not carry the machine's absolute paths), else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def load_runs(roots: Iterable[Path]) -> RunSet:
    """Read every run below ``roots``. A missing folder or no run at all is a usage error."""
    import pandas as pd

    from mixbench.results import find_results, read_jsonl

    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.exists():
            raise UsageError(f"results folder {str(root)!r} does not exist")
    records: List[Dict[str, Any]] = []
    problems: List[Dict[str, Any]] = []
    seen: Dict[str, Path] = {}
    result_dirs = set()
    for path in find_results(roots):
        run_dir = path.parent.resolve()
        if run_dir in result_dirs:
            continue
        result_dirs.add(run_dir)
        try:
            with open(path) as f:
                r = json.load(f)
            if not isinstance(r, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append({"run_dir": shown_path(run_dir), "status": "unreadable", "reason": f"result.json: {exc}"})
            continue
        status = r.get("status", "unknown")
        base = {"run_dir": shown_path(run_dir), "method": r.get("method"), "dataset": r.get("dataset"),
                "model": r.get("model"), "seed": r.get("seed"), "epochs": r.get("epochs")}
        if status != "complete":
            reason = r.get("error") or r.get("reason") or f"status {status!r}"
            problems.append({**base, "status": str(status), "reason": str(reason)})
            continue
        missing = [k for k in ("method", "dataset", "model") if not r.get(k)]
        if missing:
            problems.append({**base, "status": "invalid", "reason": f"result.json lacks {', '.join(missing)}"})
            continue
        key = r.get("run_id")
        if key is not None and key in seen:
            problems.append({**base, "status": "duplicate", "reason": f"same run_id {key} as {seen[key]}"})
            continue
        if key is not None:
            seen[key] = run_dir
        ev = flatten_eval(_with_filter_usage_means(r.get("eval") or {}))
        proto = _protocol(r)
        settings = eval_settings(r)
        records.append({
            **base,
            "status": "complete",
            "run_id": key,
            "final_top1": r.get("final_top1"),
            "best_top1": r.get("best_top1"),
            "last10_median_top1": r.get("last10_median_top1"),
            "final_top5": r.get("final_top5"),
            "epoch_time_s": r.get("epoch_time_s"),
            "epoch_cpu_time_s": r.get("epoch_cpu_time_s"),
            "cpu_time_s": r.get("cpu_time_s"),
            "num_threads": _num_threads(r),
            "cpu_contention": contention_factor(r),
            "peak_mem_mb": r.get("peak_mem_mb"),
            "wall_time_s": r.get("wall_time_s"),
            "device": r.get("device"),
            "git_commit": r.get("git_commit"),
            "method_params": json.dumps(r.get("method_params") or {}, sort_keys=True),
            "protocol": json.dumps(proto, sort_keys=True, default=str),
            **{f"eval_settings.{suite}": v for suite, v in settings.items()},
            **{f"eval.{k}": v for k, v in ev.items()},
        })
    # Run directories that never wrote result.json: interrupted, crashed, or still running.
    for root in roots:
        candidates = set()
        if root.is_dir():
            candidates.update(p.parent.resolve() for p in root.rglob("metrics.jsonl"))
            candidates.update(p.parent.resolve() for p in root.rglob("spec.yaml"))
            candidates.update(p.parent.resolve() for p in root.rglob(_LAUNCH_FILE))
        for run_dir in sorted(candidates - result_dirs):
            result_dirs.add(run_dir)
            spec = _read_spec(run_dir)
            done = len(read_jsonl(run_dir / "metrics.jsonl"))
            epochs = spec.get("epochs")
            reason = f"no result.json ({done}/{epochs if epochs else '?'} epochs in metrics.jsonl)"
            launch = _read_json(run_dir / _LAUNCH_FILE)
            if launch.get("error"):
                reason += f"; launcher: {launch['error']}"
            problems.append({
                "run_dir": shown_path(run_dir), "method": spec.get("method"), "dataset": spec.get("dataset"),
                "model": spec.get("model"), "seed": spec.get("seed"), "epochs": epochs,
                "status": "incomplete",
                "reason": reason,
            })
    if not records and not problems:
        raise UsageError(f"no results (result.json) found under {', '.join(str(r) for r in roots)}")
    runs = pd.DataFrame.from_records(records)
    eval_keys = sorted(c[len("eval."):] for c in runs.columns if c.startswith("eval.") and is_headline(c[5:]))
    return RunSet(runs=runs, problems=problems, eval_keys=eval_keys)


# ---------------------------------------------------------------------------
# rows, columns, aggregation
# ---------------------------------------------------------------------------
def method_order(names: Iterable[str]) -> List[str]:
    """Registered methods in registry order (vanilla first), then unknown ones alphabetically."""
    from mixbench.methods import list_methods

    names = set(n for n in names if n is not None)
    registry = [m for m in list_methods() if m in names]
    return registry + sorted(names - set(registry))


def _differing(dicts: Sequence[Dict[str, Any]]) -> List[str]:
    keys = sorted(set().union(*dicts)) if dicts else []
    return [k for k in keys if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts}) > 1]


def _suffix(d: Dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        v = d.get(k)
        parts.append(f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    return ", ".join(parts)


def label_runs(runs):
    """Add ``row`` (method, plus the differing hyper-parameters) and ``column`` (dataset/model, plus the
    differing protocol options) to ``runs``."""
    runs = runs.copy()
    runs["row"] = runs["method"]
    _split_label(runs, "row", "method_params")
    runs["column"] = runs["dataset"] + "/" + runs["model"]
    _split_label(runs, "column", "protocol")
    return runs


def _split_label(runs, label: str, by: str) -> None:
    """Where runs sharing a ``label`` differ in the JSON column ``by``, suffix each label with its differing keys."""
    for name, sub in runs.groupby(label, sort=False):
        values = sub[by].unique()
        if len(values) > 1:
            dicts = {v: json.loads(v) for v in values}
            keys = _differing(list(dicts.values()))
            for v, d in dicts.items():
                runs.loc[(runs[label] == name) & (runs[by] == v), label] = f"{name} ({_suffix(d, keys)})"


def row_order(runs) -> List[str]:
    order = {m: i for i, m in enumerate(method_order(runs["method"].unique()))}
    pairs = runs[["row", "method"]].drop_duplicates()
    return [r for r, _ in sorted(zip(pairs["row"], pairs["method"]), key=lambda t: (order[t[1]], t[0]))]


def natural_key(text: str) -> List[Any]:
    """Numbers inside a label compare as numbers: (epochs=5) before (epochs=10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def column_order(runs) -> List[str]:
    return sorted(runs["column"].unique(), key=natural_key)


# The per-run time of each basis of the cost column.
TIME_FIELDS = {"cpu": "epoch_cpu_time_s", "wall": "epoch_time_s"}
CONTENTION_LIMIT = 1.5  # wall x threads / CPU time above this: the run waited for a shared CPU


def time_basis(runs) -> Dict[str, str]:
    """column -> ``cpu`` or ``wall``: the epoch time that measures a method's cost in that column.

    CPU time (process user + system seconds of each epoch's training) where every run of the column ran on
    the CPU and recorded it: on a CPU shared with other work, wall time also counts the waiting. Wall time on
    CUDA (CPU time there is mostly the host waiting for the GPU) and for results that predate CPU time.
    """
    import pandas as pd

    out = {}
    cpu_time = pd.to_numeric(runs.get("epoch_cpu_time_s", pd.Series(index=runs.index, dtype=float)),
                             errors="coerce")
    for col, sub in runs.groupby("column"):
        on_cpu = sub["device"].map(is_cpu_device).all() if "device" in sub else False
        out[col] = "cpu" if on_cpu and cpu_time[sub.index].gt(0).all() else "wall"
    return out


def top1_runs(runs, metric: str = "final"):
    """``runs`` with a numeric ``top1`` column: the ``--metric`` field."""
    import pandas as pd

    runs = runs.copy()
    runs["top1"] = pd.to_numeric(runs[METRICS[metric][0]], errors="coerce")
    return runs


def aggregate(runs, metric: str = "final"):
    """One row per (column, row, quantity): mean, std (ddof 1; NaN for one run), n.

    Quantities: the chosen top-1 metric (``top1``), ``epoch_time_s`` (wall), ``epoch_cpu_time_s``,
    ``epoch_time_rel`` (each run's median epoch time over the mean of vanilla's in the same column, in CPU
    time or wall time as :func:`time_basis` chooses), ``cpu_contention``, ``peak_mem_mb`` and every
    ``eval.*`` metric.
    """
    import pandas as pd

    runs = top1_runs(runs, metric)
    runs["epoch_time_rel"] = float("nan")
    for col, basis in time_basis(runs).items():
        sub = runs[runs["column"] == col]
        t = pd.to_numeric(sub[TIME_FIELDS[basis]], errors="coerce")
        base = t[sub["method"] == "vanilla"].mean()
        if base and base > 0 and math.isfinite(base):
            runs.loc[sub.index, "epoch_time_rel"] = t / base
    quantities = ["top1", "epoch_time_s", "epoch_cpu_time_s", "epoch_time_rel", "cpu_contention",
                  "peak_mem_mb"] + [c for c in runs.columns if c.startswith("eval.")]
    quantities = [q for q in quantities if q in runs.columns]
    long = runs.melt(
        id_vars=["column", "row", "method", "dataset", "model", "seed"], value_vars=quantities,
        var_name="quantity", value_name="value",
    )
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long = long.dropna(subset=["value"])
    agg = (
        long.groupby(["column", "dataset", "model", "row", "method", "quantity"], sort=False)["value"]
        .agg(mean="mean", std="std", n="count")
        .reset_index()
    )
    agg["metric"] = metric
    return agg


def runs_frame(runset: RunSet):
    """Tidy per-run rows: complete runs and the problems, with a status column."""
    import pandas as pd

    frames = [label_runs(runset.runs)] if len(runset.runs) else []
    if runset.problems:
        frames.append(pd.DataFrame.from_records(runset.problems))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    first = [c for c in ("dataset", "model", "column", "method", "row", "seed", "status", "run_id",
                         "final_top1", "best_top1", "last10_median_top1", "final_top5",
                         "epoch_time_s", "peak_mem_mb", "wall_time_s", "epochs") if c in df.columns]
    rest = [c for c in df.columns if c not in first and not c.startswith("eval_settings.")]  # the table's check
    return df[first + rest]


def _stages(fu: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The per-stage entries of a filter_usage record (``features``, the head's input, last)."""
    st = {k: v for k, v in fu.items() if isinstance(v, dict) and v.get("channels")}
    return {k: st[k] for k in sorted(st, key=lambda k: k == "features")}


def filter_usage_means(fu: Dict[str, Any]) -> Tuple[float, float]:
    """(mean Gini, mean effective-channel fraction) over the stages of a filter_usage record, ``features``
    excluded as in ``mixbench.evaluations.filter_usage.filter_usage_summary``; the record's own numbers when it has them."""
    stages = [v for k, v in _stages(fu).items() if k != "features"]
    g = fu.get("mean_gini")
    e = fu.get("mean_effective_fraction")
    if g is None:
        g = float(np.mean([v["gini"] for v in stages])) if stages else float("nan")
    if e is None:
        e = float(np.mean([v["effective_channels"] / v["channels"] for v in stages])) if stages else float("nan")
    return float(g), float(e)
