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


def split_jacobian_shape(shape, *, input_ndim: int | None = None):
    """`(out_shape, in_shape)` of a per-sample Jacobian of shape `(batch, *out_shape, *in_shape)`.

    A saved array does not say where the output axes end, so: `input_ndim` trailing axes are the
    input's; by default, half of them when the two halves match (an image-to-image model), else
    all but the first (a vector output, the common case).

    Example:
      >>> split_jacobian_shape((32, 10, 8, 8, 1))
      ((10,), (8, 8, 1))
    """
    rest = tuple(int(d) for d in shape[1:])
    if len(rest) < 2:
        raise ValueError(
            f"a per-sample Jacobian has shape `(batch, *out_shape, *in_shape)`, at least 3 axes. "
            f"Received: shape {tuple(shape)}."
        )
    if input_ndim is None:
        half = len(rest) // 2
        input_ndim = half if len(rest) % 2 == 0 and rest[:half] == rest[half:] else len(rest) - 1
    if not 1 <= input_ndim < len(rest):
        raise ValueError(
            f"`input_ndim` must be between 1 and {len(rest) - 1} for shape {tuple(shape)}. "
            f"Received: input_ndim={input_ndim}."
        )
    return rest[: len(rest) - input_ndim], rest[len(rest) - input_ndim :]


def is_image_shape(in_shape) -> bool:
    """True for `(H, W)` or `(H, W, C)` with `C` in 1, 3, 4 and `H, W >= 2`: drawn as pictures."""
    in_shape = tuple(in_shape)
    if len(in_shape) == 3 and in_shape[2] not in (1, 3, 4):
        return False
    return len(in_shape) in (2, 3) and min(in_shape[:2]) >= 2


def jacobian_heatmap_figure(J, *, sample_labels=None, cmap="RdBu_r"):
    """Each sample's Jacobian matrix as a heatmap (outputs down, inputs across).

    Args:
      J: `(samples, out_size, in_size)`.
      sample_labels: a title per sample (default "sample b").
      cmap: a diverging colormap; each panel has its own symmetric color scale and colorbar.

    Returns:
      A `matplotlib.figure.Figure` with one panel per sample, four to a row.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    J = np.asarray(J, dtype=np.float64)
    if J.ndim != 3:
        raise ValueError(
            f"jacobian_heatmap_figure: `J` must be `(samples, out_size, in_size)`. "
            f"Received: shape {J.shape}."
        )
    samples, rows, cols = J.shape
    ncols = min(samples, 4)
    nrows = -(-samples // ncols)
    panel_w = 3.2
    panel_h = float(np.clip(panel_w * rows / max(cols, 1), 1.2, 4.0))
    figure = Figure(figsize=(panel_w * ncols + 0.6, (panel_h + 0.8) * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[samples:]:
        ax.set_axis_off()
    for b in range(samples):
        ax = axes.flat[b]
        limit = float(np.abs(J[b]).max()) or 1.0
        image = ax.imshow(
            J[b], cmap=cmap, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
        )
        ax.set_title(sample_labels[b] if sample_labels is not None else f"sample {b}", fontsize=8)
        ax.set_xlabel("input", fontsize=7)
        ax.set_ylabel("output", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    return figure


def jacobian_figure(J, *, input_ndim: int | None = None, max_rows: int = 16):
    """The picture `jacket plot` draws for per-sample Jacobians `(samples, *out_shape, *in_shape)`.

    Image-shaped inputs (see `is_image_shape`): each output's row drawn as an image, the first
    `max_rows` outputs per sample (`jacobian_rows_figure`). Otherwise one heatmap per sample of the
    flattened `(out_size, in_size)` matrix (`jacobian_heatmap_figure`).

    Returns:
      `(figure, description)`, the description one line for the terminal.
    """
    J = np.asarray(J)
    out_shape, in_shape = split_jacobian_shape(J.shape, input_ndim=input_ndim)
    samples = J.shape[0]
    out_size = int(np.prod(out_shape))
    if is_image_shape(in_shape):
        rows = J.reshape(samples, out_size, *in_shape)[:, :max_rows]
        shown = rows.shape[1]
        labels = [f"out {i}" for i in range(shown)]
        figure = jacobian_rows_figure(
            rows, row_labels=labels, sample_labels=[f"sample {b}" for b in range(samples)]
        )
        kept = "" if shown == out_size else f" (first {shown} of {out_size})"
        return figure, (
            f"{samples} sample(s) x {shown} output row(s){kept}, each drawn as a "
            f"{'x'.join(map(str, in_shape))} image"
        )
    flat = J.reshape(samples, out_size, -1)
    figure = jacobian_heatmap_figure(flat)
    return figure, (
        f"heatmap of {samples} sample(s), {out_size} outputs x {flat.shape[2]} inputs "
        f"(out_shape {out_shape}, in_shape {in_shape})"
    )
