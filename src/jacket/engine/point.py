"""Points: a model, or its cut between `wrt` and `of`, at a batch, ready for the engine's kernels.

`resolve` is what every engine function does first with `(model, x, wrt, of)`: without `wrt` or
`of` (and no integer input to hold constant) it is the model and its checked inputs, as before;
otherwise the model's cut (`jacket.engine.cut`) and the `wrt` values `x` produces, computed by one
compiled forward pass (the cut's prefix), with the constants beside them.

`at` returns the same as a `Point`, with the `of` values of that pass on request: the analyses
(`jacket.analysis`) read activations and outputs from it, move the `wrt` values (interpolation
steps, noise samples: `Point.with_values`) and pass the moved point back as `x` to `jacobian`,
`jvp` and `vjp`, which then skip the forward pass to `wrt`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ..errors import JacketValueError
from ..trees import is_leaf_structure, pack
from . import kernels
from .cut import Cut, cut_for
from .inputs import FLOAT_DTYPES, Inputs, Leaf, prepare_inputs, to_array
from .state import state_of

__all__ = ["Point", "at", "resolve"]


@dataclass(frozen=True)
class Point:
    """A model (or its cut between `wrt` and `of`) at a batch: what `jacket.engine.at` returns.

    Attributes:
      target: The model, or its cut (`jacket.engine.cut.Cut`).
      inputs: The differentiated values and the constants, as the engine's kernels take them.
      outputs: The `of` values at this point (backend tensors, in the structure of `of`), where
        they were computed (`at(..., outputs=True)`), else None.
    """

    target: Any
    inputs: Inputs
    outputs: Any = None

    @property
    def batch(self) -> int:
        return self.inputs.batch

    @property
    def wrt(self):
        """The values the Jacobian is taken at (the `wrt` activations), in `wrt`'s structure."""
        return self.inputs.pack(self.inputs.tensors)

    @property
    def leaves(self) -> list[Leaf]:
        """Per-sample shapes and dtypes of the `wrt` values."""
        return list(self.inputs.leaves)

    def with_values(self, values, repeat: int = 1) -> Point:
        """This point with other `wrt` values, `(repeat * batch, *shape)` each, the constants
        repeated `repeat` times (copy `r` of sample `b` is row `r * batch + b`)."""
        n = len(self.inputs.leaves)
        batch = self.batch * repeat
        flat = [values] if is_leaf_structure(self.inputs.structure) else keras.tree.flatten(values)
        if len(flat) != n:
            raise JacketValueError(
                f"with_values: `values` must have the structure of the point's `wrt` values ({n} "
                f"array(s)). Received: {len(flat)} array(s). Pass one array per `wrt` value."
            )
        tensors = []
        for value, leaf in zip(flat, self.inputs.leaves):
            array, _ = to_array("with_values", leaf.label, value)
            tensor = array if keras.ops.is_tensor(array) else keras.ops.convert_to_tensor(array)
            shape = tuple(int(d) for d in tensor.shape)
            if shape != (batch,) + leaf.shape:
                raise JacketValueError(
                    f"with_values: `{leaf.label}` must have shape {(batch,) + leaf.shape}. "
                    f"Received: shape {shape}. Pass `repeat * batch` samples of the `wrt` shape."
                )
            tensors.append(keras.ops.cast(tensor, leaf.dtype))
        constants = [kernels.tile(c, repeat) for c in self.inputs.tensors[n:]]
        inputs = dataclasses.replace(self.inputs, tensors=tensors + constants, batch=batch)
        return Point(self.target, inputs)

    def take(self, index, values) -> Point:
        """A point of `len(index)` samples: row `r` has the `wrt` values `values[r]` (one
        array per `wrt` value, or the array of the one) and the constants of sample
        `index[r]` of this point."""
        n = len(self.inputs.leaves)
        flat = [values] if n == 1 and not isinstance(values, (list, tuple, dict)) else values
        flat = flat if isinstance(flat, list) else keras.tree.flatten(flat)
        rows = keras.ops.convert_to_tensor(np.asarray(index, dtype="int32"))
        tensors = [keras.ops.cast(v, leaf.dtype) for v, leaf in zip(flat, self.inputs.leaves)]
        constants = [keras.ops.take(c, rows, axis=0) for c in self.inputs.tensors[n:]]
        inputs = dataclasses.replace(
            self.inputs, tensors=tensors + constants, batch=int(np.asarray(index).shape[0])
        )
        return Point(self.target, inputs)

    def __getitem__(self, index: slice) -> Point:
        """The samples `index` (a slice) of this point."""
        if not isinstance(index, slice):
            raise TypeError("a Point is sliced with a slice of samples, e.g. point[0:8]")
        tensors = [t[index] for t in self.inputs.tensors]
        batch = int(tensors[0].shape[0])
        if batch == 0:
            raise JacketValueError(f"Point[{index}]: no sample selected. Received: {index}.")
        inputs = dataclasses.replace(self.inputs, tensors=tensors, batch=batch)
        return Point(self.target, inputs)

    def output_shapes(self, training: bool = False) -> list[tuple]:
        """Per-sample shapes of the outputs (of `of`), from the engine's description (symbolic
        where Keras can tell them, else one forward pass)."""
        entry = state_of(self.target, training).entry("output_shapes", self.inputs)
        return [leaf.shape for leaf in entry.out_leaves]

    def output_dtypes(self, training: bool = False) -> list[str]:
        entry = state_of(self.target, training).entry("output_dtypes", self.inputs)
        return [leaf.dtype for leaf in entry.out_leaves]

    def rows_per_pass(self, memory_budget: int, training: bool = False) -> int:
        """How many samples one forward and backward pass may take within `memory_budget`
        bytes (NOTE: [Memory]: the activations kept for the backward pass, their cotangents,
        the inputs and outputs), at least 1."""
        state = state_of(self.target, training)
        entry = state.entry("rows_per_pass", self.inputs)
        in_size = sum(leaf.size for leaf in self.inputs.leaves)
        activations = entry.activation_size or 4 * (in_size + entry.out_size)
        itemsize = max(np.dtype(leaf.dtype).itemsize for leaf in self.inputs.leaves)
        per_row = itemsize * (2 * activations + 2 * in_size + entry.out_size)
        return max(1, int(memory_budget // max(per_row, 1)))


def resolve(
    fn_name: str, model, x, wrt, of, training: bool, *, check_finite: bool = False
) -> tuple[Any, Inputs]:
    """`(target, inputs)` for the engine: the model and its checked inputs, or the model's cut
    between `wrt` and `of` and its inputs at `x` (see the module docstring). `x` may be a
    `Point` of the same target."""
    if isinstance(x, Point):
        expected = cut_for(fn_name, model, wrt, of) if (wrt, of) != (None, None) else None
        if expected is not None and expected is not x.target:
            raise JacketValueError(
                f"{fn_name}: `x` is a point of {x.target!r}, not of the cut `wrt` and `of` name. "
                f"Received: wrt={wrt!r}, of={of!r}. Pass the point's own `wrt` and `of` (or "
                "none)."
            )
        owner = x.target.model if isinstance(x.target, Cut) else x.target
        if owner is not model and x.target is not model:
            raise JacketValueError(
                f"{fn_name}: `x` is a point of another model. Received: a point of "
                f"{type(owner).__name__}. Pass the model the point was made with."
            )
        return x.target, x.inputs
    cut = cut_for(fn_name, model, wrt, of)
    if cut is None:
        return model, prepare_inputs(fn_name, model, x, check_finite=check_finite)
    inputs, _ = _cut_inputs(fn_name, cut, x, training, with_outputs=False)
    return cut, inputs


def at(model, x, *, wrt=None, of=None, training: bool = False, outputs: bool = True) -> Point:
    """The model (or its cut between `wrt` and `of`) at `x`: the `wrt` values and, with
    `outputs`, the `of` values, from one forward pass.

    Args:
      model: As in `jacket.jacobian`.
      x: Input `(batch, *in_shape)` (or a structure of them).
      wrt, of: As in `jacket.jacobian`.
      training: Call the model in training mode.
      outputs: Also compute the `of` values (`Point.outputs`).

    Returns:
      A `Point`: `point.wrt` the values Jacobians are taken at, `point.outputs` the outputs,
      and a value `jacket.jacobian`, `jvp` and `vjp` take as `x`.
    """
    fn_name = "at"
    if isinstance(x, Point):
        target, inputs = resolve(fn_name, model, x, wrt, of, training)
        if outputs and x.outputs is None:
            return Point(target, inputs, _outputs_of(fn_name, target, inputs, training))
        return x
    cut = cut_for(fn_name, model, wrt, of)
    if cut is None:
        inputs = prepare_inputs(fn_name, model, x, check_finite=True)
        values = _outputs_of(fn_name, model, inputs, training) if outputs else None
        return Point(model, inputs, values)
    inputs, values = _cut_inputs(fn_name, cut, x, training, with_outputs=outputs)
    return Point(cut, inputs, values)


def _outputs_of(fn_name: str, target, inputs: Inputs, training: bool):
    """The target's outputs at `inputs` (one compiled forward pass), in its output structure."""
    state = state_of(target, training)
    entry = state.entry(fn_name, inputs)
    return pack(entry.y_structure, list(state.outputs(inputs)(inputs.tensors)))


def _cut_inputs(fn_name: str, cut: Cut, x, training: bool, with_outputs: bool):
    """The cut's `Inputs` at the model inputs `x` (and the `of` values, with `with_outputs`)."""
    model_inputs = prepare_inputs(fn_name, cut.model, x, check_finite=True, integers=True)
    if len(model_inputs.declared) != len(model_inputs.tensors):  # pragma: no cover
        raise AssertionError("a graph model declares its inputs")
    by_id = {id(spec): t for spec, t in zip(model_inputs.declared, model_inputs.tensors)}
    n_diff, n_extra = len(cut.diff), len(cut.extras)
    if cut.wrt_inputs_only and not with_outputs:
        values = [by_id[id(tensor)] for _, tensor in cut.diff]
        outs = None
    else:
        prefix = cut.prefix(with_outputs)
        state = state_of(prefix, training)
        args = [by_id[id(t)] for t in prefix.inputs]
        kernel = state.kernel(
            ("forward", model_inputs.signature, with_outputs),
            lambda: kernels.forward_kernel([], 0),
        )
        flat = list(kernel(args))
        values = flat[: n_diff + n_extra]
        outs = pack(cut.out_structure, flat[n_diff + n_extra :]) if with_outputs else None
    batch = model_inputs.batch
    leaves, constants = [], []
    for label, value in zip(cut.labels, values[:n_diff]):
        dtype = keras.backend.standardize_dtype(value.dtype)
        if dtype not in FLOAT_DTYPES:  # pragma: no cover - refused when the cut was made
            raise AssertionError(f"{label} is {dtype}")
        leaves.append(Leaf(label, tuple(int(d) for d in value.shape[1:]), dtype))
        _check_batch(fn_name, label, value, batch)
    extras = values[n_diff:]
    for (_, tensor), value in zip(cut.extras, extras):
        constants.append(_leaf(tensor.name, value))
    fixed = [by_id[id(t)] for t in cut.inputs]
    for tensor, value in zip(cut.inputs, fixed):
        constants.append(_leaf(tensor.name, value))
    inputs = Inputs(
        structure=cut.in_structure,
        tensors=list(values[:n_diff]) + list(extras) + fixed,
        leaves=leaves,
        batch=batch,
        constants=tuple(constants),
    )
    return inputs, outs


def _leaf(label: str, value) -> Leaf:
    return Leaf(
        label, tuple(int(d) for d in value.shape[1:]), keras.backend.standardize_dtype(value.dtype)
    )


def _check_batch(fn_name: str, label: str, value, batch: int) -> None:
    shape = tuple(int(d) for d in value.shape)
    if not shape or shape[0] != batch or math.prod(shape[1:]) == 0:
        raise JacketValueError(
            f"{fn_name}: the values of `wrt` {label!r} must have the batch axis of `x` ({batch}) "
            f"and at least one value per sample. Received: shape {shape}. Name a layer whose "
            "output is per sample."
        )
