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
and one marker in every figure and every report (:mod:`mixbench.plots.style`).

Modules: :mod:`~mixbench.plots.style` (colours, markers, panels, saving),
:mod:`~mixbench.plots.accuracy` (curves, top-1, time and robustness bars),
:mod:`~mixbench.plots.features` (feature removal, filter usage),
:mod:`~mixbench.plots.budget` (training budget, critical difference).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence

# style first: it selects the Agg backend before pyplot is imported anywhere
from mixbench.plots.style import EXTS, MARKERS, PALETTE, method_colors, method_markers  # noqa: F401

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from mixbench.frame import METRICS, aggregate, row_order, time_basis, top1_runs  # noqa: E402
from mixbench.plots.accuracy import curves_frame, plot_curves, plot_eval, plot_time, plot_top1  # noqa: E402,F401
from mixbench.plots.budget import plot_budget, plot_critical_difference  # noqa: E402
from mixbench.plots.features import (  # noqa: E402,F401
    feature_removal_frame,
    filter_usage_epochs_frame,
    filter_usage_frames,
    plot_feature_removal,
    plot_filter_usage,
    plot_filter_usage_epochs,
)


def write_plots(
    runs: pd.DataFrame,
    out: Path,
    *,
    metric: str = "final",
    rows: Optional[Sequence[str]] = None,
    eval_keys: Sequence[str] = (),
    table: Any = None,
) -> List[Path]:
    """Every figure for the labelled complete runs (:func:`mixbench.frame.label_runs`); returns the files.

    ``table`` (:func:`mixbench.tables.build_table`'s) supplies the ranks and the time basis; without it they are
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
