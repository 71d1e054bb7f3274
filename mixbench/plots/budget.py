"""Figures across runs of one method: top-1 against the training budget, and the critical-difference diagram of
the average ranks across the table's columns."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mixbench.plots.style import _panels, _save


def plot_budget(runs: pd.DataFrame, out: Path, rows: Sequence[str], colors, markers, metric_words: str) -> List[Path]:
    """Top-1 against the number of epochs, one panel per dataset/model trained for several budgets: mean over
    seeds with a +-1 std band (runs with ``top1`` from :func:`mixbench.frame.top1_runs`)."""
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
    drawn = sp.critical_difference_diagram(avg, ranks.nemenyi, ax=ax, color_palette={r: colors[r] for r in ranks.rows},
                                           label_fmt_left="{label} ({rank:.2f})",
                                           label_fmt_right="({rank:.2f}) {label}")
    # scikit-posthocs draws each bar through its methods in the iteration order of a Python set of names, which
    # changes with the string hash seed of each process; the path's overlapping segments then antialias
    # differently and the PNG changes from run to run. Drawn left to right, the figure is the same every time.
    for lines in drawn["crossbars"]:
        for line in lines:
            x, y = line.get_data()
            order = np.argsort(np.asarray(x, dtype=float), kind="stable")
            line.set_data(np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order])
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
