"""What the attribution methods share: the quadratures, the batched weighted gradients
(NOTE: [Batched attributions] in `jacket.analysis._attribution`), the targets, and Grad-CAM's layer
and upsampling."""

from __future__ import annotations

import math

import keras
import numpy as np

from ..checks import parse_bytes
from ..engine import Point, at, graph_layers, value_and_vjp, vjp
from ..engine.memory import default_memory_budget
from ..engine.outputs import output_index, single_output
from ..errors import JacketTypeError, JacketValueError
from ..trees import to_numpy

# ------------------------------------------------------------------------------------- helpers


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """`(alphas, weights)` of `steps` points on [0, 1] (see `integrated_gradients`)."""
    n = steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if method == "riemann_trapezoid":
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), weights
    weights = np.full(n, 1.0 / n)
    if method == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), weights
    if method == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), weights
    return np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n), weights  # middle


def _budget(fn: str, memory_budget) -> int:
    if memory_budget is None:
        return default_memory_budget()
    return parse_bytes(fn, "memory_budget", memory_budget)


def _point(
    fn, model, x, wrt, of, training, *, name: str = "x", arg: str = "wrt", outputs: bool = False
) -> Point:
    """The model (or its cut) at `x` (with its outputs on request); one `wrt` value, one
    output."""
    if x is None:
        raise JacketTypeError(
            f"{fn}: `{name}` must be an array `(batch, *in_shape)`. Received: {name}=None."
        )
    point = at(model, x, wrt=wrt, of=of, training=training, outputs=outputs)
    if len(point.leaves) != 1:
        raise JacketValueError(
            f"{fn}: `{arg}` must name one tensor. Received: {len(point.leaves)} "
            f"({', '.join(leaf.label for leaf in point.leaves)}). Name one layer or input."
        )
    return point


def _single(fn: str, y) -> np.ndarray:
    single_output(fn, y, " (or pass `of=` naming one layer)")
    return to_numpy(y)


def _outputs(fn: str, model, point: Point, samples: np.ndarray, values) -> np.ndarray:
    """The (one) output at the `wrt` values `values` of the point's samples `samples`: one
    forward pass."""
    moved = at(model, point.take(samples, values), outputs=True)
    return _single(fn, moved.outputs)


def _out_shape(fn: str, point: Point) -> tuple:
    shapes = point.output_shapes()
    if len(shapes) != 1:
        raise JacketValueError(
            f"{fn}: `model` must have one output tensor. Received: a model whose outputs are "
            f"{len(shapes)} tensors. Pass `of=` naming one of them."
        )
    return shapes[0]


def _targets(fn: str, point: Point, target, y: np.ndarray | None) -> np.ndarray:
    """The flat output index per sample: `target`'s, else the largest of `y`."""
    batch = point.batch
    if target is None:
        return y.reshape(batch, -1).argmax(axis=1)
    size = int(np.prod(_out_shape(fn, point)))
    return output_index(fn, "target", target, size, batch)


def _one_hot(y: np.ndarray, index: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Cotangents `(len(rows), *out_shape)`: 1 at each row's target output."""
    batch = y.shape[0]
    rows = np.arange(batch) if rows is None else rows
    size = int(np.prod(y.shape[1:]))
    u = np.zeros((len(rows), size), y.dtype)
    u[np.arange(len(rows)), index[rows % batch]] = 1.0
    return u.reshape((len(rows),) + y.shape[1:])


def _weighted_gradients(
    fn, model, point: Point, total, weights, values, index, budget: int, training: bool,
    keep: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """`sum_r weights[r] * d y[target] / d wrt` at the rows `values(rows)`, summed per sample
    (row `r` belongs to sample `r % batch`): the passes of NOTE: [Batched attributions]. With
    `keep`, also the outputs of the rows from `keep` on (one forward pass gives both)."""
    B = point.batch
    y_shape = _out_shape(fn, point)
    chunk = min(total, point.rows_per_pass(budget, training))
    passes = math.ceil(total / chunk)
    chunk = math.ceil(total / passes)  # even passes: one compiled signature
    acc = np.zeros((B,) + point.leaves[0].shape, np.float64)
    y_like = np.zeros((B,) + y_shape, np.dtype(point.output_dtypes()[0]))
    kept = []
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        rows = np.arange(start, start + chunk)
        rows[stop - start :] = stop - 1  # the last pass padded with its last row
        q = point.take(rows % B, values(rows))
        u = _one_hot(y_like, index, rows)
        if keep is not None and stop > keep:
            y, g = value_and_vjp(model, q, u, training=training)
            y = to_numpy(y)[: stop - start]
            kept.append(y[max(0, keep - start) :])
        else:
            g = vjp(model, q, u, training=training)
        g = to_numpy(g)[: stop - start].astype(np.float64)
        w = weights[start:stop].reshape((-1,) + (1,) * (g.ndim - 1))
        if (stop - start) % B == 0 and start % B == 0:  # whole steps: a reshape, no scatter
            acc += (w * g).reshape((-1, B) + g.shape[1:]).sum(axis=0)
        else:
            np.add.at(acc, rows[: stop - start] % B, w * g)
    return acc, (np.concatenate(kept) if kept else None)


_CONV_PREFIXES = ("Conv", "DepthwiseConv", "SeparableConv")


def _is_conv(layer) -> bool:
    return any(cls.__name__.startswith(_CONV_PREFIXES) for cls in type(layer).__mro__)


def _conv_layer(fn: str, model, layer):
    """`(name, layer object or None)` of the layer Grad-CAM reads: the given one, or the last
    convolutional layer of the graph."""
    layers = graph_layers(model)
    if layer is None:
        convs = [(name, op) for name, op in layers if _is_conv(op)]
        if not convs:
            raise JacketValueError(
                f"{fn}: the model has no convolutional layer to take by default. Received: "
                f"layer=None for a model of {len(layers)} layer(s). Pass `layer=` naming the "
                "layer whose feature maps to use."
            )
        return convs[-1]
    if isinstance(layer, str):
        for name, op in layers:
            if name == layer or name.split(":")[0] == layer:
                return layer, op
        return layer, None  # resolved (or refused) by the engine's `wrt`
    if isinstance(layer, keras.Layer):
        return layer, layer
    return layer, None


def _spatial_size(point: Point, x, data_format: str, rank: int) -> tuple | None:
    """The spatial size of the model's input (the map is resized to it), or None."""
    from ..engine.cut import Cut

    shape = None
    target = point.target
    if isinstance(target, Cut) and len(target.inputs) == 1:
        shape = tuple(target.inputs[0].shape[1:])
    elif hasattr(x, "shape"):
        shape = tuple(x.shape[1:])
    if shape is None or any(d is None for d in shape) or len(shape) != rank + 1:
        return None
    return shape[1:] if data_format == "channels_first" else shape[:-1]


def _resize(cam: np.ndarray, size: tuple) -> np.ndarray:
    """Bilinear resize of maps `(batch, *spatial)` to `size` (half-pixel centres, as
    `torch.nn.functional.interpolate(..., align_corners=False)` and `tf.image.resize`)."""
    if tuple(cam.shape[1:]) == tuple(size):
        return cam
    if cam.ndim == 2:  # one spatial axis: a column image
        out = _resize(cam[:, :, None], (size[0], 1))
        return out[:, :, 0]
    if cam.ndim != 3:
        return cam
    image = keras.ops.convert_to_tensor(cam[..., None].astype(np.float32))
    resized = keras.ops.image.resize(
        image, size, interpolation="bilinear", antialias=False, data_format="channels_last"
    )
    return to_numpy(resized)[..., 0].astype(np.float64)
