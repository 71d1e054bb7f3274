"""What every report figure shares: the Agg backend, one colour and one marker per method, the panel grid, the
mean-and-band line plot, and saving as PNG and PDF.

Every method keeps one colour and one marker in every figure and every report: both are keyed by the method's
position in the registry (vanilla first; other labels after the registry, sorted), so mixup looks the same in
every figure. Twenty labels get twenty distinct colours (tab20, saturated hues first); markers cycle through 13
shapes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

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
        # no creation date in the PDF: the same runs give the same files
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if ext == "pdf" else None)
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
