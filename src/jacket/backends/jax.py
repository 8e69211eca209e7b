"""JAX primitives: `jax.vjp`, `jax.jvp`, `jax.vmap`, `jax.jit` over a stateless model call."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from keras.src.backend.common.stateless_scope import in_stateless_scope

from .memory import cpu_description

NAME = "jax"
EAGER = False  # kernels are traced and compiled once per signature
# the coupling probe's few forward passes, jitted: eagerly, each new op shape compiles (ViT,
# batch 2: 3.2 s eagerly, 0.9 s jitted)
FEW_PASSES_EAGERLY = False
# The planner's candidate strategies, in the order it tries them (NOTE: [Measured plans]): `vmap`
# over the pullbacks, except through max pooling and depthwise convolutions, whose batched backward
# passes are slow (MobileNetV3Small 32x32, batch 16: `lax.map` 365 ms, vmap 6.3 s; MobileNetV2
# 64x64 batch 8: 304 ms against 2062). "replicate" is left out of "auto": it was the fastest on
# none of 21 measured cases (keras.applications, attention, recurrent and image-to-image models at
# batch 1-32), and its compile was the slowest (MobileNetV3Small: 151 s against 26 s for vmap);
# it runs when asked for.
# `jacket.engine.rules`, where XLA's batched pullbacks are slow (`benchmarks/layer_survey.py`,
# batch 8, 16 cotangents): max pooling as windows and a one-hot mask (2D: 66 ms through
# `lax.reduce_window`, 1.7 ms), depthwise convolutions as shifted slices (3x3: 157-481 ms, 1.6-2.0
# ms), a convolution of a few input channels as patches and a matmul (seed CNN, batch 32:
# 27.8 ms, 2.9 ms), bilinear up-sampling as two matmuls (a U-Net at batch 1, forward mode: 338 ms,
# 424 ms without) and attention through its explicit einsums (a ViT at batch 2: 16.4 ms, 18.8 ms)
LAYER_RULES = (
    "max_pooling", "depthwise_slices", "conv_patches", "bilinear_matrices", "explicit_attention",
)  # fmt: skip
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


def host_view(tensor):
    """A NumPy view of `tensor` where it lives in host memory (no copy), else None."""
    if all(device.platform == "cpu" for device in tensor.devices()):
        return np.asarray(tensor)
    return None


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


# ---- training
# Derivatives that are part of a loss (`jacket.training`): `jax.vjp` and `jax.jvp` composed inside
# the traced step (Keras's `compute_loss_and_updates` under `jax.value_and_grad`), closing over the
# traced weights that a `keras.StatelessScope` hands the model, so the outer gradient flows through
# them. NOTE: [Derivatives inside a training step] in `jacket.training._derivatives`.

TRAIN_FORWARD = True  # `jax.jvp` is native: few inputs and second derivatives go forward


def train_linearize(f, xs):
    """`(ys, pullback)`: one forward pass; `pullback(cts)` may be called many times (a None
    cotangent: zeros for that output)."""
    ys, pullback = jax.vjp(f, list(xs))

    def pull(cts):
        return pullback([jax.numpy.zeros_like(y) if c is None else c for y, c in zip(ys, cts)])[0]

    return ys, pull


def train_jvp(f, xs, ts):
    """`(ys, df(xs) ts)`; nestable (`jax.jvp` of a `jax.jvp`)."""
    ys, tangents = jax.jvp(f, (list(xs),), (list(ts),))
    return ys, tangents


def train_map(fn, stacked):
    """`fn` over axis 0 of a list of tensors, results stacked (`jax.vmap`)."""
    return jax.vmap(lambda args: fn(list(args)))(list(stacked))


# ---- second order

SECOND_ORDER_MODES = ("forward", "reverse")
SECOND_ORDER_STRATEGY = "vmap"


def vjp_differentiable(f, xs, cts):
    """`vjp`, whose result JAX differentiates again with respect to `xs` as it is."""
    return vjp(f, xs, cts)


def jet2(f, xs, ts):
    """`(ys, J t, f''[t, t])`: the value, first and second directional derivatives of `f` at `xs`
    along `ts` (a JVP of a JVP)."""
    xs, ts = list(xs), list(ts)

    def first(primals):
        return jax.jvp(f, (primals,), (ts,))

    (ys, dys), (_, d2ys) = jax.jvp(first, (xs,), (ts,))
    return list(ys), list(dys), list(d2ys)


def has_float64() -> bool:
    """Whether float64 can be computed: with `JAX_ENABLE_X64=1`, or in `float64_scope`."""
    return bool(jax.config.read("jax_enable_x64")) or hasattr(jax, "enable_x64")


def float64_scope():
    """A scope where float64 is float64 (`jax.enable_x64`), where JAX_ENABLE_X64 is not set."""
    if jax.config.read("jax_enable_x64") or not hasattr(jax, "enable_x64"):
        return contextlib.nullcontext()
    return jax.enable_x64(True)


def square_sum(g):
    """`sum(g**2, axis=0)`: unrolled into adds that XLA fuses into one loop (its reduction over
    the leading axis ran 25 to 75 times slower here: 24.9 ms against 0.32 ms for `(3, 4096, 64)`
    on 2 CPU cores)."""
    if g.shape[0] > 512:
        return jax.numpy.sum(jax.numpy.square(g), axis=0)
    total = jax.numpy.square(g[0])
    for j in range(1, g.shape[0]):
        total = total + jax.numpy.square(g[j])
    return total


def second_order_scope():
    """A scope in which Keras's layers have right second derivatives: everywhere, here."""
    return contextlib.nullcontext()
