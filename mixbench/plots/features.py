"""Feature-removal and filter-usage figures, from the curves and per-channel data of each run's ``result["eval"]``
and the ``filter_usage`` records of its ``metrics.jsonl``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from mixbench.frame import _stages, filter_usage_means
from mixbench.plots.style import _lines, _panels, _save
from mixbench.results import read_jsonl


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
