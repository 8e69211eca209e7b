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


def sparsity_figure(pattern, *, in_shape=None, out_shape=None, output=None, max_cells: int = 512):
    """A Jacobian's sparsity pattern, and the inputs one output depends on.

    Args:
      pattern: A boolean `(out_size, in_size)` matrix (scipy sparse or NumPy), e.g. from
        `jacket.sparsity`.
      in_shape, out_shape: per-sample shapes; with an image-like `in_shape` (`(H, W)`,
        `(H, W, C)`) a second panel draws the inputs that output `output` depends on.
      output: the flat output index drawn in the second panel (default: the middle one).
      max_cells: the pattern panel bins rows and columns into at most this many cells per side,
        each showing the share of its entries that are nonzero.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    import scipy.sparse as sp

    P = sp.csr_array(pattern, dtype=bool)
    m, n = P.shape
    draw_field = in_shape is not None and len(in_shape) in (2, 3)
    figure, axes = _figure(1, 2 if draw_field else 1, cell=3.2)
    rows_per = max(1, -(-m // max_cells))
    cols_per = max(1, -(-n // max_cells))
    coo = P.tocoo()
    cells = np.zeros((-(-m // rows_per), -(-n // cols_per)))
    np.add.at(cells, (coo.row // rows_per, coo.col // cols_per), 1.0)
    cells /= rows_per * cols_per
    ax = axes[0, 0]
    ax.imshow(cells, cmap="Greys", vmin=0.0, vmax=max(cells.max(), 1e-12), aspect="auto")
    ax.set_title(f"{m} x {n}, {P.nnz} nonzeros ({P.nnz / max(m * n, 1):.2%})", fontsize=8)
    ax.set_xlabel("input", fontsize=7)
    ax.set_ylabel("output", fontsize=7)
    if draw_field:
        output = m // 2 if output is None else int(output)
        row = np.zeros(n)
        row[P.indices[P.indptr[output] : P.indptr[output + 1]]] = 1.0
        ax = axes[0, 1]
        ax.imshow(_as_image(row.reshape(in_shape)), cmap="Greys", vmin=0.0, vmax=1.0)
        where = np.unravel_index(output, out_shape) if out_shape is not None else (output,)
        ax.set_title(f"inputs of output {tuple(int(i) for i in where)}", fontsize=8)
    return figure
