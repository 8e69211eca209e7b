"""TensorFlow primitives: `tf.GradientTape`, `tf.autodiff.ForwardAccumulator`, `tf.function`."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from .memory import cpu_description

NAME = "tensorflow"
EAGER = False  # kernels are traced and compiled once per signature
# the coupling probe's few forward passes, eagerly: no trace (ViT, batch 2: 0.38 s eagerly, 1.05 s
# through `tf.function`)
FEW_PASSES_EAGERLY = True
# The planner's first candidate strategies, in order (NOTE: [Measured plans]): `tf.vectorized_map`
# was the fastest or within 1.3x of it on most keras.applications models at batch 2 and 16 here
# (2 CPU cores); the unrolled loop is the slowest to compile (one pullback traced per seed).
# A recurrent layer's while_loop is slow to vectorise (GRU, batch 2: 9.4 s to compile against 4.1 s
# for one pass over the replicated batch), so recurrent models start from that pass.
PRIOR = {"other": ("vmap", "replicate", "loop"), "recurrent": ("replicate", "loop", "vmap")}
# `jacket.engine.rules`: recurrent layers unrolled, whose batched pullbacks (pfor) beat the
# while_loop's (`benchmarks/layer_survey.py`, GRU(32), batch 8, 16 cotangents: 6.5-7.9 ms through
# the while_loop, 4.5-5.1 ms unrolled; LSTM(32) 6.1-6.6 ms, 3.6-3.8 ms); jacket's default on a
# bidirectional GRU at batch 16: 8.6 ms, 11.5 ms with the rule off (`benchmarks/anchors.py`)
LAYER_RULES = ("unrolled",)
_ZERO = tf.UnconnectedGradients.ZERO
# NOTE: [Unchecked forward mode on TensorFlow]
# `ForwardAccumulator` builds a JVP from each op's gradient function, differentiated again; where
# that second derivative is declared missing (`ops.NotDifferentiable("ResizeBilinearGrad")`, the
# backward op of `UpSampling2D(interpolation="bilinear")` and `Resizing(..., "bilinear")`), it
# returns zeros without an error, and so does the double-VJP form. `jacket._api` therefore tries
# these candidates in order and keeps the first that passes a dot-product test against reverse
# mode (`TRUSTED_JVP = False`); when none does, forward mode is computed from reverse passes.


def compile(kernel, model, training, make_call):
    """`tf.function` over `kernel(call, *args)`; it reads the model's variables at run time."""
    stateless = training and hasattr(model, "variables")

    def run(*args):
        state = [v.value for v in model.variables] if stateless else None
        return kernel(make_call(model, training, state), *args)

    function = tf.function(run, reduce_retracing=False)
    concrete = {}

    def call(*args):
        # NOTE: [Calling a traced graph] the traced graph, looked up by the arguments' shapes and
        # dtypes, called on its flat tensors: this skips `tf.function`'s dispatch and the concrete
        # function's binding of structured arguments, most of a small model's per-call time (the
        # seed MLP's Hessian at batch 256, `benchmarks/second_order.py` hess_mlp: 441 us through
        # `tf.function`, 339 us through the concrete function, 232 us flat; TensorFlow 2.21)
        flat = tf.nest.flatten(args)
        key = tuple((tuple(t.shape), t.dtype) for t in flat)
        found = concrete.get(key)
        if found is None:
            graph = function.get_concrete_function(*args)
            flat_call = getattr(graph, "_call_flat", None)  # (TensorFlow's own, since 2.0)
            found = concrete[key] = (graph, flat_call, graph.captured_inputs)
            return graph(*args)
        graph, flat_call, captured = found
        if flat_call is None or not all(isinstance(t, tf.Tensor) for t in flat):
            return graph(*args)  # arguments to convert first
        return flat_call(flat, captured)  # (structured as the graph's outputs)

    return call


def device_description() -> str:
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else cpu_description()


def block_until_ready(tree) -> None:
    """Wait for results: TensorFlow's graph functions return when computed on the CPU; on a GPU
    the devices are synchronised."""
    if tf.config.list_logical_devices("GPU"):
        tf.test.experimental.sync_devices()


def host_view(tensor):
    """A NumPy view of `tensor` where it lives in host memory (no copy), else None."""
    if "GPU" in tensor.device.upper() or "TPU" in tensor.device.upper():
        return None
    return tensor.numpy()


def as_input(array, dtype):
    return tf.convert_to_tensor(array)  # already of `dtype` (jacket._api casts it in NumPy)


def vjp(f, xs, cts):
    with tf.GradientTape() as tape:
        for x in xs:
            tape.watch(x)
        ys = f(xs)
    return tape.gradient(ys, xs, output_gradients=cts, unconnected_gradients=_ZERO)


def jvp(f, xs, ts):
    """Forward mode where TensorFlow has it; the transpose of a VJP where it has not.

    `tf.autodiff.ForwardAccumulator` fails to trace some layers (the `while_loop` of an LSTM, whose
    TensorLists it cannot carry tangents through); there the JVP is the derivative of a VJP with
    respect to its cotangent, `J v = d/du <u^T J, v>`, which needs reverse mode only. Through other
    ops it gives zeros without an error (see `JVPS`): `jacket._api` checks it before use.
    """
    try:
        with tf.autodiff.ForwardAccumulator(xs, ts) as accumulator:
            ys = f(xs)
        return [accumulator.jvp(y, unconnected_gradients=_ZERO) for y in ys]
    except (TypeError, ValueError, NotImplementedError, LookupError):
        return jvp_by_double_vjp(f, xs, ts)


def jvp_by_double_vjp(f, xs, ts):
    """`J v = d/du <u^T J, v>`: the transpose of a VJP, by reverse mode only."""
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            for x in xs:
                inner.watch(x)
            ys = f(xs)
        us = [tf.zeros_like(y) for y in ys]
        for u in us:
            outer.watch(u)
        grads = inner.gradient(ys, xs, output_gradients=us, unconnected_gradients=_ZERO)
    return outer.gradient(grads, us, output_gradients=list(ts), unconnected_gradients=_ZERO)


JVPS = {"native": jvp, "double_vjp": jvp_by_double_vjp}
TRUSTED_JVP = False


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
    """`fn` over axis 0: unrolled into the graph up to `_UNROLL` items, a `tf.while_loop` beyond.

    Unrolled pullbacks are the fastest at run time (seed CNN, batch 32, 10 seeds: 108 ms against
    205 ms in a while_loop here), but each is traced: 32 of them made the first call of a 32x32
    image-to-image Jacobian take 2.7x as long as the while_loop's, which runs as fast there.
    """
    stacked = list(stacked)
    n = int(stacked[0].shape[0])
    if n <= _UNROLL:
        results = [fn([s[i] for s in stacked]) for i in range(n)]
        return [tf.stack([r[j] for r in results]) for j in range(len(results[0]))]
    first = fn([s[0] for s in stacked])
    arrays = [tf.TensorArray(r.dtype, size=n, element_shape=r.shape).write(0, r) for r in first]

    def body(i, arrays):
        results = fn([tf.gather(s, i) for s in stacked])
        return i + 1, [a.write(i, r) for a, r in zip(arrays, results)]

    _, arrays = tf.while_loop(
        lambda i, _: i < n, body, (tf.constant(1), arrays), parallel_iterations=_UNROLL
    )
    return [a.stack() for a in arrays]


_UNROLL = 16


# ---- training
# Derivatives that are part of a loss (`jacket.training`): they run inside whatever TensorFlow is
# tracing and recording (Keras's `train_step` under its `GradientTape`, or a user's own tape), so
# their results stay differentiable with respect to everything `f` reads, the weights included.
# Nothing here compiles or caches: the enclosing `tf.function` does. NOTE: [Derivatives inside a
# training step] in `jacket.training._derivatives`.

# Measured here (TensorFlow 2.21): one `ForwardAccumulator` inside the step's tape gives the right
# weight gradient, but an accumulator nested in another (forward over forward, for a second
# derivative) under a tape does not: eagerly it fails ("returned too few gradients"), in a
# `tf.function` the gradient of the last Dense kernel comes back None. So Jacobians and second
# derivatives go reverse (over reverse: nested tapes, as TensorFlow's PINN codes do), and
# `train_jvp` serves single JVPs only.
TRAIN_FORWARD = False


def train_linearize(f, xs):
    """`(ys, pullback)`: one forward pass; `pullback(cts)` (`cts^T df(xs)`) may be called many
    times (a None cotangent leaves its output out), and any enclosing tape records it (a
    persistent tape inside the step's tape)."""
    tape = tf.GradientTape(persistent=True)
    with tape:
        for x in xs:
            tape.watch(x)
        ys = f(xs)

    def pullback(cts):
        pairs = [(y, c) for y, c in zip(ys, cts) if c is not None]
        return tape.gradient(
            [y for y, _ in pairs],
            xs,
            output_gradients=[c for _, c in pairs],
            unconnected_gradients=_ZERO,
        )

    return ys, pullback


def train_jvp(f, xs, ts):
    """`(ys, df(xs) ts)` by `ForwardAccumulator`, recorded by any enclosing tape (one level: see
    `TRAIN_FORWARD`). Where the accumulator cannot trace `f` (an LSTM's `while_loop`), the double
    VJP, reverse mode only."""
    try:
        with tf.autodiff.ForwardAccumulator(xs, ts) as accumulator:
            ys = f(xs)
        return ys, [accumulator.jvp(y, unconnected_gradients=_ZERO) for y in ys]
    except (TypeError, ValueError, NotImplementedError, LookupError):
        with tf.GradientTape(persistent=True) as outer:
            ys, pullback = train_linearize(f, xs)
            us = [tf.zeros_like(y) for y in ys]
            for u in us:
                outer.watch(u)
            grads = pullback(us)
        return ys, outer.gradient(grads, us, output_gradients=list(ts), unconnected_gradients=_ZERO)


def train_map(fn, stacked):
    """`fn` over axis 0 of a list of tensors, results stacked: unrolled into the graph (the maps
    of `jacket.training` run over a model's outputs or inputs, a few dozen at most)."""
    stacked = list(stacked)
    results = [fn([s[i] for s in stacked]) for i in range(int(stacked[0].shape[0]))]
    return [tf.stack([r[j] for r in results]) for j in range(len(results[0]))]


# ---- second order

SECOND_ORDER_MODES = ("reverse",)
SECOND_ORDER_STRATEGY = "vmap"


def vjp_differentiable(f, xs, cts):
    """`vjp`, whose result an enclosing tape or forward accumulator differentiates again."""
    return vjp(f, xs, cts)


def jet2(f, xs, ts):
    """`(ys, J t, f''[t, t])`: the value, first and second directional derivatives of `f` at `xs`
    along `ts`, by two nested `ForwardAccumulator`s; where they cannot trace a layer (an LSTM's
    while_loop), by reverse passes only (`_jet2_by_reverse`)."""
    xs, ts = list(xs), list(ts)
    try:
        with tf.autodiff.ForwardAccumulator(xs, ts) as outer:
            with tf.autodiff.ForwardAccumulator(xs, ts) as inner:
                ys = f(xs)
            dys = [inner.jvp(y, unconnected_gradients=_ZERO) for y in ys]
        d2ys = [outer.jvp(d, unconnected_gradients=_ZERO) for d in dys]
        return list(ys), dys, d2ys
    except (TypeError, ValueError, NotImplementedError, LookupError):
        return _jet2_by_reverse(f, xs, ts)


def _jet2_by_reverse(f, xs, ts):
    """`jet2` by tapes alone: with `u` a zero cotangent, `r = <J^T u, t> = u^T J t`; `J t` is
    `dr/du`, and `f''[t, t]` is `d/du <dr/dx, t>`."""
    with tf.GradientTape(persistent=True) as by_u:
        with tf.GradientTape() as by_x:
            for x in xs:
                by_x.watch(x)
            with tf.GradientTape() as inner:
                for x in xs:
                    inner.watch(x)
                ys = f(xs)
            us = [tf.zeros_like(y) for y in ys]
            for u in us:
                by_u.watch(u)
            grads = inner.gradient(ys, xs, output_gradients=us, unconnected_gradients=_ZERO)
            r = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, ts)])
        curvature = by_x.gradient(r, xs, unconnected_gradients=_ZERO)
        z = tf.add_n([tf.reduce_sum(h * t) for h, t in zip(curvature, ts)])
    first = by_u.gradient(r, us, unconnected_gradients=_ZERO)
    second = by_u.gradient(z, us, unconnected_gradients=_ZERO)
    return list(ys), first, second


def has_float64() -> bool:
    """Whether float64 can be computed (always, here)."""
    return True


def float64_scope():
    """A scope where float64 is float64: everywhere, here."""
    return contextlib.nullcontext()


def square_sum(g):
    """`sum(g**2, axis=0)`."""
    return tf.reduce_sum(tf.square(g), axis=0)


# NOTE: [Moments with a second derivative]
# `tf.nn.moments` takes the variance around `stop_gradient(mean)`: its first derivative is right
# (the variance does not move with the mean at the mean) but its second derivatives are not, in
# reverse and forward mode alike. Keras normalises with it (LayerNormalization, GroupNormalization,
# `keras.ops.moments`), so every Hessian through those layers came out wrong on TensorFlow (the
# Laplacian of a model with LayerNormalization off by 40% against central differences), nested
# `GradientTape`s included. Second-order kernels are traced in `second_order_scope`, where
# `tf.nn.moments` is the same statistics without the `stop_gradient`; the scope ends with the trace,
# and nothing else sees it.


def _moments(x, axes, shift=None, keepdims=False, name=None):
    del shift, name
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


@contextlib.contextmanager
def second_order_scope():
    """A scope in which Keras's layers have right second derivatives (NOTE: [Moments with a
    second derivative])."""
    original = tf.nn.moments
    tf.nn.moments = _moments
    try:
        yield
    finally:
        tf.nn.moments = original
