"""What the attribution methods return in one form, and their names: NumPy only (no Keras), so
that the driver of a Dask run (`jacket.distributed.attribution_dataset`) can use them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the quadratures of integrated gradients (`jacket.analysis.integrated_gradients`)
METHODS = ("riemann_trapezoid", "gausslegendre", "riemann_left", "riemann_right", "riemann_middle")
# the methods of `jacket.analysis.attribute` and `jacket attribute`
ATTRIBUTION_METHODS = ("saliency", "gradcam", "ig", "smoothgrad")


def image_map(values: np.ndarray, channels_first: bool = False) -> np.ndarray:
    """`|values|`, the largest over the channel axis of image-like values `(batch, H, W, C)`
    (`(batch, C, H, W)` with `channels_first`); other shapes as they are."""
    magnitude = np.abs(values)
    if magnitude.ndim == 4:
        return magnitude.max(axis=1 if channels_first else -1)
    return magnitude


@dataclass
class Attribution:
    """One attribution method's result in one form (see `jacket.analysis.attribute`): what the
    command line writes and `jacket.distributed.attribution_dataset` assembles.

    Attributes:
      values: `(batch, *in_shape)` the attributions (saliency: the gradient; ig: the integrated
        gradients; smoothgrad: the mean gradient), or `(batch, *input_spatial)` the Grad-CAM map.
      map: `(batch, H, W)` (or the values' own shape) what a figure draws: `|values|`, the
        largest over channels for images; the Grad-CAM map itself.
      target: `(batch,)` the flat output index attributed.
      method: "saliency", "gradcam", "ig" or "smoothgrad".
      delta: `(batch,)` integrated gradients' completeness error, else None.
      change: `(batch,)` integrated gradients' `f(x) - f(x')`, else None.
    """

    values: np.ndarray
    map: np.ndarray
    target: np.ndarray
    method: str
    delta: np.ndarray | None = None
    change: np.ndarray | None = None

    @property
    def relative_error(self) -> np.ndarray | None:
        """`|delta| / |f(x) - f(x')|` per sample (integrated gradients), else None."""
        if self.delta is None or self.change is None:
            return None
        return np.abs(self.delta) / np.maximum(np.abs(self.change), np.finfo(np.float64).tiny)
