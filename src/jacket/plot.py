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


def sensitivity_figure(values, *, top: int = 10, title: str | None = None, cmap: str = "viridis"):
    """A sensitivity map: each input feature's sensitivity drawn over the input's shape, and the
    `top` most sensitive features as bars.

    Args:
      values: `in_shape` sensitivities (`jacket.analysis.sensitivity(...).values`): image-like
        (`(H, W)`, `(H, W, C)`, channels averaged) or flat (drawn as the smallest square).
      top: How many features to list in the bar chart (0 for none).
      title: Figure title.
      cmap: A sequential colormap.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = np.asarray(values, dtype=np.float64)
    bars = min(int(top), values.size)
    figure = Figure(figsize=(7.0 if bars else 3.5, 3.2), layout="constrained")
    axes = figure.subplots(
        1, 2 if bars else 1, squeeze=False, width_ratios=[1, 1] if bars else None
    )
    heat = axes[0, 0]
    image = heat.imshow(_as_image(values), cmap=cmap, vmin=0.0)
    heat.set_xticks([])
    heat.set_yticks([])
    heat.set_title("sensitivity per input feature", fontsize=8)
    colorbar = figure.colorbar(image, ax=heat, fraction=0.046, pad=0.04)
    colorbar.ax.tick_params(labelsize=6)
    if bars:
        flat = values.reshape(-1)
        order = np.argsort(-flat, kind="stable")[:bars]
        ax = axes[0, 1]
        ax.barh(np.arange(bars)[::-1], flat[order], color="tab:blue")
        ax.set_yticks(np.arange(bars)[::-1])
        ax.set_yticklabels(
            [str(tuple(int(i) for i in np.unravel_index(j, values.shape))) for j in order],
            fontsize=6,
        )
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"top {bars} features", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def saliency_grid_figure(images, maps, *, labels=None, columns: int = 4, cmap: str = "hot"):
    """Saliency maps next to their inputs, in a grid of `(input, saliency)` pairs.

    Args:
      images: `(n, *in_shape)` inputs.
      maps: `(n, *image_shape)` saliency magnitudes (`jacket.analysis.saliency(...).map`).
      labels: Optional title per sample.
      columns: Pairs per row.
      cmap: Colormap of the saliency panels (each scaled to its own maximum).

    Returns:
      A `matplotlib.figure.Figure`.
    """
    images, maps = np.asarray(images), np.asarray(maps, dtype=np.float64)
    n = len(images)
    columns = max(1, min(int(columns), n))
    rows = -(-n // columns)
    figure, axes = _figure(rows, 2 * columns)
    for ax in axes.flat:
        ax.set_axis_off()
    for k in range(n):
        r, c = divmod(k, columns)
        left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
        left.set_axis_on()
        right.set_axis_on()
        left.imshow(_as_image(images[k]), cmap="gray_r")
        right.imshow(_as_image(np.abs(maps[k])), cmap=cmap, vmin=0.0)
        if labels is not None:
            left.set_title(str(labels[k]), fontsize=7)
            right.set_title("saliency", fontsize=7)
    return figure


def adversarial_figure(x, x_adv, *, labels=None, adv_labels=None, max_samples: int = 8):
    """Original / adversarial / difference triplets, one row per sample.

    Args:
      x: `(n, *in_shape)` original inputs; x_adv: the adversarial examples, same shape.
      labels: Optional class per original; adv_labels: class per adversarial example.
      max_samples: Rows drawn at most (the first samples).

    Returns:
      A `matplotlib.figure.Figure`; the difference panel uses a symmetric diverging scale.
    """
    x, x_adv = np.asarray(x, dtype=np.float64), np.asarray(x_adv, dtype=np.float64)
    n = min(len(x), int(max_samples))
    figure, axes = _figure(n, 3)
    low = float(min(x[:n].min(), x_adv[:n].min()))
    high = float(max(x[:n].max(), x_adv[:n].max()))
    for b in range(n):
        diff = x_adv[b] - x[b]
        limit = float(np.abs(diff).max()) or 1.0
        axes[b, 0].imshow(_as_image(x[b]), cmap="gray_r", vmin=low, vmax=high)
        axes[b, 1].imshow(_as_image(x_adv[b]), cmap="gray_r", vmin=low, vmax=high)
        shown = axes[b, 2].imshow(_as_image(diff), cmap="RdBu_r", vmin=-limit, vmax=limit)
        colorbar = figure.colorbar(shown, ax=axes[b, 2], fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=6)
        if labels is not None:
            axes[b, 0].set_ylabel(f"class {labels[b]}", fontsize=7)
        if adv_labels is not None:
            axes[b, 1].set_xlabel(f"-> {adv_labels[b]}", fontsize=7)
        if b == 0:
            for ax, name in zip(axes[0], ("original", "adversarial", "difference")):
                ax.set_title(name, fontsize=8)
    return figure
