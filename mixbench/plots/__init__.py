"""Report figures (matplotlib Agg + seaborn), each written as PNG and PDF.

- ``top1_per_epoch``: test top-1 per epoch, mean over seeds with a +-1 std band;
- ``top1_<metric>``:  the table's top-1 metric per method, bars with +-1 std error bars;
- ``epoch_time``:     median training time per epoch relative to vanilla (seconds without vanilla);
- ``robustness``:     every ``eval`` metric per method, when runs have them;
- ``feature_removal``: test top-1 versus the number k of strongest head-input channels zeroed
  (``eval.feature_removal``), mean with a +-1 std band over seeds;
- ``filter_usage_norms``: per stage, the channels' share of the total activation norm sorted
  descending against channel rank / C (``eval.filter_usage``), mean over seeds;
- ``filter_usage_gini``: Gini coefficient and effective-channel fraction per stage, +-1 std over seeds;
- ``filter_usage_per_epoch``: mean Gini and mean effective-channel fraction per epoch, from the
  ``filter_usage`` records of ``metrics.jsonl`` (``--filter-usage-every``);
- ``top1_vs_budget``: the table's top-1 against the training budget (epochs), mean with a +-1 std band
  over seeds, where a dataset/model was trained for several numbers of epochs;
- ``critical_difference``: average ranks across the table's columns with the Nemenyi critical difference
  (two or more columns and methods).

Every figure is written only when some run has its data.

One panel per dataset/model column of the table. Every method keeps one colour
and one marker in every figure and every report: both are keyed by the method's
position in the registry (vanilla first; other labels after the registry,
sorted), so mixup looks the same in every figure. Twenty labels get twenty
distinct colours (tab20, saturated hues first); markers cycle through 13 shapes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from mixbench.frame import (  # noqa: E402
    METRICS,
    TIME_FIELDS,
    _stages,
    aggregate,
    filter_usage_means,
    row_order,
    time_basis,
    top1_runs,
)
from mixbench.evaluations import headline  # noqa: E402
from mixbench.results import read_jsonl  # noqa: E402

EXTS = ("png", "pdf")


# 20 colours: tab20's ten saturated hues first, then the light ones in the order that keeps neighbours in
# registry order furthest apart (tab20's light blue, orange... are close to each other).
_TAB20 = sns.color_palette("tab20", 20)
PALETTE = [_TAB20[2 * i] for i in range(10)] + [_TAB20[2 * i + 1] for i in (5, 0, 8, 9, 3, 4, 2, 6, 1, 7)]
# 13 filled markers: 13 and 20 share no factor, so (colour, marker) pairs repeat only after 260 labels, and
# labels fewer than 13 places apart (every close pair of colours above) never share a marker.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "d"]


def _style_index(labels: Sequence[str]) -> Dict[str, int]:
    """Registered methods by registry index, other labels after them, sorted."""
    from mixbench.methods import list_methods

    registry = list_methods()
    extra = sorted(set(label for label in labels if label not in registry))
    return {label: registry.index(label) if label in registry else len(registry) + extra.index(label)
            for label in labels}


def method_colors(labels: Sequence[str]) -> Dict[str, tuple]:
    """A fixed colour per row label: registered methods by registry index, others after them, sorted."""
    return {label: PALETTE[i % len(PALETTE)] for label, i in _style_index(labels).items()}


def method_markers(labels: Sequence[str]) -> Dict[str, str]:
    """A fixed marker per row label, indexed like :func:`method_colors`."""
    return {label: MARKERS[i % len(MARKERS)] for label, i in _style_index(labels).items()}


def _lines(ax, data: pd.DataFrame, x: str, y: str, order: Sequence[str], colors, markers, *,
           markevery: Optional[int] = None, **kwargs):
    """Mean line with a +-1 std band over seeds per row label, in the label's colour and marker."""
    npoints = data[x].nunique()
    every = markevery or (max(1, npoints // 12) if npoints > 20 else None)
    sns.lineplot(data=data, x=x, y=y, hue="row", hue_order=order, palette=colors, style="row",
                 style_order=order, markers={r: markers[r] for r in order}, dashes=False, errorbar="sd",
                 markevery=every, ax=ax, **kwargs)


def _save(fig, out: Path, stem: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in EXTS:
        path = out / f"{stem}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _panels(n: int, width: float = 5.5, height: float = 4.0, *, bars: int = 0):
    """``n`` panels, three to a row; a panel of ``bars`` bars gets about 0.42 inch per bar."""
    width = max(width, 0.42 * bars + 1.5)
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


# ---------------------------------------------------------------------------
# feature removal and filter usage (the curves and per-channel data of result["eval"])
# ---------------------------------------------------------------------------
def _run_eval(run_dir) -> Dict[str, Any]:
    """``result["eval"]`` of a run folder ({} when unreadable or absent)."""
    try:
        with open(Path(run_dir) / "result.json") as f:
            ev = json.load(f).get("eval")
    except (OSError, ValueError, AttributeError):
        return {}
    return ev if isinstance(ev, dict) else {}


def feature_removal_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """column, row, seed, channels, k, top1: one line per (run, k) of ``eval.feature_removal``."""
    records = []
    for run in runs.itertuples(index=False):
        fr = _run_eval(run.run_dir).get("feature_removal")
        if not isinstance(fr, dict) or not fr.get("k"):
            continue
        for k, top1 in zip(fr["k"], fr.get("top1", [])):
            records.append({"column": run.column, "row": run.row, "seed": run.seed,
                            "channels": fr.get("channels"), "k": int(k), "top1": float(top1)})
    return pd.DataFrame.from_records(records, columns=["column", "row", "seed", "channels", "k", "top1"])


def plot_feature_removal(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors, markers) -> List[Path]:
    fr = feature_removal_frame(runs)
    if fr.empty:
        return []
    groups = sorted(fr["column"].unique())
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        sub = fr[fr["column"] == g]
        order = [r for r in rows if r in set(sub["row"])]
        _lines(ax, sub, "k", "top1", order, colors, markers)
        ks = sorted(sub["k"].unique())
        if len(ks) > 2 and ks[-1] > 8:  # k doubles: a log axis that keeps k = 0
            ax.set_xscale("symlog", linthresh=1, linscale=0.5)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        channels = sorted({int(c) for c in sub["channels"].dropna()})
        of = f" of {channels[0]}" if len(channels) == 1 else ""
        ax.set_title(f"{g}: top-1 with the k strongest{of}\nhead-input channels zeroed (per sample)")
        ax.set_xlabel("channels removed (k)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(0, 100 if sub["top1"].max() <= 100 else None)
        ax.legend(title="method (mean ± std over seeds)", fontsize="small", title_fontsize="small")
    return _save(fig, out, "feature_removal")


def filter_usage_frames(runs: pd.DataFrame) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """From ``eval.filter_usage``: (sorted shares: column, row, seed, stage, rank, share; per-stage
    numbers: column, row, seed, stage, channels, gini, effective_fraction)."""
    shares, stats = [], []
    for run in runs.itertuples(index=False):
        fu = _run_eval(run.run_dir).get("filter_usage")
        if not isinstance(fu, dict):
            continue
        for stage, v in _stages(fu).items():
            key = {"column": run.column, "row": run.row, "seed": run.seed, "stage": stage}
            stats.append({**key, "channels": int(v["channels"]), "gini": float(v["gini"]),
                          "effective_fraction": float(v["effective_channels"]) / int(v["channels"])})
            norms = np.asarray(v.get("norms") or [], dtype=float)
            if len(norms) and norms.sum() > 0:
                share = np.sort(norms / norms.sum())[::-1]
                rank = np.arange(1, len(share) + 1) / len(share)
                shares.extend({**key, "rank": float(r), "share": float(x)} for r, x in zip(rank, share))
    return (pd.DataFrame.from_records(shares, columns=["column", "row", "seed", "stage", "rank", "share"]),
            pd.DataFrame.from_records(stats, columns=["column", "row", "seed", "stage", "channels", "gini",
                                                      "effective_fraction"]))


def _stage_order(names) -> List[str]:
    names = list(dict.fromkeys(names))
    return [n for n in names if n != "features"] + [n for n in names if n == "features"]


def _stage_label(stage: str) -> str:
    return "features (head input)" if stage == "features" else stage


def plot_filter_usage(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors, markers) -> List[Path]:
    shares, stats = filter_usage_frames(runs)
    files: List[Path] = []
    if not shares.empty:
        groups = sorted(shares["column"].unique())
        per = {g: _stage_order(shares.loc[shares["column"] == g, "stage"]) for g in groups}
        ncols = min(3, max(len(s) for s in per.values()))
        nrows = [math.ceil(len(per[g]) / ncols) for g in groups]
        fig, axes = plt.subplots(sum(nrows), ncols, figsize=(5.0 * ncols, 3.8 * sum(nrows)), squeeze=False)
        for ax in axes.flat:
            ax.set_visible(False)
        top = 0
        for g, nr in zip(groups, nrows):
            for i, stage in enumerate(per[g]):
                ax = axes[top + i // ncols][i % ncols]
                ax.set_visible(True)
                sub = shares[(shares["column"] == g) & (shares["stage"] == stage)]
                order = [r for r in rows if r in set(sub["row"])]
                c = int(round(1.0 / sub["rank"].min()))
                _lines(ax, sub, "rank", "share", order, colors, markers, markevery=max(1, c // 8), linewidth=1.5)
                ax.axhline(1.0 / c, color="gray", linestyle="--", linewidth=1, label="equal use (1/C)")
                ax.set_xlim(0, 1)  # y not from 0: real networks sit near equal use, methods differ in the tails
                ax.set_title(f"{g}: {_stage_label(stage)} (C = {c})", fontsize="medium")
                ax.set_xlabel("channel rank / C (strongest first)")
                ax.set_ylabel("share of total activation norm")
                if i == 0:
                    ax.legend(fontsize="x-small", title="method (mean ± std over seeds)", title_fontsize="x-small")
                elif ax.get_legend() is not None:
                    ax.get_legend().remove()
            top += nr
        fig.suptitle("Filter usage: per-channel mean activation norm, sorted, as a share of the stage's total",
                     y=1.0)
        fig.tight_layout()
        files += _save(fig, out, "filter_usage_norms")
    if not stats.empty:
        groups = sorted(stats["column"].unique())
        fig, axes = plt.subplots(len(groups), 2, squeeze=False,
                                 figsize=(2 * max(5.0, 0.9 * stats["stage"].nunique() + 2.0), 4.2 * len(groups)))
        for gi, g in enumerate(groups):
            sub = stats[stats["column"] == g].assign(stage=lambda d: d["stage"].map(_stage_label))
            stage_order = [_stage_label(s) for s in _stage_order(stats.loc[stats["column"] == g, "stage"])]
            order = [r for r in rows if r in set(sub["row"])]
            for ax, y, words in ((axes[gi][0], "gini", "Gini coefficient (lower: wider filter use)"),
                                 (axes[gi][1], "effective_fraction",
                                  "effective channels / C (higher: wider filter use)")):
                sns.pointplot(data=sub, x="stage", y=y, hue="row", order=stage_order, hue_order=order,
                              palette=colors, markers=[markers[r] for r in order], linestyles="-",
                              errorbar="sd", dodge=0.4 if len(order) > 1 else False,
                              capsize=0.08, markersize=5, linewidth=1.2, err_kws={"linewidth": 1.2}, ax=ax)
                ax.set_title(f"{g}: {words}", fontsize="medium")
                ax.set_xlabel("stage")
                ax.set_ylabel(f"{'Gini' if y == 'gini' else 'effective channels / C'}, mean ± std over seeds")
                for label in ax.get_xticklabels():
                    label.set_rotation(30)
                    label.set_ha("right")
                ax.legend(title="method", fontsize="x-small", title_fontsize="x-small")
        fig.tight_layout()
        files += _save(fig, out, "filter_usage_gini")
    return files


def filter_usage_epochs_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """column, row, seed, epoch, mean_gini, mean_effective_fraction from metrics.jsonl ``filter_usage``."""
    records = []
    for run in runs.itertuples(index=False):
        for m in read_jsonl(Path(run.run_dir) / "metrics.jsonl"):
            fu = m.get("filter_usage")
            if isinstance(fu, dict) and "epoch" in m:
                g, e = filter_usage_means(fu)
                records.append({"column": run.column, "row": run.row, "seed": run.seed,
                                "epoch": int(m["epoch"]) + 1, "mean_gini": g, "mean_effective_fraction": e})
    return pd.DataFrame.from_records(records, columns=["column", "row", "seed", "epoch", "mean_gini",
                                                      "mean_effective_fraction"])


def plot_filter_usage_epochs(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors, markers) -> List[Path]:
    curves = filter_usage_epochs_frame(runs)
    if curves.empty:
        return []
    groups = sorted(curves["column"].unique())
    fig, axes = plt.subplots(len(groups), 2, figsize=(11.0, 4.0 * len(groups)), squeeze=False)
    for gi, g in enumerate(groups):
        sub = curves[curves["column"] == g]
        order = [r for r in rows if r in set(sub["row"])]
        for ax, y, words in ((axes[gi][0], "mean_gini", "mean Gini over stages (lower: wider filter use)"),
                             (axes[gi][1], "mean_effective_fraction",
                              "mean effective channels / C (higher: wider use)")):
            _lines(ax, sub, "epoch", y, order, colors, markers)
            ax.set_title(f"{g}: {words}", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{'Gini' if y == 'mean_gini' else 'effective channels / C'}, mean ± std over seeds")
            if sub["epoch"].nunique() <= 20:
                ax.set_xticks(sorted(sub["epoch"].unique()))
            ax.legend(title="method", fontsize="x-small", title_fontsize="x-small")
    fig.tight_layout()
    return _save(fig, out, "filter_usage_per_epoch")


# ---------------------------------------------------------------------------
# training budget and ranks across benchmarks
# ---------------------------------------------------------------------------
def plot_budget(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors, markers, metric_words: str) -> List[Path]:
    """Top-1 against the number of epochs, one panel per dataset/model trained for several budgets: mean over
    seeds with a +-1 std band (runs with ``top1`` from :func:`mixbench.report.top1_runs`)."""
    from mixbench.stats import budget_groups

    runs = runs.assign(budget_group=budget_groups(runs), epochs=pd.to_numeric(runs["epochs"], errors="coerce"))
    runs = runs.dropna(subset=["top1", "epochs"])
    groups = [g for g in sorted(runs["budget_group"].unique())
              if runs.loc[runs["budget_group"] == g, "epochs"].nunique() > 1]
    if not groups:
        return []
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        sub = runs[runs["budget_group"] == g]
        stats = sub.groupby(["row", "epochs"])["top1"].agg(["mean", "std"]).reset_index()
        for r in [r for r in rows if r in set(stats["row"])]:
            line = stats[stats["row"] == r].sort_values("epochs")
            x, m, sd = line["epochs"].to_numpy(), line["mean"].to_numpy(), line["std"].fillna(0.0).to_numpy()
            ax.plot(x, m, color=colors[r], marker=markers[r], label=r, linewidth=1.5)
            ax.fill_between(x, m - sd, m + sd, color=colors[r], alpha=0.15, linewidth=0)
        budgets = sorted(int(b) for b in sub["epochs"].unique())
        if budgets[-1] / budgets[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_title(f"{g}: test top-1 {metric_words}\nagainst the training budget")
        ax.set_xlabel("training budget (epochs)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(title="method (mean, band ±1 std over seeds)", fontsize="small", title_fontsize="small")
    return _save(fig, out, "top1_vs_budget")


def plot_critical_difference(ranks, out: Path, colors) -> List[Path]:
    """Demšar's critical-difference diagram of :class:`mixbench.stats.Ranks`: average ranks on the axis, methods
    whose pairwise Nemenyi test does not reject equality (5%) joined by a bar, the critical difference above."""
    if ranks is None or ranks.nemenyi is None:
        return []
    import scikit_posthocs as sp

    k = len(ranks.rows)
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    avg = pd.Series({r: float(ranks.average[r]) for r in ranks.rows})
    sp.critical_difference_diagram(avg, ranks.nemenyi, ax=ax, color_palette={r: colors[r] for r in ranks.rows},
                                   label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}")
    # The critical difference as a bar above the rank axis (its tick labels take about one unit of y).
    low, top = float(avg.min()), 3.0
    ax.plot([low, low + ranks.cd], [2.0, 2.0], color="black", linewidth=1.5)
    for end in (low, low + ranks.cd):
        ax.plot([end, end], [1.85, 2.15], color="black", linewidth=1.5)
    ax.text(low + ranks.cd / 2, 2.25, f"critical difference (Nemenyi, 5%) = {ranks.cd:.2f}", ha="center",
            va="bottom", fontsize="small")
    ax.set_xlim(1.0 - 0.05 * k, max(k, low + ranks.cd) + 0.05 * k)
    bottom = ax.get_ylim()[0]
    ax.set_ylim(bottom, top)
    fig.set_size_inches(7.0, 0.6 + 0.25 * (top - bottom))
    ax.set_title(f"Average rank over {len(ranks.columns)} columns (1 = best); Friedman p = {ranks.p:.3g}",
                 fontsize="medium")
    return _save(fig, out, "critical_difference")


def write_plots(
    runs: pd.DataFrame,
    out: Path,
    *,
    metric: str = "final",
    rows: Optional[Sequence[str]] = None,
    eval_keys: Sequence[str] = (),
    table: Any = None,
) -> List[Path]:
    """Every figure for the labelled complete runs (``mixbench.report.label_runs``); returns the files.

    ``table`` (``mixbench.report.build_table``'s) supplies the ranks and the time basis; without it they are
    computed here.
    """
    from mixbench.stats import rank_methods

    rows = list(rows) if rows is not None else row_order(runs)
    colors = method_colors(rows)
    markers = method_markers(rows)
    agg = aggregate(runs, metric)
    scored = top1_runs(runs, metric)
    basis = table.time_basis if table is not None else time_basis(runs)
    ranks = table.ranks if table is not None else rank_methods(scored, rows)[0]
    files: List[Path] = []
    with sns.axes_style("whitegrid"), plt.rc_context({"figure.autolayout": False}):
        files += plot_curves(runs, out, rows, colors, markers)
        files += plot_top1(agg, out, rows, colors, metric, METRICS[metric][1])
        files += plot_time(agg, out, rows, colors, basis)
        files += plot_eval(agg, out, rows, colors, eval_keys)
        files += plot_feature_removal(runs, out, rows, colors, markers)
        files += plot_filter_usage(runs, out, rows, colors, markers)
        files += plot_filter_usage_epochs(runs, out, rows, colors, markers)
        files += plot_budget(scored, out, rows, colors, markers, METRICS[metric][1])
    with sns.axes_style("white"):
        files += plot_critical_difference(ranks, out, colors)
    return files
