"""Paired comparisons, ranks across benchmarks and training-budget sweeps for ``mixbench report``.

Runs that share a seed share their initial weights, data order and training
subset, so two methods are compared seed by seed:

- :func:`paired_comparisons`: for every table column (dataset/model/protocol),
  every method against vanilla and against the column's best method: the mean
  of the per-seed differences, its 95% t-based confidence interval and a
  two-sided paired t-test (``scipy.stats.ttest_rel``), Holm-corrected over the
  methods of the column. Only seeds present in both runs count; with fewer than
  :data:`MIN_PAIRS` pairs nothing is tested.
- :func:`rank_methods`: each method's rank per column (1 = highest mean top-1),
  the average rank, a Friedman test and the Nemenyi critical difference
  (Demšar 2006) with the pairwise Nemenyi p-values of ``scikit-posthocs``.
- :func:`budget_sweeps`: where the runs of a dataset/model were trained for
  several numbers of epochs, the smallest budget at which each method's mean
  top-1 exceeds vanilla's, and whether the paired test at that budget agrees.

Every function takes the labelled runs of :func:`mixbench.frame.label_runs`
with a numeric ``top1`` column (the table's metric) and returns plain data.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from mixbench.frame import _differing, _suffix, natural_key

ALPHA = 0.05  # significance level of every test (after Holm's correction for the paired tests)
MIN_PAIRS = 3  # fewer paired seeds than this: differences are reported, not tested
BASELINE = "vanilla"
# Table marks: a method's top-1 differs from vanilla's / from the column best's (paired t-test, Holm).
MARK_VS_BASELINE = "†"
MARK_VS_BEST = "‡"
LATEX_SYMBOLS = {MARK_VS_BASELINE: r"\dagger", MARK_VS_BEST: r"\ddagger"}


def latex_marks(marks: str) -> str:
    r"""The LaTeX superscript of a cell's marks: ``"†‡"`` -> ``$^{\dagger\ddagger}$`` ("" for none)."""
    symbols = "".join(LATEX_SYMBOLS[m] for m in marks if m in LATEX_SYMBOLS)
    return f"$^{{{symbols}}}$" if symbols else ""


STATS_COLUMNS = [
    "column", "row", "method", "reference", "reference_row", "epochs", "n_pairs", "mean", "reference_mean",
    "diff_mean", "diff_std", "ci_low", "ci_high", "t", "p", "p_holm", "significant", "metric",
]


# ---------------------------------------------------------------------------
# paired tests
# ---------------------------------------------------------------------------
@dataclass
class Paired:
    n_pairs: int
    diff_mean: float = float("nan")
    diff_std: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    t: float = float("nan")
    p: float = float("nan")

    @property
    def tested(self) -> bool:
        return math.isfinite(self.p)


def paired_test(a: Dict[Any, float], b: Dict[Any, float], *, min_pairs: int = MIN_PAIRS) -> Paired:
    """``a - b`` over the keys (seeds) both have: mean, std, 95% CI and a two-sided paired t-test.

    With fewer than ``min_pairs`` pairs only the mean difference is given. Differences that are all equal
    (no spread) give p = 0 when non-zero and p = 1 when zero.
    """
    from scipy import stats

    keys = sorted(set(a) & set(b), key=str)
    x = np.array([a[k] for k in keys], dtype=float)
    y = np.array([b[k] for k in keys], dtype=float)
    d = x - y
    n = len(d)
    if n == 0:
        return Paired(0)
    mean = float(d.mean())
    if n < min_pairs:
        return Paired(n, diff_mean=mean, diff_std=float(d.std(ddof=1)) if n > 1 else float("nan"))
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        t_stat = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        return Paired(n, mean, 0.0, mean, mean, t_stat, 1.0 if mean == 0 else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(x, y)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return Paired(n, mean, sd, mean - half, mean + half, float(res.statistic), float(res.pvalue))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values; NaN entries (untested) stay NaN and are not counted."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    out = [float("nan")] * len(pvalues)
    m = len(idx)
    running = 0.0
    for step, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - step) * float(pvalues[i])))
        out[i] = running
    return out


def best_row(means: Dict[str, float], rows: Sequence[str], decimals: int = 2) -> Optional[str]:
    """The row with the highest mean as the table shows it (rounded); ties go to the first in ``rows``."""
    present = [r for r in rows if r in means and math.isfinite(means[r])]
    if not present:
        return None
    top = max(round(means[r], decimals) for r in present)
    return next(r for r in present if round(means[r], decimals) == top)


def _per_seed(sub: pd.DataFrame) -> Dict[str, Dict[Any, float]]:
    """row -> {seed: top-1} (the mean where one seed has several runs)."""
    sub = sub.dropna(subset=["top1"])
    return {r: g.groupby("seed")["top1"].mean().to_dict() for r, g in sub.groupby("row", sort=False)}


def _column_epochs(runs: pd.DataFrame) -> Dict[str, Optional[int]]:
    out = {}
    for col, sub in runs.groupby("column"):
        vals = pd.to_numeric(sub["epochs"], errors="coerce").dropna().unique() if "epochs" in sub else []
        out[col] = int(vals[0]) if len(vals) == 1 else None
    return out


def paired_comparisons(runs: pd.DataFrame, rows: Sequence[str], metric: str = "final",
                       *, min_pairs: int = MIN_PAIRS) -> pd.DataFrame:
    """One line per (column, method, reference) with reference ``vanilla`` or ``best`` (see module doc).

    ``significant`` is True where the Holm-adjusted p (over the tested methods of the column, per reference)
    is below :data:`ALPHA`.
    """
    records: List[Dict[str, Any]] = []
    epochs = _column_epochs(runs)
    for col in sorted(runs["column"].unique()):
        per_row = _per_seed(runs[runs["column"] == col])
        means = {r: float(np.mean(list(v.values()))) for r, v in per_row.items() if v}
        order = [r for r in rows if r in per_row]
        base_rows = [r for r in order if r == BASELINE] or [r for r in order if r.startswith(BASELINE + " (")]
        refs = []
        if base_rows:
            refs.append(("vanilla", base_rows[0]))
        best = best_row(means, order)
        if best is not None:
            refs.append(("best", best))
        for ref_name, ref in refs:
            family = []
            for r in order:
                if r == ref:
                    continue
                res = paired_test(per_row[r], per_row[ref], min_pairs=min_pairs)
                family.append({
                    "column": col, "row": r, "method": _method_of(runs, r), "reference": ref_name,
                    "reference_row": ref, "epochs": epochs.get(col), "n_pairs": res.n_pairs,
                    "mean": means.get(r), "reference_mean": means.get(ref), "diff_mean": res.diff_mean,
                    "diff_std": res.diff_std, "ci_low": res.ci_low, "ci_high": res.ci_high, "t": res.t,
                    "p": res.p, "metric": metric,
                })
            for rec, p_adj in zip(family, holm([f["p"] for f in family])):
                rec["p_holm"] = p_adj
                rec["significant"] = bool(math.isfinite(p_adj) and p_adj < ALPHA)
            records.extend(family)
    return pd.DataFrame.from_records(records, columns=STATS_COLUMNS)


def _method_of(runs: pd.DataFrame, row: str) -> str:
    m = runs.loc[runs["row"] == row, "method"]
    return str(m.iloc[0]) if len(m) else row


def marks(paired: pd.DataFrame) -> Dict[Tuple[str, str], str]:
    """(column, row) -> the marks of its top-1 cell: † differs from vanilla, ‡ differs from the best."""
    out: Dict[Tuple[str, str], str] = {}
    for ref, mark in (("vanilla", MARK_VS_BASELINE), ("best", MARK_VS_BEST)):
        sig = paired[(paired["reference"] == ref) & paired["significant"].astype(bool)]
        for col, row in zip(sig["column"], sig["row"]):
            out[(col, row)] = out.get((col, row), "") + mark
    return out


def untested(paired: pd.DataFrame, *, min_pairs: int = MIN_PAIRS) -> Dict[str, List[str]]:
    """column -> ``"ROW vs REFERENCE (N paired seeds)"`` for every comparison with fewer than ``min_pairs``."""
    out: Dict[str, List[str]] = {}
    for rec in paired[paired["n_pairs"] < min_pairs].itertuples(index=False):
        out.setdefault(rec.column, []).append(f"{rec.row} vs {rec.reference_row} ({rec.n_pairs} paired)")
    return out


# ---------------------------------------------------------------------------
# ranks across benchmarks
# ---------------------------------------------------------------------------
@dataclass
class Ranks:
    columns: List[str]  # the benchmarks (blocks)
    rows: List[str]  # the methods ranked (present in every column), table order
    means: pd.DataFrame  # columns x rows: mean top-1 over seeds
    ranks: pd.DataFrame  # columns x rows: 1 = best, ties averaged
    average: pd.Series  # row -> average rank
    chi2: float
    p: float
    cd: float  # Nemenyi critical difference of average ranks at ALPHA
    nemenyi: Optional[pd.DataFrame] = None  # rows x rows: pairwise Nemenyi p-values
    left_out: List[str] = field(default_factory=list)  # rows missing from some column


def friedman(values: np.ndarray) -> Tuple[float, float]:
    """Friedman's chi-square test (ties corrected) of a blocks x treatments array, higher = better.

    Written out rather than ``scipy.stats.friedmanchisquare`` (which wants three or more treatments) so
    that two methods are ranked too; with three or more both agree.
    """
    from scipy import stats

    n, k = values.shape
    r = np.vstack([stats.rankdata(-row) for row in values])
    ties = 0.0
    for row in r:
        _, counts = np.unique(row, return_counts=True)
        ties += float(np.sum(counts ** 3 - counts))
    c = 1.0 - ties / (n * k * (k * k - 1))
    if c <= 0:  # every block ties every method
        return 0.0, 1.0
    chi2 = (12.0 / (n * k * (k + 1)) * float(np.sum(r.sum(axis=0) ** 2)) - 3.0 * n * (k + 1)) / c
    return float(chi2), float(stats.chi2.sf(chi2, k - 1))


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Demšar's critical difference of average ranks: q_alpha(k, inf) / sqrt(2) * sqrt(k (k + 1) / (6 n))."""
    from scipy import stats

    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6.0 * n))


def rank_methods(runs: pd.DataFrame, rows: Sequence[str]) -> Tuple[Optional[Ranks], str]:
    """Average ranks over the table's columns, or (None, why not)."""
    from scipy import stats

    means = runs.dropna(subset=["top1"]).groupby(["column", "row"])["top1"].mean().unstack("row")
    columns = sorted(means.index, key=natural_key)
    if len(columns) < 2:
        return None, "they need 2 or more columns; this report has 1"
    present = [r for r in rows if r in means.columns]
    full = [c for c in columns if means.loc[c, present].notna().all()]
    if 2 <= len(full) < len(columns):  # rank every method over the columns that have them all
        columns = full
    complete = [r for r in rows if r in means.columns and means.loc[columns, r].notna().all()]
    left_out = [r for r in rows if r in means.columns and r not in complete]
    if len(complete) < 2:
        return None, (f"they need 2 or more methods present in every column; {len(complete)} "
                      f"{'is' if len(complete) == 1 else 'are'}")
    m = means.loc[columns, complete]
    ranks = m.apply(lambda row: pd.Series(stats.rankdata(-row.to_numpy()), index=row.index), axis=1)
    chi2, p = friedman(m.to_numpy())
    nemenyi = None
    try:
        import scikit_posthocs as sp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nemenyi = sp.posthoc_nemenyi_friedman(m.reset_index(drop=True))
        nemenyi.index, nemenyi.columns = list(complete), list(complete)
    except ImportError:
        pass
    return Ranks(columns, complete, m, ranks, ranks.mean(axis=0), chi2, p, nemenyi_cd(len(complete), len(columns)),
                 nemenyi, left_out), ""


def ranks_frame(r: Ranks, runs: pd.DataFrame) -> pd.DataFrame:
    """ranks.csv: one line per method: average rank, the Friedman test, the CD, and the rank per column."""
    out = pd.DataFrame({
        "row": r.rows,
        "method": [_method_of(runs, row) for row in r.rows],
        "average_rank": [float(r.average[row]) for row in r.rows],
        "n_columns": len(r.columns),
        "friedman_chi2": r.chi2,
        "friedman_p": r.p,
        "nemenyi_cd": r.cd,
    })
    for col in r.columns:
        out[f"rank[{col}]"] = [float(r.ranks.loc[col, row]) for row in r.rows]
    for col in r.columns:
        out[f"top1[{col}]"] = [float(r.means.loc[col, row]) for row in r.rows]
    return out


# ---------------------------------------------------------------------------
# budget sweeps
# ---------------------------------------------------------------------------
@dataclass
class Sweep:
    group: str  # dataset/model (plus the non-epoch options that differ)
    budgets: List[int]  # epochs, ascending
    columns: Dict[int, str]  # epochs -> the table column
    lines: List[str]  # per method: when it overtakes vanilla (plain text)


def budget_groups(runs: pd.DataFrame) -> pd.Series:
    """Each run's dataset/model label plus its differing protocol options other than ``epochs``."""
    protos = runs["protocol"].map(lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "epochs"},
                                                       sort_keys=True))
    base = runs["dataset"].astype(str) + "/" + runs["model"].astype(str)
    label = base.copy()
    for name in base.unique():
        sel = base == name
        values = protos[sel].unique()
        if len(values) > 1:

            dicts = {v: json.loads(v) for v in values}
            keys = _differing(list(dicts.values()))
            for v, d in dicts.items():
                label[sel & (protos == v)] = f"{name} ({_suffix(d, keys)})"
    return label


def _fmt_p(p: float) -> str:
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"


def budget_sweeps(runs: pd.DataFrame, rows: Sequence[str], paired: pd.DataFrame) -> List[Sweep]:
    """The dataset/model groups with more than one ``epochs`` value, and per method when it overtakes vanilla."""
    runs = runs.assign(budget_group=budget_groups(runs), epochs=pd.to_numeric(runs["epochs"], errors="coerce"))
    sweeps: List[Sweep] = []
    for group in sorted(runs["budget_group"].unique()):
        sub = runs[(runs["budget_group"] == group) & runs["epochs"].notna()]
        budgets = sorted(int(e) for e in sub["epochs"].unique())
        if len(budgets) < 2:
            continue
        columns = {int(e): str(c) for e, c in sub[["epochs", "column"]].drop_duplicates().itertuples(index=False)}
        means = sub.dropna(subset=["top1"]).groupby(["row", "epochs"])["top1"].mean()
        lines: List[str] = []
        base = BASELINE if BASELINE in set(sub["row"]) else None
        if base is None:
            lines.append("no vanilla runs: nothing to overtake")
        for row in [r for r in rows if r in set(sub["row"]) and r != base] if base else []:
            shared = [b for b in budgets if (row, b) in means.index and (base, b) in means.index]
            if not shared:
                lines.append(f"{row}: no budget shared with vanilla")
                continue
            ahead = [b for b in shared if means[(row, b)] > means[(base, b)]]
            span = ", ".join(str(b) for b in shared)
            if not ahead:
                lines.append(f"{row}: does not overtake vanilla at any budget ({span} epochs)")
                continue
            b = ahead[0]
            diff = means[(row, b)] - means[(base, b)]
            rec = paired[(paired["column"] == columns[b]) & (paired["row"] == row) & (paired["reference"] == "vanilla")]
            if rec.empty or not math.isfinite(float(rec["p_holm"].iloc[0])):
                n = int(rec["n_pairs"].iloc[0]) if len(rec) else 0
                test = f"not tested ({n} paired seed{'s' if n != 1 else ''})"
            elif bool(rec["significant"].iloc[0]):
                test = f"the paired test agrees (p_Holm {_fmt_p(float(rec['p_holm'].iloc[0]))})"
            else:
                test = f"the paired test does not confirm it (p_Holm {_fmt_p(float(rec['p_holm'].iloc[0]))})"
            later = [x for x in shared if x > b]
            behind = [x for x in later if means[(row, x)] <= means[(base, x)]]
            if behind:
                stays = f"; behind or level again at {', '.join(str(x) for x in behind)} epochs"
            elif later:
                stays = "; ahead at every larger budget"
            else:
                stays = ""
            first = "from the smallest budget, " if b == shared[0] else ""
            lines.append(f"{row}: overtakes vanilla {first}at {b} epochs ({diff:+.2f} points; {test}){stays}")
        sweeps.append(Sweep(group, budgets, columns, lines))
    return sweeps
