"""The rules of Keras's layers for sparsity detection: each maps the dependency sets of a layer's
inputs to those of its outputs from the layer's configuration alone (NOTE: [How the pattern is
propagated] in `_detect`); `_rule_for` finds a layer class's rule (exact class match)."""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import scipy.sparse as sp

from ._deps import (
    _Dep,
    _gather,
    _identity,
    _kron_all,
    _mix_all,
    _probe_1d,
    _repeat,
    _reshape,
    _separable,
    _shift,
    _transpose,
    _window,
)

# ------------------------------------------------------------------------------------------ rules


@dataclass
class _Context:
    training: bool
    notes: list[str] = field(default_factory=list)  # layers given the conservative rule
    activations: int = 0  # elements of every tensor met, per sample (a memory estimate)


def _channels_first(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def _last_layout(fn):
    """Run a channels-last rule on a channels-first layer: move the channel axis there and back."""

    def rule(layer, dep, out_shape, ctx):
        if not _channels_first(layer):
            return fn(layer, dep, out_shape, ctx)
        rank = len(dep.shape)
        to_last = (*range(1, rank), 0)
        out_last = (*out_shape[1:], out_shape[0])
        result = fn(layer, _transpose(dep, to_last), out_last, ctx)
        return _transpose(result, (rank - 1, *range(rank - 1)))

    return rule


def _tuple(value, rank: int) -> tuple:
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


_ELEMENTWISE_ACTIVATIONS = (
    "linear relu relu6 leaky_relu elu selu gelu celu silu swish hard_silu hard_swish sigmoid "
    "hard_sigmoid log_sigmoid tanh hard_tanh tanh_shrink soft_shrink hard_shrink softplus "
    "softsign sparse_plus squareplus mish exponential threshold"
).split()
_LAST_AXIS_ACTIVATIONS = "softmax log_softmax sparsemax glu".split()


def _activation(layer, dep: _Dep, ctx: _Context, fn=None) -> _Dep:
    fn = getattr(layer, "activation", None) if fn is None else fn
    if fn is None:
        return dep
    for name in _ELEMENTWISE_ACTIVATIONS:
        if fn is getattr(keras.activations, name, None):
            return dep
    for name in _LAST_AXIS_ACTIVATIONS:
        if fn is getattr(keras.activations, name, None):
            return _separable(dep, None, np.ones((dep.channels, dep.channels), bool), dep.shape)
    ctx.notes.append(f"{layer.name!r} ({type(layer).__name__}): activation {fn!r}")
    return _mix_all([dep], [dep.shape])[0]


def _elementwise(layer, dep, out_shape, ctx):
    return dep


def _activation_layer(layer, dep, out_shape, ctx):
    return _activation(layer, dep, ctx)


def _spatial_channel_map(kind: str, layer, dep: _Dep, out_shape):
    """The pixel map `P` of a windowed layer on channels-last `dep`."""
    rank = len(dep.shape) - 1
    n_in, n_out = dep.shape[:-1], tuple(out_shape[:-1])
    if kind == "conv":
        k, s, d = layer.kernel_size, layer.strides, layer.dilation_rate
        padding = layer.padding
    else:  # pooling
        k = _tuple(layer.pool_size, rank)
        s = _tuple(layer.strides if layer.strides is not None else layer.pool_size, rank)
        d, padding = (1,) * rank, layer.padding
    return _kron_all(
        _window(n_in[a], n_out[a], k[a], s[a], d[a], padding.lower()) for a in range(rank)
    )


@_last_layout
def _conv(layer, dep, out_shape, ctx):
    P = _spatial_channel_map("conv", layer, dep, out_shape)
    c_in, c_out = dep.channels, out_shape[-1]
    groups = getattr(layer, "groups", 1)
    Cm = (np.arange(c_out)[:, None] // (c_out // groups)) == (
        np.arange(c_in)[None, :] // (c_in // groups)
    )
    return _activation(layer, _separable(dep, P, Cm, out_shape), ctx)


@_last_layout
def _depthwise_conv(layer, dep, out_shape, ctx):
    P = _spatial_channel_map("conv", layer, dep, out_shape)
    m = layer.depth_multiplier
    Cm = np.arange(out_shape[-1])[:, None] // m == np.arange(dep.channels)[None, :]
    return _activation(layer, _separable(dep, P, Cm, out_shape), ctx)


@_last_layout
def _separable_conv(layer, dep, out_shape, ctx):
    P = _spatial_channel_map("conv", layer, dep, out_shape)
    Cm = np.ones((out_shape[-1], dep.channels), dtype=bool)
    return _activation(layer, _separable(dep, P, Cm, out_shape), ctx)


@_last_layout
def _conv_transpose(layer, dep, out_shape, ctx):
    rank = len(dep.shape) - 1
    output_padding = layer.output_padding
    factors = []
    for a in range(rank):
        pad = None if output_padding is None else _tuple(output_padding, rank)[a]
        k, s, d = layer.kernel_size[a], layer.strides[a], layer.dilation_rate[a]

        def fn(onehot, k=k, s=s, d=d, pad=pad):
            kernel = keras.ops.ones((k, 1, 1), dtype="float32")
            return keras.ops.conv_transpose(
                onehot, kernel, strides=s, padding=layer.padding, output_padding=pad,
                data_format="channels_last", dilation_rate=d,
            )  # fmt: skip

        factors.append(_probe_1d(dep.shape[a], out_shape[a], fn))
    Cm = np.ones((out_shape[-1], dep.channels), dtype=bool)
    return _activation(layer, _separable(dep, _kron_all(factors), Cm, out_shape), ctx)


@_last_layout
def _pooling(layer, dep, out_shape, ctx):
    return _separable(dep, _spatial_channel_map("pool", layer, dep, out_shape), None, out_shape)


@_last_layout
def _global_pooling(layer, dep, out_shape, ctx):
    P = sp.csr_array(np.ones((1, dep.spatial), dtype=bool))
    return _separable(dep, P, None, out_shape)


def _up_sampling(layer, dep, out_shape, ctx):
    if type(layer).__name__ == "UpSampling1D":  # channels-last only, no data_format
        return _separable(dep, _repeat(dep.shape[0], out_shape[0], layer.size), None, out_shape)
    return _up_sampling_nd(layer, dep, out_shape, ctx)


@_last_layout
def _up_sampling_nd(layer, dep, out_shape, ctx):
    rank = len(dep.shape) - 1
    size = _tuple(layer.size, rank)
    interpolation = getattr(layer, "interpolation", "nearest")
    factors = []
    for a in range(rank):
        n_in, n_out = dep.shape[a], out_shape[a]
        if interpolation == "nearest":
            factors.append(_repeat(n_in, n_out, size[a]))
        else:

            def fn(onehot, n_out=n_out):
                images = keras.ops.expand_dims(onehot, 2)  # (n, n_in, 1, 1)
                return keras.ops.image.resize(
                    images, (n_out, 1), interpolation=interpolation, data_format="channels_last"
                )

            factors.append(_probe_1d(n_in, n_out, fn))
    return _separable(dep, _kron_all(factors), None, out_shape)


def _pad_amounts(layer, attribute: str, rank: int):
    value = getattr(layer, attribute)
    if rank == 1:
        value = (tuple(value),)
    return [tuple(pair) for pair in value]


@_last_layout
def _zero_padding(layer, dep, out_shape, ctx):
    pads = _pad_amounts(layer, "padding", len(dep.shape) - 1)
    P = _kron_all(_shift(dep.shape[a], out_shape[a], pads[a][0]) for a in range(len(pads)))
    return _separable(dep, P, None, out_shape)


@_last_layout
def _cropping(layer, dep, out_shape, ctx):
    crops = _pad_amounts(layer, "cropping", len(dep.shape) - 1)
    P = _kron_all(_shift(dep.shape[a], out_shape[a], -crops[a][0]) for a in range(len(crops)))
    return _separable(dep, P, None, out_shape)


def _axes(layer, axis, rank: int) -> list[int]:
    """Per-sample axes (the batch axis dropped) of a layer's `axis` (an int or a list)."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    out = []
    for a in axes:
        a = a % (rank + 1)
        if a == 0:
            raise ValueError("normalises over the batch axis")
        out.append(a - 1)
    return sorted(set(out))


def _mix_axes(dep: _Dep, axes, out_shape) -> _Dep:
    """Every output element reads the inputs that agree with it on all axes outside `axes`."""
    rank = len(dep.shape)
    spatial = [a for a in range(rank - 1)]
    P = _kron_all(
        sp.csr_array(np.ones((dep.shape[a], dep.shape[a]), dtype=bool))
        if a in axes
        else _identity(dep.shape[a])
        for a in spatial
    )
    Cm = np.ones((dep.channels, dep.channels), dtype=bool) if (rank - 1) in axes else None
    if not any(a in axes for a in spatial):
        P = None
    return _separable(dep, P, Cm, out_shape)


def _layer_normalization(layer, dep, out_shape, ctx):
    return _mix_axes(dep, _axes(layer, layer.axis, len(dep.shape)), out_shape)


def _softmax(layer, dep, out_shape, ctx):
    return _mix_axes(dep, _axes(layer, layer.axis, len(dep.shape)), out_shape)


def _batch_normalization(layer, dep, out_shape, ctx, training=None):
    if not (ctx.training if training is None else training):
        return dep  # inference: a fixed affine map per channel
    # training: batch statistics over every axis but `axis` (one sample: over its other axes)
    kept = _axes(layer, layer.axis, len(dep.shape))
    return _mix_axes(dep, [a for a in range(len(dep.shape)) if a not in kept], out_shape)


def _group_normalization(layer, dep, out_shape, ctx):
    (axis,) = _axes(layer, layer.axis, len(dep.shape))
    if axis != len(dep.shape) - 1:
        return _mix_axes(dep, list(range(len(dep.shape))), out_shape)
    c = dep.channels
    size = c // layer.groups
    Cm = (np.arange(c)[:, None] // size) == (np.arange(c)[None, :] // size)
    P = sp.csr_array(np.ones((dep.spatial, dep.spatial), dtype=bool))
    return _separable(dep, P, Cm, out_shape)


def _dense(layer, dep, out_shape, ctx):
    Cm = np.ones((out_shape[-1], dep.channels), dtype=bool)
    return _activation(layer, _separable(dep, None, Cm, out_shape), ctx)


def _flatten(layer, dep, out_shape, ctx):
    if _channels_first(layer) and len(dep.shape) > 1:
        rank = len(dep.shape)
        dep = _transpose(dep, (*range(1, rank), 0))
    return _reshape(dep, out_shape)


def _reshape_layer(layer, dep, out_shape, ctx):
    return _reshape(dep, out_shape)


def _permute(layer, dep, out_shape, ctx):
    return _transpose(dep, [d - 1 for d in layer.dims])


def _repeat_vector(layer, dep, out_shape, ctx):
    index = np.broadcast_to(np.arange(dep.channels)[None, :], out_shape)
    return _gather(dep, index, out_shape)


_SINGLE = {
    "Activation": _activation_layer,
    "ReLU": _elementwise,
    "LeakyReLU": _elementwise,
    "PReLU": _elementwise,
    "ELU": _elementwise,
    "Dropout": _elementwise,
    "SpatialDropout1D": _elementwise,
    "SpatialDropout2D": _elementwise,
    "SpatialDropout3D": _elementwise,
    "GaussianDropout": _elementwise,
    "GaussianNoise": _elementwise,
    "AlphaDropout": _elementwise,
    "ActivityRegularization": _elementwise,
    "Identity": _elementwise,
    "Rescaling": _elementwise,
    "Softmax": _softmax,
    "LayerNormalization": _layer_normalization,
    "UnitNormalization": _layer_normalization,
    "BatchNormalization": _batch_normalization,
    "GroupNormalization": _group_normalization,
    "Dense": _dense,
    "Conv1D": _conv,
    "Conv2D": _conv,
    "Conv3D": _conv,
    "DepthwiseConv1D": _depthwise_conv,
    "DepthwiseConv2D": _depthwise_conv,
    "SeparableConv1D": _separable_conv,
    "SeparableConv2D": _separable_conv,
    "Conv1DTranspose": _conv_transpose,
    "Conv2DTranspose": _conv_transpose,
    "Conv3DTranspose": _conv_transpose,
    "MaxPooling1D": _pooling,
    "MaxPooling2D": _pooling,
    "MaxPooling3D": _pooling,
    "AveragePooling1D": _pooling,
    "AveragePooling2D": _pooling,
    "AveragePooling3D": _pooling,
    "GlobalMaxPooling1D": _global_pooling,
    "GlobalMaxPooling2D": _global_pooling,
    "GlobalMaxPooling3D": _global_pooling,
    "GlobalAveragePooling1D": _global_pooling,
    "GlobalAveragePooling2D": _global_pooling,
    "GlobalAveragePooling3D": _global_pooling,
    "UpSampling1D": _up_sampling,
    "UpSampling2D": _up_sampling,
    "UpSampling3D": _up_sampling,
    "ZeroPadding1D": _zero_padding,
    "ZeroPadding2D": _zero_padding,
    "ZeroPadding3D": _zero_padding,
    "Cropping1D": _cropping,
    "Cropping2D": _cropping,
    "Cropping3D": _cropping,
    "Flatten": _flatten,
    "Reshape": _reshape_layer,
    "Permute": _permute,
    "RepeatVector": _repeat_vector,
}
_MERGE = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
# elementwise `keras.ops` nodes of a Functional graph (`x + y`, `keras.ops.relu(x)`, `2.0 * x`)
_ELEMENTWISE_OPS = {
    "keras.src.ops.numpy": set(
        "Add Subtract Multiply Divide TrueDivide Maximum Minimum Power Negative Absolute Abs Exp "
        "Log Sqrt Square Tanh Sin Cos Log1p Expm1 Sign Clip".split()
    ),
    "keras.src.ops.nn": set(
        "Relu Relu6 Sigmoid Silu Gelu Softplus Softsign Elu Selu LeakyRelu HardSigmoid HardSilu "
        "LogSigmoid".split()
    ),
}


def _rule_for(operation):
    """The rule of a Keras layer class, matched exactly: a subclass may change `call`, so it gets
    the conservative rule."""
    cls = type(operation)
    name = cls.__name__
    if name in _SINGLE or name in _MERGE or name == "Concatenate":
        if getattr(keras.layers, name, None) is cls:
            return name
    return None
