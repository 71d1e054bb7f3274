"""Tables and plots from run directories.

``mixbench report`` reads every ``result.json`` below the given folders into a
pandas DataFrame (one row per run), groups the complete runs by column
(dataset/model, plus the options that differ when several protocols share a
dataset/model) and row (method, plus its hyper-parameters when one method was
run with several settings), and writes

- ``table.md``   a GitHub Markdown table;
- ``table.tex``  a booktabs ``table`` environment with caption and label (both from :mod:`mixbench.tables`);
- ``runs.csv``   one row per run (complete, incomplete and failed), tidy;
- ``summary.csv`` one row per (column, row, quantity) with mean, std and n;
- ``stats.csv``  paired comparisons with vanilla and with each column's best (:mod:`mixbench.stats`);
- ``ranks.csv``  average ranks across columns, with the Friedman test (two or more columns);
- ``plots/``     PNG and PDF figures (see :mod:`mixbench.plots`);
- ``index.html`` the page to open in a browser: the tables (sortable), the plots, the methods and links
  to every cell's runs (:mod:`mixbench.htmlpage`).

Runs that did not complete (``status`` other than ``complete``, or a run
directory with ``metrics.jsonl``/``spec.yaml`` but no ``result.json``) are
listed in the output and in the tables' notes, never averaged.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

from mixbench import UsageError
from mixbench.frame import METRICS, RunSet, _number, aggregate, is_cpu_device, label_runs, load_runs, runs_frame
# The table and its Markdown/LaTeX renderings live in mixbench.tables; these names stay importable from here.
from mixbench.tables import (  # noqa: F401
    Column,
    Table,
    _fmt,
    build_table,
    latex_document,
    latex_escape,
    to_latex,
    to_markdown,
)

FORMATS = ("md", "latex", "csv", "html")

def summary_table(results: Sequence[Dict[str, Any]], metric: str = "final_top1") -> str:
    """A plain-text table: method, runs, mean top-1 +- std (the value alone for one run), epoch time relative
    to vanilla (CPU time when every run ran on the CPU and recorded it, else wall time).

    Runs that did not complete (``status`` failed, or running in another launcher)
    are listed below the table with their reason, never averaged.
    """
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        if r and r.get("status") == "complete":
            by_method.setdefault(r["method"], []).append(r)
    others = [
        f"{r.get('status')}: {r.get('method')} seed {r.get('seed')}: {r.get('error') or r.get('reason') or '-'}"
        for r in results if r and r.get("status") != "complete"
    ]
    if not by_method:
        return "\n".join(["no complete runs", *others])
    done = [r for runs in by_method.values() for r in runs]
    cpu = all(is_cpu_device(r.get("device")) and (_number(r.get("epoch_cpu_time_s")) or 0) > 0 for r in done)
    key = "epoch_cpu_time_s" if cpu else "epoch_time_s"
    base = by_method.get("vanilla")
    base_time = statistics.mean(r[key] for r in base) if base else None
    rows = [("method", "runs", f"{metric} (%)", "epoch time", "vs vanilla (CPU time)" if cpu else "vs vanilla")]
    for method, runs in by_method.items():
        accs = [r[metric] for r in runs]
        acc = f"{statistics.mean(accs):.2f}"
        if len(accs) > 1:
            acc += f" +- {statistics.stdev(accs):.2f}"
        t = statistics.mean(r["epoch_time_s"] for r in runs)
        rel = f"{statistics.mean(r[key] for r in runs) / base_time:.2f}x" if base_time else "-"
        rows.append((method, str(len(runs)), acc, f"{t:.2f} s", rel))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([""] + others if others else []))


# ---------------------------------------------------------------------------
# argument parsing helpers
# ---------------------------------------------------------------------------
def parse_metric(text: str) -> str:
    if text not in METRICS:
        raise UsageError(f"unknown metric {text!r}; choose from: {', '.join(METRICS)}")
    return text


def parse_formats(text: str) -> List[str]:
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    names = ["latex" if f in ("tex",) else "md" if f == "markdown" else f for f in names]
    if not names:
        raise UsageError(f"--format is empty; choose from: {', '.join(FORMATS)}")
    bad = [f for f in names if f not in FORMATS]
    if bad:
        raise UsageError(f"unknown format {bad[0]!r}; choose from: {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))



# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------
def to_html(table: Table, runset: RunSet, out: Path, *, metric: str = "final", plots: Sequence[Path] = ()) -> str:
    """``index.html`` of a report written into ``out`` (links are relative to it); see :mod:`mixbench.htmlpage`."""
    from mixbench.htmlpage import render_page

    return render_page(table, label_runs(runset.runs), runset.problems, Path(out), metric=metric, plots=plots,
                       cell_text=_fmt)


# ---------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------
def write_report(
    roots: Sequence[Path],
    out: Path,
    *,
    metric: str = "final",
    formats: Sequence[str] = FORMATS,
    plots: bool = True,
) -> Dict[str, Any]:
    """Write the tables (and plots) for every run below ``roots`` into ``out``.

    Returns ``{"files": [...], "table": Table, "runset": RunSet, "markdown": str}``.
    """
    parse_metric(metric)
    runset = load_runs(roots)
    if not len(runset.runs):
        p = runset.problems[0]
        raise UsageError(
            f"no complete runs under {', '.join(str(r) for r in roots)}: {len(runset.problems)} incomplete or "
            f"failed (e.g. {p['run_dir']}: {p['status']})"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: List[Path] = []
    table = build_table(runset, metric)
    markdown = to_markdown(table)
    if "md" in formats:
        (out / "table.md").write_text(markdown)
        files.append(out / "table.md")
    if "latex" in formats:
        (out / "table.tex").write_text(to_latex(table))
        files.append(out / "table.tex")
    if "csv" in formats:
        runs_frame(runset).to_csv(out / "runs.csv", index=False)
        files.append(out / "runs.csv")
        aggregate(label_runs(runset.runs), metric).to_csv(out / "summary.csv", index=False)
        files.append(out / "summary.csv")
        table.paired.to_csv(out / "stats.csv", index=False)
        files.append(out / "stats.csv")
        if table.ranks is not None:
            from mixbench.stats import ranks_frame

            ranks_frame(table.ranks, label_runs(runset.runs)).to_csv(out / "ranks.csv", index=False)
            files.append(out / "ranks.csv")
    figures: List[Path] = []
    if plots:
        from mixbench.plots import write_plots

        figures = write_plots(label_runs(runset.runs), out / "plots", metric=metric,
                              rows=table.rows, eval_keys=runset.eval_keys, table=table)
        files.extend(figures)
    if "html" in formats:  # after the plots: the page shows this report's figures
        (out / "index.html").write_text(to_html(table, runset, out, metric=metric, plots=figures), encoding="utf-8")
        files.append(out / "index.html")
    return {"files": files, "table": table, "runset": runset, "markdown": markdown}
