"""Accuracy and cost figures: test top-1 per epoch, the table's top-1 per method, epoch time relative to vanilla,
and the robustness metrics of each run's evaluation, as bars."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mixbench.evaluations import headline
from mixbench.frame import TIME_FIELDS
from mixbench.plots.style import _lines, _panels, _save
from mixbench.results import read_jsonl


def curves_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch test top-1 of every run, from its metrics.jsonl (column, row, seed, epoch, test_top1)."""
    records = []
    for run in runs.itertuples(index=False):
        for m in read_jsonl(Path(run.run_dir) / "metrics.jsonl"):
            if "test_top1" in m and "epoch" in m:
                records.append({"column": run.column, "row": run.row, "seed": run.seed,
                                "epoch": int(m["epoch"]) + 1, "test_top1": float(m["test_top1"])})
    return pd.DataFrame.from_records(records, columns=["column", "row", "seed", "epoch", "test_top1"])


def plot_curves(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors, markers) -> List[Path]:
    curves = curves_frame(runs)
    if curves.empty:
        return []
    groups = sorted(curves["column"].unique())
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        sub = curves[curves["column"] == g]
        order = [r for r in rows if r in set(sub["row"])]
        _lines(ax, sub, "epoch", "test_top1", order, colors, markers)
        ax.set_title(f"{g}: test top-1 per epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(title="method (mean ± std over seeds)", fontsize="small", title_fontsize="small")
        if sub["epoch"].nunique() <= 20:
            ax.set_xticks(sorted(sub["epoch"].unique()))
        # Zoom on the interesting part: the last half of training, where methods separate.
        late = sub[sub["epoch"] > sub["epoch"].max() / 2]["test_top1"]
        if len(late) and sub["epoch"].nunique() > 4:
            ax.set_ylim(max(0.0, late.min() - 2.0), min(100.0, sub["test_top1"].max() + 1.0))
    return _save(fig, out, "top1_per_epoch")


def _bars(ax, summary: pd.DataFrame, rows: Sequence[str], colors, *, zoom: bool, fmt: str):
    summary = summary.set_index("row").reindex([r for r in rows if r in set(summary["row"])])
    x = np.arange(len(summary))
    yerr = summary["std"].fillna(0.0).to_numpy()
    means = summary["mean"].to_numpy()
    ax.bar(x, means, yerr=yerr, capsize=4, color=[colors[r] for r in summary.index], edgecolor="black",
           linewidth=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(summary.index, rotation=30 if len(x) > 4 else 0, ha="right" if len(x) > 4 else "center")
    lo, hi = float(np.min(means - yerr)), float(np.max(means + yerr))
    if zoom and len(x):
        span = max(hi - lo, 1.0)
        ax.set_ylim(max(0.0, lo - 0.5 * span), hi + 0.35 * span)
    else:
        ax.set_ylim(0, hi * 1.25 if hi > 0 else 1.0)
    many = len(x) > 8  # upright labels overlap: one rotated line per bar
    for xi, m, e, n in zip(x, means, yerr, summary["n"]):
        ax.annotate(f"{m:{fmt}} (n={int(n)})" if many else f"{m:{fmt}}\n(n={int(n)})", (xi, m + e),
                    ha="center", va="bottom", fontsize="x-small" if many else "small",
                    rotation=90 if many else 0, xytext=(0, 2), textcoords="offset points")
    if many and len(x):  # room above the bars for the rotated labels
        if zoom:
            span = max(hi - lo, 1.0)
            ax.set_ylim(max(0.0, lo - 0.5 * span), hi + 0.9 * span)
        elif hi > 0:
            ax.set_ylim(0, hi * 1.6)


def plot_top1(agg: pd.DataFrame, out: Path, rows, colors, metric: str, metric_words: str) -> List[Path]:
    top = agg[agg["quantity"] == "top1"]
    groups = sorted(top["column"].unique())
    fig, axes = _panels(len(groups), bars=top.groupby("column")["row"].nunique().max())
    for ax, g in zip(axes, groups):
        _bars(ax, top[top["column"] == g], rows, colors, zoom=True, fmt=".2f")
        ax.set_title(f"{g}: test top-1 {metric_words}")
        ax.set_xlabel("method")
        ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    return _save(fig, out, f"top1_{metric}")


def plot_time(agg: pd.DataFrame, out: Path, rows, colors, basis: Optional[Dict[str, str]] = None) -> List[Path]:
    """Epoch time relative to vanilla per column: CPU time where ``basis`` says ``cpu``, wall time otherwise."""

    basis = basis or {}
    groups = sorted(agg["column"].unique())
    fig, axes = _panels(len(groups), bars=agg.groupby("column")["row"].nunique().max())
    drawn = False
    for ax, g in zip(axes, groups):
        sub = agg[agg["column"] == g]
        cpu = basis.get(g) == "cpu"
        what = "epoch CPU time" if cpu else "training time per epoch"
        rel = sub[sub["quantity"] == "epoch_time_rel"]
        if len(rel):
            _bars(ax, rel, rows, colors, zoom=False, fmt=".2f")
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            ax.set_ylabel(f"{'epoch CPU time' if cpu else 'epoch time'} relative to vanilla (×)")
            ax.set_title(f"{g}: {what} vs vanilla")
        else:
            sec = sub[sub["quantity"] == TIME_FIELDS["cpu" if cpu else "wall"]]
            if not len(sec):
                ax.set_visible(False)
                continue
            _bars(ax, sec, rows, colors, zoom=False, fmt=".2f")
            ax.set_ylabel(f"{what} (s)")
            ax.set_title(f"{g}: {what} (no vanilla run)")
        ax.set_xlabel("method")
        drawn = True
    if not drawn:
        plt.close(fig)
        return []
    return _save(fig, out, "epoch_time")


def plot_eval(agg: pd.DataFrame, out: Path, rows, colors, eval_keys: Sequence[str]) -> List[Path]:
    """One panel per (dataset/model, robustness metric): each metric keeps its own scale."""

    ev = agg[agg["quantity"].isin([f"eval.{k}" for k in eval_keys])]
    if ev.empty:
        return []
    groups = sorted(ev["column"].unique())
    metrics = [k for k in eval_keys if f"eval.{k}" in set(ev["quantity"])]
    ncols = min(4, len(metrics))
    per_group = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(len(groups) * per_group, ncols, squeeze=False,
                             figsize=(max(3.2, 0.7 * len(rows) + 1.2) * ncols, 3.8 * len(groups) * per_group))
    for ax in axes.flat:
        ax.set_visible(False)
    for gi, g in enumerate(groups):
        for mi, key in enumerate(metrics):
            ax = axes[gi * per_group + mi // ncols][mi % ncols]
            sub = ev[(ev["column"] == g) & (ev["quantity"] == f"eval.{key}")]
            if sub.empty:
                continue
            ax.set_visible(True)
            _bars(ax, sub, rows, colors, zoom=False, fmt=".3g")
            h = headline(key)  # the suite's declaration
            better = "lower is better" if h.lower_is_better else "higher is better"
            unit = " (%)" if h.percent else ""
            ax.set_title(f"{g}\n{h.label} ({better})", fontsize="medium")
            ax.set_ylabel(f"{key.rsplit('.', 1)[-1]}{unit}, mean ± std")
            ax.set_xlabel("method")
            for label in ax.get_xticklabels():
                label.set_rotation(45)
                label.set_ha("right")
    fig.suptitle("Robustness and evaluation metrics per method", y=1.0)
    fig.tight_layout()
    return _save(fig, out, "robustness")
