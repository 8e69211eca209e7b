"""The model as a function of flat float inputs, and the one-hot, flattening and projection
helpers that `_derivatives` builds its quantities on (NOTE: [Derivatives inside a training step]
in `jacket.training._derivatives`)."""

from __future__ import annotations

import math

import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope

from ..backends import current
from ..checks import check_flag, check_model, positive_int
from ..errors import JacketTypeError, JacketValueError
from ..trees import is_leaf_structure, pack, skeleton

ops = keras.ops


def check_projections(fn_name: str, n_projections) -> int | str:
    if n_projections == "exact":
        return "exact"
    if isinstance(n_projections, str):
        raise JacketValueError(
            f"{fn_name}: `n_projections` must be a positive integer or 'exact'. "
            f"Received: n_projections={n_projections!r}."
        )
    return positive_int(fn_name, "n_projections", n_projections)


def model_call(model, training: bool):
    """A Keras model or layer as `x -> y`, called statelessly on its current weights (those of
    the enclosing `StatelessScope`, if any), so that nothing of it changes; a callable as is."""
    if not isinstance(model, keras.Layer):
        return model

    def call(x):
        # Inside another scope (JAX's step) every variable is read from it; outside, only the
        # variables a call may change need a value (what is written goes to the scope either
        # way), the rest are read from the model (measured on PyTorch: 0.5 ms less per call of
        # a 4-layer MLP when only its non-trainable variables are mapped).
        nested = in_stateless_scope()
        variables = model.variables if nested else model.non_trainable_variables
        with keras.StatelessScope(state_mapping=[(v, v.value) for v in variables]):
            return model(x, training=training)

    return call


class _Function:
    """The model as a function of a flat list of input leaves to a flat list of output leaves
    (what the backend primitives take), with the checked inputs and the per-sample shapes."""

    def __init__(self, fn_name: str, model, x, training: bool, *, single: bool = False):
        check_model(fn_name, model)
        check_flag(fn_name, "training", training)
        self.fn_name = fn_name
        self.call = model_call(model, training)
        self.in_structure = skeleton(x)
        flat = [x] if is_leaf_structure(x) else keras.tree.flatten(x)
        self.xs = [_float_input(fn_name, leaf) for leaf in flat]
        self.in_shapes = [tuple(int(d) for d in t.shape[1:]) for t in self.xs]
        self.out_structure = None
        self.out_shapes: list[tuple] | None = None
        self.single = single
        if single and len(self.xs) != 1:
            raise JacketValueError(
                f"{fn_name}: the model must have one input here. Received: {len(self.xs)} input "
                "arrays. Wrap it to take one (e.g. the inputs concatenated) or use "
                "`jacket.training.vjp` / `jvp`, which take any structure."
            )

    def __call__(self, flat_xs):
        ys = self.call(pack(self.in_structure, list(flat_xs)))
        flat = [ys] if is_leaf_structure(ys) else list(keras.tree.flatten(ys))
        if self.out_shapes is None:  # the first call (the inputs are then never mapped over)
            if self.single and len(flat) != 1:
                raise JacketValueError(
                    f"{self.fn_name}: the model must have one output here. Received: "
                    f"{len(flat)} output arrays. Wrap it to return one, or use "
                    "`jacket.training.vjp` / `jvp`, which take any structure."
                )
            self.out_structure = skeleton(ys)
            self.out_shapes = [tuple(int(d) for d in y.shape[1:]) for y in flat]
        return flat


def _float_input(fn_name: str, leaf):
    tensor = leaf if ops.is_tensor(leaf) else ops.convert_to_tensor(leaf)
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise JacketTypeError(
            f"{fn_name}: the model's inputs must be floating point to be differentiated. "
            f"Received: x.dtype={dtype}. Cast them (`keras.ops.cast(x, 'float32')`), or keep "
            "integer inputs (token ids) out of the derivative."
        )
    if len(tensor.shape) < 1:
        raise JacketValueError(
            f"{fn_name}: `x` must have a leading batch axis, shape `(batch, *in_shape)`. "
            f"Received: x.shape={tuple(tensor.shape)}. For one sample, pass `x[None]`."
        )
    return tensor


def _like_inputs(fn_name: str, name: str, value, fn: _Function) -> list:
    flat = [value] if is_leaf_structure(value) else keras.tree.flatten(value)
    return _matching(fn_name, name, flat, fn.xs, "`x`")


def _like_outputs(fn_name: str, name: str, value, fn: _Function, ys) -> list:
    flat = [value] if is_leaf_structure(value) else keras.tree.flatten(value)
    return _matching(fn_name, name, flat, ys, "the model's output")


def _matching(fn_name: str, name: str, flat: list, like: list, what: str) -> list:
    if len(flat) != len(like):
        raise JacketValueError(
            f"{fn_name}: `{name}` must have the structure of {what} ({len(like)} array(s)). "
            f"Received: {len(flat)} array(s). Pass one array per leaf, in that structure."
        )
    out = []
    for value, ref in zip(flat, like):
        tensor = value if ops.is_tensor(value) else ops.convert_to_tensor(value)
        if tuple(tensor.shape[1:]) != tuple(ref.shape[1:]):
            raise JacketValueError(
                f"{fn_name}: `{name}` must have the shape of {what}, "
                f"{('batch',) + tuple(int(d) for d in ref.shape[1:])}. Received: "
                f"{name}.shape={tuple(tensor.shape)}. Pass an array of that shape."
            )
        out.append(ops.cast(tensor, _dtype(ref)))
    return out


def _size(shape: tuple) -> int:
    return math.prod(shape)


def _dtype(t) -> str:
    return keras.backend.standardize_dtype(t.dtype)


def _one_hot_seeds(leaves: list, total: int) -> list:
    """One seed per coordinate of the leaves taken together: a list with, per leaf, `(total,
    batch, *shape)`, seed `r` one at coordinate `r` of every sample (the batch-sum trick)."""
    if total == 1 and len(leaves) == 1:  # one coordinate (a scalar output): ones, in one op
        return [ops.ones_like(leaves[0])[None]]
    out, offset = [], 0
    for leaf in leaves:
        shape = tuple(int(d) for d in leaf.shape[1:])
        size = _size(shape)
        eye = ops.eye(total, dtype=_dtype(leaf))[:, None, offset : offset + size]
        block = ops.zeros_like(ops.reshape(leaf, (-1, size)))[None] + eye  # (total, batch, size)
        out.append(ops.reshape(block, (total, -1) + shape))
        offset += size
    return out


def _one_hot_leaf(x, axis: int):
    """`(batch, *in_shape)`: one at flat coordinate `axis` of every sample."""
    shape = tuple(int(d) for d in x.shape[1:])
    n = _size(shape)
    row = ops.eye(n, dtype=_dtype(x))[axis]
    return ops.reshape(ops.zeros_like(ops.reshape(x, (-1, n))) + row[None], (-1,) + shape)


def _flat(leaves: list, leading: int):
    """Leaves `(leading, batch, *shape)` -> `(leading, batch, total size)`."""
    parts = [ops.reshape(t, (leading, -1, _size(tuple(t.shape[2:])))) for t in leaves]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def _flat_jacobian(f, xs, *, reverse: bool | None = None):
    """`(ys, J)`: `J` the per-sample Jacobian of `f` (flat list -> flat list), `(batch, m, n)`
    over all output and input leaves; reverse mode (`m` pullbacks) unless `reverse` is False or
    (None) forward mode is native and `n < m` (`n` JVPs). `ys` is None in forward mode."""
    backend = current()
    n = sum(_size(tuple(x.shape[1:])) for x in xs)
    ys = None
    if reverse is None:
        reverse = True
        if backend.TRAIN_FORWARD:  # the outputs' size, from a call that the compiler drops
            m = sum(_size(tuple(y.shape[1:])) for y in f(xs))
            reverse = n >= m
    if reverse:
        ys, pullback = backend.train_linearize(f, xs)
        m = sum(_size(tuple(y.shape[1:])) for y in ys)
        rows = backend.train_map(pullback, _one_hot_seeds(ys, m))  # per input (m, batch, ...)
        return ys, ops.transpose(_flat(rows, m), (1, 0, 2))
    columns = backend.train_map(lambda ts: backend.train_jvp(f, xs, ts)[1], _one_hot_seeds(xs, n))
    return ys, ops.transpose(_flat(columns, n), (1, 2, 0))


def _squared_frobenius(fn, n_projections, seed):
    if n_projections == "exact":
        _, J = _flat_jacobian(fn, fn.xs)
        return ops.sum(ops.square(J), axis=(1, 2))
    backend = current()
    ys, pullback = backend.train_linearize(fn, fn.xs)
    m = sum(_size(tuple(y.shape[1:])) for y in ys)
    k = n_projections
    flat_y = ops.concatenate([ops.reshape(y, (-1, _size(tuple(y.shape[1:])))) for y in ys], -1)
    g = keras.random.normal((k,) + tuple(ops.shape(flat_y)), dtype=_dtype(flat_y), seed=seed)
    v = g / ops.sqrt(ops.sum(ops.square(g), axis=-1, keepdims=True))  # (k, batch, m), unit rows
    cts, offset = [], 0
    for y in ys:
        shape = tuple(int(d) for d in y.shape[1:])
        cts.append(ops.reshape(v[..., offset : offset + _size(shape)], (k, -1) + shape))
        offset += _size(shape)
    grads = backend.train_map(pullback, cts)  # per input leaf (k, batch, *in_shape)
    sq = ops.sum(ops.square(_flat(grads, k)), axis=-1)  # (k, batch)
    return m * ops.mean(sq, axis=0)


def _along(g, x, axis: int):
    """`xs -> [d g(xs) / d x_axis]` for `g` of one input and one output: a JVP along the
    coordinate where forward mode is native (and nests), else that column of the reverse-mode
    Jacobian (`m` pullbacks); itself differentiable, so these nest into mixed partials."""
    backend = current()
    e = _one_hot_leaf(x, axis)

    def derivative(xs):
        if backend.TRAIN_FORWARD:
            _, tangents = backend.train_jvp(g, xs, [e])
            return tangents
        ys, J = _flat_jacobian(g, xs, reverse=True)  # (batch, m, n)
        return [ops.reshape(J[:, :, axis], (-1,) + tuple(int(d) for d in ys[0].shape[1:]))]

    return derivative
