"""The forward Laplacian's `Jet` and its rules per layer and per operation
(NOTE: [The forward Laplacian] in `jacket.engine.forward_laplacian`).

A rule takes the `Walker`, the layer or operation and its arguments (some of them `Jet`s) and returns
the output `Jet`, or `NotImplemented` where the call is not one it covers (the walker then runs the
fallback). `RULES` maps Keras's exact classes to their rules; `ELEMENTWISE` holds the activations
applied elementwise, `CLOSED_FORMS` those whose first and second derivatives are written out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:  # pragma: no cover
    from .forward_laplacian import Walker

ops = keras.ops


class Jet:
    """A tensor of the forward pass and its derivatives with respect to `d` input coordinates.

    `value` is `(B, *s)`; `grad` is `(d, B or 1, *s)` (`d value / d x_j`, with a batch axis of 1
    while it is the same for every sample); `lap` is `(B or 1, *s)` (`sum_j d^2 value / d x_j^2`),
    or None where it is zero.
    """

    __slots__ = ("value", "grad", "lap")

    def __init__(self, value, grad, lap):
        self.value, self.grad, self.lap = value, grad, lap


def _single(args, kwargs):
    """The one `Jet` a single-input layer was called with, or None."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Jet):
        return None
    return args[0]


def _dense(walker: Walker, layer, args, kwargs):
    jet = _single(args, {k: v for k, v in kwargs.items() if k != "training"})
    if jet is None or getattr(layer, "lora_enabled", False):
        return NotImplemented
    kernel = layer.kernel
    out = walker.linear(lambda ts: ops.matmul(ts[0], kernel), [jet], layer.bias)
    return walker.activation(layer.activation, out)


def _conv(walker: Walker, layer, args, kwargs):
    jet = _single(args, kwargs)
    if jet is None or getattr(layer, "padding", None) == "causal" or layer.groups != 1:
        return NotImplemented
    kernel = layer.kernel
    bias = None
    if layer.use_bias:
        if layer.data_format == "channels_last":
            shape = (1,) * (layer.rank + 1) + (layer.filters,)
        else:
            shape = (1, layer.filters) + (1,) * layer.rank
        bias = ops.reshape(layer.bias, shape)
    out = walker.linear(lambda ts: layer.convolution_op(ts[0], kernel), [jet], bias)
    return walker.activation(layer.activation, out)


def _linear_layer(walker: Walker, layer, args, kwargs):
    """A layer linear in its inputs, with no bias: the layer itself on values, gradients and
    Laplacians (reshapes, padding, average pooling, dropout in inference, merges by sum)."""
    jets = [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, Jet)]

    def fn(tensors):
        it = iter(tensors)
        a, k = keras.tree.map_structure(
            lambda leaf: next(it) if isinstance(leaf, Jet) else leaf, (args, kwargs)
        )
        return layer(*a, **k)

    return walker.linear(fn, jets)


def _activation_layer(walker: Walker, layer, args, kwargs):
    jet = _single(args, kwargs)
    if jet is None:
        return NotImplemented
    return walker.activation(layer.activation, jet)


def _elementwise_layer(walker: Walker, layer, args, kwargs):
    jet = _single(args, kwargs)
    if jet is None:
        return NotImplemented
    return walker.elementwise(layer, jet)


def _batch_normalization(walker: Walker, layer, args, kwargs):
    jet = _single(args, {k: v for k, v in kwargs.items() if k != "training"})
    if jet is None or kwargs.get("training"):
        return NotImplemented
    rank = len(jet.value.shape)
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    shape = [1] * rank
    for axis in axes:
        shape[axis % rank] = int(jet.value.shape[axis])
    scale = ops.rsqrt(ops.add(layer.moving_variance, layer.epsilon))
    if layer.scale:
        scale = ops.multiply(scale, layer.gamma)
    scale = ops.reshape(ops.cast(scale, jet.value.dtype), shape)
    value = layer(jet.value)
    grad = ops.multiply(scale[None], jet.grad)
    lap = None if jet.lap is None else ops.multiply(scale, jet.lap)
    return Jet(value, grad, lap)


def _multiply_layer(walker: Walker, layer, args, kwargs):
    if kwargs or len(args) != 1 or not all(isinstance(a, Jet) for a in args[0]):
        return NotImplemented
    jets = list(args[0])
    out = jets[0]
    for jet in jets[1:]:
        out = walker.product(out, jet)
    return out


def _scaled(walker: Walker, jet: Jet, c, divide: bool = False) -> Jet:
    def scale(t):
        return ops.divide(t, c) if divide else ops.multiply(t, c)

    return Jet(scale(jet.value), scale(jet.grad), None if jet.lap is None else scale(jet.lap))


def _add_op(walker: Walker, op, args, kwargs, sign: float = 1.0):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    if isinstance(a, Jet) and isinstance(b, Jet):
        if sign > 0:
            return walker.linear(lambda ts: ops.add(ts[0], ts[1]), [a, b])
        return walker.linear(lambda ts: ops.subtract(ts[0], ts[1]), [a, b])
    if isinstance(a, Jet):  # jet +- constant
        value = ops.add(a.value, b) if sign > 0 else ops.subtract(a.value, b)
        return Jet(value, a.grad, a.lap)
    negated = b if sign > 0 else _scaled(walker, b, -1.0)
    return Jet(ops.add(a, negated.value), negated.grad, negated.lap)


def _subtract_op(walker: Walker, op, args, kwargs):
    return _add_op(walker, op, args, kwargs, sign=-1.0)


def _multiply_op(walker: Walker, op, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    if isinstance(a, Jet) and isinstance(b, Jet):
        return walker.product(a, b)
    jet, c = (a, b) if isinstance(a, Jet) else (b, a)
    return _scaled(walker, jet, c)


def _divide_op(walker: Walker, op, args, kwargs):
    if kwargs or len(args) != 2 or not isinstance(args[0], Jet) or isinstance(args[1], Jet):
        return NotImplemented
    return _scaled(walker, args[0], args[1], divide=True)


def _negative_op(walker: Walker, op, args, kwargs):
    jet = _single(args, kwargs)
    return NotImplemented if jet is None else _scaled(walker, jet, -1.0)


def _elementwise_op(walker: Walker, op, args, kwargs):
    jet = _single(args, {})
    if jet is None:
        return NotImplemented
    return walker.elementwise(lambda z: op(z, **kwargs), jet)


def _tanh(z):
    y = ops.tanh(z)
    d1 = 1 - ops.square(y)
    return y, d1, -2 * y * d1


def _sigmoid(z):
    y = ops.sigmoid(z)
    d1 = y * (1 - y)
    return y, d1, d1 * (1 - 2 * y)


def _relu(z):
    y = ops.relu(z)
    return y, ops.cast(ops.greater(z, 0), z.dtype), None


def _build_rules():
    layers, activations = keras.layers, keras.activations
    rules = {
        layers.Dense: _dense,
        layers.Conv1D: _conv,
        layers.Conv2D: _conv,
        layers.Conv3D: _conv,
        layers.Activation: _activation_layer,
        layers.BatchNormalization: _batch_normalization,
        layers.Multiply: _multiply_layer,
    }
    for name in (
        "ReLU",
        "LeakyReLU",
        "ELU",
        "PReLU",
    ):
        rules[getattr(layers, name)] = _elementwise_layer
    for name in (
        "Flatten",
        "Reshape",
        "Permute",
        "RepeatVector",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "ZeroPadding3D",
        "Cropping1D",
        "Cropping2D",
        "Cropping3D",
        "UpSampling1D",
        "UpSampling2D",
        "UpSampling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "Identity",
        "ActivityRegularization",
        "Add",
        "Subtract",
        "Average",
        "Concatenate",
    ):
        layer = getattr(layers, name, None)
        if layer is not None:
            rules[layer] = _linear_layer
    from keras.src.ops import nn as nn_ops
    from keras.src.ops import numpy as np_ops

    rules[np_ops.Add] = _add_op
    rules[np_ops.Subtract] = _subtract_op
    rules[np_ops.Multiply] = _multiply_op
    rules[np_ops.Divide] = _divide_op
    rules[np_ops.TrueDivide] = _divide_op
    rules[np_ops.Negative] = _negative_op
    for module, names in (
        (
            np_ops,
            (
                "Sin",
                "Cos",
                "Tan",
                "Tanh",
                "Sinh",
                "Cosh",
                "Arctan",
                "Arcsinh",
                "Exp",
                "Expm1",
                "Log",
                "Log1p",
                "Sqrt",
                "Square",
                "Abs",
            ),
        ),
        (nn_ops, ("Relu", "Sigmoid", "Softplus", "Silu", "Gelu", "Elu", "Selu", "Softsign")),
    ):
        for name in names:
            cls = getattr(module, name, None)
            if cls is not None:
                rules[cls] = _elementwise_op
    elementwise = set()
    for name in (
        "celu",
        "elu",
        "exponential",
        "gelu",
        "hard_shrink",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "hard_tanh",
        "leaky_relu",
        "linear",
        "log_sigmoid",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "swish",
        "soft_shrink",
        "softplus",
        "softsign",
        "sparse_plus",
        "sparse_sigmoid",
        "squareplus",
        "tanh",
        "tanh_shrink",
    ):
        fn = getattr(activations, name, None)
        if fn is not None:
            elementwise.add(fn)
    closed = {activations.tanh: _tanh, activations.sigmoid: _sigmoid, activations.relu: _relu}
    return rules, frozenset(elementwise), closed, activations.linear


RULES, ELEMENTWISE, CLOSED_FORMS, LINEAR = _build_rules()
