"""One module per Keras backend, each with the same few primitives; the only place a framework is
imported.

Every backend module defines:

- `NAME`: the Keras backend name.
- `EAGER`: True where kernels run as Python each call (PyTorch): constants are then made once and
  kept, and checks that a compiler would fuse into the kernel run before it instead.
- `FEW_PASSES_EAGERLY`: True where a few forward passes (the coupling probe's) cost less run
  eagerly than traced and compiled once.
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
- `LAYER_RULES`: the layer rules (`jacket.engine.rules.RULES`, by name) that jacket's own passes
  run instead of a layer's `call`, those measured to give a faster batched pullback here (NOTE:
  [Layer rules] in `jacket.engine.rules`).
- `device_description()`: the device kernels run on, as the plan cache keys plans by it.
- `host_view(tensor)`: a NumPy view of a tensor that lives in host memory (no copy), else None.
- `block_until_ready(tree)`: wait until results are computed (JAX dispatches asynchronously, and
  accelerators run behind the host), so that timings measure the work.

Second order (appended at the end of each module):

- `vjp_differentiable(f, xs, cts)`: `vjp` whose result can be differentiated again with respect to
  `xs` (JAX's and TensorFlow's `vjp` already are; PyTorch keeps the backward graph and leaves `xs`
  attached): the gradient that Hessian-vector products differentiate.
- `jet2(f, xs, ts)`: `(ys, J t, f''[t, t])`, the value and the first and second directional
  derivatives of `f` along `ts` (a JVP of a JVP; by reverse passes alone on PyTorch, and on
  TensorFlow where its forward accumulators cannot trace a layer): the forward Laplacian's rule
  for layers without one of their own.
- `square_sum(g)`: `sum(g**2, axis=0)`, the cheapest way here (the forward Laplacian's
  `sum_j dh_j^2`).
- `SECOND_ORDER_MODES`: the forms of a Hessian-vector product worth measuring here, the first
  the one to use unmeasured: "forward" (forward-over-reverse) and "reverse"
  (reverse-over-reverse).
- `has_float64()`, `float64_scope()`: whether float64 can be computed, and a context in which it
  is (JAX without `JAX_ENABLE_X64=1`: `jax.enable_x64`): `jacket.check`'s float64 reference.
- `SECOND_ORDER_STRATEGY`: how the pairs of one Hessian pass are batched ("replicate", "vmap",
  "loop"), measured per backend (`jacket.engine.hessian`).
- `second_order_scope()`: a context in which Keras's layers have right second derivatives, where
  second-order kernels are traced (TensorFlow: `tf.nn.moments` without its `stop_gradient`).

Jacobians, chunking, coupling probes and everything above them are written once on these
(`jacket.engine`).

Training (the `# ---- training` section of each module, for `jacket.training`): derivatives that
run inside the user's own traced step and stay differentiable with respect to the weights; nothing
here compiles or caches (NOTE: [Derivatives inside a training step]):

- `TRAIN_FORWARD`: True where forward mode is native and nests under the step's gradient (JAX):
  second derivatives then go forward over forward; else reverse over reverse (TensorFlow, whose
  nested `ForwardAccumulator`s lose weight gradients under a tape; PyTorch, whose JVP is two
  reverse passes).
- `train_linearize(f, xs)`: `(ys, pullback)`, one forward pass; `pullback(cts)` may be called many
  times (a None cotangent leaves its output out) and its result is differentiable again.
- `train_jvp(f, xs, ts)`: `(ys, tangents)`, differentiable.
- `train_map(fn, stacked)`: `fn` over axis 0 of a list of tensors, results stacked (`jax.vmap`; a
  loop elsewhere).
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
