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
from dataclasses import dataclass

import keras
import numpy as np
import scipy.sparse as sp

from ._deps import (
    _concatenate,
    _csr,
    _Dep,
    _expand,
    _merge,
    _mix_all,
    _per_element,
)
from ._errors import SparsityWarning
from ._rules import (
    _ELEMENTWISE_OPS,
    _MERGE,
    _SINGLE,
    _batch_normalization,
    _Context,
    _rule_for,
)

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


def detect(model, in_shapes, out_shapes, *, training: bool = False) -> Detection:
    """Propagate the dependency sets of `model`'s inputs to its outputs (see the NOTE above).

    Args:
      in_shapes, out_shapes: per-sample shapes of the model's inputs and outputs, flat.
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
    if _is_graph(model):
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
