"""Attribution maps: Grad-CAM, integrated gradients and SmoothGrad, at any layer of a model.

Built on the engine: the activations and the outputs come from one forward pass
(`jacket.engine.at`), the gradients from `jacket.vjp` at points the engine takes as `x` (so a
layer's activations are moved without running the model up to it again).

NOTE: [Batched attributions]
Integrated gradients at `steps` steps is the gradient at `steps` points per sample, SmoothGrad at
`n` noise samples the same. Every point is a row of one batch of `steps * batch` rows (step-major:
row `r` is step `r // batch` of sample `r % batch`), cut into equal passes of as many rows as
`memory_budget` allows for one forward and backward pass (`Point.rows_per_pass`: the activations
kept for the backward pass, their cotangents, the inputs and outputs), the last pass padded, so
that every pass has the same compiled VJP. The rows of a pass are made when the pass runs (a
gather of the samples' values and an affine map, or a draw of noise), never all at once, and the
weighted gradients are summed into one `(batch, *shape)` array as each pass ends. On the digits
model (batch 32, 50 steps: 1600 rows of 8x8x1) the default budget holds every row: one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from ..checks import check_flag, check_model, choice, positive_float, positive_int
from ..engine import vjp
from ..errors import JacketValueError
from ..trees import to_numpy
from ._batched import (
    _budget,
    _conv_layer,
    _one_hot,
    _out_shape,
    _outputs,
    _point,
    _resize,
    _single,
    _spatial_size,
    _targets,
    _weighted_gradients,
    quadrature,
)
from .maps import ATTRIBUTION_METHODS, METHODS, Attribution, image_map

# ------------------------------------------------------------------------------------------ results


@dataclass
class IntegratedGradients:
    """Integrated gradients of one output per sample (see `integrated_gradients`).

    Attributes:
      attributions: `(batch, *in_shape)` (the shape of `wrt`'s values):
        `(x - x') * integral of the gradient along the straight path from `x'` to `x``.
      target: `(batch,)` the flat output index attributed for each sample.
      delta: `(batch,)` the completeness error, `sum(attributions) - (f(x) - f(x'))`.
      outputs, baseline_outputs: `(batch,)` `f(x)` and `f(x')` of the target output.
      steps, method: the quadrature used.
      channels_first: whether the values' channel axis is axis 1 (for `map`).
    """

    attributions: np.ndarray
    target: np.ndarray
    delta: np.ndarray
    outputs: np.ndarray
    baseline_outputs: np.ndarray
    steps: int
    method: str
    channels_first: bool = False

    @property
    def relative_error(self) -> np.ndarray:
        """`|delta| / |f(x) - f(x')|` per sample: how far completeness is from exact."""
        change = np.abs(self.outputs - self.baseline_outputs)
        return np.abs(self.delta) / np.maximum(change, np.finfo(np.float64).tiny)

    @property
    def map(self) -> np.ndarray:
        """`|attributions|`, the largest over channels for images: `(batch, H, W)`."""
        return image_map(self.attributions, self.channels_first)


@dataclass
class SmoothGrad:
    """The mean gradient over noisy copies of each sample (see `smoothgrad`).

    Attributes:
      gradient: `(batch, *in_shape)`: the mean of `d y[target] / d x` at `x + noise`.
      target: `(batch,)` the flat output index.
      n, sigma: noise samples per sample and the noise level (relative to each sample's range).
      channels_first: whether the values' channel axis is axis 1 (for `map`).
    """

    gradient: np.ndarray
    target: np.ndarray
    n: int
    sigma: float
    channels_first: bool = False

    @property
    def map(self) -> np.ndarray:
        """`|gradient|`, the largest over channels for images: `(batch, H, W)`."""
        return image_map(self.gradient, self.channels_first)


@dataclass
class GradCAM:
    """Grad-CAM maps (see `gradcam`).

    Attributes:
      map: `(batch, *input_spatial)`: the map upsampled to the input's spatial size (at the
        layer's size where the input has none, or with `upsample=False`).
      cam: `(batch, *layer_spatial)`: the map at the layer's resolution,
        `relu(sum_k weights[k] * A_k)`.
      weights: `(batch, channels)`: the spatial mean of `d y[target] / d A_k` per channel.
      target: `(batch,)` the flat output index.
      layer: the layer's name.
    """

    map: np.ndarray
    cam: np.ndarray
    weights: np.ndarray
    target: np.ndarray
    layer: str


# ------------------------------------------------------------------------------------ functions


def integrated_gradients(
    model,
    x,
    *,
    baseline=None,
    steps: int = 50,
    target=None,
    method: str = "riemann_trapezoid",
    wrt=None,
    of=None,
    memory_budget: int | str | None = None,
    training: bool = False,
) -> IntegratedGradients:
    """Integrated gradients (Sundararajan et al. 2017), batched through the engine.

    `IG(x) = (x - x') * integral_0^1 d f(x' + a (x - x')) / dx da`, by a quadrature of `steps`
    points: "riemann_trapezoid" (the trapezoid rule on `steps` equally spaced points, weights
    `1 / (steps - 1)`, halved at both ends: they sum to 1) or "gausslegendre" (Gauss-Legendre
    nodes and weights on [0, 1]); "riemann_left", "riemann_right" and "riemann_middle" as in
    Captum. All `steps * batch` gradients go through the engine as one batch, cut into passes
    that fit `memory_budget` (NOTE: [Batched attributions]).

    Captum's "riemann_trapezoid" weighs the same points by `1 / steps` (halved at the ends), which
    sums to `1 - 1 / steps`: its attributions are those here times `(steps - 1) / steps` (2% less
    at 50 steps), and its completeness error is that much larger. The other methods are Captum's.

    Args:
      model: A Keras model (or layer) with one output (or `of` naming one tensor).
      x: Input `(batch, *in_shape)` (or a structure of inputs, for a model with integer inputs
        held constant or with `wrt`).
      baseline: The reference input `x'`, shaped like `x` (with `wrt`, its activations at `wrt`
        are the baseline); default zeros (of `wrt`'s values).
      steps: Quadrature points.
      target: The flat output index to attribute: an int, one per sample, or None for each
        sample's largest output.
      method: See above.
      wrt, of: As in `jacket.jacobian`: attributions to a layer's activations (an embedding,
        say), of a layer's output; one tensor each.
      memory_budget: Working memory of one pass (bytes or "500MB"); default as in
        `jacket.jacobian`.
      training: Call the model in training mode.

    Returns:
      An `IntegratedGradients` (`attributions`, `target`, `delta`, `relative_error`, `map`).

    Example:
      >>> ig = jacket.analysis.integrated_gradients(model, x_test[:32], steps=50)
      >>> ig.attributions.shape, float(ig.relative_error.max()) < 0.01
      ((32, 8, 8, 1), True)
    """
    fn = "integrated_gradients"
    check_model(fn, model)
    steps = positive_int(fn, "steps", steps)
    choice(fn, "method", method, METHODS)
    if method.startswith("riemann") and steps < 2:
        raise JacketValueError(
            f"{fn}: the Riemann and trapezoid rules need at least 2 steps. Received: steps={steps}."
        )
    check_flag(fn, "training", training)
    budget = _budget(fn, memory_budget)
    point = _point(fn, model, x, wrt, of, training)
    X = point.wrt
    if baseline is None:
        X0 = keras.ops.zeros_like(X)
    else:
        base = _point(fn, model, baseline, wrt, of, training, name="baseline")
        if base.batch != point.batch or base.leaves != point.leaves:
            shown = [(base.batch,) + leaf.shape for leaf in base.leaves]
            raise JacketValueError(
                f"{fn}: `baseline` must be shaped like `x` (its `wrt` values like those of `x`). "
                f"Received: values {shown} for {[(point.batch,) + point.leaves[0].shape]}."
            )
        X0 = base.wrt
    B = point.batch
    dtype = point.leaves[0].dtype
    shape = point.leaves[0].shape
    alphas, weights = quadrature(method, steps)
    # f(x) and f(x') come from two rows per sample at a = 1 and a = 0: in a forward pass of their
    # own when the target is to be read from f(x), else in the passes themselves (weight 0)
    alphas = np.concatenate([alphas, [1.0, 0.0]])
    ends = None
    if target is None:
        ends = _outputs(fn, model, point, np.tile(np.arange(B), 2), keras.ops.concatenate([X, X0]))
    index = _targets(fn, point, target, None if ends is None else ends[:B])
    rows = steps * B + (0 if ends is not None else 2 * B)

    def values(rows: np.ndarray):
        samples = keras.ops.convert_to_tensor((rows % B).astype("int32"))
        a = alphas[rows // B].reshape((-1,) + (1,) * len(shape))
        a = keras.ops.convert_to_tensor(a.astype(dtype))
        start, stop = keras.ops.take(X0, samples, axis=0), keras.ops.take(X, samples, axis=0)
        return start + a * (stop - start)

    weight = np.concatenate([np.repeat(weights, B), np.zeros(rows - steps * B)])
    total, kept = _weighted_gradients(
        fn, model, point, rows, weight, values, index, budget, training, keep=steps * B
    )
    if ends is None:
        ends = kept
    difference = to_numpy(X).astype(np.float64) - to_numpy(X0).astype(np.float64)
    attributions = difference * total
    picked = ends.reshape(2 * B, -1)[np.arange(2 * B), np.tile(index, 2)].astype(np.float64)
    outputs, baseline_outputs = picked[:B], picked[B:]
    delta = attributions.reshape(B, -1).sum(axis=1) - (outputs - baseline_outputs)
    return IntegratedGradients(
        attributions=attributions.astype(np.dtype(dtype), copy=False),
        target=index,
        delta=delta,
        outputs=outputs,
        baseline_outputs=baseline_outputs,
        steps=steps,
        method=method,
        channels_first=keras.config.image_data_format() == "channels_first",
    )


def smoothgrad(
    model,
    x,
    *,
    n: int = 50,
    sigma: float = 0.15,
    target=None,
    seed: int = 0,
    wrt=None,
    of=None,
    memory_budget: int | str | None = None,
    training: bool = False,
) -> SmoothGrad:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over `n` noisy copies of each
    sample, `x + N(0, (sigma * (max(x) - min(x)))^2)` per sample, batched through the engine
    (NOTE: [Batched attributions]).

    Args:
      model, x, target, wrt, of, memory_budget, training: As in `integrated_gradients`.
      n: Noisy copies per sample.
      sigma: The noise's standard deviation relative to each sample's range (0.15: 15%).
      seed: Seed of the noise (the same noise on every call).

    Returns:
      A `SmoothGrad` (`gradient`, `target`, `map`).
    """
    fn = "smoothgrad"
    check_model(fn, model)
    n = positive_int(fn, "n", n)
    sigma = positive_float(fn, "sigma", sigma, allow_zero=True)
    check_flag(fn, "training", training)
    budget = _budget(fn, memory_budget)
    point = _point(fn, model, x, wrt, of, training)
    X = point.wrt
    B = point.batch
    y = None if target is not None else _outputs(fn, model, point, np.arange(B), X)
    index = _targets(fn, point, target, y)
    dtype = point.leaves[0].dtype
    shape = point.leaves[0].shape
    flat = to_numpy(X).reshape(B, -1).astype(np.float64)
    scale = sigma * (flat.max(axis=1) - flat.min(axis=1))  # (B,)
    rng = np.random.default_rng(seed)

    def values(rows: np.ndarray):
        samples = (rows % B).astype("int32")
        noise = rng.standard_normal((len(rows),) + shape) * scale[samples].reshape(
            (-1,) + (1,) * len(shape)
        )
        base = keras.ops.take(X, keras.ops.convert_to_tensor(samples), axis=0)
        return base + keras.ops.convert_to_tensor(noise.astype(dtype))

    weights = np.full(n * B, 1.0 / n)
    total, _ = _weighted_gradients(
        fn, model, point, n * B, weights, values, index, budget, training
    )
    return SmoothGrad(
        gradient=total.astype(np.dtype(dtype), copy=False),
        target=index,
        n=n,
        sigma=sigma,
        channels_first=keras.config.image_data_format() == "channels_first",
    )


def gradcam(
    model,
    x,
    *,
    layer=None,
    target=None,
    of=None,
    relu: bool = True,
    upsample: bool = True,
    data_format: str | None = None,
    training: bool = False,
) -> GradCAM:
    """Grad-CAM (Selvaraju et al. 2017): the feature maps `A_k` of a convolutional layer weighed
    by the spatial mean of the target's gradient with respect to them, summed over channels and
    rectified, upsampled (bilinear) to the input's size. One forward pass to the layer and one
    VJP from it.

    Args:
      model: A Functional or Sequential model with one output (or `of` naming one tensor).
      x: Input `(batch, *in_shape)` (or a structure of inputs).
      layer: The layer (name, path or object, as `wrt` in `jacket.jacobian`); default the last
        convolutional layer of the model's graph.
      target: As in `integrated_gradients`.
      of: As in `jacket.jacobian` (default the model's output).
      relu: Rectify the map (Grad-CAM's ReLU).
      upsample: Resize the map to the input's spatial size.
      data_format: "channels_last" or "channels_first" for the layer's maps; default the
        layer's own (`layer.data_format`), else Keras's image data format.
      training: Call the model in training mode.

    Returns:
      A `GradCAM` (`map`, `cam`, `weights`, `target`, `layer`).

    Example:
      >>> cam = jacket.analysis.gradcam(model, x_test[:8])
      >>> cam.map.shape, cam.layer
      ((8, 8, 8), 'conv2d_1')
    """
    fn = "gradcam"
    check_model(fn, model)
    check_flag(fn, "relu", relu)
    check_flag(fn, "upsample", upsample)
    check_flag(fn, "training", training)
    name, found = _conv_layer(fn, model, layer)
    if data_format is None:
        data_format = getattr(found, "data_format", None) or keras.config.image_data_format()
    choice(fn, "data_format", data_format, ("channels_last", "channels_first"))
    point = _point(fn, model, x, name, of, training, arg="layer", outputs=target is None)
    y = None if target is None else np.zeros((point.batch,) + _out_shape(fn, point))
    index = _targets(fn, point, target, None if y is not None else _single(fn, point.outputs))
    if y is None:
        y = _single(fn, point.outputs)
    A = point.wrt
    if len(A.shape) < 3:
        raise JacketValueError(
            f"{fn}: the layer's output must have spatial axes, `(batch, *spatial, channels)`. "
            f"Received: layer {name!r} with output shape {tuple(A.shape)}. Name a convolutional "
            "layer."
        )
    gradient = to_numpy(vjp(model, point, _one_hot(y, index), training=training))
    activations = to_numpy(A)
    if data_format == "channels_first":  # (B, K, *spatial) -> (B, *spatial, K)
        gradient = np.moveaxis(gradient, 1, -1)
        activations = np.moveaxis(activations, 1, -1)
    spatial_axes = tuple(range(1, gradient.ndim - 1))
    weights = gradient.astype(np.float64).mean(axis=spatial_axes)  # (B, K)
    cam = np.einsum("b...k,bk->b...", activations.astype(np.float64), weights)
    if relu:
        cam = np.maximum(cam, 0.0)
    size = _spatial_size(point, x, data_format, cam.ndim - 1) if upsample else None
    upsampled = _resize(cam, size) if size is not None else cam
    return GradCAM(
        map=upsampled.astype(np.float32), cam=cam.astype(np.float32), weights=weights,
        target=index, layer=getattr(name, "name", str(name)),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- dispatch


def attribute(
    model,
    x,
    *,
    method: str = "saliency",
    target=None,
    layer=None,
    baseline=None,
    steps: int = 50,
    quadrature: str = "riemann_trapezoid",
    n: int = 50,
    sigma: float = 0.15,
    memory_budget: int | str | None = None,
) -> Attribution:
    """An attribution map by name: "saliency" (`jacket.analysis.saliency`), "gradcam"
    (`gradcam`, at `layer`), "ig" (`integrated_gradients` with `steps`, `quadrature`,
    `baseline`, at the inputs or the activations of `layer`) or "smoothgrad" (`smoothgrad`
    with `n`, `sigma`).

    Returns:
      An `Attribution` (`values`, `map`, `target`, `delta`).
    """
    fn = "attribute"
    choice(fn, "method", method, ATTRIBUTION_METHODS)
    if method == "gradcam":
        cam = gradcam(model, x, layer=layer, target=target)
        return Attribution(cam.map, cam.map, cam.target, method)
    if method == "ig":
        ig = integrated_gradients(
            model, x, baseline=baseline, steps=steps, target=target, method=quadrature,
            wrt=layer, memory_budget=memory_budget,
        )  # fmt: skip
        change = ig.outputs - ig.baseline_outputs
        return Attribution(ig.attributions, ig.map, ig.target, method, ig.delta, change)
    if method == "smoothgrad":
        sg = smoothgrad(
            model, x, n=n, sigma=sigma, target=target, wrt=layer, memory_budget=memory_budget
        )
        return Attribution(sg.gradient, sg.map, sg.target, method)
    from ._sensitivity import saliency

    s = saliency(model, x, target, wrt=layer)
    return Attribution(s.gradient, image_map(s.gradient), s.target, method)
