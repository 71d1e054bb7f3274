"""Report figures (matplotlib Agg + seaborn), each written as PNG and PDF.

- ``top1_per_epoch``: test top-1 per epoch, mean over seeds with a +-1 std band;
- ``top1_<metric>``:  the table's top-1 metric per method, bars with +-1 std error bars;
- ``epoch_time``:     median training time per epoch relative to vanilla (seconds without vanilla);
- ``robustness``:     every ``eval`` metric per method, when runs have them.

One panel per dataset/model column of the table. Every method keeps one colour
in every figure and every report: colours are keyed by the method's position in
the registry (vanilla first), so mixup is the same colour in every figure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from mixbench.results import read_jsonl  # noqa: E402

EXTS = ("png", "pdf")


def method_colors(labels: Sequence[str]) -> Dict[str, tuple]:
    """A fixed colour per row label: registered methods by registry index, others after them, sorted."""
    from mixbench.methods import list_methods

    registry = list_methods()
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("tab20", 20)
    colors = {}
    extra = sorted(label for label in labels if label not in registry)
    for label in labels:
        i = registry.index(label) if label in registry else len(registry) + extra.index(label)
        colors[label] = palette[i % len(palette)]
    return colors


def _save(fig, out: Path, stem: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in EXTS:
        path = out / f"{stem}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _panels(n: int, width: float = 5.5, height: float = 4.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def curves_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch test top-1 of every run, from its metrics.jsonl (column, row, seed, epoch, test_top1)."""
    records = []
    for run in runs.itertuples(index=False):
        for m in read_jsonl(Path(run.run_dir) / "metrics.jsonl"):
            if "test_top1" in m and "epoch" in m:
                records.append({"column": run.column, "row": run.row, "seed": run.seed,
                                "epoch": int(m["epoch"]) + 1, "test_top1": float(m["test_top1"])})
    return pd.DataFrame.from_records(records, columns=["column", "row", "seed", "epoch", "test_top1"])


def plot_curves(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors) -> List[Path]:
    curves = curves_frame(runs)
    if curves.empty:
        return []
    groups = sorted(curves["column"].unique())
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        sub = curves[curves["column"] == g]
        order = [r for r in rows if r in set(sub["row"])]
        sns.lineplot(data=sub, x="epoch", y="test_top1", hue="row", hue_order=order, palette=colors,
                     errorbar="sd", marker="o" if sub["epoch"].nunique() <= 20 else None, ax=ax)
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
    for xi, m, e, n in zip(x, means, yerr, summary["n"]):
        ax.annotate(f"{m:{fmt}}\n(n={int(n)})", (xi, m + e), ha="center", va="bottom", fontsize="small",
                    xytext=(0, 2), textcoords="offset points")


def plot_top1(agg: pd.DataFrame, out: Path, rows, colors, metric: str, metric_words: str) -> List[Path]:
    top = agg[agg["quantity"] == "top1"]
    groups = sorted(top["column"].unique())
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        _bars(ax, top[top["column"] == g], rows, colors, zoom=True, fmt=".2f")
        ax.set_title(f"{g}: test top-1 {metric_words}")
        ax.set_xlabel("method")
        ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    return _save(fig, out, f"top1_{metric}")


def plot_time(agg: pd.DataFrame, out: Path, rows, colors) -> List[Path]:
    groups = sorted(agg["column"].unique())
    fig, axes = _panels(len(groups))
    drawn = False
    for ax, g in zip(axes, groups):
        sub = agg[agg["column"] == g]
        rel = sub[sub["quantity"] == "epoch_time_rel"]
        if len(rel):
            _bars(ax, rel, rows, colors, zoom=False, fmt=".2f")
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            ax.set_ylabel("epoch time relative to vanilla (×)")
            ax.set_title(f"{g}: training time per epoch vs vanilla")
        else:
            sec = sub[sub["quantity"] == "epoch_time_s"]
            if not len(sec):
                ax.set_visible(False)
                continue
            _bars(ax, sec, rows, colors, zoom=False, fmt=".2f")
            ax.set_ylabel("training time per epoch (s)")
            ax.set_title(f"{g}: training time per epoch (no vanilla run)")
        ax.set_xlabel("method")
        drawn = True
    if not drawn:
        plt.close(fig)
        return []
    return _save(fig, out, "epoch_time")


def plot_eval(agg: pd.DataFrame, out: Path, rows, colors, eval_keys: Sequence[str]) -> List[Path]:
    """One panel per (dataset/model, robustness metric): each metric keeps its own scale."""
    from mixbench.report import _eval_better

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
            better = "lower is better" if _eval_better(key) == "min" else "higher is better"
            unit = " (%)" if key.endswith(("top1", "auc", "ece")) else ""
            ax.set_title(f"{g}\n{key} ({better})", fontsize="medium")
            ax.set_ylabel(f"{key.rsplit('.', 1)[-1]}{unit}, mean ± std")
            ax.set_xlabel("method")
            for label in ax.get_xticklabels():
                label.set_rotation(45)
                label.set_ha("right")
    fig.suptitle("Robustness and evaluation metrics per method", y=1.0)
    fig.tight_layout()
    return _save(fig, out, "robustness")


def write_plots(
    runs: pd.DataFrame,
    out: Path,
    *,
    metric: str = "final",
    rows: Optional[Sequence[str]] = None,
    eval_keys: Sequence[str] = (),
) -> List[Path]:
    """Every figure for the labelled complete runs (``mixbench.report.label_runs``); returns the files."""
    from mixbench.report import METRICS, aggregate, row_order

    rows = list(rows) if rows is not None else row_order(runs)
    colors = method_colors(rows)
    agg = aggregate(runs, metric)
    files: List[Path] = []
    with sns.axes_style("whitegrid"), plt.rc_context({"figure.autolayout": False}):
        files += plot_curves(runs, out, rows, colors)
        files += plot_top1(agg, out, rows, colors, metric, METRICS[metric][1])
        files += plot_time(agg, out, rows, colors)
        files += plot_eval(agg, out, rows, colors, eval_keys)
    return files
