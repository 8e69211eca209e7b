"""What the figures share: a grid of axes without ticks, and arrays as images."""

from __future__ import annotations

import numpy as np


def _figure(nrows: int, ncols: int, cell: float = 1.1):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(2.0, cell * ncols), max(1.5, cell * nrows + 0.3)))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure, axes


def _as_image(a: np.ndarray) -> np.ndarray:
    """`(H, W)`, `(H, W, 1)` or `(H, W, C)` -> something `imshow` draws (channels averaged)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[-1] == 1 else a.mean(axis=-1)
    if a.ndim == 1:
        side = int(np.ceil(np.sqrt(a.size)))
        a = np.pad(a, (0, side * side - a.size)).reshape(side, side)
    return a
