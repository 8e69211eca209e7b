"""One module per Keras backend, each with the same few primitives; the only place a framework is
imported.

Every backend module defines:

- `NAME`: the Keras backend name.
- `EAGER`: True where kernels run as Python each call (PyTorch): constants are then made once and
  kept, and checks that a compiler would fuse into the kernel run before it instead.
- `compile(kernel, model, training, make_call)`: a callable `(*args) -> kernel(call, *args)`, compiled and traced
  once per argument signature (`tf.function`, `jax.jit`; PyTorch runs eagerly). `call` maps the model's
  input structure to its output structure and reads the model's current weights on every run; it is
  `make_call(model, training, state)` (the engine's, passed in: backends import nothing above them).
- `as_input(array, dtype)`: a NumPy array as a kernel argument of that dtype, as cheaply as the
  framework allows (the per-call fast path of `jacket.engine`).
- `vjp(f, xs, cts)`: `cts^T df(xs)`: one reverse pass; `f` maps a list of tensors to a list of tensors.
- `jvp(f, xs, ts)`: `df(xs) ts`: one forward-mode pass.
- `JVPS`: the ways this backend has of computing `jvp`, by name, in the order to try them.
- `TRUSTED_JVP`: True where `jvp` raises rather than returns a wrong tangent; where False, the
  engine checks each of `JVPS` against reverse mode before using it (NOTE: [Checked forward mode] in
  `jacket.engine.probes`).
- `linearize_vjp(f, xs)`: `(ys, pullback)`, one forward pass whose pullback may be called many times.
- `vmap(fn, stacked)`: `fn` mapped over axis 0 of a list of tensors, results stacked on axis 0.
- `loop(fn, stacked)`: the same, one element after the other (unrolled, `lax.map`, a Python loop).
- `PRIOR`: by kind of model (`jacket.engine.model.model_kind`, "other" for the rest), the strategies
  ("replicate", "vmap", "loop") the planner tries, in order: the first is what a first call runs,
  the others are measured on the next calls (`jacket.engine.tuning`); one left out runs only when
  forced.
- `device_description()`: the device kernels run on, as the plan cache keys plans by it.
- `block_until_ready(tree)`: wait until results are computed (JAX dispatches asynchronously, and
  accelerators run behind the host), so that timings measure the work.

Jacobians, chunking, coupling probes and everything above them are written once on these
(`jacket.engine`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import JacketError

_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def current() -> ModuleType:
    """The backend module for the active Keras backend (`keras.backend.backend()`)."""
    import keras

    name = keras.backend.backend()
    if name not in _EXTRAS:
        raise JacketError(
            f"jacket supports the Keras backends {sorted(_EXTRAS)}. Received: KERAS_BACKEND={name!r}. "
            "Set KERAS_BACKEND to one of them."
        )
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as error:  # pragma: no cover - depends on what is installed
        raise JacketError(
            f"The '{name}' backend needs {_EXTRAS[name]}: pip install \"jacket[{name}]\" ({error})"
        ) from error
