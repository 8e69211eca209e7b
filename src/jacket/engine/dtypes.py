"""float64 as the model means it: jacket's own passes run without Keras's float64-to-float32 demotion.

NOTE: [Keras and float64]
Keras's type promotion (`keras.backend.result_type`) maps float64 to float32 on every backend but
TensorFlow (its table `BIT64_TO_BIT32_DTYPE`), even for a single float64 operand. So a float64
model runs some of its ops in float32 there: on JAX `Activation("tanh", dtype="float64")` returns
float32, and an LSTM's or BatchNormalization's activations are rounded to float32; on PyTorch
`Dense(dtype="float64")` multiplies in float32. Its Jacobian is then float32-grade (about 1e-7
relative) although the model, its weights, its inputs and the result are all float64.

jacket's passes (every compiled kernel and eager call goes through `jacket.engine.model.make_call`)
therefore run a model that computes in float64 with that demotion lifted, so its Jacobian is the
float64 derivative of the model as written. What changes is confined to the call:

- Only jacket's own evaluations, and only of Keras layers and models that have float64 in them (a
  float64 layer or variable): with no float64 operand Keras's promotion never yields float64, so
  the lift would change nothing for other models anyway. A plain callable runs as given: on JAX its
  compiled kernels call it directly, not through `make_call`, and its eager and compiled passes
  must agree on the output dtype.
- Only the current thread (and task): the lift is a `ContextVar`, read by the table's lookup.
  To make that possible the table is replaced, on first use, by a `dict` subclass with the same
  entries whose `get("float64")` (Keras's only read of it, in `_lattice_result_type`) answers
  "float64" while the lift is on; otherwise it answers exactly as the original table. Should Keras
  read it another way, the lift stops working and test_float64_is_kept_where_keras_demotes_it
  says so.
- What Keras does outside jacket is unchanged: the user's own `model(x)` still demotes.

Ops that cast to float32 by their own code, not through the promotion table, stay float32: JAX's
`dot_product_attention` always takes its softmax in float32, so a float64 `MultiHeadAttention`
on JAX stays float32-grade inside, in jacket's passes as in the user's.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import keras

_LIFTED: contextvars.ContextVar[bool] = contextvars.ContextVar("jacket_keep_float64", default=False)


class _PromotionTable(dict):
    """Keras's `BIT64_TO_BIT32_DTYPE`, whose lookup of "float64" by `get` (how Keras reads it)
    answers "float64" while lifted. Its stored entries never change: code that saves and restores
    an entry (the tests' oracles) reads and writes them as before."""

    def get(self, key, default=None):
        if key == "float64" and _LIFTED.get():
            return "float64"
        return super().get(key, default)


def _install() -> bool:
    """Put `_PromotionTable` in place of Keras's table; False where this Keras has no such table."""
    try:
        from keras.src.backend.common import dtypes
    except ImportError:  # pragma: no cover - a Keras without that module
        return False
    table = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    if isinstance(table, _PromotionTable):
        return True
    if not isinstance(table, dict):  # pragma: no cover - another Keras
        return False
    dtypes.BIT64_TO_BIT32_DTYPE = _PromotionTable(table)
    return True


@contextlib.contextmanager
def keep_float64():
    """Keras keeps float64 in this thread while inside (NOTE: [Keras and float64]); nestable."""
    if keras.backend.backend() == "tensorflow" or not _install():
        yield  # TensorFlow keeps float64 already
        return
    token = _LIFTED.set(True)
    try:
        yield
    finally:
        _LIFTED.reset(token)


_FLOAT64_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def computes_in_float64(model) -> bool:
    """True when a Keras layer or model has a float64 layer or variable in it (kept per model)."""
    try:
        return _FLOAT64_MODELS[model]
    except (KeyError, TypeError):
        pass
    layers = model._flatten_layers(include_self=True, recursive=True)
    found = any(
        keras.backend.standardize_dtype(getattr(layer, "compute_dtype", None) or "float32")
        == "float64"
        for layer in layers
    ) or any(keras.backend.standardize_dtype(v.dtype) == "float64" for v in model.variables)
    try:
        _FLOAT64_MODELS[model] = found
    except TypeError:  # pragma: no cover - an object that takes no weak reference
        pass
    return found
