"""Render labelled heatmaps to RGB arrays (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["heatmap_image"]


def heatmap_image(
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    *,
    xlabel: str = "expert",
    ylabel: str = "",
    base_columns: int = 0,
    annotate: bool | None = None,
) -> np.ndarray:
    """An [H, W, 3] uint8 image of ``values`` [rows, cols]; NaN cells (padding) are grey.

    Columns before ``base_columns`` (the base experts) are set off by a dashed line. Cells are
    annotated with their values when the grid is small (or when ``annotate`` says so).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    rows, cols = values.shape
    if annotate is None:
        annotate = rows * cols <= 160
    figure = Figure(figsize=(1.6 + 0.55 * max(cols, 4), 1.2 + 0.3 * max(rows, 4)), dpi=110)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    masked = np.ma.masked_invalid(values)
    finite = values[np.isfinite(values)]
    vmax = max(float(finite.max()), 1e-6) if finite.size else 1.0
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    image = axes.imshow(masked, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax)
    axes.set_xticks(range(cols), list(col_labels))
    axes.set_yticks(range(rows), list(row_labels))
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.tick_params(labelsize=7)
    if 0 < base_columns < cols:
        axes.axvline(base_columns - 0.5, color="white", linestyle="--", linewidth=1.2)
    if annotate:
        for r in range(rows):
            for c in range(cols):
                if np.isfinite(values[r, c]):
                    bright = values[r, c] > 0.6 * vmax
                    axes.text(
                        c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if bright else "white",
                    )  # fmt: skip
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
