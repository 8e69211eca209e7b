"""JAX primitives: `jax.vjp`, `jax.jvp`, `jax.vmap`, `jax.jit` over a stateless model call."""

from __future__ import annotations

import jax
from keras.src.backend.common.stateless_scope import in_stateless_scope

from .memory import cpu_description

NAME = "jax"
EAGER = False  # kernels are traced and compiled once per signature
# The planner's candidate strategies, in the order it tries them (NOTE: [Measured plans]): `vmap`
# over the pullbacks, except through max pooling and depthwise convolutions, whose batched backward
# passes are slow (MobileNetV3Small 32x32, batch 16: `lax.map` 365 ms, vmap 6.3 s; MobileNetV2
# 64x64 batch 8: 304 ms against 2062). "replicate" is left out of "auto": it was the fastest on
# none of 21 measured cases (keras.applications, attention, recurrent and image-to-image models at
# batch 1-32), and its compile was the slowest (MobileNetV3Small: 151 s against 26 s for vmap);
# it runs when asked for.
PRIOR = {
    "other": ("vmap", "loop"),
    "max_pooling": ("loop", "vmap"),
    "depthwise": ("loop", "vmap"),
}


def compile(kernel, model, training, make_call):
    """`jax.jit` over `kernel(call, *args)`, the model's variables passed as arguments.

    Passing the weights as arguments (through `keras.StatelessScope`) keeps the trace valid when the
    weights change, and leaves the model itself untouched.
    """
    if not hasattr(model, "variables"):
        return jax.jit(lambda *args: kernel(model, *args))

    def pure(state, *args):
        return kernel(make_call(model, training, state), *args)

    jitted = jax.jit(pure)
    variables = list(model.variables)  # the model is built by now; the values are read per call

    def call(*args):
        # `Variable.value` costs ~2 us each (autocast and scope lookups); outside a scope it is
        # the stored array itself, read directly (a per-call cost that matters on small models)
        if in_stateless_scope():
            return jitted([v.value for v in variables], *args)
        return jitted([v._value for v in variables], *args)

    return call


def device_description() -> str:
    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else cpu_description()


def block_until_ready(tree) -> None:
    jax.block_until_ready(tree)


def as_input(array, dtype):
    return array  # `jax.jit` takes NumPy arrays directly, without a dispatch of its own


def vjp(f, xs, cts):
    _, pullback = jax.vjp(f, list(xs))
    return pullback(list(cts))[0]


def jvp(f, xs, ts):
    return jax.jvp(f, (list(xs),), (list(ts),))[1]


JVPS = {"native": jvp}
TRUSTED_JVP = True  # `jax.jvp` raises where a primitive has no forward rule, never gives zeros


def linearize_vjp(f, xs):
    ys, pullback = jax.vjp(f, list(xs))
    return ys, lambda cts: pullback(list(cts))[0]


def vmap(fn, stacked):
    return jax.vmap(lambda args: fn(list(args)))(list(stacked))


def loop(fn, stacked):
    return jax.lax.map(lambda args: fn(list(args)), list(stacked))
