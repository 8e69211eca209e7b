"""Fuzzing the public API with hypothesis: every call ends in a right result or a clear library error.

Each example draws a model family (linear and nonlinear models whose Jacobian has a closed form in
float64 NumPy, multi-input list and dict models, multi-output, rank-3 and rank-4 inputs, a plain
function, a function mixing samples, and callables returning what has no Jacobian), an input (dtype,
NaN/inf, batch 0 or 1, shape perturbed in rank, feature size or batch axis, non-contiguous, Fortran
order, negative strides, read-only, memory-mapped, nested Python lists), the framework it comes from
(NumPy, or a TensorFlow, JAX or PyTorch tensor, also with `requires_grad=True`, on any backend), the
container (list or tuple, dict keys missing or extra, nested wrongly) and the options (valid or not).

The oracle decides beforehand whether the call is valid:
- valid: the result must have the right structure, shape and dtype and equal the closed form;
- invalid: the call must raise a jacket error (`jacket.JacketError` and `ValueError`/`TypeError`)
  whose message is written the library's way (see `_assert_library_message`) and names one of the
  faults drawn. No other exception may escape (no framework error, no IndexError, no RuntimeError).
- a model that raises its own exception: that exception, unchanged.

Every example runs under a hang guard (SIGALRM, then faulthandler as a hard stop). The outcomes are
counted by category and printed at the end of the module (`fuzz outcomes` table); run with
`--hypothesis-show-statistics` for hypothesis's own view of the same events.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import itertools
import re
import signal
import sys
import warnings
from dataclasses import dataclass, field

import keras
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from oracles import to_numpy

import jacket
from jacket import errors as _errors

BACKEND = keras.backend.backend()
SOFT_TIMEOUT_S = 120  # one example (the first compile of a model on a loaded machine: ~5 s)
HARD_TIMEOUT_S = 300  # faulthandler dumps every thread and ends the process

COUNTS: collections.Counter = collections.Counter()  # (category, outcome) -> cases
INPUTS: collections.Counter = collections.Counter()  # (aspect of x, value, outcome) -> cases

COMMON = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# examples per model family (21 families: 11 with a Jacobian, 10 without)
# the slow variant explores new cases on every run (a failure prints how to replay it)
SLOW = {**COMMON, "derandomize": False, "print_blob": True}
FAST = settings(max_examples=3, **COMMON)
MANY = settings(max_examples=30, **SLOW)
PRODUCTS_FAST = settings(max_examples=2, **COMMON)
PRODUCTS_MANY = settings(max_examples=12, **SLOW)


# ------------------------------------------------------------------------------------ hang guard


class Hang(BaseException):  # not an Exception: no `except Exception` in the library swallows it
    pass


@contextlib.contextmanager
def _hang_guard(seconds: float = SOFT_TIMEOUT_S):
    """Fail an example that runs past `seconds`: SIGALRM raises `Hang` in the main thread, and if
    native code never returns to Python, faulthandler dumps the stacks and ends the process."""

    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(HARD_TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


# ----------------------------------------------------------------------------------- the families


@dataclass
class Family:
    """A model and its exact Jacobian.

    `inputs`: (name, per-sample shape) in the order of `keras.tree.flatten` of the model's input
    structure; `container`: "single", "list" or "dict". `outputs`: (key, per-sample shape) in the
    order of the flattened output structure (key None for a single output, an int for a list, a
    str for a dict). `jac(xs, full)`: blocks `F[j][i]` of shape `(B, out_size_j, B, in_size_i)` in
    float64 (the full Jacobian: per-sample ones sit on the diagonal), from the float64 inputs.
    """

    name: str
    model: object
    inputs: list
    container: str
    outputs: list
    jac: object
    dtype: str | None = "float32"  # declared input dtype (None: the callable's own)
    shape_free: bool = False  # a plain function: any shape is fine
    refusal: tuple | None = None  # (error class, fragments) for a model without a Jacobian
    raises: type | None = None  # a model that raises its own exception
    coupled: bool = False  # mixes samples: per-sample Jacobians refused for batch > 1
    extra: dict = field(default_factory=dict)


def _weights(layer) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in layer.weights]


def _block_diag(per_sample: np.ndarray) -> np.ndarray:
    """`(B, m, n)` per-sample blocks -> the full `(B, m, B, n)` Jacobian."""
    B, m, n = per_sample.shape
    full = np.zeros((B, m, B, n))
    for b in range(B):
        full[b, :, b, :] = per_sample[b]
    return full


def _linear(kernel_t_fn):
    """A Jacobian that does not depend on x: `kernel_t_fn()` is one sample's `(m, n)` block."""

    def jac(xs):
        B = xs[0].shape[0]
        return [[_block_diag(np.broadcast_to(kernel_t_fn(), (B,) + kernel_t_fn().shape))]]

    return jac


def _build_dense():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    (K, _b) = _weights(model.layers[0])
    return Family("dense", model, [("x", (4,))], "single", [(None, (3,))], _linear(lambda: K.T))


def _build_dense64():
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64")]
    )
    (K, _b) = _weights(model.layers[0])
    return Family(
        "dense64", model, [("x", (4,))], "single", [(None, (3,))], _linear(lambda: K.T), "float64"
    )


def _build_mlp():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )
    K1, b1 = _weights(model.layers[0])
    K2, _ = _weights(model.layers[1])

    def jac(xs):
        (x,) = xs
        d = 1.0 - np.tanh(x @ K1 + b1) ** 2  # (B, 4)
        per = np.einsum("ho,bh,ih->boi", K2, d, K1)  # (B, 2, 3)
        return [[_block_diag(per)]]

    return Family("mlp", model, [("x", (3,))], "single", [(None, (2,))], jac)


def _build_rank3():
    model = keras.Sequential([keras.Input((2, 3)), keras.layers.Dense(2)])
    K, _ = _weights(model.layers[0])
    one = np.einsum("ts,io->tosi", np.eye(2), K).reshape(4, 6)  # J[t, o, s, i] = d_ts K[i, o]
    return Family("rank3", model, [("x", (2, 3))], "single", [(None, (2, 2))], _linear(lambda: one))


def _build_conv1d():
    model = keras.Sequential([keras.Input((5, 2)), keras.layers.Conv1D(2, 3)])
    K, _ = _weights(model.layers[0])  # (3, 2, 2): (k, c, o)
    one = np.zeros((3, 2, 5, 2))  # (t, o, s, c)
    for t in range(3):
        for k in range(3):
            one[t, :, t + k, :] = K[k].T
    return Family(
        "conv1d",
        model,
        [("x", (5, 2))],
        "single",
        [(None, (3, 2))],
        _linear(lambda: one.reshape(6, 10)),
    )


def _build_conv2d():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 2)])
    K, _ = _weights(model.layers[0])  # (2, 2, 1, 2): (p, q, c, o)
    one = np.zeros((3, 3, 2, 4, 4, 1))  # (i, j, o, h, w, c)
    for i in range(3):
        for j in range(3):
            for p in range(2):
                for q in range(2):
                    one[i, j, :, i + p, j + q, :] = K[p, q].T
    return Family(
        "conv2d", model, [("x", (4, 4, 1))], "single", [(None, (3, 3, 2))],
        _linear(lambda: one.reshape(18, 16)),
    )  # fmt: skip


def _build_multi_list():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    dense = keras.layers.Dense(2)
    model = keras.Model([a, b], dense(keras.layers.Concatenate()([a, b])))
    K, _ = _weights(dense)

    def jac(xs):
        B = xs[0].shape[0]
        return [[_block_diag(np.broadcast_to(K[:3].T, (B, 2, 3))),
                 _block_diag(np.broadcast_to(K[3:].T, (B, 2, 2)))]]  # fmt: skip

    return Family("multi_list", model, [("a", (3,)), ("b", (2,))], "list", [(None, (2,))], jac)


def _build_multi_dict():
    p, q = keras.Input((3,), name="p"), keras.Input((2,), name="q")
    dense = keras.layers.Dense(2)
    model = keras.Model({"p": p, "q": q}, dense(keras.layers.Concatenate()([p, q])))
    K, _ = _weights(dense)

    def jac(xs):
        B = xs[0].shape[0]
        return [[_block_diag(np.broadcast_to(K[:3].T, (B, 2, 3))),
                 _block_diag(np.broadcast_to(K[3:].T, (B, 2, 2)))]]  # fmt: skip

    return Family("multi_dict", model, [("p", (3,)), ("q", (2,))], "dict", [(None, (2,))], jac)


def _build_multi_out():
    x = keras.Input((4,))
    s, t = keras.layers.Dense(2, name="s"), keras.layers.Dense(3, name="t")
    model = keras.Model(x, {"s": s(x), "t": t(x)})
    Ks, _ = _weights(s)
    Kt, _ = _weights(t)

    def jac(xs):
        B = xs[0].shape[0]
        return [[_block_diag(np.broadcast_to(Ks.T, (B, 2, 4)))],
                [_block_diag(np.broadcast_to(Kt.T, (B, 3, 4)))]]  # fmt: skip

    return Family("multi_out", model, [("x", (4,))], "single", [("s", (2,)), ("t", (3,))], jac)


def _twice(z):
    return 2.0 * z


def _build_callable():
    def jac(xs):
        (x,) = xs
        B, n = x.shape[0], int(np.prod(x.shape[1:], dtype=int))
        return [[_block_diag(np.broadcast_to(2.0 * np.eye(n), (B, n, n)))]]

    return Family(
        "callable", _twice, [("x", (3,))], "single", [(None, None)], jac, None, shape_free=True
    )


def _centre(z):
    return z - keras.ops.mean(z, axis=0, keepdims=True)


def _build_coupled():
    def jac(xs):
        (x,) = xs
        B, n = x.shape[0], int(np.prod(x.shape[1:], dtype=int))
        full = np.einsum("bc,ij->bicj", np.eye(B) - 1.0 / B, np.eye(n))
        return [[full]]

    return Family(
        "coupled", _centre, [("x", (3,))], "single", [(None, None)], jac, None, shape_free=True,
        coupled=True,
    )  # fmt: skip


class ModelsOwnError(Exception):
    pass


def _raising(z):
    raise ModelsOwnError("the model's own failure")


def _bad(name, fn, error, *fragments):
    def build():
        return Family(
            name, fn, [("x", (3,))], "single", [(None, None)], None, None, shape_free=True,
            refusal=(error, fragments),
        )  # fmt: skip

    return build


BAD_OUTPUTS = {
    "returns_float": (lambda z: 1.0, _errors.JacketTypeError, "float"),
    "returns_none": (lambda z: None, _errors.JacketTypeError, "NoneType"),
    "returns_str": (lambda z: "y", _errors.JacketTypeError, "str"),
    "returns_int_tensor": (
        lambda z: keras.ops.cast(3.0 * z, "int32"),
        _errors.JacketTypeError,
        "int32",
    ),
    "returns_dict_non_tensor": (
        lambda z: {"a": 2.0 * z, "b": 3},
        _errors.JacketTypeError,
        "y['b']",
        "int",
    ),
    "returns_numpy": (lambda z: np.ones((1, 3)), _errors.JacketTypeError, "NumPy"),
    "returns_scalar": (lambda z: keras.ops.sum(z), _errors.JacketValueError, "shape=()"),
    "returns_nothing": (lambda z: [], _errors.JacketValueError, "[]"),
    "returns_bool": (lambda z: z > 0, _errors.JacketTypeError, "bool"),
}

BUILDERS = {
    "dense": _build_dense,
    "dense64": _build_dense64,
    "mlp": _build_mlp,
    "rank3": _build_rank3,
    "conv1d": _build_conv1d,
    "conv2d": _build_conv2d,
    "multi_list": _build_multi_list,
    "multi_dict": _build_multi_dict,
    "multi_out": _build_multi_out,
    "callable": _build_callable,
    "coupled": _build_coupled,
    "raises": lambda: Family(
        "raises",
        _raising,
        [("x", (3,))],
        "single",
        [(None, None)],
        None,
        None,
        shape_free=True,
        raises=ModelsOwnError,
    ),  # fmt: skip
}
BUILDERS.update({name: _bad(name, *spec) for name, spec in BAD_OUTPUTS.items()})
GOOD = [
    "dense", "dense64", "mlp", "rank3", "conv1d", "conv2d", "multi_list", "multi_dict",
    "multi_out", "callable", "coupled",
]  # fmt: skip
_FAMILIES: dict[str, Family] = {}


def _family(name: str) -> Family:
    if name not in _FAMILIES:
        keras.utils.set_random_seed(sum(map(ord, name)))
        _FAMILIES[name] = BUILDERS[name]()
    return _FAMILIES[name]


# -------------------------------------------------------------------------------------- the draws

FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16"]
OK_DTYPES = FLOAT_DTYPES + ["int32", "int64", "uint8", "bool"]
BAD_DTYPES = ["complex64", "object", "str"]
FRAMEWORKS = ["numpy", "tensorflow", "jax", "torch", "torch_grad"]
LAYOUTS = ["C", "fortran", "strided", "negative", "readonly", "memmap", "pylist"]


@dataclass
class Fault:
    category: str  # what was wrong, for the table
    names: tuple  # arguments one of which the message must name (in backticks or as label)
    fragments: tuple  # one of these must appear in the message: the received value or type


def _choose(data, valid: list, invalid: list, percent_invalid: int, label: str):
    """One of `valid` (most of the time) or one of `invalid`; returns (value, is_invalid)."""
    # hypothesis draws (and shrinks towards) small integers: the valid values sit there
    if invalid and data.draw(st.integers(0, 99), label=f"{label}?") >= 100 - percent_invalid:
        return data.draw(st.sampled_from(invalid), label=label), True
    return data.draw(st.sampled_from(valid), label=label), False


def _values(rng, shape, dtype: str) -> np.ndarray:
    if dtype == "bool":
        return rng.uniform(size=shape) > 0.5
    if dtype in ("int32", "int64", "uint8"):
        return rng.integers(0, 4, size=shape).astype(dtype)
    x = rng.uniform(-1.0, 1.0, size=shape)
    if dtype == "complex64":
        return (x + 1j * x).astype("complex64")
    if dtype == "object":
        return x.astype(object)
    if dtype == "str":
        return x.astype(str)
    if dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


_FILES = itertools.count()


def _layout(array: np.ndarray, layout: str, tmp_path) -> object:
    """The same values in another memory layout (or as nested Python lists)."""
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim >= 1:
        big = np.repeat(array, 2, axis=-1)  # every value twice along the last axis
        return big[..., ::2]
    if layout == "negative" and array.ndim >= 1:
        return np.ascontiguousarray(array[::-1])[::-1]
    if layout == "readonly":
        array = array.copy()
        array.flags.writeable = False
        return array
    if layout == "memmap" and array.dtype.kind in "biuf" and array.size:
        path = tmp_path / f"x{next(_FILES)}.npy"  # one file per array
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
        mapped[...] = array
        mapped.flush()
        return np.load(path, mmap_mode="r")
    if layout == "pylist" and array.dtype.kind in "fiub" and array.dtype != ml_dtypes.bfloat16:
        return array.tolist()
    return array


def _framework(array: np.ndarray, framework: str):
    """The array as a tensor of `framework` (any backend); NumPy for dtypes it cannot hold."""
    if framework == "numpy" or not isinstance(array, np.ndarray) or array.dtype.kind in "OUS":
        return array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if framework == "tensorflow":
            import tensorflow as tf

            if array.dtype == ml_dtypes.bfloat16:
                return tf.cast(tf.constant(array.astype("float32")), tf.bfloat16)
            return tf.constant(array)
        if framework == "jax":
            import jax.numpy as jnp

            return jnp.asarray(array)
        import torch

        if array.dtype == ml_dtypes.bfloat16:
            tensor = torch.tensor(array.astype("float32")).to(torch.bfloat16)
        else:
            tensor = torch.tensor(np.ascontiguousarray(array))
        if framework == "torch_grad" and tensor.is_floating_point():
            tensor.requires_grad_(True)
        return tensor


def _as_float64(value) -> np.ndarray:
    """What jacket sees, as float64 NumPy (the oracle's input)."""
    if hasattr(value, "detach"):
        value = value.detach().float().numpy() if "bfloat16" in str(value.dtype) else value.detach()
    array = np.asarray(value)
    if array.dtype == ml_dtypes.bfloat16:
        array = array.astype("float32")
    return array.astype(np.float64)


def _seen_dtype(value) -> str:
    """The dtype jacket receives `value` in (a Python list as NumPy makes it)."""
    if "bfloat16" in str(getattr(value, "dtype", "")):
        return "bfloat16"
    if hasattr(value, "detach"):
        value = value.detach()
    return keras.backend.standardize_dtype(np.asarray(value).dtype)


@dataclass
class Case:
    family: Family
    fn: str
    x: object = None  # as passed
    xs64: list = None  # float64 arrays in the family's input order (valid inputs only)
    in_shapes: list = None
    batch: int = 0
    options: dict = field(default_factory=dict)
    faults: list = field(default_factory=list)
    extra_arg: object = None  # v of jvp, u of vjp
    extra64: list = None
    x_copies: list = field(default_factory=list)  # (given NumPy array, copy): not changed by jacket
    input_dtype: str = "float32"  # the dtype of the (first) input as jacket receives it
    aspects: dict = field(default_factory=dict)  # framework, dtype, layout of x, for the table


def _draw_inputs(data, case: Case, tmp_path) -> None:
    fam = case.family
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    batch, empty = _choose(data, [1, 2, 3], [0], 5, "batch")
    dtype, bad_dtype = _choose(data, OK_DTYPES, BAD_DTYPES, 8, "dtype")
    if data.draw(st.integers(0, 99), label="other dtype?") < 50 and not bad_dtype:
        dtype = "float32"
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    framework = data.draw(st.sampled_from(FRAMEWORKS), label="framework")
    shape_fault = data.draw(
        st.sampled_from(["none"] * 12 + ["no_batch_axis", "extra_axis", "feature_plus_one"]),
        label="shape",
    )
    nan = data.draw(st.sampled_from(["none"] * 10 + ["nan", "inf", "-inf"]), label="non-finite")
    case.batch = batch
    case.input_dtype = dtype
    if empty:
        case.faults.append(Fault("empty batch", ("x",), ("empty batch", "(0,")))
    if bad_dtype:
        fragments = {"complex64": ("complex",), "object": ("object",), "str": ("<U", "str")}
        case.faults.append(Fault(f"dtype {dtype}", ("x",), fragments[dtype]))
    fault_leaf = data.draw(st.integers(0, len(fam.inputs) - 1), label="which input")
    arrays, xs64, shapes = [], [], []
    for i, (_, shape) in enumerate(fam.inputs):
        full = (batch,) + shape
        if i == fault_leaf and shape_fault != "none":
            if shape_fault == "no_batch_axis":
                full = shape
            elif shape_fault == "extra_axis":
                full = full + (1,)
            else:
                full = full[:-1] + (full[-1] + 1,)
        array = _values(rng, full, dtype)
        if i == fault_leaf and nan != "none" and array.size and array.dtype.kind == "f":
            flat = array.reshape(-1)
            flat[data.draw(st.integers(0, flat.size - 1), label="nan at")] = float(nan)
        elif i == fault_leaf and nan != "none":
            nan = "none"  # an integer array holds no NaN
        value = _framework(_layout(array, layout, tmp_path), framework)
        if isinstance(value, np.ndarray):
            case.x_copies.append((value, value.copy()))
        arrays.append(value)
        shapes.append(full[1:])
        if array.dtype.kind in "biuf" or array.dtype == ml_dtypes.bfloat16:
            xs64.append(_as_float64(value))
            case.input_dtype = _seen_dtype(value)
    label = "x" if fam.container == "single" else None
    if shape_fault != "none" and not fam.shape_free:
        leaf = "x" if label else fam.inputs[fault_leaf][0]
        want = {"no_batch_axis": "leading batch axis", "extra_axis": "does not fit"}
        case.faults.append(
            Fault(
                f"shape {shape_fault}",
                ("x", leaf),
                (want.get(shape_fault, "does not fit"), "shape="),
            )
        )
    if nan != "none":
        case.faults.append(Fault(f"{nan} in x", ("x",), ("NaN or inf",)))
    if fam.shape_free and shape_fault == "no_batch_axis":  # (3,): a batch of 3 scalars
        case.batch = fam.inputs[0][1][0]
        shapes = [fam.inputs[0][1][1:]]
        case.faults = [f for f in case.faults if f.category != "empty batch"]
    case.in_shapes = shapes
    case.xs64 = xs64
    case.x = _container(data, case, arrays)
    case.aspects = {"framework": framework, "dtype": dtype, "layout": layout, "batch": batch}
    event(f"input: {dtype}, {layout}, {framework}")


def _container(data, case: Case, given: list):
    fam = case.family
    names = [name for name, _ in fam.inputs]
    if fam.container == "single":
        if fam.shape_free or isinstance(given[0], list):
            return given[0]  # ([rows] is itself a nested list of numbers: one more axis)
        form, bad = _choose(data, ["bare", "bare", "list1", "tuple1"],
                            ["dict", "two", "nested"], 6, "container")  # fmt: skip
        if bad:
            why = {
                "dict": ("x", ("dict",)),
                "two": ("x", ("2 arrays", "2 items", "takes 1")),
                "nested": ("x", ("shape=(1, 1,", "shape=")),
            }[form]
            case.faults.append(Fault(f"container {form}", (why[0],), why[1]))
        return {
            "bare": lambda: given[0],
            "list1": lambda: [given[0]],
            "tuple1": lambda: (given[0],),
            "dict": lambda: {"x": given[0]},
            "two": lambda: [given[0], given[0]],
            "nested": lambda: [[given[0]]],
        }[form]()
    if fam.container == "list":
        # a dict keyed by input name is what Keras takes for a model of a list of inputs too
        form, bad = _choose(data, ["list", "tuple", "dict"],
                            ["short", "long", "nested", "bare"], 20, "container")  # fmt: skip
        if bad:
            fragments = {
                "short": ("1 items", "1 arrays", "takes 2"),
                "long": ("3 items", "3 arrays"),
                "nested": ("1 items", "arrays", "takes 2"),
                "bare": ("takes 2", "1 arrays", "shape="),
            }[form]
            case.faults.append(Fault(f"container {form}", ("x",), fragments))
        return {
            "list": lambda: list(given),
            "tuple": lambda: tuple(given),
            "dict": lambda: dict(zip(names, given)),
            "short": lambda: [given[0]],
            "long": lambda: [given[0], given[1], given[1]],
            "nested": lambda: [[given[0], given[1]]],
            "bare": lambda: given[0],
        }[form]()
    # a list in the order of the inputs is what Keras takes for a dict whose keys are sorted
    form, bad = _choose(data, ["dict", "dict_reversed", "list"],
                        ["missing", "extra", "renamed"], 20, "container")  # fmt: skip
    if bad:
        fragments = {
            "missing": ("missing",),
            "extra": ("unexpected",),
            "renamed": ("missing",),
        }[form]
        case.faults.append(Fault(f"container {form}", ("x",), fragments))
    return {
        "dict": lambda: dict(zip(names, given)),
        "dict_reversed": lambda: dict(reversed(list(zip(names, given)))),
        "missing": lambda: {names[0]: given[0]},
        "extra": lambda: {**dict(zip(names, given)), "label": given[0]},
        "list": lambda: list(given),
        "renamed": lambda: {names[0]: given[0], "other": given[1]},
    }[form]()


OPTION_SPACE = {
    # name: (valid values, invalid values, percent invalid, fragments for an invalid value)
    "mode": (["auto", "reverse", "forward"], ["sideways", None, 1, "Reverse"], 8),
    "chunk_size": ([None, None, 1, 2, 3, 10**12, np.int64(2)], [0, -1, 2.5, True, "2"], 10),
    "flatten": ([False, True, np.bool_(True)], [1, "yes", None], 6),
    "per_sample": ([True, True, False], [0, "no"], 6),
    "training": ([False, False, True], ["yes"], 4),
    "memory_budget": (
        [None, None, "1KB", "500MB", 1, 10**12, "2GiB"],
        [0, -1, "abc", "1e3", "", float("nan"), [1]],
        8,
    ),
    "strategy": (["auto", "auto", "vmap", "loop", "replicate", "autotune"], ["fast", None, 3], 6),
}


def _draw_options(data, case: Case) -> None:
    names = ("per_sample", "training") if case.fn in ("jvp", "vjp") else tuple(OPTION_SPACE)
    for name in names:
        valid, invalid, percent = OPTION_SPACE[name]
        if name == "strategy" and "autotune" in valid and data.draw(st.integers(0, 9)) > 1:
            valid = [v for v in valid if v != "autotune"]  # each autotune compiles several kernels
        value, bad = _choose(data, valid, invalid, percent, name)
        case.options[name] = value
        if bad:
            case.faults.append(Fault(f"option {name}", (name,), (f"{name}={value!r}",)))
    o = case.options
    if o.get("strategy") == "replicate" and (o.get("per_sample") is False or o.get("training")):
        case.faults.append(Fault("option strategy", ("strategy",), ("strategy='replicate'",)))


# ------------------------------------------------------------------------------------------ oracle


def _assert_library_message(error: BaseException, faults: list) -> str:
    """The library's way of writing an error (see `jacket._model`): `fn: ` first, the argument
    named (in backticks, or the model's output `y` / the model), a requirement ("must", "only",
    "does not fit", "has no", "contains"), "Received:" with what was received, and the fix: an
    imperative sentence ("Pass ...", "Use ...", "Reshape ...", "Remove ...", "Return ...",
    "Differentiate ...", "split ...") or, for an option, the accepted values ("must be one of",
    "must be True or False", "must be a positive integer", "must look like")."""
    message = str(error)
    assert isinstance(error, _errors.JacketError), f"{type(error).__name__}: {message}"
    assert isinstance(error, (ValueError, TypeError)), type(error).__mro__
    assert "\n" not in message.strip(), message
    assert message.split(":")[0] in ("jacobian", "jacobian_fn", "jvp", "vjp"), message
    assert "Received:" in message, message
    fixes = (
        "Pass ", "pass ", "Use ", "Reshape ", "Remove ", "Return ", "Differentiate ", "split ",
        "must be one of", "must be True or False", "must be a positive integer",
        "must be a number of bytes", "must look like", "must be at least",
    )  # fmt: skip
    assert any(fix in message for fix in fixes), f"no fix in: {message}"
    matched = [
        f
        for f in faults
        if any(_names(message, n) for n in f.names)
        and any(fragment in message for fragment in f.fragments)
    ]
    assert matched, f"the message names none of the faults {faults}: {message}"
    return matched[0].category


def _names(message: str, name: str) -> bool:
    """`name` is named: in backticks (`x`, `x['p']`), as `name=...`, or after "Received:"."""
    n = re.escape(name)
    return bool(
        re.search(rf"`{n}(`|\[)|\b{n}=|Received: (a |an )?{n}[ .=\[]|\b{n}\.(shape|dtype)", message)
    )


def _dtype_of(t) -> str:
    return keras.backend.standardize_dtype(t.dtype)


def _expected_dtype(case: Case) -> str:
    if case.family.dtype is not None:
        return case.family.dtype
    return case.input_dtype if case.input_dtype in FLOAT_DTYPES else keras.config.floatx()


def _tolerance(dtype: str) -> float:
    return {"float64": 1e-10, "float32": 2e-5, "float16": 2e-2, "bfloat16": 3e-2}[dtype]


def _out_shapes(case: Case) -> list:
    fam = case.family
    if fam.outputs[0][1] is None:  # the function keeps the input's shape
        return [case.in_shapes[0]]
    return [shape for _, shape in fam.outputs]


def _expected_paths(case: Case, result) -> list:
    fam = case.family
    x = case.x
    if fam.container == "single":
        inner = [()]
    elif isinstance(x, dict):
        inner = [(k,) for k in sorted(x)]
    else:
        inner = [(i,) for i in range(len(x))]
    outer = [()] if fam.outputs[0][0] is None else [(k,) for k, _ in fam.outputs]
    return [o + i for o in outer for i in inner]


def _check_structure(case: Case, result) -> None:
    fam = case.family
    if fam.outputs[0][0] is not None:
        assert isinstance(result, dict), type(result)
    if fam.container != "single":
        inner = result if fam.outputs[0][0] is None else next(iter(result.values()))
        assert type(inner) is type(case.x), (type(inner), type(case.x))
    paths = (
        [path for path, _ in keras.tree.flatten_with_path(result)]
        if not (keras.ops.is_tensor(result))
        else [()]
    )
    assert paths == _expected_paths(case, result), (paths, _expected_paths(case, result))


def _check_jacobian(case: Case, result) -> None:
    _check_structure(case, result)
    F = case.family.jac(case.xs64)
    leaves = [result] if keras.ops.is_tensor(result) else keras.tree.flatten(result)
    blocks = [block for row in F for block in row]
    assert len(leaves) == len(blocks)
    o = case.options
    B = case.batch
    out_shapes = _out_shapes(case)
    want_dtype = _expected_dtype(case)
    k = 0
    for j, row in enumerate(F):
        for i, full in enumerate(row):
            leaf = leaves[k]
            k += 1
            assert keras.ops.is_tensor(leaf), type(leaf)
            assert _dtype_of(leaf) == want_dtype, (_dtype_of(leaf), want_dtype)
            out_shape, in_shape = out_shapes[j], case.in_shapes[i]
            m, n = full.shape[1], full.shape[3]
            if o["per_sample"]:
                expected = np.stack([full[b, :, b, :] for b in range(B)])
                shape = (B, m, n) if o["flatten"] else (B, *out_shape, *in_shape)
            else:
                expected = full
                shape = (B, m, B, n) if o["flatten"] else (B, *out_shape, B, *in_shape)
            assert tuple(leaf.shape) == shape, (tuple(leaf.shape), shape)
            actual = to_numpy(leaf).reshape(expected.shape)
            scale = max(1.0, np.abs(expected).max())
            error = np.abs(actual - expected).max()
            assert error <= _tolerance(want_dtype) * scale, f"max error {error:.3g}"


def _draw_products(data, case: Case) -> None:
    """v (jvp) or u (vjp): the shapes of x or of the output, or a fault."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed v"))
    name = "v" if case.fn == "jvp" else "u"
    shapes = case.in_shapes if name == "v" else _out_shapes(case)
    keys = (
        [k for k, _ in case.family.inputs] if name == "v" else [k for k, _ in case.family.outputs]
    )
    kind, bad = _choose(data, ["ok"], ["shape", "complex", "object", "none", "structure"], 25, name)
    arrays = [rng.uniform(-1, 1, size=(case.batch,) + tuple(s)) for s in shapes]
    case.extra64 = [a.astype(np.float64) for a in arrays]
    framework = data.draw(st.sampled_from(FRAMEWORKS), label=f"{name} framework")
    if kind == "shape":
        arrays[0] = np.concatenate([arrays[0], arrays[0][:1]])  # one sample too many
    elif kind == "complex":
        arrays[0] = arrays[0] + 1j
    elif kind == "object":
        arrays[0] = arrays[0].astype(object)
    if bad:
        fragments = {
            "shape": ("shape=",),
            "complex": ("complex",),
            "object": ("object",),
            "none": ("=None",),
            "structure": ("structure",),
        }[kind]
        case.faults.append(Fault(f"{name} {kind}", (name,), fragments))
    values = [
        _framework(a.astype("float32") if a.dtype == np.float64 else a, framework) for a in arrays
    ]
    case.extra64 = [_as_float64(v) if not bad else a for v, a in zip(values, case.extra64)]
    if kind == "none":
        case.extra_arg = None
        return
    single = len(values) == 1 and (
        (name == "v" and case.family.container == "single")
        or (name == "u" and case.family.outputs[0][0] is None)
    )
    if kind == "structure":
        case.extra_arg = values if single else values[0]  # a list for one array, one for several
        if single:
            case.extra_arg = [values[0], values[0]]
        return
    if single:
        case.extra_arg = values[0]
    elif name == "u" or isinstance(case.x, dict):  # v in the structure x was given in
        case.extra_arg = dict(zip(keys, values))
    else:
        case.extra_arg = type(case.x)(values) if isinstance(case.x, (list, tuple)) else values


def _check_product(case: Case, result) -> None:
    F = case.family.jac(case.xs64)
    B = case.batch
    want_dtype = _expected_dtype(case)
    leaves = [result] if keras.ops.is_tensor(result) else keras.tree.flatten(result)
    if case.fn == "jvp":
        expected = [
            sum(
                np.einsum("bmcn,cn->bm", F[j][i], v.reshape(B, -1))
                for i, v in enumerate(case.extra64)
            )
            for j in range(len(F))
        ]
        shapes = _out_shapes(case)
    else:
        expected = [
            sum(
                np.einsum("bm,bmcn->cn", u.reshape(B, -1), F[j][i])
                for j, u in enumerate(case.extra64)
            )
            for i in range(len(F[0]))
        ]
        shapes = case.in_shapes
    assert len(leaves) == len(expected)
    for leaf, want, shape in zip(leaves, expected, shapes):
        assert tuple(leaf.shape) == (B, *shape), (tuple(leaf.shape), shape)
        assert _dtype_of(leaf) == want_dtype
        actual = to_numpy(leaf).reshape(want.shape)
        scale = max(1.0, np.abs(want).max())
        assert np.abs(actual - want).max() <= 4 * _tolerance(want_dtype) * scale


# -------------------------------------------------------------------------------------- one example


def _call(case: Case):
    fam, o = case.family, case.options
    if case.fn == "jacobian":
        return jacket.jacobian(fam.model, case.x, **o)
    if case.fn == "jacobian_fn":
        return jacket.jacobian_fn(fam.model, **o)(case.x)
    if case.fn == "jvp":
        return jacket.jvp(fam.model, case.x, case.extra_arg, **o)
    return jacket.vjp(fam.model, case.x, case.extra_arg, **o)


def _run(data, tmp_path, fns: list, name: str) -> None:
    fam = _family(name)
    case = Case(fam, data.draw(st.sampled_from(fns), label="function"))
    _draw_inputs(data, case, tmp_path)
    _draw_options(data, case)
    if case.fn in ("jvp", "vjp"):
        if fam.jac is None:  # a model without a Jacobian: v/u of the input's shape will do
            case.extra_arg = np.ones(np.shape(case.xs64[0]) if case.xs64 else (1, 3), "float32")
        else:
            _draw_products(data, case)
    valid_call = not case.faults
    if fam.refusal is not None:
        error, fragments = fam.refusal
        case.faults.append(Fault(f"model {name}", ("y", "model"), fragments))
    if valid_call and fam.coupled and case.options["per_sample"] and case.batch > 1:
        case.faults.append(Fault("coupled samples", ("per_sample",), ("per_sample=False",)))
    if (
        valid_call
        and fam.coupled
        and case.batch == 1
        and case.fn in ("jacobian", "jacobian_fn")
        and case.options.get("strategy") == "replicate"
    ):  # no second sample to probe at batch 1: two tiled copies are, and the tiling refused
        case.faults.append(
            Fault("replicate on coupled samples", ("strategy",), ("tiles the batch",))
        )
    note(f"family={name} fn={case.fn} x={_describe(case.x)} options={case.options}")
    note(f"faults={case.faults}")
    category = _category(case)
    with _hang_guard():
        try:
            result = _call(case)
        except ModelsOwnError:
            # the model runs before the (fused) finite check: NaN inputs may reach it
            assert fam.raises is ModelsOwnError, "the model's error, from another model?"
            assert all(f.category.endswith("in x") for f in case.faults), case.faults
            _count(case, category, "the model's own error, passed through unchanged")
            return
        except (ValueError, TypeError) as error:
            if not case.faults or (fam.raises and valid_call):
                raise AssertionError(
                    f"refused a valid call ({type(error).__name__}: {error})"
                ) from error
            category = _assert_library_message(error, case.faults)
            if isinstance(error, _errors.CouplingError) and fam.coupled:
                _count(case, category, "refused: CouplingError")
            else:
                _count(case, category, f"refused: {type(error).__name__}")
            return
    assert not case.faults, f"accepted a call with faults {case.faults}"
    assert fam.raises is None
    if case.fn in ("jacobian", "jacobian_fn"):
        _check_jacobian(case, result)
    else:
        _check_product(case, result)
    for original, copy in case.x_copies:  # the caller's arrays are left as they were
        np.testing.assert_array_equal(original, copy)
    _count(case, category, "accepted, equal to the closed form")


def _describe(x) -> str:
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], (int, float, bool)):
        inner = ", ".join(_describe(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner},)"
    if isinstance(x, list):
        return f"nested list {np.shape(x)}"
    return f"{type(x).__module__}.{type(x).__name__}{tuple(getattr(x, 'shape', ()))} " + str(
        getattr(x, "dtype", "")
    )


def _category(case: Case) -> str:
    if case.faults:
        return case.faults[0].category
    fam = case.family
    if fam.raises:
        return "model raises"
    if fam.coupled:
        return "samples interact"
    return f"valid {case.fn}: {fam.name}"


def _count(case: Case, category: str, outcome: str) -> None:
    COUNTS[(category, outcome)] += 1
    short = outcome.split(",")[0].split(":")[0]  # accepted / refused / the model's own error
    for aspect, value in case.aspects.items():
        INPUTS[(aspect, str(value), short)] += 1
    event(f"{category} -> {outcome}")


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module", autouse=True)
def _outcome_table(request):
    yield
    if not COUNTS:
        return
    lines = [f"fuzz outcomes ({BACKEND}): category | outcome | cases"]
    for (category, outcome), n in sorted(COUNTS.items()):
        lines.append(f"  {category:32s} | {outcome:48s} | {n}")
    lines.append(f"  total {COUNTS.total()}")
    lines.append(f"fuzz inputs ({BACKEND}): aspect of x | value | outcome | cases")
    for (aspect, value, outcome), n in sorted(INPUTS.items()):
        lines.append(f"  {aspect:10s} | {value:12s} | {outcome:48s} | {n}")
    _print_table(request.config, lines)


def _print_table(config, lines: list[str]) -> None:
    """Write past pytest's output capture, to the terminal (or stderr without one)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
        else:  # pragma: no cover - without the terminal plugin
            print("\n".join(lines), file=sys.stderr)


FAMILIES = GOOD + list(BAD_OUTPUTS) + ["raises"]


@pytest.mark.parametrize("family", FAMILIES)
@FAST
@given(data=st.data())
def test_fuzz_jacobian(data, tmp_path_factory, family):
    _run(data, tmp_path_factory.mktemp("fuzz"), ["jacobian", "jacobian_fn"], family)


@pytest.mark.parametrize("family", FAMILIES)
@PRODUCTS_FAST
@given(data=st.data())
def test_fuzz_products(data, tmp_path_factory, family):
    _run(data, tmp_path_factory.mktemp("fuzz"), ["jvp", "vjp"], family)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@MANY
@given(data=st.data())
def test_fuzz_jacobian_many(data, tmp_path_factory, family):
    _run(data, tmp_path_factory.mktemp("fuzz"), ["jacobian", "jacobian_fn"], family)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@PRODUCTS_MANY
@given(data=st.data())
def test_fuzz_products_many(data, tmp_path_factory, family):
    _run(data, tmp_path_factory.mktemp("fuzz"), ["jvp", "vjp"], family)


class _Steered:
    """`data` with some draws fixed: `fixed` by label, and every "is it invalid?" draw of
    `_choose` (labels ending in "?") answered "valid". The rest is drawn by hypothesis."""

    def __init__(self, data, fixed: dict):
        self.data, self.fixed = data, fixed

    def draw(self, strategy, label=None):
        if label in self.fixed:
            return self.fixed[label]
        if label is not None and label.endswith("?"):
            return 0
        return self.data.draw(strategy, label=label)


# Valid calls the hypothesis draws above rarely make (derandomized, they start from the first
# option of each draw: float32, C order, NumPy, batch 1, `jacobian`), each once per run: (family,
# dtype, layout, framework, function, batch). A callable computes in its input's dtype, a Keras
# model in its own.
STEERED = [
    ("callable", "float16", "fortran", "numpy", "jacobian", 3),
    ("callable", "bfloat16", "readonly", "numpy", "jvp", 2),
    ("callable", "float64", "negative", "torch", "vjp", 3),
    ("dense64", "float64", "fortran", "jax", "jacobian_fn", 2),
    ("dense64", "float64", "readonly", "numpy", "vjp", 3),
    ("mlp", "float16", "readonly", "tensorflow", "jacobian", 2),
    ("conv2d", "bfloat16", "fortran", "numpy", "jacobian_fn", 3),
    ("multi_dict", "float64", "fortran", "torch_grad", "jvp", 2),
    ("rank3", "int32", "readonly", "jax", "jacobian", 3),
]


@pytest.mark.parametrize("family,dtype,layout,framework,fn,batch", STEERED)
@settings(max_examples=1, **COMMON)
@given(data=st.data())
def test_fuzz_valid_dtypes_and_layouts(
    data, tmp_path_factory, family, dtype, layout, framework, fn, batch
):
    fixed = {
        "function": fn,
        "batch": batch,
        "dtype": dtype,
        "other dtype?": 99,  # keep the drawn dtype
        "layout": layout,
        "framework": framework,
        "shape": "none",
        "non-finite": "none",
        "strategy": "auto",  # "replicate" is refused with per_sample=False or training=True
    }
    fns = ["jacobian", "jacobian_fn", "jvp", "vjp"]
    # a valid call: `_run` fails unless the result equals the closed form
    _run(_Steered(data, fixed), tmp_path_factory.mktemp("fuzz"), fns, family)


@pytest.mark.parametrize("options", [dict(mode="forward"), dict(strategy="autotune")])
def test_tiling_is_not_used_on_a_sample_mixing_model_at_batch_1(options):
    """At batch 1 the coupling probe has no second sample; "replicate" (the default in forward mode
    on TensorFlow and PyTorch) tiles the batch, which a sample-mixing model would see: jacket
    probes two copies and takes another strategy (it gave J = (1 - 1/k) I instead of 0)."""
    x = np.arange(3, dtype="float32")[None] / 3.0
    J = to_numpy(jacket.jacobian(_centre, x, **options))
    np.testing.assert_allclose(J, np.zeros((1, 3, 3)), atol=1e-6)  # y = z - mean(z) = 0 at B=1
    assert jacket.jacobian_fn(_centre, **options).plan(x).strategy != "replicate"
    with pytest.raises(jacket.JacketValueError, match="strategy='replicate' tiles the batch"):
        jacket.jacobian(_centre, x, strategy="replicate")


def test_masked_values_are_refused():
    """A masked array with masked values is refused (NumPy would hand over the hidden data);
    without masked values it is an ordinary array."""
    fam = _family("dense")
    x = np.ma.masked_array(np.ones((2, 4), "float32"), mask=np.zeros((2, 4), bool))
    J = to_numpy(jacket.jacobian(fam.model, x))
    np.testing.assert_allclose(J, np.stack([fam.jac([x.data])[0][0][b, :, b] for b in range(2)]))
    x.mask[1, 2] = True
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(fam.model, x)
    _assert_library_message(info.value, [Fault("masked", ("x",), ("1 masked value",))])


def test_hang_guard_fails_a_hang():
    """The guard itself: a call that never returns ends in `Hang`, not a stuck run."""
    import time

    with pytest.raises(Hang):
        with _hang_guard(0.2):
            time.sleep(5)
