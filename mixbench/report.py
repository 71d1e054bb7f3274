"""Tables from result.json records."""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Sequence


def summary_table(results: Sequence[Dict[str, Any]], metric: str = "final_top1") -> str:
    """A plain-text table: method, runs, mean top-1 +- std, epoch time relative to vanilla."""
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        if r and r.get("status") == "complete":
            by_method.setdefault(r["method"], []).append(r)
    if not by_method:
        return "no complete runs"
    base = by_method.get("vanilla")
    base_time = statistics.mean(r["epoch_time_s"] for r in base) if base else None
    rows = [("method", "runs", f"{metric} (%)", "epoch time", "vs vanilla")]
    for method, runs in by_method.items():
        accs = [r[metric] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        t = statistics.mean(r["epoch_time_s"] for r in runs)
        rel = f"{t / base_time:.2f}x" if base_time else "-"
        rows.append((method, str(len(runs)), f"{statistics.mean(accs):.2f} +- {std:.2f}", f"{t:.2f} s", rel))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
