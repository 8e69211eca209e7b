"""Sparsity detection: which outputs of one sample can depend on which of its inputs.

NOTE: [How the pattern is propagated]
Every tensor of the model gets a `_Dep`: for each of its elements, the set of model inputs (flat, per
sample) it may depend on, as rows of a boolean sparse matrix. The model's inputs start as the
identity; each layer maps the `_Dep`s of its inputs to those of its outputs by a rule that reads the
layer's configuration only (never its weights: a pattern stays right when the weights change), and
the model's outputs' rows are the pattern.

Image models repeat one dependency set across all channels of a pixel (a convolution mixes all input
channels), so a `_Dep` stores one row per (pixel, channel *group*): `groups[c]` says which row of the
pixel channel `c` uses. Channels-last layouts are treated natively; channels-first ones are moved to
channels-last and back.

Most layers act separately on the pixel grid and on the channels: output pixel `p` reads input
pixels `P[p, :]` (a Kronecker product of one window per spatial axis) and output channel `c` reads
input channels `Cm[c, :]`. Convolutions, pooling, up-sampling, padding, cropping, the
normalisations and Dense (on the last axis) are all of this form (`_separable`). Merges (the
merging layers and elementwise `keras.ops` nodes such as `x + y`, with broadcasting),
concatenations and reshapes have rules of their own. A layer without a rule, or whose rule fails,
gets the conservative one: each of its outputs depends on every input of that layer (all rows
united), which can only over-estimate; `SparsityWarning` names it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import keras
import numpy as np
import scipy.sparse as sp

from ..engine.cut import Cut
from ._errors import SparsityWarning

# ------------------------------------------------------------------------------------ dependency sets


@dataclass
class _Dep:
    """The dependency rows of one tensor (per sample): element `(s, c)` (`s` the flat index over
    all axes but the last, `c` the last axis) depends on the columns of row `s * G + groups[c]`."""

    shape: tuple[int, ...]
    matrix: sp.csr_array  # bool, (S * G, n_in)
    groups: np.ndarray  # int, (C,): channel -> row group

    @property
    def spatial(self) -> int:
        return math.prod(self.shape[:-1]) if self.shape else 1

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_groups(self) -> int:
        return self.matrix.shape[0] // max(self.spatial, 1)

    @property
    def n_in(self) -> int:
        return self.matrix.shape[1]


def _csr(matrix) -> sp.csr_array:
    out = sp.csr_array(matrix, dtype=bool)
    out.sum_duplicates()
    return out


def _rows_to_csr(rows, cols, shape) -> sp.csr_array:
    data = np.ones(len(rows), dtype=bool)
    return _csr(sp.coo_array((data, (np.asarray(rows), np.asarray(cols))), shape=shape))


def _identity(n: int) -> sp.csr_array:
    return sp.eye_array(n, dtype=bool, format="csr")


def _per_element(shape, matrix) -> _Dep:
    channels = shape[-1] if shape else 1
    return _Dep(tuple(shape), _csr(matrix), np.arange(channels))


def _expand(dep: _Dep) -> sp.csr_array:
    """One row per element, `(size, n_in)`, in row-major order of `dep.shape`."""
    G = dep.n_groups
    if G == dep.channels and np.array_equal(dep.groups, np.arange(G)):
        return dep.matrix
    rows = (np.arange(dep.spatial)[:, None] * G + dep.groups[None, :]).ravel()
    return dep.matrix[rows]


def _union(dep: _Dep) -> sp.csr_array:
    """`(1, n_in)`: every column any element depends on."""
    ones = sp.csr_array(np.ones((1, dep.matrix.shape[0]), dtype=bool))
    return _csr(ones @ dep.matrix)


def _broadcast_rows(row: sp.csr_array, shape) -> _Dep:
    """Every element of a tensor of `shape` depends on the columns of `row` (one shared group)."""
    spatial = math.prod(shape[:-1]) if shape else 1
    channels = shape[-1] if shape else 1
    matrix = _csr(sp.kron(sp.csr_array(np.ones((spatial, 1), dtype=bool)), row))
    return _Dep(tuple(shape), matrix, np.zeros(channels, dtype=np.int64))


def _separable(dep: _Dep, P, Cm, out_shape) -> _Dep:
    """A layer whose output pixel `p` reads input pixels `P[p]` and output channel `c` reads input
    channels `Cm[c]` (P: `(S_out, S_in)` sparse or None for the identity; Cm: `(C_out, C_in)` bool
    or None for the identity)."""
    G = dep.n_groups
    if Cm is None:
        groups, Gm = dep.groups, _identity(G)
    else:
        onehot = np.zeros((dep.channels, G), dtype=bool)
        onehot[np.arange(dep.channels), dep.groups] = True
        by_group = (np.asarray(Cm, dtype=np.int64) @ onehot) > 0  # (C_out, G)
        unique, groups = np.unique(by_group, axis=0, return_inverse=True)
        Gm = _csr(unique)
        groups = groups.ravel()
    if P is None:
        if dep.spatial != (math.prod(out_shape[:-1]) if out_shape else 1):
            raise ValueError("the pixel grid changed without a pixel map")
        P = _identity(dep.spatial)
    operator = _csr(sp.kron(_csr(P), Gm))
    return _Dep(tuple(out_shape), _csr(operator @ dep.matrix), np.asarray(groups))


def _gather(dep: _Dep, index: np.ndarray, out_shape) -> _Dep:
    """Output element `k` is input element `index[k]` (or depends on nothing where `index < 0`)."""
    index = np.asarray(index).ravel()
    keep = np.flatnonzero(index >= 0)
    size = math.prod(dep.shape)
    select = _rows_to_csr(keep, index[keep], (len(index), size))
    return _per_element(out_shape, select @ _expand(dep))


def _merge(deps: list[_Dep], out_shape) -> _Dep:
    """Elementwise n-ary op (Add, Multiply, ...): each output element unites its inputs' rows."""
    if all(d.shape == tuple(out_shape) for d in deps):
        pairs = np.stack([d.groups for d in deps], axis=1)  # (C, n)
        unique, groups = np.unique(pairs, axis=0, return_inverse=True)
        S = math.prod(out_shape[:-1]) if out_shape else 1
        total = None
        for k, d in enumerate(deps):
            rows = (np.arange(S)[:, None] * d.n_groups + unique[None, :, k]).ravel()
            part = d.matrix[rows]
            total = part if total is None else total + part
        return _Dep(tuple(out_shape), _csr(total), np.asarray(groups).ravel())
    total = None
    for d in deps:  # broadcasting: each input's element index, broadcast to the output's shape
        shape = (1,) * (len(out_shape) - len(d.shape)) + tuple(d.shape)
        index = np.broadcast_to(np.arange(math.prod(d.shape)).reshape(shape), out_shape)
        part = _expand(_gather(d, index, out_shape))
        total = part if total is None else total + part
    return _per_element(out_shape, total)


def _concatenate(deps: list[_Dep], axis: int, out_shape) -> _Dep:
    rank = len(out_shape)
    if axis == rank - 1:
        S = math.prod(out_shape[:-1])
        blocks, offset, groups = [], 0, []
        for d in deps:
            G = d.n_groups
            blocks.append(np.arange(S)[:, None] * G + np.arange(G)[None, :] + offset)
            groups.append(d.groups + sum(g.n_groups for g in deps[: len(groups)]))
            offset += d.matrix.shape[0]
        rows = np.concatenate(blocks, axis=1).ravel()
        stacked = sp.vstack([d.matrix for d in deps], format="csr")
        return _Dep(tuple(out_shape), _csr(stacked[rows]), np.concatenate(groups))
    ids, offset = [], 0
    for d in deps:
        size = math.prod(d.shape)
        ids.append(np.arange(offset, offset + size).reshape(d.shape))
        offset += size
    index = np.concatenate(ids, axis=axis).ravel()
    stacked = sp.vstack([_expand(d) for d in deps], format="csr")
    return _per_element(out_shape, stacked[index])


def _reshape(dep: _Dep, out_shape) -> _Dep:
    out_shape = tuple(out_shape)
    if out_shape and dep.shape and out_shape[-1] == dep.channels:
        return _Dep(out_shape, dep.matrix, dep.groups)  # the last axis kept: the same rows
    return _per_element(out_shape, _expand(dep))


def _transpose(dep: _Dep, perm) -> _Dep:
    ids = np.arange(math.prod(dep.shape)).reshape(dep.shape)
    moved = np.transpose(ids, perm)
    return _gather(dep, moved.ravel(), moved.shape)


def _mix_all(deps: list[_Dep], out_shapes) -> list[_Dep]:
    """The conservative rule: every output element depends on every input of the layer."""
    row = None
    for d in deps:
        u = _union(d)
        row = u if row is None else _csr(row + u)
    return [_broadcast_rows(row, shape) for shape in out_shapes]


# ---------------------------------------------------------------------------------- 1-D windows


def _window(n_in: int, n_out: int, k: int, stride: int, dilation: int, padding: str):
    """`(n_out, n_in)`: output position `o` reads `o * stride - before + j * dilation`, `j < k`
    (Keras's padding: "same" pads `total // 2` before, as TensorFlow, JAX and Keras's PyTorch
    backend all do)."""
    span = (k - 1) * dilation + 1
    if padding == "valid":
        before, expected = 0, max((n_in - span) // stride + 1, 0)
    elif padding == "same":
        expected = -(-n_in // stride)
        before = max((expected - 1) * stride + span - n_in, 0) // 2
    elif padding == "causal":
        before, expected = span - 1, (n_in - 1) // stride + 1
    else:
        raise ValueError(f"unknown padding {padding!r}")
    if expected != n_out:
        raise ValueError(f"window output {expected} != layer output {n_out}")
    o = np.arange(n_out)[:, None]
    i = o * stride - before + np.arange(k)[None, :] * dilation
    o = np.broadcast_to(o, i.shape)
    inside = (i >= 0) & (i < n_in)
    return _rows_to_csr(o[inside], i[inside], (n_out, n_in))


def _shift(n_in: int, n_out: int, before: int):
    """`(n_out, n_in)`: output `o` is input `o - before` (padding: before > 0; cropping: < 0)."""
    o = np.arange(n_out)
    i = o - before
    inside = (i >= 0) & (i < n_in)
    return _rows_to_csr(o[inside], i[inside], (n_out, n_in))


def _repeat(n_in: int, n_out: int, size: int):
    o = np.arange(n_out)
    return _rows_to_csr(o, o // size, (n_out, n_in))


def _probe_1d(n_in: int, n_out: int, fn):
    """`(n_out, n_in)` from running a 1-D op on the one-hot batch `(n_in, n_in, 1)`: exact for ops
    whose weights are all nonzero where they act (all-ones kernels, interpolation weights)."""
    onehot = keras.ops.convert_to_tensor(np.eye(n_in, dtype="float32")[:, :, None])
    out = np.asarray(keras.ops.convert_to_numpy(fn(onehot)))
    out = out.reshape(n_in, -1)
    if out.shape[1] != n_out:
        raise ValueError(f"probe output {out.shape[1]} != layer output {n_out}")
    return _csr(out.T != 0)


def _kron_all(factors):
    out = None
    for factor in factors:
        out = factor if out is None else _csr(sp.kron(out, factor))
    return out if out is not None else _identity(1)


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


# ------------------------------------------------------------------------------------ the walk


def _symbolic(value):
    if isinstance(value, _Dep):
        return keras.KerasTensor((1,) + value.shape, dtype="float32")
    return value


def _output_shapes(operation, args, kwargs, node) -> list[tuple[int, ...]]:
    """Per-sample output shapes, from the graph when it is concrete and the inputs match it."""
    if node is not None:
        ins = [d for d in keras.tree.flatten((args, kwargs)) if isinstance(d, _Dep)]
        graph_in = [tuple(t.shape[1:]) for t in node.input_tensors]
        graph_out = [tuple(t.shape[1:]) for t in node.outputs]
        if [d.shape for d in ins] == graph_in and all(
            d is not None for shape in graph_out for d in shape
        ):
            return graph_out
    sym_args = keras.tree.map_structure(_symbolic, args)
    sym_kwargs = keras.tree.map_structure(_symbolic, kwargs)
    spec = operation.compute_output_spec(*sym_args, **sym_kwargs)
    return [tuple(int(d) for d in t.shape[1:]) for t in keras.tree.flatten(spec)]


def _apply(operation, args, kwargs, node, ctx: _Context) -> list[_Dep]:
    deps = [d for d in keras.tree.flatten((args, kwargs)) if isinstance(d, _Dep)]
    out_shapes = _output_shapes(operation, args, kwargs, node)
    for shape in out_shapes:
        ctx.activations += math.prod(shape)
    try:
        outs = _known(operation, deps, kwargs, out_shapes, ctx)
        reason = "no rule for this layer" if outs is None else "its rule gave other shapes"
        if outs is not None and [d.shape for d in outs] == out_shapes:
            return outs
    except Exception as error:  # noqa: BLE001 - any failure falls back to the safe rule
        reason = f"{type(error).__name__}: {error}"
    label = getattr(operation, "name", type(operation).__name__)
    ctx.notes.append(f"{label!r} ({type(operation).__name__}): {reason}")
    return _mix_all(deps, out_shapes)


def _known(operation, deps, kwargs, out_shapes, ctx) -> list[_Dep] | None:
    """The output `_Dep`s by the operation's rule, or None where it has none."""
    if _is_graph(operation):
        return _walk(operation, deps, ctx)
    if len(out_shapes) == 1 and deps:
        cls = type(operation)
        if cls.__name__ in _ELEMENTWISE_OPS.get(cls.__module__, ()):
            return [_merge(deps, out_shapes[0])]  # operands broadcast to the output
    name = _rule_for(operation)
    if name is None or not deps or len(out_shapes) != 1:
        return None
    (out_shape,) = out_shapes
    if name in _MERGE:
        return [_merge(deps, out_shape)]
    if name == "Concatenate":
        axis = operation.axis % (len(out_shape) + 1) - 1  # the batch axis dropped
        return [_concatenate(deps, axis, out_shape)]
    if len(deps) != 1:
        return None
    if name == "BatchNormalization":
        training = kwargs.get("training")
        return [_batch_normalization(operation, deps[0], out_shape, ctx, training=training)]
    return [_SINGLE[name](operation, deps[0], out_shape, ctx)]


def _is_graph(operation) -> bool:
    return isinstance(operation, keras.Sequential) or (
        isinstance(operation, keras.Model) and hasattr(operation, "_nodes_by_depth")
    )


def _walk(model, deps: list[_Dep], ctx: _Context) -> list[_Dep]:
    """The output `_Dep`s of a Sequential or Functional model given its inputs' `_Dep`s."""
    if isinstance(model, keras.Sequential):
        if len(deps) != 1:
            raise ValueError("a Sequential model takes one input")
        dep = deps[0]
        for layer in model.layers:
            (dep,) = _apply(layer, (dep,), {}, None, ctx)
        return [dep]
    tensors = {id(t): d for t, d in zip(model.inputs, deps)}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(t) not in tensors for t in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            outs = _apply(node.operation, args, kwargs, node, ctx)
            for t, d in zip(node.outputs, outs):
                tensors[id(t)] = d
    return [tensors[id(t)] for t in model.outputs]


@dataclass
class Detection:
    """A detected pattern and how it was found."""

    pattern: sp.csr_array  # bool, (out_size, in_size)
    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    notes: list[str]  # layers given the conservative rule, and why
    activation_size: int | None  # elements of all intermediate tensors of one sample


def detect(model, in_shapes, out_shapes, *, training: bool = False, constants=()) -> Detection:
    """Propagate the dependency sets of `model`'s inputs to its outputs (see the NOTE above).

    Args:
      in_shapes, out_shapes: per-sample shapes of the model's inputs and outputs, flat.
      constants: per-sample shapes of the constants of a cut between layers
        (`jacket.engine.cut`), which depend on no input.
    """
    n_in = sum(math.prod(s) for s in in_shapes)
    ctx = _Context(training)
    deps, offset = [], 0
    for shape in in_shapes:
        size = math.prod(shape)
        eye = sp.csr_array(
            (np.ones(size, bool), np.arange(offset, offset + size), np.arange(size + 1)),
            shape=(size, n_in),
        )
        deps.append(_per_element(shape, eye))
        offset += size
    outs = None
    if isinstance(model, Cut):  # its graph run with dependency sets for values
        try:
            fixed = [_per_element(shape, sp.csr_array((math.prod(shape), n_in), dtype=bool))
                     for shape in constants]  # fmt: skip
            n = len(model.extras)

            def apply(operation, args, kwargs, node):
                return _apply(operation, args, kwargs, node, ctx)

            outs = model.program(deps + fixed[:n], fixed[n:], training, call_fn=apply)
            if [d.shape for d in outs] != [tuple(s) for s in out_shapes]:
                ctx.notes.append("the cut: its outputs do not match the walked graph")
                outs = None
        except Exception as error:  # noqa: BLE001 - any failure falls back to the safe rule
            ctx.notes.append(f"the cut: {type(error).__name__}: {error}")
            outs = None
    elif _is_graph(model):
        try:
            outs = _walk(model, deps, ctx)
            if [d.shape for d in outs] != [tuple(s) for s in out_shapes]:
                ctx.notes.append("the model: its outputs do not match the walked graph")
                outs = None
        except Exception as error:  # noqa: BLE001 - any failure falls back to the safe rule
            ctx.notes.append(f"the model: {type(error).__name__}: {error}")
            outs = None
    elif isinstance(model, keras.Layer) and not isinstance(model, keras.Model):
        outs = _apply(model, tuple(deps) if len(deps) > 1 else (deps[0],), {}, None, ctx)
        if [d.shape for d in outs] != [tuple(s) for s in out_shapes]:
            outs = None
    else:
        ctx.notes.append(
            f"the model ({type(model).__name__}) has no layer graph to follow "
            "(a subclassed model or a plain function)"
        )
    if outs is None:
        outs = _mix_all(deps, out_shapes)
        activation_size = None
    else:
        activation_size = ctx.activations or None
    pattern = sp.vstack([_expand(d) for d in outs], format="csr") if outs else None
    pattern = _csr(pattern)
    pattern.sort_indices()
    if ctx.notes:
        warnings.warn(
            "sparsity: the conservative rule (each output depends on every input of the layer) "
            "was used for: " + "; ".join(ctx.notes) + ". The pattern is right but may be larger "
            "than the true one; `verify=True` checks it at random points.",
            SparsityWarning,
            stacklevel=3,
        )
    return Detection(
        pattern, [tuple(s) for s in in_shapes], [tuple(s) for s in out_shapes], ctx.notes,
        activation_size,
    )  # fmt: skip
