"""The report's table: its model, its content (columns, highlighting, marks, notes, the statistics sections)
and its Markdown and LaTeX renderings.

:func:`build_table` turns the loaded runs (:func:`mixbench.frame.load_runs`) into a :class:`Table`: one row per
method (and hyper-parameters), per dataset/model column top-1 with the cost, memory and evaluation columns, the
best and second best of each column, the marks of the paired tests (:mod:`mixbench.stats`), the notes that say
what each number measures, and the Markdown sections on paired differences, ranks and training budgets.
:func:`to_markdown` and :func:`to_latex` render it (``table.md``, ``table.tex``); :mod:`mixbench.htmlpage`
renders the same table as ``index.html``. :mod:`mixbench.report` writes the files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mixbench.evaluations import headline
from mixbench.frame import (
    CONTENTION_LIMIT,
    METRICS,
    TIME_FIELDS,
    RunSet,
    aggregate,
    column_order,
    is_cpu_device,
    label_runs,
    row_order,
    time_basis,
    top1_runs,
)


# ---------------------------------------------------------------------------
# the table model shared by Markdown and LaTeX
# ---------------------------------------------------------------------------
@dataclass
class Column:
    group: str  # dataset/model label
    quantity: str  # key in the aggregate
    title: str  # plain-text header
    latex_title: str
    better: Optional[str]  # "max", "min" or None (no highlighting)
    decimals: int
    with_std: bool


@dataclass
class Table:
    rows: List[str]
    columns: List[Column]
    cells: Dict[Tuple[str, int], Tuple[float, float, int]]  # (row, column index) -> (mean, std, n)
    rank: Dict[Tuple[str, int], int]  # 1 best, 2 second best
    caption: str
    latex_caption: str
    label: str
    problems: List[Dict[str, Any]]
    notes: List[Tuple[str, str]]  # (plain text, LaTeX)
    marks: Dict[Tuple[str, int], str] = field(default_factory=dict)  # (row, column index) -> "†", "‡", "†‡"
    sections: List[str] = field(default_factory=list)  # Markdown after the table: differences, ranks, budgets
    paired: Any = None  # pandas.DataFrame of mixbench.stats.paired_comparisons (stats.csv)
    ranks: Any = None  # mixbench.stats.Ranks, or None when there are too few columns or methods
    sweeps: List[Any] = field(default_factory=list)  # mixbench.stats.Sweep per dataset/model with several budgets
    time_basis: Dict[str, str] = field(default_factory=dict)  # column -> "cpu" or "wall"


def _time_column(g: str, basis: str, present) -> Optional[Column]:
    """The cost column of group ``g``: epoch time relative to vanilla (seconds without vanilla), in CPU time or
    wall time as ``basis`` says."""
    what = "epoch CPU time" if basis == "cpu" else "epoch time"
    if (g, "epoch_time_rel") in present:
        return Column(g, "epoch_time_rel", f"{what} (× vanilla)", f"{what} ($\\times$ vanilla)", None, 2, False)
    quantity = TIME_FIELDS[basis]
    if (g, quantity) in present:
        return Column(g, quantity, f"{what} (s)", f"{what} (s)", None, 2, False)
    return None


def _join_groups(groups: Sequence[str], all_groups: Sequence[str]) -> str:
    return "" if len(groups) == len(all_groups) else f" ({', '.join(groups)})"


def eval_settings_notes(runs, columns: List[Column]) -> List[str]:
    """One warning per (column, suite) whose runs were evaluated with different settings (options, sample
    count, seed or the parts measured, e.g. another set of corruptions): their numbers are not comparable."""
    notes: List[str] = []
    shown = {(c.group, c.quantity.split(".")[1]) for c in columns if c.quantity.startswith("eval.")}
    for group, suite in sorted(shown):
        key = f"eval_settings.{suite}"
        if key not in runs:
            continue
        sub = runs[(runs["column"] == group) & runs[key].notna()]
        kinds = sub.groupby(key, sort=False)
        if kinds.ngroups < 2:
            continue
        settings = [(json.loads(k), v) for k, v in kinds]
        differ = [f for f in settings[0][0] if len({json.dumps(s[f], sort_keys=True) for s, _ in settings}) > 1]
        every_part = sorted({p for s, _ in settings for p in s["parts"]})
        described = []
        for s, v in settings:
            missing = [p for p in every_part if p not in s["parts"]]
            what = ", ".join(
                (f"{len(s[f])} parts" + (f" (not {', '.join(missing)})" if missing else "")) if f == "parts"
                else f"{f} {json.dumps(s[f], sort_keys=True)}" for f in differ)
            described.append(f"{len(v)} run(s) with {what} (e.g. {v['row'].iloc[0]} seed {v['seed'].iloc[0]})")
        notes.append(f"WARNING: {suite} in {group} was evaluated with {kinds.ngroups} different settings, so its "
                     f"numbers are not comparable: " + "; ".join(described) + ". Evaluate these runs again with "
                     f"one `mixbench evaluate` command")
    return notes


def _time_notes(runs, columns: List[Column], basis: Dict[str, str]) -> List[Tuple[str, str]]:
    """What the cost column measures, which results lack CPU time, and which runs waited for a shared CPU."""
    import pandas as pd

    notes: List[Tuple[str, str]] = []
    timed = list(dict.fromkeys(c.group for c in columns if c.quantity in ("epoch_time_rel",) + tuple(TIME_FIELDS.values())))
    rel = any(c.quantity == "epoch_time_rel" for c in columns)
    per = ", relative to vanilla's mean" if rel else ""
    cpu = [g for g in timed if basis.get(g) == "cpu"]
    wall = [g for g in timed if basis.get(g) != "cpu"]
    if cpu:
        t = (f"epoch CPU time{_join_groups(cpu, timed)}: process CPU time (user + system) of each epoch's "
             f"training, median over epochs, mean over seeds{per}; on a CPU device it counts the work done, "
             f"whatever else shared the cores")
        notes.append((t, latex_escape(t)))
    if wall:
        t = (f"epoch time{_join_groups(wall, timed)}: wall-clock training time per epoch, median over epochs, "
             f"mean over seeds{per}")
        notes.append((t, latex_escape(t)))
        old = []
        for g in wall:
            sub = runs[runs["column"] == g]
            if not sub["device"].map(lambda d: isinstance(d, str) and not is_cpu_device(d)).all():
                old.append(g)  # some runs on a CPU (or an unnamed device) without CPU time
        if old:
            where = "" if len(old) == len(timed) else f" in {', '.join(old)}"
            t = (f"wall-clock time{where}: not every run recorded CPU time (results written before it was), so "
                 f"on a shared CPU the epoch times also count waiting for the CPU")
            notes.append((t, latex_escape(t)))
    factors = pd.to_numeric(runs.get("cpu_contention"), errors="coerce") if "cpu_contention" in runs else None
    if factors is not None:
        hot = runs[factors > CONTENTION_LIMIT]
        if len(hot):
            named = []
            for g, sub in hot.groupby("column", sort=True):
                items = ", ".join(f"{r} seed {s} ({f:.2f})" for r, s, f in
                                  sorted(zip(sub["row"], sub["seed"], factors[sub.index]), key=lambda t: (str(t[0]), t[1])))
                named.append(f"{g}: {items}")
            t = (f"CPU contention in {len(hot)} run(s) (wall time × threads / CPU time above {CONTENTION_LIMIT}: "
                 f"they waited for a CPU shared with other work, so their wall times overstate their cost"
                 f"{'; the CPU-time column is unaffected' if cpu else ''}): " + "; ".join(named))
            notes.append((t, latex_escape(t).replace("×", r"$\times$")))
    return notes


def _stats_notes(table_groups: Sequence[str], rows: Sequence[str], paired) -> List[Tuple[str, str]]:
    from mixbench import stats as st

    notes: List[Tuple[str, str]] = []
    if paired is None or paired.empty:
        return notes
    if paired["p"].notna().any():
        plain = (f"{st.MARK_VS_BASELINE} differs from vanilla, {st.MARK_VS_BEST} differs from the best of its "
                 f"column (bold): two-sided paired t-test on top-1 over seeds (runs paired by seed: same initial "
                 f"weights, data order and training subset), {st.ALPHA:.0%} level after Holm's correction over the "
                 f"methods of the column; mean differences, 95% CIs and p-values in stats.csv")
        tex = latex_escape(plain).replace(st.MARK_VS_BASELINE, st.latex_marks(st.MARK_VS_BASELINE)) \
            .replace(st.MARK_VS_BEST, st.latex_marks(st.MARK_VS_BEST))
        notes.append((plain, tex))
    missing = st.untested(paired)
    if missing:
        plain = (f"not tested, fewer than {st.MIN_PAIRS} seeds paired with the reference (no mark): "
                 + "; ".join(f"{g}: {', '.join(dict.fromkeys(items))}" for g, items in sorted(missing.items())))
        notes.append((plain, latex_escape(plain)))
    no_base = sorted(g for g in table_groups
                     if not (paired[(paired["column"] == g) & (paired["reference"] == "vanilla")]).shape[0]
                     and (paired["column"] == g).any())
    if no_base:
        t = f"no vanilla runs in {', '.join(no_base)}: not compared with vanilla"
        notes.append((t, latex_escape(t)))
    return notes


def build_table(runset: RunSet, metric: str = "final") -> Table:
    from mixbench import stats as st

    runs = label_runs(runset.runs)
    agg = aggregate(runs, metric)
    rows, groups = row_order(runs), column_order(runs)
    basis = time_basis(runs)
    index = {(c, r, q): (m, s, int(n)) for c, r, q, m, s, n in
             agg[["column", "row", "quantity", "mean", "std", "n"]].itertuples(index=False)}
    present = {(c, q) for c, _, q in index}

    columns: List[Column] = []
    for g in groups:
        columns.append(Column(g, "top1", "top-1 (%)", r"top-1 (\%)", "max", 2, True))
        time_col = _time_column(g, basis.get(g, "wall"), present)
        if time_col is not None:
            columns.append(time_col)
        if (g, "peak_mem_mb") in present:
            columns.append(Column(g, "peak_mem_mb", "peak mem (MB)", "peak mem (MB)", None, 0, False))
        for key in runset.eval_keys:
            if (g, f"eval.{key}") in present:
                h = headline(key)  # the suite's declaration: display name, direction, decimals
                arrow = "↓" if h.lower_is_better else "↑"
                larrow = r"$\downarrow$" if h.lower_is_better else r"$\uparrow$"
                columns.append(Column(g, f"eval.{key}", f"{h.label} {arrow}", f"{latex_escape(h.label)} {larrow}",
                                      h.better, h.decimals, True))

    cells: Dict[Tuple[str, int], Tuple[float, float, int]] = {}
    for j, col in enumerate(columns):
        for r in rows:
            if (col.group, r, col.quantity) in index:
                cells[(r, j)] = index[(col.group, r, col.quantity)]
    rank: Dict[Tuple[str, int], int] = {}
    for j, col in enumerate(columns):
        if not col.better:
            continue
        vals = {r: round(cells[(r, j)][0], col.decimals) for r in rows if (r, j) in cells}
        if len(vals) < 2:
            continue
        distinct = sorted(set(vals.values()), reverse=col.better == "max")
        for r, v in vals.items():
            if v == distinct[0]:
                rank[(r, j)] = 1
            elif len(vals) > 2 and len(distinct) > 1 and v == distinct[1]:
                rank[(r, j)] = 2

    # Paired tests per column, ranks across columns, budget sweeps: all on the table's top-1.
    scored = top1_runs(runs, metric)
    paired = st.paired_comparisons(scored, rows, metric)
    by_cell = st.marks(paired)
    marks = {(r, j): by_cell[(c.group, r)] for j, c in enumerate(columns) if c.quantity == "top1"
             for r in rows if (c.group, r) in by_cell and (r, j) in cells}
    ranks, no_ranks = st.rank_methods(scored, rows)
    sweeps = st.budget_sweeps(scored, rows, paired)

    what = METRICS[metric][1]
    has_mem = any(c.quantity == "peak_mem_mb" for c in columns)
    has_eval = any(c.quantity.startswith("eval.") for c in columns)
    notes: List[Tuple[str, str]] = [(t, latex_escape(t)) for t in eval_settings_notes(runs, columns)]
    notes += _stats_notes(groups, rows, paired)
    notes += _time_notes(runs, columns, basis)
    if has_mem:
        t = "peak mem: peak CUDA memory allocated (GPU) or peak process RSS (CPU)"
        notes.append((t, t))
    if has_eval:
        notes.append(("robustness metrics from each run's evaluation (↑ higher is better, ↓ lower is better)",
                      r"robustness metrics from each run's evaluation ($\uparrow$ higher is better, "
                      r"$\downarrow$ lower is better)"))
    excluded = f" {len(runset.problems)} incomplete or failed run(s) excluded." if runset.problems else ""
    tested = paired["p"].notna().any()
    mark_words = (f" {st.MARK_VS_BASELINE}/{st.MARK_VS_BEST}: differs from vanilla/from the best at 5% "
                  f"(paired t-test over seeds, Holm).") if tested else ""
    latex_marks = (f" {st.latex_marks(st.MARK_VS_BASELINE)}/{st.latex_marks(st.MARK_VS_BEST)}: differs from "
                   f"vanilla/from the best at 5\\% (paired t-test over seeds, Holm).") if tested else ""
    caption = (
        f"Test top-1 accuracy (%) {what} (metric: {metric}); mean ± std over seeds, "
        f"number of seeds in parentheses. Best per column in bold.{mark_words}{excluded}"
    )
    latex_caption = (
        f"Test top-1 accuracy (\\%) {what} (metric: {metric}); mean $\\pm$ std over seeds, "
        f"number of seeds in parentheses. Best per column in bold, second best underlined.{latex_marks}{excluded}"
    )
    table = Table(rows, columns, cells, rank, caption, latex_caption, f"tab:mixbench-{metric}",
                  runset.problems, notes, marks=marks, paired=paired, ranks=ranks, sweeps=sweeps, time_basis=basis)
    table.sections = [s for s in (_paired_section(paired, rows), _rank_section(ranks, no_ranks, metric),
                                  _budget_section(sweeps)) if s]
    return table


def _num(x: float, fmt: str = "+.2f") -> str:
    return f"{x:{fmt}}" if x == x else "–"


def _paired_section(paired, rows: Sequence[str]) -> str:
    """Markdown: every paired comparison of the top-1 columns (stats.csv has the same numbers)."""
    if paired is None or paired.empty:
        return ""
    order = {r: i for i, r in enumerate(rows)}
    lines = ["### Paired differences in top-1", "",
             "Method minus reference, in percentage points, over the seeds both ran (paired by seed); "
             "two-sided paired t-test, Holm-corrected over the methods of a column.", "",
             "| column | method | vs | Δ mean | 95% CI | p | p (Holm) | paired seeds |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|"]
    paired = paired.assign(_ref=paired["reference"].map({"vanilla": 0, "best": 1}),
                           _row=paired["row"].map(order))
    # Where vanilla is the best, the comparisons with the best repeat those with vanilla (stats.csv has both).
    dup = (paired["reference"] == "best") & (paired["reference_row"] == "vanilla")
    for rec in paired[~dup].sort_values(["column", "_ref", "_row"]).itertuples(index=False):
        vs = "vanilla" if rec.reference == "vanilla" else f"best ({rec.reference_row})"
        ci = f"[{rec.ci_low:+.2f}, {rec.ci_high:+.2f}]" if rec.ci_low == rec.ci_low else "–"
        if rec.p == rec.p:
            p, ph = _p_text(rec.p), _p_text(rec.p_holm) + (" *" if rec.significant else "")
        else:
            p, ph = "not tested", "–"
        lines.append(f"| {_md_escape(rec.column)} | {_md_escape(rec.row)} | {_md_escape(vs)} | {_num(rec.diff_mean)} "
                     f"| {ci} | {p} | {ph} | {rec.n_pairs} |")
    if paired["significant"].astype(bool).any():
        lines += ["", "\\* below 0.05 after Holm's correction (a mark in the table)."]
    return "\n".join(lines)


def _p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


def _rank_section(ranks, why: str, metric: str) -> str:
    if ranks is None:
        return f"Ranks across benchmarks: not computed ({why})."
    lines = [f"### Average rank over {len(ranks.columns)} columns", "",
             f"Rank of each method's mean top-1 ({metric}) in each column (1 = best, ties share the mean rank), "
             f"averaged over the columns; plots/critical_difference.png draws them.", "",
             "| method | average rank | " + " | ".join(_md_escape(c) for c in ranks.columns) + " |",
             "|:--|--:|" + "|".join("--:" for _ in ranks.columns) + "|"]
    for row in sorted(ranks.rows, key=lambda r: (ranks.average[r], ranks.rows.index(r))):
        per = " | ".join(f"{ranks.ranks.loc[c, row]:g}" for c in ranks.columns)
        lines.append(f"| {_md_escape(row)} | {ranks.average[row]:.2f} | {per} |")
    k, n = len(ranks.rows), len(ranks.columns)
    verdict = "the methods' ranks differ" if ranks.p < 0.05 else "no evidence that the methods' ranks differ"
    lines += ["", f"- Friedman test over {n} columns and {k} methods: χ²({k - 1}) = {ranks.chi2:.2f}, "
                  f"p = {_p_text(ranks.p)} ({verdict} at 5%).",
              f"- Nemenyi critical difference at 5%: {ranks.cd:.2f} (average ranks further apart than this "
              f"differ; methods joined by a bar in the diagram do not)."]
    if ranks.left_out:
        lines.append(f"- Not ranked (missing from some column): {', '.join(ranks.left_out)}.")
    return "\n".join(lines)


def _budget_section(sweeps) -> str:
    if not sweeps:
        return ""
    lines = ["### Training budget", "",
             "Smallest budget (epochs) at which each method's mean top-1 over seeds exceeds vanilla's, and the "
             "paired test at that budget; plots/top1_vs_budget.png draws every budget."]
    for sw in sweeps:
        lines += ["", f"{sw.group} ({', '.join(str(b) for b in sw.budgets)} epochs):", ""]
        lines += [f"- {line}" for line in sw.lines]
    return "\n".join(lines)


def _fmt(mean: float, std: float, n: int, col: Column) -> Tuple[str, str]:
    """(number part, n part) of a cell, plain text."""
    d = col.decimals
    if col.quantity == "epoch_time_rel":
        return f"{mean:.{d}f}×", ""
    if not col.with_std:
        return f"{mean:.{d}f}", ""
    if n > 1 and std == std:  # std is NaN for one run
        return f"{mean:.{d}f} ± {std:.{d}f}", f"({n})"
    return f"{mean:.{d}f}", f"({n})"


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(table: Table) -> str:
    groups = list(dict.fromkeys(c.group for c in table.columns))
    multi = len(groups) > 1

    def header(c: Column) -> str:
        return f"{c.group} {c.title}" if c.quantity == "top1" or multi else c.title

    lines = [f"**{table.caption}**", ""]
    lines.append("| method | " + " | ".join(_md_escape(header(c)) for c in table.columns) + " |")
    lines.append("|:--|" + "|".join("--:" for _ in table.columns) + "|")
    for r in table.rows:
        cells = []
        for j, c in enumerate(table.columns):
            if (r, j) not in table.cells:
                cells.append("–")
                continue
            num, n = _fmt(*table.cells[(r, j)], c)
            if table.rank.get((r, j)) == 1:
                num = f"**{num}**"
            num += table.marks.get((r, j), "")
            cells.append(f"{num} {n}".strip())
        lines.append(f"| {_md_escape(r)} | " + " | ".join(cells) + " |")
    if table.notes:
        lines.append("")
        lines.extend(f"- {plain}" for plain, _ in table.notes)
    lines.extend(_problem_lines(table.problems, "md"))
    for section in table.sections:
        lines += ["", section]
    return "\n".join(lines) + "\n"


def _problem_lines(problems: List[Dict[str, Any]], fmt: str) -> List[str]:
    if not problems:
        return []
    prefix = "% " if fmt == "latex" else ""
    bullet = "- " if fmt == "md" else "  "
    out = ["", f"{prefix}Incomplete or failed runs (not averaged):"]
    for p in problems:
        out.append(f"{prefix}{bullet}{p['run_dir']}: {p['status']} ({p.get('reason', '')})")
    return out


# ---------------------------------------------------------------------------
# LaTeX
# ---------------------------------------------------------------------------
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    from mixbench import stats as stats_marks

    groups = list(dict.fromkeys(c.group for c in table.columns))
    spans = [(g, [j for j, c in enumerate(table.columns) if c.group == g]) for g in groups]
    lines = [
        "% Generated by `mixbench report`; needs \\usepackage{booktabs} in the preamble.",
        r"\begin{table}[t]",
        r"  \centering",
        f"  \\caption{{{table.latex_caption}}}",
        f"  \\label{{{table.label}}}",
        f"  \\begin{{tabular}}{{l{'c' * len(table.columns)}}}",
        r"    \toprule",
    ]
    head = ["Method"] + [
        f"\\multicolumn{{{len(js)}}}{{c}}{{{latex_escape(g)}}}" if len(js) > 1 else latex_escape(g)
        for g, js in spans
    ]
    lines.append("    " + " & ".join(head) + r" \\")
    rules = " ".join(f"\\cmidrule(lr){{{js[0] + 2}-{js[-1] + 2}}}" for _, js in spans)
    lines.append("    " + rules)
    lines.append("    " + " & ".join([""] + [c.latex_title for c in table.columns]) + r" \\")
    lines.append(r"    \midrule")
    for r in table.rows:
        cells = [latex_escape(r)]
        for j, c in enumerate(table.columns):
            if (r, j) not in table.cells:
                cells.append("--")
                continue
            num, n = _fmt(*table.cells[(r, j)], c)
            num = latex_escape(num).replace("±", r"$\pm$").replace("×", r"$\times$")
            rank = table.rank.get((r, j))
            if rank == 1:
                num = f"\\textbf{{{num}}}"
            elif rank == 2:
                num = f"\\underline{{{num}}}"
            num += stats_marks.latex_marks(table.marks.get((r, j), ""))
            cells.append(f"{num} {{\\scriptsize {n}}}" if n else num)
        lines.append("    " + " & ".join(cells) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}"]
    if table.notes:
        notes = "; ".join(tex for _, tex in table.notes)
        lines += [r"  \par\smallskip", f"  {{\\footnotesize {notes}.}}"]
    lines.append(r"\end{table}")
    lines.extend(_problem_lines(table.problems, "latex"))
    return "\n".join(lines) + "\n"


def latex_document(table_tex: str) -> str:
    """A minimal standalone document around a table, for compiling it."""
    return (
        "\\documentclass{article}\n\\usepackage{booktabs}\n"
        "\\usepackage[margin=1cm,landscape]{geometry}\n\\begin{document}\n"
        + table_tex + "\\end{document}\n"
    )
