"""Second order: hessian, hvp, laplacian, divergence and check(order=2), each against an oracle that
does not use jacket: float64 central differences of the model's outputs (no autodiff at all), and the
framework's own Hessian and Jacobian."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers
from oracles import assert_close, keras_float64, native_jacobian, to_numpy
from scenarios import Subclassed, dict_inputs, dict_model

import jacket
from jacket.engine import memory as _memory

BACKEND = keras.backend.backend()


# --------------------------------------------------------------------------------------- oracles


def _forward(model, x: np.ndarray) -> np.ndarray:
    """`(n, out_size)` float64 outputs of a batch of flat inputs reshaped to the model's (float64
    kept inside: `keras_float64`)."""
    with keras_float64():
        return to_numpy(model(x, training=False) if isinstance(model, keras.Layer) else model(x))


def second_differences(model, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """`(B, out_size, n, n)`: `[f(x + h e_j + h e_k) - f(x + h e_j - h e_k) - f(x - h e_j + h e_k)
    + f(x - h e_j - h e_k)] / 4 h^2` on a float64 model, every perturbation one row of one batch."""
    B, shape = x.shape[0], x.shape[1:]
    n = int(np.prod(shape))
    flat = x.reshape(B, n)
    pairs = [(j, k) for j in range(n) for k in range(j, n)]
    signs = [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    moved = np.repeat(flat[None, None], len(signs), axis=0).repeat(len(pairs), axis=1)
    for s, (a, b) in enumerate(signs):
        for p, (j, k) in enumerate(pairs):
            moved[s, p, :, j] += a * h
            moved[s, p, :, k] += b * h
    y = _forward(model, moved.reshape((-1,) + shape)).reshape(len(signs), len(pairs), B, -1)
    values = (y[0] - y[1] - y[2] + y[3]) / (4 * h * h)  # (pairs, B, m)
    H = np.zeros((B, values.shape[-1], n, n))
    for p, (j, k) in enumerate(pairs):
        H[:, :, j, k] = H[:, :, k, j] = values[p]
    return H


def laplacian_differences(model, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """`(B, out_size)`: `sum_j [f(x + h e_j) - 2 f(x) + f(x - h e_j)] / h^2`, float64."""
    B, shape = x.shape[0], x.shape[1:]
    n = int(np.prod(shape))
    flat = x.reshape(B, n)
    moved = np.repeat(flat[None, None], 2, axis=0).repeat(n, axis=1)  # (2, n, B, n)
    for j in range(n):
        moved[0, j, :, j] += h
        moved[1, j, :, j] -= h
    y = _forward(model, moved.reshape((-1,) + shape)).reshape(2, n, B, -1)
    y0 = _forward(model, x).reshape(B, -1)
    return ((y[0] + y[1] - 2 * y0[None]) / (h * h)).sum(axis=0)


def native_hessian(model, x: np.ndarray) -> np.ndarray:
    """`(B, out_size, n, n)` by the framework's own Hessian (single input and output), float64
    kept inside (`keras_float64`)."""
    with keras_float64():
        return _native_hessian(model, x)


def _native_hessian(model, x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    if BACKEND == "jax":
        import jax

        def one(xi):
            return keras.ops.reshape(model(xi[None], training=False), (-1,))

        H = jax.vmap(jax.hessian(one))(keras.ops.convert_to_tensor(x))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as outer:
            outer.watch(xt)
            with tf.GradientTape() as inner:
                inner.watch(xt)
                y = tf.reshape(model(xt, training=False), (B, -1))
            J = tf.reshape(inner.batch_jacobian(y, xt), (B, -1, int(np.prod(x.shape[1:]))))
        H = outer.batch_jacobian(J, xt)
    else:
        import torch

        def one(xi):
            return model(xi[None], training=False).reshape(-1)

        H = torch.stack(
            [
                torch.autograd.functional.jacobian(
                    lambda z: torch.autograd.functional.jacobian(one, z, create_graph=True), xi
                )
                for xi in torch.as_tensor(x)
            ]
        )
    n = int(np.prod(x.shape[1:]))
    H = to_numpy(H)
    return H.reshape(B, -1, n, n)


# ---------------------------------------------------------------------------------------- models


def tanh_mlp(dtype="float64", d=4, out=3):
    return keras.Sequential(
        [
            layers.Input((d,), dtype=dtype),
            layers.Dense(8, activation="tanh", dtype=dtype),
            layers.Dense(6, activation="softplus", dtype=dtype),
            layers.Dense(out, dtype=dtype),
        ]
    )


def conv1d(dtype="float64"):
    return keras.Sequential(
        [
            layers.Input((5, 2), dtype=dtype),
            layers.Conv1D(3, 3, padding="same", activation="tanh", dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(2, activation="sigmoid", dtype=dtype),
        ]
    )


def every_rule(dtype="float64"):
    """One of each layer the forward Laplacian has a rule for, and a few it falls back on
    (LayerNormalization, MaxPooling2D, softmax, an op of `keras.ops` it has no rule for)."""
    inputs = keras.Input((2, 2, 2), dtype=dtype)
    h = layers.Conv2D(3, 3, padding="same", activation="gelu", dtype=dtype)(inputs)
    g = layers.Conv2D(3, 1, activation="tanh", dtype=dtype)(inputs)
    h = layers.Add(dtype=dtype)([h, g])
    h = layers.BatchNormalization(dtype=dtype)(h)
    h = layers.Multiply(dtype=dtype)([h, layers.Activation("sigmoid", dtype=dtype)(g)])
    pooled = layers.AveragePooling2D(2, dtype=dtype)(h)
    maxed = layers.MaxPooling2D(2, dtype=dtype)(h)
    h = layers.Concatenate(dtype=dtype)([pooled, maxed])
    h = layers.LayerNormalization(dtype=dtype)(h)
    h = layers.Flatten(dtype=dtype)(h)
    h = layers.Dense(5, activation="silu", dtype=dtype)(h)
    h = keras.ops.sin(h) * 2.0 - h / 3.0 + keras.ops.arcsinh(h)
    h = layers.Dropout(0.5, dtype=dtype)(h)
    out = layers.Dense(3, activation="softmax", dtype=dtype)(h)
    model = keras.Model(inputs, out)
    bn = model.layers[4]
    rng = np.random.default_rng(3)
    bn.moving_mean.assign(rng.normal(size=3).astype(dtype))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3).astype(dtype))
    return model


def pinn(dtype="float32"):
    return keras.Sequential(
        [
            layers.Input((2,), dtype=dtype),
            layers.Dense(16, activation="tanh", dtype=dtype),
            layers.Dense(16, activation="tanh", dtype=dtype),
            layers.Dense(1, dtype=dtype),
        ]
    )


class BatchMean(keras.layers.Layer):
    """Mixes the samples of a batch."""

    def call(self, x):
        return keras.ops.tanh(x) - keras.ops.mean(x, axis=0, keepdims=True) ** 2


def layer_norm(dtype="float64"):
    """LayerNormalization: on TensorFlow, `tf.nn.moments`' `stop_gradient` spoils second derivatives
    (NOTE: [Moments with a second derivative])."""
    return keras.Sequential(
        [
            layers.Input((3,), dtype=dtype),
            layers.Dense(4, activation="tanh", dtype=dtype),
            layers.LayerNormalization(dtype=dtype),
            layers.Dense(2, dtype=dtype),
        ]
    )


HESSIAN_MODELS = {
    "tanh_mlp": (tanh_mlp, (4,), 3),
    "layer_norm": (layer_norm, (3,), 2),
    "conv1d_batch1": (conv1d, (5, 2), 1),
    "subclassed": (Subclassed, (5,), 2),
}
SLOW_HESSIAN_MODELS = {"subclassed"}


# ----------------------------------------------------------------------------------------- hessian


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_HESSIAN_MODELS else [])
        for name in HESSIAN_MODELS
    ],
)
def test_hessian_matches_second_differences(name, rng):
    build, shape, batch = HESSIAN_MODELS[name]
    model = build(dtype="float64")
    x = rng.uniform(-1, 1, size=(batch,) + shape)
    H = jacket.hessian(model, x)
    out_shape = tuple(model(x[:1]).shape[1:])
    assert tuple(H.shape) == (batch,) + out_shape + shape + shape
    assert keras.backend.standardize_dtype(H.dtype) == "float64"
    flat = to_numpy(H).reshape(batch, -1, int(np.prod(shape)), int(np.prod(shape)))
    assert_close(flat, second_differences(model, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(flat, flat.transpose(0, 1, 3, 2))  # symmetric


def test_hessian_matches_the_framework_hessian(rng):
    model = tanh_mlp(dtype="float32")
    x = rng.uniform(-1, 1, size=(3, 4)).astype("float32")
    H = jacket.hessian(model, x, flatten=True)
    assert keras.backend.standardize_dtype(H.dtype) == "float32"
    assert tuple(H.shape) == (3, 3, 4, 4)
    assert_close(H, native_hessian(model, x), rtol=1e-5, atol=1e-7)


def test_hessian_modes_and_chunks_agree(rng):
    model = tanh_mlp()
    x = rng.uniform(-1, 1, size=(3, 4))
    reference = to_numpy(jacket.hessian(model, x))
    for options in (
        {"mode": "forward"},
        {"mode": "reverse", "chunk_size": 3},
        {"memory_budget": 1},  # one direction per pass
    ):
        assert_close(jacket.hessian(model, x, **options), reference, rtol=1e-12, atol=1e-14)
    flat = jacket.hessian(model, x, flatten=True)
    assert tuple(flat.shape) == (3, 3, 4, 4)


def test_hessian_of_several_inputs_and_outputs(rng):
    model = dict_model("float64")
    x = dict_inputs(rng, batch=2)
    H = jacket.hessian(model, x)
    assert set(H) == {"score", "parts"}
    assert set(H["parts"]) == {"image", "meta"}
    assert tuple(H["parts"]["image"]["meta"].shape) == (2, 5, 4, 4, 1, 3)
    assert tuple(H["score"]["meta"]["meta"].shape) == (2, 1, 3, 3)

    def flat_model(z):  # the model on one flat vector of both inputs, outputs concatenated
        y = model({"image": z[:, :16].reshape(-1, 4, 4, 1), "meta": z[:, 16:]})
        return keras.ops.concatenate([y["parts"], y["score"]], axis=1)  # flatten order

    z = np.concatenate([x["image"].reshape(2, -1), x["meta"]], axis=1)
    reference = second_differences(flat_model, z)
    for o, (out, size) in enumerate((("parts", 5), ("score", 1))):
        rows = slice(0, 5) if o == 0 else slice(5, 6)
        for left, ls in (("image", slice(0, 16)), ("meta", slice(16, 19))):
            for right, rs in (("image", slice(0, 16)), ("meta", slice(16, 19))):
                block = to_numpy(H[out][left][right]).reshape(2, size, ls.stop - ls.start, -1)
                assert_close(block, reference[:, rows, ls, rs], rtol=1e-5, atol=1e-7)


def test_hvp_is_the_hessian_times_v(rng):
    model = tanh_mlp()
    x = rng.uniform(-1, 1, size=(3, 4))
    v, u = rng.normal(size=(3, 4)), rng.normal(size=(3, 3))
    H = second_differences(model, x)
    expected = np.einsum("bi,bijk,bk->bj", u, H, v)
    assert_close(jacket.hvp(model, x, v, u=u), expected, rtol=1e-5, atol=1e-7)
    scalar = tanh_mlp(out=1)
    expected = np.einsum("bjk,bk->bj", second_differences(scalar, x)[:, 0], v)
    assert_close(jacket.hvp(scalar, x, v), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------- laplacian


@pytest.mark.parametrize("method", ["auto", "forward", "hessian"])
def test_laplacian_matches_the_trace_of_the_hessian(method, rng):
    model = tanh_mlp()
    x = rng.uniform(-1, 1, size=(3, 4))
    L = jacket.laplacian(model, x, method=method)
    assert tuple(L.shape) == (3, 3)
    trace = np.trace(second_differences(model, x), axis1=2, axis2=3)
    assert_close(L, trace, rtol=1e-5, atol=1e-7)
    assert_close(L, np.trace(to_numpy(jacket.hessian(model, x)), axis1=2, axis2=3), rtol=1e-12)


def some_rules(dtype="float64"):
    """A few of the rules, and no fallback: convolution, BatchNormalization, Add, average pooling,
    Dense with an activation of its closed forms."""
    inputs = keras.Input((3, 3, 1), dtype=dtype)
    h = layers.Conv2D(2, 3, padding="same", activation="tanh", dtype=dtype)(inputs)
    h = layers.BatchNormalization(dtype=dtype)(h)
    h = layers.Add(dtype=dtype)([h, layers.Conv2D(2, 1, dtype=dtype)(inputs)])
    h = layers.Flatten(dtype=dtype)(layers.AveragePooling2D(3, dtype=dtype)(h))
    out = layers.Dense(2, activation="sigmoid", dtype=dtype)(h)
    model = keras.Model(inputs, out)
    (bn,) = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    bn.moving_variance.assign(np.array([0.5, 2.0], dtype))
    return model


def test_forward_laplacian_rules(rng):
    model = some_rules()
    x = rng.uniform(-1, 1, size=(2, 3, 3, 1))
    forward = jacket.laplacian(model, x, method="forward")
    assert_close(forward, laplacian_differences(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_forward_laplacian_rules_and_fallbacks(rng):
    model = every_rule()
    x = rng.uniform(-1, 1, size=(2, 2, 2, 2))
    forward = jacket.laplacian(model, x, method="forward")
    assert_close(forward, laplacian_differences(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_forward_laplacian_through_a_recurrent_layer(rng):
    """No rule for an LSTM: the fallback's second directional derivatives (by reverse passes on
    TensorFlow, whose forward accumulators cannot trace its while_loop)."""
    model = keras.Sequential(
        [
            layers.Input((3, 2), dtype="float64"),
            layers.LSTM(3, dtype="float64"),
            layers.Dense(1, dtype="float64"),
        ]
    )
    x = rng.uniform(-1, 1, size=(2, 3, 2))
    assert_close(
        jacket.laplacian(model, x, method="forward"),
        laplacian_differences(model, x),
        rtol=1e-5,
        atol=1e-7,
    )


def test_forward_laplacian_of_a_callable(rng):
    def field(x):
        return keras.ops.sum(keras.ops.sin(x) * x, axis=1, keepdims=True)

    x = rng.uniform(-1, 1, size=(3, 4))
    expected = np.sum(2 * np.cos(x) - x * np.sin(x), axis=1, keepdims=True)
    with keras_float64():  # a plain callable runs as given: Keras demotes its float64 ops otherwise
        assert_close(jacket.laplacian(field, x, method="forward"), expected, rtol=1e-10)


def test_laplacian_of_a_pinn_in_float32(rng):
    model = pinn()
    x = rng.uniform(-1, 1, size=(64, 2)).astype("float32")
    L = jacket.laplacian(model, x)
    assert keras.backend.standardize_dtype(L.dtype) == "float32"
    twin = pinn("float64")
    twin.set_weights([w.astype("float64") for w in model.get_weights()])
    assert_close(L, laplacian_differences(twin, x.astype("float64")), rtol=1e-4, atol=1e-6)


def test_hutchinson_laplacian_is_unbiased_with_an_honest_error(rng):
    model = tanh_mlp(out=1)
    x = rng.uniform(-1, 1, size=(4, 4))
    exact = to_numpy(jacket.laplacian(model, x))
    estimate = jacket.laplacian(model, x, method="hutchinson", n_samples=400, seed=3)
    assert isinstance(estimate, jacket.Estimate)
    value, stderr = to_numpy(estimate.value), to_numpy(estimate.stderr)
    assert value.shape == stderr.shape == (4, 1)
    assert np.all(stderr > 0)
    assert np.all(np.abs(value - exact) <= 4 * stderr)
    again = jacket.laplacian(model, x, method="hutchinson", n_samples=400, seed=3)
    np.testing.assert_array_equal(to_numpy(again.value), value)  # reproducible


# -------------------------------------------------------------------------------------- divergence


def square_mlp(dtype="float64"):
    return keras.Sequential(
        [
            layers.Input((5,), dtype=dtype),
            layers.Dense(7, activation="tanh", dtype=dtype),
            layers.Dense(5, dtype=dtype),
        ]
    )


def test_divergence_is_the_trace_of_the_jacobian(rng):
    model = square_mlp("float32")
    x = rng.uniform(-1, 1, size=(4, 5)).astype("float32")
    div = jacket.divergence(model, x)
    assert tuple(div.shape) == (4,)
    assert keras.backend.standardize_dtype(div.dtype) == "float32"
    assert_close(div, np.trace(native_jacobian(model, x), axis1=1, axis2=2), rtol=1e-5)


def test_divergence_of_an_image_field(rng):
    model = keras.Sequential(
        [
            layers.Input((4, 4, 1), dtype="float64"),
            layers.Conv2D(2, 3, padding="same", activation="tanh", dtype="float64"),
            layers.Conv2D(1, 3, padding="same", dtype="float64"),
        ]
    )
    x = rng.uniform(-1, 1, size=(2, 4, 4, 1))
    J = native_jacobian(model, x).reshape(2, 16, 16)
    assert_close(jacket.divergence(model, x), np.trace(J, axis1=1, axis2=2), rtol=1e-10)


def test_hutchinson_divergence_covers_the_exact_value(rng):
    model = square_mlp()
    x = rng.uniform(-1, 1, size=(6, 5))
    exact = to_numpy(jacket.divergence(model, x))
    inside = 0
    for seed in range(40):
        value, stderr = jacket.divergence(model, x, method="hutchinson", n_samples=16, seed=seed)
        inside += np.sum(np.abs(to_numpy(value) - exact) <= 2 * to_numpy(stderr))
    assert inside / (40 * 6) >= 0.85  # 2 standard errors: about 93% for 16 vectors


# ------------------------------------------------------------------------------ wrt and of


def residual_block(dtype="float64"):
    """A hidden layer `h` and, after it, a block whose sum `res` also takes a path from the
    input (held constant in a cut `wrt="h"`)."""
    inputs = keras.Input((3,), dtype=dtype, name="x")
    h = layers.Dense(4, activation="tanh", name="h", dtype=dtype)(inputs)
    g = layers.Dense(4, activation="softplus", name="g", dtype=dtype)(h)
    skip = layers.Dense(4, name="skip", dtype=dtype)(inputs)
    res = layers.Add(name="res", dtype=dtype)([g, skip])
    out = layers.Dense(2, activation="tanh", name="out", dtype=dtype)(res)
    return keras.Model(inputs, out)


def _tail(model, x: np.ndarray, of: str):
    """The model from `h` to `of` with `x` fixed, written with its layers (no jacket): a function
    of a batch of `h` values, `len(h) // len(x)` copies of the batch at a time."""

    def f(h):
        xs = np.tile(x, (len(h) // len(x), 1))
        res = model.get_layer("g")(h) + model.get_layer("skip")(xs)
        return res if of == "res" else model.get_layer("out")(res)

    return f


def test_second_order_with_respect_to_a_layer(rng):
    model = residual_block()
    x = rng.uniform(-1, 1, size=(3, 3))
    h = to_numpy(model.get_layer("h")(x))
    tail = _tail(model, x, "out")
    H_fd = second_differences(tail, h)
    H = jacket.hessian(model, x, wrt="h", of="out")
    assert tuple(H.shape) == (3, 2, 4, 4)
    assert_close(H, H_fd, rtol=1e-5, atol=1e-7)
    for mode in ("forward", "reverse"):
        assert_close(jacket.hessian(model, x, wrt="h", of="out", mode=mode), H_fd, rtol=1e-5)
    trace = np.trace(H_fd, axis1=2, axis2=3)
    for method in ("auto", "forward", "hessian"):
        L = jacket.laplacian(model, x, wrt="h", of="out", method=method)
        assert_close(L, trace, rtol=1e-5, atol=1e-7)
    assert_close(laplacian_differences(tail, h), trace, rtol=1e-4, atol=1e-6)
    v, u = rng.normal(size=(3, 4)), rng.normal(size=(3, 2))
    expected = np.einsum("bi,bijk,bk->bj", u, H_fd, v)
    assert_close(jacket.hvp(model, x, v, u=u, wrt="h", of="out"), expected, rtol=1e-5)
    # the divergence of the block's sum in `h` (both of 4 values)
    step, field = 1e-6, _tail(model, x, "res")
    moved = np.stack(
        [h + step * np.eye(4)[j] for j in range(4)] + [h - step * np.eye(4)[j] for j in range(4)]
    )  # (8, B, 4)
    y = _forward(field, moved.reshape(-1, 4)).reshape(2, 4, 3, 4)
    fd = sum((y[0, j, :, j] - y[1, j, :, j]) / (2 * step) for j in range(4))
    div = jacket.divergence(model, x, wrt="h", of="res")
    # (the differences' rounding, eps |y| / step, is about 2e-10 |y|: 2.2e-9 against a bound of
    # 1.5e-9 at rtol=1e-8 on one machine's CPU, and within it on another's)
    assert_close(div, fd, rtol=1e-7)
    report = jacket.check(model, x, wrt="h", of="out", order=2)
    assert report.ok and report.reference == "float64 copy of the model's cut", str(report)


@pytest.mark.parametrize("strategy", ["replicate", "vmap", "loop"])
def test_second_order_of_a_cut_in_every_strategy(strategy, monkeypatch, rng):
    """The cut's constant (the path from the input) follows the batch where it is repeated."""
    from jacket import backends

    monkeypatch.setattr(backends.current(), "SECOND_ORDER_STRATEGY", strategy)
    model = residual_block()
    x = rng.uniform(-1, 1, size=(2, 3))
    h = to_numpy(model.get_layer("h")(x))
    H_fd = second_differences(_tail(model, x, "out"), h)
    assert_close(jacket.hessian(model, x, wrt="h", of="out"), H_fd, rtol=1e-5, atol=1e-7)
    L = jacket.laplacian(model, x, wrt="h", of="out", method="hessian")
    assert_close(L, np.trace(H_fd, axis1=2, axis2=3), rtol=1e-5, atol=1e-7)
    estimate = jacket.laplacian(model, x, wrt="h", of="out", method="hutchinson", n_samples=8)
    assert tuple(estimate.value.shape) == (2, 2)


def test_second_order_at_a_token_model_s_embeddings(rng):
    """Integer token ids and an integer input held constant; a mask from the ids."""
    ids = keras.Input((5,), dtype="int32", name="ids")
    weights = keras.Input((1,), dtype="float32", name="weight")
    e = layers.Embedding(7, 3, mask_zero=True, name="embedding")(ids)
    h = layers.Dense(4, activation="tanh", name="mix")(e)
    pooled = layers.GlobalAveragePooling1D(name="pool")(h)
    out = layers.Dense(2, activation="sigmoid", name="out")(pooled)
    scale = layers.Dense(2, activation="tanh", name="scale")(weights)
    model = keras.Model([ids, weights], layers.Multiply()([out, scale]))
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 6, 1]], "int32")
    x = [tokens, rng.uniform(0.5, 1.5, size=(2, 1)).astype("float32")]
    H = to_numpy(jacket.hessian(model, x, wrt="embedding", flatten=True))
    assert H.shape == (2, 2, 15, 15)
    np.testing.assert_array_equal(H[0, :, 9:], 0)  # padded positions are masked out
    report = jacket.check(model, x, wrt="embedding", order=2)
    assert report.ok, str(report)
    trace = np.trace(H, axis1=2, axis2=3)
    for method in ("forward", "hessian"):
        L = jacket.laplacian(model, x, wrt="embedding", method=method)
        assert_close(L, trace, rtol=1e-4, atol=1e-6)
    # without `wrt`: the float input is differentiated, the integer ids held constant
    H_w = jacket.hessian(model, x)
    assert set(H_w) == {"weight"} and tuple(H_w["weight"]["weight"].shape) == (2, 2, 1, 1)
    assert np.abs(to_numpy(H_w["weight"]["weight"])).max() > 1e-3
    report = jacket.check(model, x, order=2)
    assert report.ok and report.shape == (2, 2, 1, 1), str(report)


def test_second_order_wrt_errors_name_the_fix(rng):
    model = residual_block("float32")
    x = rng.uniform(-1, 1, size=(2, 3)).astype("float32")
    with pytest.raises(jacket.JacketValueError, match=r"hessian: .*no layer|hessian: .*nope"):
        jacket.hessian(model, x, wrt="nope")
    with pytest.raises(jacket.JacketValueError, match=r"divergence: the model's outputs \(of"):
        jacket.divergence(model, x, wrt="h", of="out")
    with pytest.raises(jacket.JacketTypeError, match=r"laplacian: .*Functional or Sequential"):
        jacket.laplacian(Subclassed(), rng.normal(size=(2, 5)), of="dense")


# -------------------------------------------------------------------------------------- check


def test_check_order_2_passes_on_a_right_hessian(rng):
    model = tanh_mlp("float32")
    report = jacket.check(model, rng.uniform(-1, 1, size=(3, 4)).astype("float32"), order=2)
    assert report.ok, str(report)
    assert report.order == 2 and report.shape == (3, 3, 4, 4)
    assert report.reference == "float64 copy of the model"
    assert str(report).startswith("Hessian check OK")


def test_check_order_2_catches_a_wrong_hessian(rng):
    def lying(
        x,
    ):  # value x^3; its gradient claims 3x^2 by a hidden square, with no second derivative
        square = keras.ops.stop_gradient(x * x)
        return x * square

    report = jacket.check(lying, rng.uniform(1, 2, size=(2, 3)), order=2)
    assert not report.ok
    assert "Hessian check FAILED" in str(report)


@pytest.mark.jax
@pytest.mark.slow  # a fresh process: about 20 s
def test_check_gets_a_float64_reference_without_jax_enable_x64():
    code = (
        "import warnings; warnings.simplefilter('error', UserWarning)\n"
        "import numpy as np, keras, jacket\n"
        "m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation='tanh'),"
        " keras.layers.Dense(3)])\n"
        "x = np.random.default_rng(0).normal(size=(4, 5)).astype('float32')\n"
        "for order in (1, 2):\n"
        "    r = jacket.check(m, x, order=order)\n"
        "    assert r.ok and r.reference == 'float64 copy of the model', str(r)\n"
        "    assert r.max_rel_error < 1e-5, str(r)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env.update(KERAS_BACKEND="jax", JACKET_CACHE_DIR="off")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "truncated to dtype float32" not in result.stderr


# ------------------------------------------------------------------------------------ refusals


def test_a_hessian_too_large_is_refused_with_the_way_around(monkeypatch, rng):
    monkeypatch.setattr(_memory, "available_memory", lambda: 1000)
    import importlib

    hessian_module = importlib.import_module("jacket.engine.hessian")
    monkeypatch.setattr(hessian_module, "available_memory", lambda: 1000)
    model = tanh_mlp()
    with pytest.raises(jacket.JacketMemoryError) as info:
        jacket.hessian(model, rng.uniform(-1, 1, size=(8, 4)))
    message = str(info.value)
    assert "hessian: the result would take" in message
    assert "3 outputs x 4 x 4 inputs" in message
    assert "jacket.hvp" in message and "jacket.laplacian" in message


@pytest.mark.parametrize("fn", ["hessian", "laplacian", "divergence", "hvp"])
def test_coupled_samples_are_refused(fn, rng):
    model = keras.Sequential([layers.Input((3,)), BatchMean()])
    x = rng.normal(size=(4, 3)).astype("float32")
    args = (x,) if fn != "hvp" else (x, x)
    kwargs = {"u": x} if fn == "hvp" else {}
    with pytest.raises(jacket.CouplingError) as info:
        getattr(jacket, fn)(model, *args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{fn}: the model's output for one sample depends on other samples")
    assert "x[b:b + 1]" in message
    getattr(jacket, fn)(model, *(a[:1] for a in args), **{k: v[:1] for k, v in kwargs.items()})


def test_errors_name_the_function_and_the_fix(rng):
    x = rng.normal(size=(2, 4)).astype("float32")
    with pytest.raises(jacket.JacketValueError, match=r"laplacian: `method` must be one of"):
        jacket.laplacian(tanh_mlp(), x, method="exact")
    with pytest.raises(jacket.JacketValueError, match=r"n_samples=1"):
        jacket.laplacian(tanh_mlp(), x, method="hutchinson", n_samples=1)
    with pytest.raises(jacket.JacketValueError, match=r"Pass method='hutchinson'"):
        jacket.divergence(square_mlp(), rng.normal(size=(2, 5)), n_samples=8)
    with pytest.raises(jacket.JacketValueError, match=r"divergence: the model's outputs \(of"):
        jacket.divergence(tanh_mlp(), x)
    with pytest.raises(jacket.JacketValueError, match=r"hvp: `u` must be given.*Received: u=None"):
        jacket.hvp(tanh_mlp(), x, x)
    with pytest.raises(jacket.JacketValueError, match=r"hessian: `mode` must be one of"):
        jacket.hessian(tanh_mlp(), x, mode="sideways")
    with pytest.raises(jacket.JacketValueError, match=r"check: `order` must be 1"):
        jacket.check(tanh_mlp(), x, order=3)
    with pytest.raises(jacket.JacketValueError, match=r"NaN or inf"):
        jacket.laplacian(tanh_mlp(), np.full((2, 4), np.nan))


@pytest.mark.jax
def test_a_second_call_does_not_trace_again(rng):
    model = pinn()
    x = rng.uniform(-1, 1, size=(8, 2)).astype("float32")
    for fn in (jacket.laplacian, jacket.hessian):
        fn(model, x)
        traces = model._jacket_state[False].traces
        fn(model, x + 1)
        assert model._jacket_state[False].traces == traces


def test_methods_that_disagree_keep_the_preferred_one_with_a_warning():
    from jacket.engine.measured import Measured

    right, wrong = np.ones((2, 3)), np.ones((2, 3)) * 1.5
    measured = Measured(
        "laplacian", {"fast": lambda t: wrong, "hessian": lambda t: right}, prefer="hessian"
    )
    with pytest.warns(jacket.JacketWarning, match=r"laplacian: its methods disagree.*method="):
        result = measured([])
    assert measured.chosen == "hessian" and result is right
    rounding = Measured("hessian", {"a": lambda t: right, "b": lambda t: right * (1 + 1e-3)})
    rounding([])  # float32 rounding of an ill-conditioned result is no disagreement
    assert rounding.chosen in ("a", "b") and set(rounding.seconds) == {"a", "b"}
