"""What jacket needs to know about a model and the inputs it is given.

Everything here is backend-agnostic (Keras and NumPy only): the input structure and the declared shapes
and dtypes, the checks on `x` that give the library's error messages, and the model call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import ml_dtypes
import numpy as np

from ..errors import JacketTypeError, JacketValueError
from ..trees import flatten_with_labels, is_leaf_structure, pack, skeleton

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def numpy_dtype(dtype: str):
    """The NumPy dtype of a Keras dtype name (bfloat16 from ml_dtypes)."""
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def dtype_name(dtype) -> str:
    """The Keras dtype name of a NumPy dtype."""
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).name


def result_dtype(leaves: list[Leaf]) -> str:
    """The widest float dtype among the leaves (Keras's own promotion maps float64 to float32 on
    JAX and PyTorch, which would lose precision here)."""
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) == 1:
        return dtypes.pop()
    if "float64" in dtypes:
        return "float64"
    return "float32"


@dataclass(frozen=True)
class Leaf:
    """One input or output array of a model, per sample (the batch axis left out)."""

    label: str  # how messages name it: "x", "x['image']", "y[1]"
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Inputs:
    """`x` after the checks: its structure, its leaves as backend tensors, and their description."""

    structure: Any  # x's own structure, leaves replaced by None
    tensors: (
        list  # backend tensors, each `(batch, *shape)`, cast to the dtype the model computes in
    )
    leaves: list[Leaf]
    batch: int

    @property
    def signature(self) -> tuple:
        return (self.batch, tuple((leaf.shape, leaf.dtype) for leaf in self.leaves))

    def pack(self, flat):
        return pack(self.structure, flat)


# ----------------------------------------------------------------------------------------------- trees


def declared_inputs(model):
    """The tree of `keras.KerasTensor` a model declares as inputs, or None where it declares none."""
    if not isinstance(model, keras.Model):
        return None
    structure = getattr(model, "_inputs_struct", None)  # Functional models
    if structure is not None:
        return structure
    try:
        inputs = model.inputs  # a built Sequential
    except (AttributeError, ValueError):
        return None
    if inputs is not None and len(inputs) == 1:
        return inputs[0]
    return None


# ---------------------------------------------------------------------------------------- the inputs


def _is_array_like_leaf(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _normalise_structure(fn_name: str, x, declared):
    """Tell data (a nested list of numbers) from structure (a list of arrays), and check dict keys."""
    if isinstance(x, Mapping):
        if declared is not None and not isinstance(declared, Mapping):
            raise JacketTypeError(
                f"{fn_name}: `x` is a dict, but the model takes {_describe_declared(declared)}. "
                f"Received: x with keys {sorted(map(str, x))}. Pass the arrays without keys."
            )
        if isinstance(declared, Mapping):
            missing = sorted(map(str, set(declared) - set(x)))
            extra = sorted(map(str, set(x) - set(declared)))
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing {missing}")
                if extra:
                    parts.append(f"unexpected {extra}")
                raise JacketValueError(
                    f"{fn_name}: the keys of `x` must be the model's input names "
                    f"{sorted(map(str, declared))}. Received: x with keys {sorted(map(str, x))} "
                    f"({', '.join(parts)}). Pass exactly one array per model input."
                )
        return {key: _as_data(x[key]) for key in x}
    if isinstance(x, (list, tuple)):
        arrays = len(x) > 0 and all(_is_array_like_leaf(item) for item in x)
        multi_declared = declared is not None and not is_leaf_structure(declared)
        if arrays or multi_declared:
            if isinstance(declared, Mapping):
                raise JacketTypeError(
                    f"{fn_name}: the model takes a dict of inputs {sorted(map(str, declared))}. "
                    f"Received: x as a {type(x).__name__} of {len(x)} arrays. Pass a dict keyed by "
                    "input name."
                )
            if multi_declared and len(declared) != len(x):
                raise JacketValueError(
                    f"{fn_name}: the model takes {len(declared)} inputs. Received: x as a "
                    f"{type(x).__name__} of {len(x)} items. Pass one array per model input."
                )
            if multi_declared or len(x) > 1 or declared is None:
                return type(x)(_as_data(item) for item in x)
            return x[0]  # a one-element list of arrays for a single-input model
        return _as_array(fn_name, "x", x)  # nested Python numbers: one array
    return x


def _as_data(value):
    """A nested list of numbers given for one input, as one NumPy array (else unchanged)."""
    if not isinstance(value, (list, tuple)):
        return value
    if not all(isinstance(leaf, (int, float, np.generic)) for leaf in keras.tree.flatten(value)):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError):
        return value  # ragged: refused with a message by `_to_array`


def _as_array(fn_name: str, label: str, value):
    """Nested Python numbers (a list of lists) as one NumPy array, or a library error."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as error:
        raise JacketTypeError(
            f"{fn_name}: `{label}` must be an array of numbers. Received: a "
            f"{type(value).__name__} that NumPy cannot turn into one ({error}). Pass a NumPy "
            "array or a backend tensor (a list of lists must be rectangular)."
        ) from None


def _describe_declared(declared) -> str:
    if is_leaf_structure(declared):
        return "a single input"
    return f"{len(declared)} inputs as a {type(declared).__name__}"


def to_array(fn_name: str, label: str, value):
    """A backend tensor (kept as is) or a NumPy array; strings, objects and complex are refused.

    Tensors of another framework (a `torch.Tensor` on TensorFlow, a `jax.Array` on PyTorch) go
    through NumPy: detached from autograd, copied off their device, bfloat16 kept as bfloat16.
    """
    kind = type(value).__name__
    if "Sparse" in kind or "Ragged" in kind or getattr(value, "is_sparse", False) is True:
        raise JacketTypeError(
            f"{fn_name}: `{label}` must be a dense array. Received: {label} of type {kind}. "
            "Pass a dense tensor (`tf.sparse.to_dense(x)`, `x.to_tensor()`, `x.to_dense()`)."
        )
    if getattr(value, "is_meta", False) is True:
        raise JacketTypeError(
            f"{fn_name}: `{label}` holds no data. Received: {label} on PyTorch's 'meta' device. "
            "Pass a tensor with values (on the CPU or an accelerator)."
        )
    if keras.ops.is_tensor(value):
        dtype = keras.backend.standardize_dtype(value.dtype)
        if dtype.startswith("complex") or dtype == "string":
            raise JacketTypeError(
                f"{fn_name}: `{label}` must hold real numbers. Received: {label}.dtype={dtype}. "
                "Jacobians here are of real-valued models; split complex data into real and "
                "imaginary parts."
            )
        if any(d is None for d in value.shape):
            raise JacketValueError(
                f"{fn_name}: `{label}` must have a known shape. Received: {label}.shape="
                f"{tuple(value.shape)}. Pass a tensor whose every axis has a size."
            )
        return value, dtype
    if isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value):
        raise JacketValueError(
            f"{fn_name}: `{label}` has masked values, which a Jacobian cannot leave out. "
            f"Received: a masked array with {int(np.ma.count_masked(value))} masked value(s). "
            f"Pass `{label}.filled(value)` or the unmasked samples only."
        )
    try:
        array = np.asarray(_foreign_to_numpy(value))
    except (ValueError, TypeError, RuntimeError) as error:
        raise JacketTypeError(
            f"{fn_name}: `{label}` must be an array of numbers. Received: {type(value).__name__} "
            f"that NumPy cannot turn into one ({error}). Pass a NumPy array or a backend tensor."
        ) from None
    if array.dtype == ml_dtypes.bfloat16:
        return array, "bfloat16"
    if array.dtype.kind not in "biuf":
        kind = {"c": "complex", "U": "string", "S": "bytes", "O": "object"}.get(
            array.dtype.kind, str(array.dtype)
        )
        raise JacketTypeError(
            f"{fn_name}: `{label}` must hold real numbers. Received: {label} of dtype "
            f"{array.dtype} ({kind}). Pass a float array (for example `np.asarray(x, 'float32')`)."
        )
    return array, keras.backend.standardize_dtype(array.dtype)


def _foreign_to_numpy(value):
    """Another framework's tensor as something `np.asarray` takes (anything else unchanged)."""
    if callable(getattr(value, "detach", None)) and callable(getattr(value, "cpu", None)):
        value = value.detach().cpu()  # PyTorch: off autograd and off its device
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16 of PyTorch's
            return value.float().numpy().astype(ml_dtypes.bfloat16)
    return value


def _target_dtype(fn_name: str, model, label: str, dtype: str, spec) -> str:
    declared = keras.backend.standardize_dtype(spec.dtype) if spec is not None else None
    if declared is not None and declared not in FLOAT_DTYPES:
        name = getattr(spec, "name", None) or label
        raise JacketTypeError(
            f"{fn_name}: model input {name!r} (`{label}`) is declared {declared}: a Jacobian "
            "with respect to integer ids (an Embedding's input, say) does not exist. Received: "
            f"{label}.dtype={dtype}. Differentiate with respect to the embedding output instead: "
            "build a model from the Embedding's output onward and pass it the embedded vectors."
        )
    if declared is not None:
        return declared
    compute = getattr(model, "compute_dtype", None) if isinstance(model, keras.Layer) else None
    if compute in FLOAT_DTYPES:
        return compute
    if dtype in FLOAT_DTYPES:
        return dtype
    return keras.config.floatx()


def example_inputs(fn_name: str, model, input_shape, batch: int, seed: int = 0):
    """Standard-normal inputs of `batch` samples in the model's input structure: of
    `input_shape` (a shape, or a list/dict of them), else of the model's declared input shapes
    and dtypes."""
    declared = declared_inputs(model)
    specs = (
        keras.tree.flatten(declared)
        if declared is not None and not is_leaf_structure(declared)
        else [declared]
    )
    if input_shape is None:
        if declared is None or any(d is None for spec in specs for d in tuple(spec.shape)[1:]):
            shown = "none" if declared is None else ", ".join(str(tuple(s.shape)) for s in specs)
            raise JacketValueError(
                f"{fn_name}: the model does not declare every input size. Received: input "
                f"shapes {shown}. Pass `input_shape`, the shape of one sample (e.g. (32, 32, 3))."
            )
        shapes = [tuple(int(d) for d in tuple(spec.shape)[1:]) for spec in specs]
    else:
        given = input_shape
        if isinstance(given, Mapping):
            shapes = [tuple(given[key]) for key in (declared or given)]
        elif len(given) and all(isinstance(d, (int, np.integer)) for d in given):
            shapes = [tuple(given)]
        else:
            shapes = [tuple(shape) for shape in given]
    rng = np.random.default_rng(seed)
    arrays = []
    for k, shape in enumerate(shapes):
        spec = specs[k] if k < len(specs) else None
        dtype = keras.backend.standardize_dtype(spec.dtype) if spec is not None else "float32"
        dtype = dtype if dtype in FLOAT_DTYPES else keras.config.floatx()
        arrays.append(rng.standard_normal((batch,) + shape).astype(numpy_dtype(dtype)))
    if declared is None or is_leaf_structure(declared):
        return arrays[0] if len(arrays) == 1 else arrays
    return keras.tree.pack_sequence_as(declared, arrays)


def prepare_inputs(fn_name: str, model, x, *, check_finite: bool = True) -> Inputs:
    """Check `x` against the model and turn it into backend tensors of the model's float dtype."""
    if x is None:
        raise JacketTypeError(
            f"{fn_name}: `x` must be an array of shape `(batch, *in_shape)` (or a list/dict of them "
            "for a model with several inputs). Received: x=None."
        )
    declared = declared_inputs(model)
    x = _normalise_structure(fn_name, x, declared)
    flat = flatten_with_labels(x, "x")
    if isinstance(declared, Mapping) or not is_leaf_structure(declared):
        specs = keras.tree.flatten(declared) if declared is not None else [None] * len(flat)
    else:
        specs = [declared]
    if len(specs) != len(flat):
        raise JacketValueError(
            f"{fn_name}: the model takes {len(specs)} inputs. Received: {len(flat)} arrays in `x`. "
            "Pass one array per model input."
        )

    tensors, leaves, batches = [], [], []
    for (label, value), spec in zip(flat, specs):
        array, dtype = to_array(fn_name, label, value)
        shape = tuple(int(d) for d in array.shape)
        _check_shape(fn_name, label, shape, spec)
        if 0 in shape[1:]:
            raise JacketValueError(
                f"{fn_name}: `{label}` has no values per sample, so its Jacobian is empty. "
                f"Received: {label}.shape={shape}. Pass inputs with at least one value per "
                "sample."
            )
        target = _target_dtype(fn_name, model, label, dtype, spec)
        tensor = keras.ops.convert_to_tensor(array)
        if dtype != target:
            tensor = keras.ops.cast(tensor, target)
        tensors.append(tensor)
        leaves.append(Leaf(label, shape[1:], target))
        batches.append(shape[0])

    if len(set(batches)) != 1:
        received = ", ".join(f"{leaf.label}: {b}" for leaf, b in zip(leaves, batches))
        raise JacketValueError(
            f"{fn_name}: every input must have the same batch size. Received: {received}. "
            "Pass the same number of samples for each input."
        )
    batch = batches[0]
    if batch == 0:
        raise JacketValueError(
            f"{fn_name}: `x` has an empty batch. Received: {leaves[0].label}.shape="
            f"{(0,) + leaves[0].shape}. Pass at least one sample."
        )
    if check_finite:
        for tensor, leaf in zip(tensors, leaves):
            check_finite_samples(fn_name, leaf.label, tensor, batch)
    return Inputs(skeleton(x), tensors, leaves, batch)


def _check_shape(fn_name: str, label: str, shape: tuple, spec) -> None:
    if len(shape) == 0:
        raise JacketValueError(
            f"{fn_name}: `{label}` must have a leading batch axis, shape `(batch, *in_shape)`. "
            f"Received: {label}.shape=(). For one sample, pass `{label}[None]`."
        )
    if spec is None:
        return
    want = tuple(spec.shape[1:])

    def fits(candidate):
        return len(candidate) == len(want) and all(
            w is None or w == c for w, c in zip(want, candidate)
        )

    if fits(shape[1:]):
        return
    shown = "(batch, " + ", ".join("?" if d is None else str(d) for d in want) + ")"
    if fits(shape):
        raise JacketValueError(
            f"{fn_name}: `{label}` must have a leading batch axis, shape `{shown}`. "
            f"Received: {label}.shape={shape}. For one sample, pass `{label}[None]`."
        )
    raise JacketValueError(
        f"{fn_name}: `{label}` does not fit the model, which expects shape `{shown}`. "
        f"Received: {label}.shape={shape}. Reshape the input to the model's input shape."
    )


def check_finite_samples(fn_name: str, label: str, tensor, batch: int) -> None:
    ops = keras.ops
    finite = ops.all(ops.isfinite(ops.reshape(tensor, (batch, -1))), axis=1)
    finite = np.asarray(ops.convert_to_numpy(finite))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise JacketValueError(
            f"{fn_name}: `{label}` contains NaN or inf in sample(s) {shown} "
            f"({len(bad)} of {batch}). Received: non-finite values at batch index {bad[0]}. "
            "Remove or repair those samples: a derivative there is undefined."
        )


def output_leaves(fn_name: str, y_structure, batch: int) -> list[Leaf]:
    """Describe the model's outputs, checking each has the batch axis and a float dtype."""
    leaves = []
    flat = flatten_with_labels(y_structure, "y")
    if not flat:
        raise JacketValueError(
            f"{fn_name}: the model must return at least one tensor. Received: `y` = "
            f"{y_structure!r}. Return the outputs to differentiate."
        )
    for label, value in flat:
        # (array-like: backend tensors, and Keras's symbolic tensors of `jacket.sparse`)
        if isinstance(value, np.ndarray) or not (
            keras.ops.is_tensor(value) or _is_array_like_leaf(value)
        ):
            what = (
                "a NumPy array, which carries no derivative"
                if isinstance(value, np.ndarray)
                else f"of type {type(value).__name__}"
            )
            raise JacketTypeError(
                f"{fn_name}: the model must return tensors. Received: `{label}` {what}. "
                "Return backend tensors (keras.ops results)."
            )
        shape = tuple(int(d) for d in value.shape)
        dtype = keras.backend.standardize_dtype(value.dtype)
        if len(shape) == 0 or shape[0] != batch:
            raise JacketValueError(
                f"{fn_name}: the model's output `{label}` must start with the batch axis of size "
                f"{batch}. Received: {label}.shape={shape}. jacket differentiates batch -> batch "
                "maps; if `x` lacks its batch axis, pass `x[None]`."
            )
        if dtype not in FLOAT_DTYPES:
            raise JacketTypeError(
                f"{fn_name}: the model's output `{label}` has dtype {dtype}; only float outputs "
                "have a Jacobian. Received: an output that is not differentiable (argmax, a cast "
                "to integers?). Differentiate the float tensor before it."
            )
        if 0 in shape[1:]:
            raise JacketValueError(
                f"{fn_name}: the model's output `{label}` has no values per sample, so its "
                f"Jacobian is empty. Received: {label}.shape={shape}. Return outputs with at "
                "least one value per sample."
            )
        leaves.append(Leaf(label, shape[1:], dtype))
    return leaves
