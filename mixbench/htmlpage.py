"""``index.html``: the report as one page to open in a browser (``mixbench report --format html``).

Rendered with Jinja2 from ``mixbench/templates/report.html.j2`` (autoescaped),
from the same :class:`mixbench.report.Table` as ``table.md`` and ``table.tex``:

- the accuracy table with its paired-test marks (bold: best of its column,
  underlined: second), the paired differences and the average ranks, every
  table sortable by any column (a click on a header; a few lines of plain
  JavaScript in the page);
- the notes, the training-budget findings and the runs that did not complete;
- the plots (``plots/*.png``, each linked to its PDF);
- per method its paper, the parameters it ran with and its implementation
  choices and deviations from the authors' code (the README's method table and
  its section ``<Method>: implementation choices``);
- per table cell its runs, linked to each run's ``spec.yaml``,
  ``metrics.jsonl`` and ``result.json`` (evaluation results included).

The page fetches nothing from the network: the style and the script are
inline, the plots and the run files are relative links, so the report folder
opens offline (and stays valid when copied with its ``runs`` folder).
"""
from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

TEMPLATE = "report.html.j2"
RUN_FILES = ("spec.yaml", "metrics.jsonl", "result.json")


# ---------------------------------------------------------------------------
# the README's method table and sections: paper, notes, implementation choices
# ---------------------------------------------------------------------------
def _readme_text() -> str:
    """README.md of the checkout, else the installed package's long description ('' when neither)."""
    here = Path(__file__).resolve().parent.parent / "README.md"
    if here.is_file():
        return here.read_text(encoding="utf-8")
    try:
        from importlib.metadata import metadata

        meta = metadata("mixbench")
        return meta.get_payload() or meta.get("Description") or ""
    except Exception:  # not installed: the page then says "not documented"
        return ""


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _split_row(line: str) -> List[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def method_docs(readme: Optional[str] = None) -> Dict[str, Dict[str, str]]:
    """method name -> ``{"paper", "defaults", "notes", "choices"}`` (Markdown) from the README."""
    text = _readme_text() if readme is None else readme
    docs: Dict[str, Dict[str, str]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\|\s*name\s*\|\s*paper\s*\|", line):
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _split_row(row)
                if len(cells) >= 4:
                    name = cells[0].strip("`")
                    docs[name] = {"paper": cells[1], "defaults": cells[2], "notes": cells[3], "choices": ""}
            break
    by_key = {_key(name): name for name in docs}
    sections = re.split(r"^### ", text, flags=re.M)
    for sec in sections[1:]:
        title, _, body = sec.partition("\n")
        m = re.match(r"(.+?): implementation choices\s*$", title)
        if m and _key(m.group(1)) in by_key:
            body = re.split(r"^## ", body, flags=re.M)[0]  # the section ends at the next chapter
            docs[by_key[_key(m.group(1))]]["choices"] = body.strip()
    return docs


def markdown_html(text: str, inline: bool = False):
    """The README's Markdown as HTML (``markdown`` with tables); one paragraph unwrapped when ``inline``."""
    import markdown
    from markupsafe import Markup

    if not text or text.strip() in ("-", "–"):
        return Markup("–")
    html = markdown.markdown(text, extensions=["tables"], output_format="html")
    if inline:
        html = re.sub(r"^<p>(.*)</p>$", r"\1", html.strip(), flags=re.S)
    return Markup(html)


# ---------------------------------------------------------------------------
# the page's data
# ---------------------------------------------------------------------------
def _rel(path: Any, out: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()


def _value(x: Any) -> str:
    """A cell's sort key: the number, or '' (sorted last)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return ""
    return repr(f) if math.isfinite(f) else ""


def _p_text(p: float) -> str:
    return "–" if p != p else "< 0.001" if p < 0.001 else f"{p:.3g}"


def _signed(x: float) -> str:
    return "–" if x != x else f"{x:+.2f}"


def _cell_runs(runs, metric_field: str, out: Path) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    """(column, row) -> its runs: seed, top-1 and links to the run's files."""
    cells: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    from mixbench.frame import column_order, row_order

    col_at = {c: i for i, c in enumerate(column_order(runs))}
    row_at = {r: i for i, r in enumerate(row_order(runs))}
    ordered = runs.assign(_c=runs["column"].map(col_at), _r=runs["row"].map(row_at))
    for rec in ordered.sort_values(["_c", "_r", "seed"]).to_dict("records"):
        run_dir = Path(rec["run_dir"])
        files = [(name, _rel(run_dir / name, out)) for name in RUN_FILES if (run_dir / name).exists()]
        top1 = rec.get(metric_field)
        cells.setdefault((rec["column"], rec["row"]), []).append({
            "seed": rec.get("seed"), "run_id": rec.get("run_id"), "dir": _rel(run_dir, out),
            "name": run_dir.name, "top1": "–" if top1 is None or top1 != top1 else f"{float(top1):.2f}",
            "files": files,
        })
    return cells


def _main_table(table, cell_text: Callable, cell_ids: Dict[Tuple[str, str], str],
                row_method: Dict[str, str]) -> Dict[str, Any]:
    groups = list(dict.fromkeys(c.group for c in table.columns))
    head = [{"group": g, "span": sum(1 for c in table.columns if c.group == g)} for g in groups]
    columns = [{"title": c.title, "group": c.group, "better": c.better or "", "index": j + 1}
               for j, c in enumerate(table.columns)]
    rows = []
    for r in table.rows:
        cells = []
        for j, c in enumerate(table.columns):
            if (r, j) not in table.cells:
                cells.append({"value": "", "text": "–", "n": "", "rank": 0, "marks": "", "link": None})
                continue
            mean, std, n = table.cells[(r, j)]
            num, count = cell_text(mean, std, n, c)
            cells.append({"value": _value(mean), "text": num, "n": count, "rank": table.rank.get((r, j), 0),
                          "marks": table.marks.get((r, j), ""), "link": cell_ids.get((c.group, r))})
        rows.append({"label": r, "anchor": f"method-{_key(row_method.get(r, r))}", "cells": cells})
    return {"head": head, "columns": columns, "rows": rows, "multi": len(groups) > 1}


def _paired_rows(paired, rows: Sequence[str]) -> List[Dict[str, Any]]:
    if paired is None or paired.empty:
        return []
    order = {r: i for i, r in enumerate(rows)}
    dup = (paired["reference"] == "best") & (paired["reference_row"] == "vanilla")  # repeats the vanilla line
    sub = paired[~dup].assign(_ref=paired["reference"].map({"vanilla": 0, "best": 1}),
                              _row=paired["row"].map(order))
    out = []
    for rec in sub.sort_values(["column", "_ref", "_row"]).itertuples(index=False):
        tested = rec.p == rec.p
        out.append({
            "column": rec.column, "row": rec.row,
            "vs": "vanilla" if rec.reference == "vanilla" else f"best ({rec.reference_row})",
            "diff": (_value(rec.diff_mean), _signed(rec.diff_mean)),
            "ci": (_value(rec.ci_low), f"[{rec.ci_low:+.2f}, {rec.ci_high:+.2f}]" if rec.ci_low == rec.ci_low else "–"),
            "p": (_value(rec.p), _p_text(rec.p) if tested else "not tested"),
            "p_holm": (_value(rec.p_holm), _p_text(rec.p_holm)),
            "significant": bool(rec.significant),
            "n": (_value(rec.n_pairs), str(rec.n_pairs)),
        })
    return out


def _ranks(ranks) -> Optional[Dict[str, Any]]:
    if ranks is None:
        return None
    rows = []
    for row in sorted(ranks.rows, key=lambda r: (ranks.average[r], ranks.rows.index(r))):
        rows.append({"label": row, "average": float(ranks.average[row]),
                     "per": [float(ranks.ranks.loc[c, row]) for c in ranks.columns]})
    k, n = len(ranks.rows), len(ranks.columns)
    verdict = "the methods' ranks differ" if ranks.p < 0.05 else "no evidence that the methods' ranks differ"
    return {"columns": list(ranks.columns), "rows": rows,
            "friedman": f"Friedman test over {n} columns and {k} methods: χ²({k - 1}) = {ranks.chi2:.2f}, "
                        f"p = {_p_text(ranks.p)} ({verdict} at 5%)",
            "cd": f"Nemenyi critical difference at 5%: {ranks.cd:.2f}",
            "left_out": list(ranks.left_out)}


def _methods(runs, docs: Dict[str, Dict[str, str]]) -> List[Dict[str, Any]]:
    from mixbench.frame import method_order
    from mixbench.methods import get_method, list_methods

    registered = set(list_methods())
    out = []
    for name in method_order(runs["method"].unique()):
        doc = docs.get(name, {})
        settings = sorted({p for p in runs.loc[runs["method"] == name, "method_params"]})
        params = [", ".join(f"{k}={v!r}" for k, v in json.loads(p).items()) or "(none)" for p in settings]
        defaults = get_method(name).default_params() if name in registered else None
        out.append({
            "name": name, "anchor": f"method-{_key(name)}",
            "paper": markdown_html(doc.get("paper", ""), inline=True),
            "notes": markdown_html(doc.get("notes", ""), inline=True),
            "choices": markdown_html(doc["choices"]) if doc.get("choices") else None,
            "params": params,
            "defaults": ", ".join(f"{k}={v!r}" for k, v in defaults.items()) if defaults else "(none)",
            "documented": bool(doc),
        })
    return out


def render_page(table, runs, problems: Sequence[Dict[str, Any]], out: Path, *, metric: str,
                plots: Sequence[Path] = (), cell_text: Callable, readme: Optional[str] = None) -> str:
    """The page as a string. ``runs``: the labelled runs (``mixbench.frame.label_runs``); ``plots``: the figure
    files of this report (their PNGs are shown); ``cell_text``: ``(mean, std, n, column) -> (number, n)``, the
    Markdown table's cell text."""
    import jinja2

    from mixbench import __version__
    from mixbench.frame import METRICS

    out = Path(out)
    cells = _cell_runs(runs, METRICS[metric][0], out)
    cell_ids = {key: f"runs-{i}" for i, key in enumerate(cells)}
    pngs = [p for p in plots if Path(p).suffix == ".png"]
    figures = []
    for p in pngs:
        pdf = Path(p).with_suffix(".pdf")
        figures.append({"src": _rel(p, out), "name": Path(p).stem.replace("_", " "),
                        "pdf": _rel(pdf, out) if pdf.exists() else None})
    env = jinja2.Environment(loader=jinja2.PackageLoader("mixbench", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    problem_rows = [{**p, "dir": _rel(p["run_dir"], out)} for p in problems]
    return env.get_template(TEMPLATE).render(
        title=f"mixbench report: {', '.join(sorted(set(runs['dataset'] + '/' + runs['model'])))}",
        caption=table.caption, metric=metric, version=__version__,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_runs=len(runs), main=_main_table(table, cell_text, cell_ids, dict(zip(runs["row"], runs["method"]))),
        notes=[plain for plain, _ in table.notes], problems=problem_rows,
        paired=_paired_rows(table.paired, table.rows), ranks=_ranks(table.ranks),
        sweeps=[{"group": s.group, "budgets": s.budgets, "lines": s.lines} for s in table.sweeps],
        figures=figures, methods=_methods(runs, method_docs(readme)),
        cells=[{"id": cell_ids[key], "column": key[0], "row": key[1], "runs": rs} for key, rs in cells.items()],
    )
