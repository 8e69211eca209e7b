"""TensorFlow primitives: `tf.GradientTape`, `tf.autodiff.ForwardAccumulator`, `tf.function`."""

from __future__ import annotations

import tensorflow as tf

from .._model import make_call

NAME = "tensorflow"
# Per-sample seeds through one forward pass and unrolled pullbacks beat both the replicated batch and
# `tf.vectorized_map` (what `batch_jacobian` uses) on convolutional models; see `jacket._plan`.
PER_SAMPLE_STRATEGY = "loop"
_ZERO = tf.UnconnectedGradients.ZERO


def compile(kernel, model, training):
    """`tf.function` over `kernel(call, *args)`; it reads the model's variables at run time."""
    stateless = training and hasattr(model, "variables")

    def run(*args):
        state = [v.value for v in model.variables] if stateless else None
        return kernel(make_call(model, training, state), *args)

    return tf.function(run, reduce_retracing=False)


def vjp(f, xs, cts):
    with tf.GradientTape() as tape:
        for x in xs:
            tape.watch(x)
        ys = f(xs)
    return tape.gradient(ys, xs, output_gradients=cts, unconnected_gradients=_ZERO)


def jvp(f, xs, ts):
    with tf.autodiff.ForwardAccumulator(xs, ts) as accumulator:
        ys = f(xs)
    return [accumulator.jvp(y, unconnected_gradients=_ZERO) for y in ys]


def linearize_vjp(f, xs):
    tape = tf.GradientTape(persistent=True)
    with tape:
        for x in xs:
            tape.watch(x)
        ys = f(xs)

    def pullback(cts):
        return tape.gradient(ys, xs, output_gradients=cts, unconnected_gradients=_ZERO)

    return ys, pullback


def vmap(fn, stacked):
    return tf.vectorized_map(lambda args: fn(list(args)), list(stacked))


def loop(fn, stacked):
    """`fn` over axis 0, unrolled into the graph (the plan keeps the count small)."""
    results = [fn([s[i] for s in stacked]) for i in range(int(stacked[0].shape[0]))]
    return [tf.stack([r[j] for r in results]) for j in range(len(results[0]))]
