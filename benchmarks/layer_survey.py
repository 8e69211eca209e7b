"""Batched pullbacks of common Keras layers: the plain layer call against a rewrite (a "layer rule").

A layer rule is another implementation of a layer, written once in `keras.ops`, with the same
forward values but (hopefully) a cheaper batched pullback. Per layer case and per backend this
script measures, at a float32 input `x` of shape `(B, ...)` and `k` random cotangents of the output
shape, all pulled back at the same `x` (one forward pass plus `k` pullbacks):

- plain batched:   the layer's own call, the `k` pullbacks vectorised
  (JAX: `jit(vmap(pullback))` with `jax.vjp`; TensorFlow: `tf.function` of `tape.jacobian` (pfor)
  of the `k` projections `<ct_i, f(x)>`; PyTorch: `torch.func.vmap` over `torch.func.vjp`'s
  pullback, or a loop of `autograd.grad` where vmap fails);
- plain unbatched: the same `k` pullbacks one after the other (JAX: `lax.map`; TensorFlow: an
  unrolled loop of `tape.gradient(output_gradients=...)` in `tf.function`; PyTorch: a loop of
  `autograd.grad`);
- rule batched:    the rewrite, vectorised as the plain batched pullback.

Before timing, the rewrite is checked: the largest forward difference (exactly 0 for selections:
max pooling, nearest up-sampling) and the largest difference of the batched pullbacks relative to
their largest entry (<= 1e-5). Max-pooling cases are checked again on an input full of ties (small
integers): the windowed rewrite picks the first maximum of a window, as the pullbacks of 1D/2D max
pooling do; a reduce-max (GlobalMaxPooling2D) splits the cotangent evenly among tied maxima, hence
its second, "tie-split" rewrite. The verdict is
"rule" when the checks pass and plain batched / rule batched > 1.3. Times: the median of
`--repeats` runs after a warm-up (compilation) run, results materialised as numpy arrays.

One backend per process (Keras fixes it per process):

    KERAS_BACKEND=jax .venv/bin/python benchmarks/layer_survey.py --json bench-results/layer-survey-jax.json
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/layer_survey.py --batch 2 --cases maxpool,depthwise

Options: `--batch` (8), `--k` (16), `--repeats` (7), `--cases` (comma-separated substrings of the
case names, case-insensitive), `--json PATH` (write the rows), `--threads N` (intra-op threads of
TensorFlow and PyTorch; on a busy 2-core machine PyTorch's default threads stall for tens of ms
per op, so use `--threads 1` there; JAX: set `XLA_FLAGS` before starting instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import traceback
from functools import partial
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from jacket.engine import rules

BACKEND = keras.backend.backend()
SPEEDUP_FOR_RULE = 1.3
JAC_RTOL = 1e-5
FWD_RTOL = 1e-5


# ---------------------------------------------------------------------- backend-specific pullbacks


def _jax_pullbacks():
    import jax

    def batched(f):
        def run(x, cts):
            _, pullback = jax.vjp(f, x)
            return jax.vmap(lambda ct: pullback(ct)[0])(cts)

        return jax.jit(run), lambda: "vmap"

    def unbatched(f):
        def run(x, cts):
            _, pullback = jax.vjp(f, x)
            return jax.lax.map(lambda ct: pullback(ct)[0], cts)

        return jax.jit(run)

    def to_numpy(t):
        return np.asarray(jax.block_until_ready(t))

    return batched, unbatched, jax.numpy.asarray, to_numpy


class _WhileLoopFallbacks(logging.Handler):
    """Collects pfor's "Using a while_loop for converting <op>" warnings."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def emit(self, record):
        message = record.getMessage()
        if "while_loop for converting" in message:
            self.ops.add(message.split("converting")[1].split()[0])


def _tf_pullbacks():
    import tensorflow as tf

    fallbacks = _WhileLoopFallbacks()
    logging.getLogger("tensorflow").addHandler(fallbacks)

    def batched(f):
        @tf.function(jit_compile=False)
        def run(x, cts):
            k = cts.shape[0]
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = f(x)
                z = tf.reduce_sum(tf.reshape(cts, (k, -1)) * tf.reshape(y, (1, -1)), axis=1)
            return tape.jacobian(z, x, experimental_use_pfor=True)

        def mode():  # known only after the first (tracing) call
            return "pfor" + (
                f" + while_loop({','.join(sorted(fallbacks.ops))})" if fallbacks.ops else ""
            )

        def traced(x, cts):
            fallbacks.ops.clear()
            return run(x, cts)

        return traced, mode

    def unbatched(f):
        @tf.function(jit_compile=False)
        def run(x, cts):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                y = f(x)
            return tf.stack(
                [tape.gradient(y, x, output_gradients=cts[i]) for i in range(cts.shape[0])]
            )

        return run

    return batched, unbatched, tf.convert_to_tensor, lambda t: t.numpy()


def _torch_pullbacks():
    import torch

    def loop(f, x, cts):
        x = x.detach().requires_grad_(True)
        y = f(x)
        return torch.stack([torch.autograd.grad(y, x, ct, retain_graph=True)[0] for ct in cts])

    def batched(f):
        state = {"mode": "vmap"}

        def vmapped(x, cts):
            _, pullback = torch.func.vjp(f, x)
            return torch.func.vmap(lambda ct: pullback(ct)[0])(cts)

        def run(x, cts):
            if state["mode"] == "vmap":
                try:
                    return vmapped(x, cts)
                except Exception as error:  # noqa: BLE001 - report which path ran
                    state["mode"] = f"loop (vmap failed: {type(error).__name__})"
            return loop(f, x, cts)

        return run, lambda: state["mode"]

    def unbatched(f):
        return lambda x, cts: loop(f, x, cts)

    return batched, unbatched, torch.as_tensor, lambda t: t.detach().cpu().numpy()


def pullbacks():
    """(batched(f) -> (run, mode), unbatched(f) -> run, to_tensor, to_numpy) for this backend."""
    return {"jax": _jax_pullbacks, "tensorflow": _tf_pullbacks, "torch": _torch_pullbacks}[
        BACKEND
    ]()


# ------------------------------------------------------------------------------------- rewrites


def _windows(x, pool, padding="valid", pad_value=0.0):
    """(B, *spatial, C) -> (B, *out_spatial, C, prod(pool)): non-overlapping windows, row-major."""
    spatial = x.shape[1:-1]
    if padding == "same":
        out = [math.ceil(n / p) for n, p in zip(spatial, pool)]
        totals = [o * p - n for n, o, p in zip(spatial, out, pool)]
        pads = [(0, 0)] + [(t // 2, t - t // 2) for t in totals] + [(0, 0)]  # TF's SAME
        if any(totals):
            x = ops.pad(x, pads, constant_values=pad_value)
    else:
        out = [n // p for n, p in zip(spatial, pool)]
        x = x[(slice(None),) + tuple(slice(0, o * p) for o, p in zip(out, pool)) + (slice(None),)]
    b, c, d = x.shape[0], x.shape[-1], len(spatial)
    split = [b]
    for o, p in zip(out, pool):
        split += [o, p]
    x = ops.reshape(x, split + [c])
    # axes: 0, (o_i at 1+2i, p_i at 2+2i), channel at 1+2d
    perm = [0] + [1 + 2 * i for i in range(d)] + [1 + 2 * d] + [2 + 2 * i for i in range(d)]
    x = ops.transpose(x, perm)
    return ops.reshape(x, [b] + out + [c, int(np.prod(pool))])


def _select_max(windows):
    """Max over the last axis as a selection of the first maximum (a one-hot mask, no gradient)."""
    first = ops.argmax(windows, axis=-1)
    mask = ops.stop_gradient(ops.cast(ops.one_hot(first, windows.shape[-1]), "bool"))
    return ops.sum(ops.where(mask, windows, ops.zeros_like(windows)), axis=-1)


def max_pool_rule(layer):
    pool = tuple(layer.pool_size)
    lowest = float(np.finfo(np.float32).min)
    return lambda x: _select_max(_windows(x, pool, layer.padding, lowest))


def avg_pool_rule(layer):
    pool = tuple(layer.pool_size)
    return lambda x: ops.mean(_windows(x, pool, layer.padding), axis=-1)


def global_avg_rule(layer):
    return lambda x: ops.mean(x, axis=tuple(range(1, len(x.shape) - 1)))


def global_max_rule(layer):
    def f(x):
        flat = ops.reshape(x, (x.shape[0], -1, x.shape[-1]))
        return _select_max(ops.transpose(flat, (0, 2, 1)))

    return f


def global_max_split_rule(layer):
    """The frameworks' reduce-max pullback: the cotangent split evenly among tied maxima. The
    forward value is the max plus an exact zero that carries the gradient."""

    def f(x):
        axes = tuple(range(1, len(x.shape) - 1))
        top = ops.stop_gradient(ops.max(x, axis=axes, keepdims=True))
        mask = ops.cast(ops.equal(ops.stop_gradient(x), top), x.dtype)
        weights = ops.stop_gradient(mask / ops.sum(mask, axis=axes, keepdims=True))
        zero = ops.sum(weights * (x - ops.stop_gradient(x)), axis=axes)
        return ops.squeeze(top, axes) + zero

    return f


def nearest_upsampling_rule(layer):
    sh, sw = layer.size

    def f(x):
        b, h, w, c = x.shape
        x = ops.broadcast_to(x[:, :, None, :, None, :], (b, h, sh, w, sw, c))
        return ops.reshape(x, (b, h * sh, w * sw, c))

    return f


def interpolation_matrix_rule(layer, x_shape):
    """Separable resampling as two matmuls. The matrices come from the plain layer applied to
    inputs whose channel c is the indicator of row (column) c, constant along the other axis."""
    _, h, w, _ = x_shape
    rows = np.broadcast_to(np.eye(h, dtype="float32")[None, :, None, :], (1, h, w, h))
    cols = np.broadcast_to(np.eye(w, dtype="float32")[None, None, :, :], (1, h, w, w))
    fresh = layer.__class__.from_config(layer.get_config())
    a_h = ops.convert_to_numpy(fresh(np.ascontiguousarray(rows)))[0, :, 0, :]  # (H', H)
    a_w = ops.convert_to_numpy(fresh(np.ascontiguousarray(cols)))[0, 0, :, :]  # (W', W)
    a_h, a_w = ops.convert_to_tensor(a_h), ops.convert_to_tensor(a_w)
    return lambda x: ops.einsum("jw,biwc->bijc", a_w, ops.einsum("ih,bhwc->biwc", a_h, x))


def layer_norm_rule(layer):
    eps = layer.epsilon

    def f(x):
        mean = ops.mean(x, axis=-1, keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * ops.rsqrt(var + eps) * layer.gamma.value + layer.beta.value

    return f


def batch_norm_rule(layer):
    scale = layer.gamma.value / ops.sqrt(layer.moving_variance.value + layer.epsilon)
    shift = layer.beta.value - layer.moving_mean.value * scale
    return lambda x: x * scale + shift


def gelu_rule(approximate):
    if approximate:
        c = math.sqrt(2 / math.pi)
        return lambda x: 0.5 * x * (1 + ops.tanh(c * (x + 0.044715 * x * x * x)))
    return lambda x: 0.5 * x * (1 + ops.erf(x / math.sqrt(2)))


def softmax_rule(layer):
    def f(x):
        e = ops.exp(x - ops.stop_gradient(ops.max(x, axis=-1, keepdims=True)))
        return e / ops.sum(e, axis=-1, keepdims=True)

    return f


def depthwise_slices_rule(layer):
    """Sum over the kernel offsets of a shifted input times the per-channel weights."""
    kh, kw = layer.kernel_size

    def f(x):
        _, h, w, _ = x.shape
        xp = ops.pad(x, [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)])
        y = 0.0
        for i in range(kh):
            for j in range(kw):
                y = y + xp[:, i : i + h, j : j + w, :] * layer.kernel.value[i, j, :, 0]
        return y + layer.bias.value if layer.use_bias else y

    return f


def depthwise_grouped_rule(layer):
    """The depthwise convolution as a grouped `ops.conv` (groups = channels)."""
    kh, kw, c, m = layer.kernel.value.shape

    def f(x):
        y = ops.conv(x, ops.reshape(layer.kernel.value, (kh, kw, 1, c * m)), padding="same")
        return y + layer.bias.value if layer.use_bias else y

    return f


def mha_rule(layer):
    q, k, v, o = layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense
    scale = 1.0 / math.sqrt(layer.key_dim)

    def f(x):
        query = (ops.einsum("btd,dhk->bthk", x, q.kernel.value) + q.bias.value) * scale
        key = ops.einsum("btd,dhk->bthk", x, k.kernel.value) + k.bias.value
        value = ops.einsum("btd,dhk->bthk", x, v.kernel.value) + v.bias.value
        scores = ops.einsum("bshk,bthk->bhts", key, query)
        probs = softmax_rule(None)(scores)
        heads = ops.einsum("bhts,bshk->bthk", probs, value)
        return ops.einsum("bthk,hko->bto", heads, o.kernel.value) + o.bias.value

    return f


def jacket_rule(layer):
    """The engine's own rule for the layer (`jacket.engine.rules.RULES`), run as jacket's passes
    run it: the layer's call with the rule installed (`rules.applied`)."""
    rule = next(r for r in rules.RULES[type(layer)] if r.applies(layer))
    call = _plain_call(layer)

    def f(x):
        with rules.applied([(layer, rule)]):
            return call(x)

    return f


def lstm_rule(layer):
    cell = layer.cell

    def f(x):
        h = c = ops.zeros((x.shape[0], cell.units))
        for t in range(x.shape[1]):
            z = (
                ops.matmul(x[:, t], cell.kernel.value)
                + ops.matmul(h, cell.recurrent_kernel.value)
                + cell.bias.value
            )
            zi, zf, zc, zo = ops.split(z, 4, axis=-1)
            c = ops.sigmoid(zf) * c + ops.sigmoid(zi) * ops.tanh(zc)
            h = ops.sigmoid(zo) * ops.tanh(c)
        return h

    return f


def gru_rule(layer):
    cell = layer.cell  # reset_after=True: bias (2, 3 * units), input and recurrent parts

    def f(x):
        h = ops.zeros((x.shape[0], cell.units))
        for t in range(x.shape[1]):
            xz, xr, xh = ops.split(
                ops.matmul(x[:, t], cell.kernel.value) + cell.bias.value[0], 3, axis=-1
            )
            rz, rr, rh = ops.split(
                ops.matmul(h, cell.recurrent_kernel.value) + cell.bias.value[1], 3, axis=-1
            )
            z, r = ops.sigmoid(xz + rz), ops.sigmoid(xr + rr)
            h = z * h + (1 - z) * ops.tanh(xh + r * rh)
        return h

    return f


# ----------------------------------------------------------------------------------------- cases


def _randomise_weights(layer, rng):
    for w in layer.weights:
        w.assign(
            rng.uniform(0.5, 1.5, w.shape).astype("float32")
            if "variance" in w.path
            else rng.normal(0, 0.5, w.shape).astype("float32")
        )


def _case(name, shape, make_layer, rules, exact=False, ties=False):
    return name, shape, make_layer, rules, exact, ties


def cases(batch):
    """(name, input shape, make_layer, {rule name: make_rule(layer)}, exact, ties): `exact`: the
    forward values must agree bit for bit; `ties`: check the Jacobians again at an input with ties."""
    B = batch
    img, small, seq, low = (B, 32, 32, 16), (B, 16, 16, 16), (B, 16, 32), (B, 16, 16, 8)
    pool, sel = {"windows": max_pool_rule}, dict(exact=True, ties=True)
    depthwise = {"slices": depthwise_slices_rule, "grouped conv": depthwise_grouped_rule}
    global_max = {"first-max mask": global_max_rule, "tie-split mask": global_max_split_rule}
    matmuls = {"matmuls": lambda layer: interpolation_matrix_rule(layer, low)}
    ours = {"jacket rule": jacket_rule}
    L, same = layers, dict(padding="same")
    gelu_tanh = partial(L.Activation, partial(keras.activations.gelu, approximate=True))
    # fmt: off
    return [
        _case("MaxPooling2D(2)", img, partial(L.MaxPooling2D, 2), pool, **sel),
        _case("MaxPooling2D(2,same) 15x15", (B, 15, 15, 16), partial(L.MaxPooling2D, 2, **same), pool, **sel),
        _case("MaxPooling1D(2)", (B, 64, 32), partial(L.MaxPooling1D, 2), pool, **sel),
        _case("MaxPooling3D(2)", (B, 8, 8, 8, 16), partial(L.MaxPooling3D, 2), pool, **sel),
        _case("AveragePooling2D(2)", img, partial(L.AveragePooling2D, 2), {"windows": avg_pool_rule}),
        _case("GlobalAveragePooling2D", small, L.GlobalAveragePooling2D, {"mean": global_avg_rule}),
        _case("GlobalMaxPooling2D", small, L.GlobalMaxPooling2D, global_max, **sel),
        _case("UpSampling2D(2) nearest", low, partial(L.UpSampling2D, 2), {"broadcast": nearest_upsampling_rule}, exact=True),
        _case("UpSampling2D(2) bilinear", low, partial(L.UpSampling2D, 2, interpolation="bilinear"), {**matmuls, **ours}),
        _case("Resizing(32,32) bilinear", low, partial(L.Resizing, 32, 32, "bilinear"), matmuls),
        _case("LayerNormalization", seq, L.LayerNormalization, {"formula": layer_norm_rule}),
        _case("BatchNormalization (inference)", small, L.BatchNormalization, {"affine": batch_norm_rule}),
        _case("Activation gelu", small, partial(L.Activation, "gelu"), {"erf": lambda _: gelu_rule(False)}),
        _case("Activation gelu approximate", small, gelu_tanh, {"tanh": lambda _: gelu_rule(True)}),
        _case("Softmax", seq, L.Softmax, {"formula": softmax_rule}),
        _case("DepthwiseConv2D 3x3", img, partial(L.DepthwiseConv2D, 3, **same), depthwise),
        _case("DepthwiseConv2D 7x7", img, partial(L.DepthwiseConv2D, 7, **same), depthwise),
        _case("Conv2D 3x3 16->16", img, partial(L.Conv2D, 16, 3, **same), {}),
        _case("MultiHeadAttention(4,8) self", seq, partial(L.MultiHeadAttention, 4, 8), {"einsum": mha_rule, **ours}),
        _case("LSTM(32)", seq, partial(L.LSTM, 32), {"unrolled": lstm_rule, **ours}),
        _case("GRU(32)", seq, partial(L.GRU, 32), {"unrolled": gru_rule, **ours}),
    ]
    # fmt: on


# ------------------------------------------------------------------------------------- measuring


def median_ms(run, args, to_numpy, repeats):
    to_numpy(run(*args))  # warm-up: tracing and compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        to_numpy(run(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _plain_call(layer):
    if isinstance(layer, layers.MultiHeadAttention):
        return lambda x: layer(x, x, training=False)  # self-attention
    return lambda x: layer(x, training=False)


def build(make_layer, shape, rng):
    layer = make_layer()
    call = _plain_call(layer)
    call(rng.normal(size=shape).astype("float32"))
    _randomise_weights(layer, rng)
    return layer, call


def survey_case(case, args, tools, rng):
    name, shape, make_layer, rules, exact, ties = case
    batched, unbatched, to_tensor, to_numpy = tools
    layer, plain = build(make_layer, shape, rng)
    x = to_tensor(rng.normal(size=shape).astype("float32"))
    y_plain = to_numpy(plain(x))
    cts = to_tensor(rng.normal(size=(args.k,) + y_plain.shape).astype("float32"))
    base = dict(layer=name, backend=BACKEND, batch=shape[0], k=args.k, in_shape=list(shape[1:]))
    base["out_shape"] = list(y_plain.shape[1:])

    plain_batched, plain_mode = batched(plain)
    plain_unbatched = unbatched(plain)
    g_plain = to_numpy(plain_batched(x, cts))
    base["mode"] = plain_mode()
    base["batched_vs_unbatched_diff"] = _rel(g_plain, to_numpy(plain_unbatched(x, cts)))
    base["plain_batched_ms"] = median_ms(plain_batched, (x, cts), to_numpy, args.repeats)
    base["plain_unbatched_ms"] = median_ms(plain_unbatched, (x, cts), to_numpy, args.repeats)
    if not rules:
        return [dict(base, rule="-", verdict="- (reference)")]

    if ties:  # a second input, full of ties, for the Jacobian check only
        x_ties = to_tensor(rng.integers(0, 3, size=shape).astype("float32"))
    rows = []
    for rule_name, make_rule in rules.items():
        row = dict(base, rule=rule_name)
        try:
            rule = make_rule(layer)
            row["fwd_diff"] = float(np.max(np.abs(to_numpy(rule(x)) - y_plain)))
            rule_batched, rule_mode = batched(rule)
            g_rule = to_numpy(rule_batched(x, cts))
            row["rule_mode"] = rule_mode()
            row["jac_diff"] = _rel(g_rule, g_plain)
            if ties:
                row["fwd_diff_ties"] = float(
                    np.max(np.abs(to_numpy(rule(x_ties)) - to_numpy(plain(x_ties))))
                )
                row["jac_diff_ties"] = _rel(
                    to_numpy(rule_batched(x_ties, cts)), to_numpy(plain_batched(x_ties, cts))
                )
            row["rule_batched_ms"] = median_ms(rule_batched, (x, cts), to_numpy, args.repeats)
            row["speedup"] = row["plain_batched_ms"] / row["rule_batched_ms"]
            row["verdict"] = _verdict(row, exact, np.max(np.abs(y_plain)))
        except Exception as error:  # noqa: BLE001 - a broken rewrite is a finding, not a crash
            row["verdict"] = f"ERROR {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            traceback.print_exc()
        rows.append(row)
    return rows


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _verdict(row, exact, y_scale):
    fwd_tol = 0.0 if exact else FWD_RTOL * max(1.0, y_scale)
    failures = []
    if row["fwd_diff"] > fwd_tol or row.get("fwd_diff_ties", 0.0) > fwd_tol:
        failures.append("forward")
    if not row["jac_diff"] <= JAC_RTOL:
        failures.append("jacobian")
    if not row.get("jac_diff_ties", 0.0) <= JAC_RTOL:
        failures.append("jacobian at ties")
    if failures:
        return "FAIL " + ", ".join(failures)
    return "rule" if row["speedup"] > SPEEDUP_FOR_RULE else "-"


# -------------------------------------------------------------------------------------- printing

COLUMNS = [
    ("layer", "layer", "{}"),
    ("rule", "rule", "{}"),
    ("in", "in_shape", "{}"),
    ("out", "out_shape", "{}"),
    ("plain batched ms", "plain_batched_ms", "{:.2f}"),
    ("plain unbatched ms", "plain_unbatched_ms", "{:.2f}"),
    ("rule batched ms", "rule_batched_ms", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("fwd diff", "fwd_diff", "{:.1e}"),
    ("jac diff", "jac_diff", "{:.1e}"),
    ("jac diff ties", "jac_diff_ties", "{:.1e}"),
    ("plain mode", "mode", "{}"),
    ("verdict", "verdict", "{}"),
]


def set_threads(n):
    if BACKEND == "torch":
        import torch

        torch.set_num_threads(n)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)
    else:
        print("--threads: not supported on JAX (XLA_FLAGS must be set before import); ignored")


def markdown(rows):
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return ""
        if isinstance(value, list):
            value = "x".join(map(str, value))
        return fmt.format(value)

    lines = [
        "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, help="intra-op threads (TensorFlow and PyTorch)")
    args = parser.parse_args()
    if args.threads:
        set_threads(args.threads)

    wanted = [s.strip().lower().replace(" ", "") for s in args.cases.split(",") if s.strip()]
    selected = [
        c
        for c in cases(args.batch)
        if not wanted or any(w in c[0].lower().replace(" ", "") for w in wanted)
    ]
    tools = pullbacks()
    rng = np.random.default_rng(args.seed)
    rows = []
    for case in selected:
        start = time.perf_counter()
        try:
            new = survey_case(case, args, tools, rng)
        except Exception as error:  # noqa: BLE001 - the plain layer itself failed
            traceback.print_exc()
            new = [
                {
                    "layer": case[0],
                    "backend": BACKEND,
                    "batch": args.batch,
                    "verdict": f"ERROR (plain) {type(error).__name__}: {str(error).splitlines()[0][:120]}",
                }
            ]
        rows += new
        print(
            f"[{BACKEND}] {case[0]}: {time.perf_counter() - start:.1f}s "
            + "; ".join(f"{r.get('rule')}: {r['verdict']}" for r in new),
            flush=True,
        )

    print(
        f"\n### {BACKEND} (Keras {keras.__version__}), batch {args.batch}, k {args.k}, "
        f"median of {args.repeats}\n"
    )
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
