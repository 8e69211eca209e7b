"""Matplotlib figures of Jacobians. Figures are returned, never shown; NumPy arrays in."""

from __future__ import annotations

import numpy as np

from ..errors import JacketValueError
from ._attribution import attribution_figure, token_figure
from ._common import _as_image, _figure

__all__ = [
    "adversarial_figure",
    "attribution_figure",
    "is_image_shape",
    "jacobian_figure",
    "jacobian_heatmap_figure",
    "jacobian_rows_figure",
    "saliency_grid_figure",
    "sensitivity_figure",
    "sparsity_figure",
    "split_jacobian_shape",
    "token_figure",
]


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
        raise JacketValueError(
            f"a per-sample Jacobian has shape `(batch, *out_shape, *in_shape)`, at least 3 axes. "
            f"Received: shape {tuple(shape)}."
        )
    if input_ndim is None:
        half = len(rest) // 2
        input_ndim = half if len(rest) % 2 == 0 and rest[:half] == rest[half:] else len(rest) - 1
    if not 1 <= input_ndim < len(rest):
        raise JacketValueError(
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
        raise JacketValueError(
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


def sparsity_figure(
    pattern,
    *,
    in_shape=None,
    out_shape=None,
    output=None,
    max_cells: int = 512,
    max_markers: int = 20_000,
    colors=None,
    title=None,
):
    """A Jacobian's sparsity pattern, and the inputs one output depends on.

    Args:
      pattern: A boolean `(out_size, in_size)` matrix (scipy sparse or NumPy), e.g. from
        `jacket.sparsity`.
      in_shape, out_shape: per-sample shapes; with an image-like `in_shape` (`(H, W)`,
        `(H, W, C)`) a second panel draws the inputs that output `output` depends on.
      output: the flat output index drawn in the second panel (default: the middle one, the
        center pixel of an image-like `out_shape`).
      max_cells: A pattern with at most this many rows and columns and `max_markers` nonzeros
        is drawn as a spy plot (one marker per nonzero); a larger one as a rasterised density
        image, its rows and columns binned into at most `max_cells` cells per side, each cell
        showing the share of its entries that are nonzero.
      max_markers: See `max_cells`.
      colors: Optional `{"forward": n, "reverse": m}`: the colors of the columns and of the
        rows, shown in the title.
      title: The figure's title (default: the shape, nonzeros, density and `colors`).

    Returns:
      A `matplotlib.figure.Figure`.
    """
    import scipy.sparse as sp

    P = sp.csr_array(pattern, dtype=bool)
    P.sum_duplicates()
    P.eliminate_zeros()
    m, n = P.shape
    draw_field = in_shape is not None and len(in_shape) in (2, 3) and m > 0
    figure, axes = _figure(1, 2 if draw_field else 1, cell=3.2)
    ax = axes[0, 0]
    if max(m, n) <= max_cells and P.nnz <= max_markers:
        marker = float(np.clip(200.0 / max(m, n, 1), 0.5, 6.0))
        ax.spy(P.toarray(), markersize=marker, color="black", aspect="auto", origin="upper")
        ax.xaxis.set_ticks_position("bottom")
        drawn = "spy"
    else:
        rows_per = max(1, -(-m // max_cells))
        cols_per = max(1, -(-n // max_cells))
        coo = P.tocoo()
        cells = np.zeros((max(1, -(-m // rows_per)), max(1, -(-n // cols_per))))
        np.add.at(cells, (coo.row // rows_per, coo.col // cols_per), 1.0)
        cells /= rows_per * cols_per
        image = ax.imshow(
            cells,
            cmap="Greys",
            vmin=0.0,
            vmax=max(cells.max(), 1e-12),
            aspect="auto",
            interpolation="nearest",
            extent=(-0.5, n - 0.5, m - 0.5, -0.5),
        )
        colorbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        colorbar.ax.tick_params(labelsize=6)
        colorbar.set_label("share nonzero per cell", fontsize=6)
        drawn = f"density, {rows_per}x{cols_per} entries per cell"
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"pattern ({drawn})", fontsize=8)
    ax.set_xlabel(f"input ({n})", fontsize=7)
    ax.set_ylabel(f"output ({m})", fontsize=7)
    if draw_field:
        if output is None and out_shape is not None and int(np.prod(out_shape)) == m:
            output = int(np.ravel_multi_index(tuple(d // 2 for d in out_shape), out_shape))
        output = m // 2 if output is None else int(output)
        row = np.zeros(n)
        row[P.indices[P.indptr[output] : P.indptr[output + 1]]] = 1.0
        ax = axes[0, 1]
        ax.imshow(_as_image(row.reshape(in_shape)), cmap="Greys", vmin=0.0, vmax=1.0)
        where = np.unravel_index(output, out_shape) if out_shape is not None else (output,)
        ax.set_title(f"inputs of output {tuple(int(i) for i in where)}", fontsize=8)
    if title is None:
        title = f"{m} x {n}, {P.nnz} nonzeros ({P.nnz / max(m * n, 1):.2%})"
        if colors:
            title += ", colors: " + ", ".join(f"{side} {k}" for side, k in colors.items())
    figure.suptitle(title, fontsize=9)
    return figure
