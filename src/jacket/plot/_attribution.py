"""Attribution maps over images, and token scores as coloured sentences."""

from __future__ import annotations

import numpy as np

from ..errors import JacketValueError
from ._common import _as_image, _figure


def attribution_figure(
    images,
    maps,
    *,
    labels=None,
    columns: int = 4,
    cmap: str | None = None,
    alpha: float = 0.55,
    title: str | None = None,
):
    """Attribution maps drawn over their images, one panel per sample.

    Args:
      images: `(n, H, W)`, `(n, H, W, C)` inputs (grey, or RGB with 3 channels).
      maps: `(n, h, w)` maps (`jacket.analysis.gradcam(...).map`, `integrated_gradients(...).map`,
        `Attribution.map`); a map of another size than its image is stretched over it. Signed
        maps are drawn on a diverging scale centred on 0, others from 0.
      labels: Optional title per sample.
      columns: Panels per row.
      cmap: Colormap of the maps (default "RdBu_r" for signed maps, "jet" otherwise).
      alpha: Opacity of the maps over the images.
      title: Optional title of the figure.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float64)
    if len(images) != len(maps):
        raise JacketValueError(
            f"attribution_figure: `images` and `maps` must have one entry per sample each. "
            f"Received: {len(images)} images and {len(maps)} maps."
        )
    n = len(images)
    if n == 0:
        raise JacketValueError("attribution_figure: no samples to draw. Received: 0 images.")
    columns = max(1, min(int(columns), n))
    rows = -(-n // columns)
    figure, axes = _figure(rows, columns, cell=1.6)
    for ax in axes.flat:
        ax.set_axis_off()
    for k in range(n):
        ax = axes[k // columns, k % columns]
        ax.set_axis_on()
        image = np.asarray(images[k], dtype=np.float64)
        if image.ndim == 3 and image.shape[-1] == 3:
            low, high = image.min(), image.max()
            shown, image_cmap = (image - low) / (high - low if high > low else 1.0), None
        else:
            shown, image_cmap = _as_image(image), "gray"
        height, width = shown.shape[:2]
        extent = (0, width, height, 0)
        ax.imshow(shown, cmap=image_cmap, extent=extent)
        m = maps[k] if maps[k].ndim == 2 else _as_image(maps[k])
        signed = bool((m < 0).any())
        scale = float(np.abs(m).max()) or 1.0
        ax.imshow(
            m, cmap=cmap or ("RdBu_r" if signed else "jet"), alpha=alpha, extent=extent,
            vmin=-scale if signed else 0.0, vmax=scale, interpolation="bilinear",
        )  # fmt: skip
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        if labels is not None:
            ax.set_title(str(labels[k]), fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def token_figure(
    tokens,
    scores,
    *,
    labels=None,
    cmap: str = "RdBu_r",
    fontsize: float = 10.0,
    width: float = 8.0,
):
    """Token scores as coloured sentences: each token on a background whose colour is its score
    (`jacket.analysis.token_attribution(...).scores`), on a diverging scale centred on 0 and
    scaled per sentence; one sentence per sample, wrapped to `width` inches.

    Args:
      tokens: Per sample, its tokens (strings; None or "" are left out, such as padding), or an
        integer array of ids (drawn as numbers).
      scores: `(n, seq)` one score per token.
      labels: Optional label per sample, drawn before its sentence.
      cmap: A diverging colormap.
      fontsize: Font size of the tokens.
      width: Figure width in inches.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise JacketValueError(
            f"token_figure: `scores` must be `(n, seq)`, one score per token. Received: shape "
            f"{scores.shape}."
        )
    if len(tokens) != len(scores):
        raise JacketValueError(
            f"token_figure: `tokens` and `scores` must have one entry per sample each. "
            f"Received: {len(tokens)} and {len(scores)}."
        )
    colors = colormaps[cmap]
    dpi = 100
    figure = Figure(figsize=(width, 1.0), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    renderer = canvas.get_renderer()
    line = fontsize * 2.0  # points between lines
    margin, gap = 6.0, 3.0  # points
    page = width * 72.0 - 2 * margin
    placed = []  # (x_pt, line index, text, colour)
    current = 0
    for k, row in enumerate(tokens):
        words = [str(t) for t in (row.tolist() if hasattr(row, "tolist") else row)]
        keep = [i for i, t in enumerate(words) if t not in ("", "None")]
        scale = float(np.abs(scores[k, keep]).max(initial=0.0)) if keep else 0.0
        scale = scale or 1.0
        x = 0.0
        if labels is not None:
            placed.append((x, current, f"{labels[k]}:", None))
            x += _text_width(figure, renderer, f"{labels[k]}:", fontsize) + 2 * gap
        for i in keep:
            word = words[i]
            w = _text_width(figure, renderer, word, fontsize) + 2 * gap
            if x + w > page and x > 0:
                current += 1
                x = 0.0
            color = colors(0.5 + 0.5 * float(np.clip(scores[k, i] / scale, -1, 1)))
            placed.append((x, current, word, color))
            x += w + gap
        current += 1
    height_pt = current * line + 2 * margin
    figure.set_size_inches(width, max(0.5, height_pt / 72.0))
    for x, row, word, color in placed:
        y = 1.0 - (margin + (row + 0.6) * line) / height_pt
        box = None if color is None else dict(facecolor=color, edgecolor="none", pad=2.0)
        figure.text(
            (margin + x + gap) / (width * 72.0), y, word, fontsize=fontsize, bbox=box,
            va="center", ha="left", family="DejaVu Sans",
        )  # fmt: skip
    return figure


def _text_width(figure, renderer, text: str, fontsize: float) -> float:
    """Width of `text` in points."""
    t = figure.text(0, 0, text, fontsize=fontsize, family="DejaVu Sans")
    width = t.get_window_extent(renderer).width * 72.0 / figure.dpi
    t.remove()
    return width
