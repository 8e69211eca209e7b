"""Matplotlib figures of Jacobians. Figures are returned, never shown; NumPy arrays in."""

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


def jacobian_rows_figure(J, *, images=None, row_labels=None, sample_labels=None, cmap="RdBu_r"):
    """Each output's row of a per-sample Jacobian drawn as an image of the input.

    Args:
      J: `(samples, out_size, *in_shape)` with an image-like `in_shape` (`(H, W)`, `(H, W, C)`) or
        a flat one (drawn as the smallest square).
      images: optional inputs `(samples, *in_shape)`, drawn in the first column.
      row_labels: a title per output row; sample_labels: a label per sample.
      cmap: a diverging colormap; each sample's panels share one symmetric color scale.

    Returns:
      A `matplotlib.figure.Figure` with one row of panels per sample.
    """
    J = np.asarray(J)
    samples, outputs = J.shape[0], J.shape[1]
    first = 1 if images is not None else 0
    figure, axes = _figure(samples, outputs + first)
    for b in range(samples):
        if images is not None:
            axes[b, 0].imshow(_as_image(np.asarray(images)[b]), cmap="gray_r")
            if sample_labels is not None:
                axes[b, 0].set_ylabel(sample_labels[b], fontsize=7)
        elif sample_labels is not None:
            axes[b, 0].set_ylabel(sample_labels[b], fontsize=7)
        limit = float(np.abs(J[b]).max()) or 1.0
        for i in range(outputs):
            ax = axes[b, first + i]
            image = ax.imshow(_as_image(J[b, i]), cmap=cmap, vmin=-limit, vmax=limit)
            if b == 0 and row_labels is not None:
                ax.set_title(row_labels[i], fontsize=7)
        figure.colorbar(image, ax=axes[b, :].tolist(), fraction=0.02, pad=0.01)
    return figure
