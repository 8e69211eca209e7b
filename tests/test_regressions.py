"""Regressions: bugs found in review, each checked against an independent oracle.

- Forward mode through ops that have no forward rule on TensorFlow (bilinear resizing gave zeros).
- Dropout in training mode: every pass of one call sees the same mask (PyTorch mixed masks).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers
from oracles import assert_close, central_differences, native_jacobian, to_numpy

import jacket

BACKEND = keras.backend.backend()


# --------------------------------------------------------------------- forward mode, checked


def _resize_model(interpolation: str, dtype: str = "float64"):
    """Conv -> resize (UpSampling2D or Resizing) -> conv; TensorFlow's forward mode has no rule for
    the bilinear resize's gradient op and gave zeros."""
    resize = (
        layers.UpSampling2D(interpolation="bilinear", dtype=dtype)
        if interpolation == "upsampling_bilinear"
        else layers.Resizing(5, 5, interpolation=interpolation, dtype=dtype)
    )
    return keras.Sequential(
        [
            keras.Input((3, 3, 2), dtype=dtype),
            layers.Conv2D(2, 2, padding="same", activation="tanh", dtype=dtype),
            resize,
            layers.Conv2D(1, 2, dtype=dtype),
        ]
    )


@pytest.mark.parametrize("interpolation", ["upsampling_bilinear", "nearest"])
def test_forward_mode_through_resizing_matches_central_differences(interpolation, rng):
    model = _resize_model(interpolation)
    x = rng.uniform(-1, 1, size=(2, 3, 3, 2))
    # the framework's own reverse-mode Jacobian, itself checked by central differences (with a
    # step for float32: TensorFlow resizes bilinearly in float32 inside a float64 model)
    expected = native_jacobian(model, x)  # (2, *out, 3, 3, 2)
    assert_close(expected, central_differences(model, x, eps=1e-3), rtol=1e-3)
    assert np.abs(expected).max() > 0.1  # the oracle is not trivially zero
    forward = jacket.jacobian(model, x, mode="forward")
    assert_close(forward, expected, rtol=1e-6, atol=1e-9)
    assert_close(jacket.jacobian(model, x, mode="forward", chunk_size=5), expected, rtol=1e-6)

    # J v, by jvp and by the matrix-free operator, and per_sample=False's full product
    v = rng.normal(size=x.shape)
    out_nd = expected.ndim - x.ndim
    Jv = np.einsum("bon,bn->bo", expected.reshape(2, -1, 18), v.reshape(2, 18))
    Jv = Jv.reshape(expected.shape[: 1 + out_nd])
    assert_close(jacket.jvp(model, x, v), Jv, rtol=1e-6, atol=1e-9)
    assert_close(jacket.jvp(model, x, v, per_sample=False), Jv, rtol=1e-6, atol=1e-9)
    op = jacket.JacobianOperator(model, x)
    assert_close(op @ v.reshape(2, 18), Jv.reshape(2, -1), rtol=1e-6, atol=1e-9)


def test_sparse_forward_coloring_through_bilinear_resizing(rng):
    model = keras.Sequential(
        [keras.Input((6, 6, 1)), layers.UpSampling2D(interpolation="bilinear")]
    )  # each output pixel reads at most 4 input pixels
    x = rng.uniform(-1, 1, size=(2, 6, 6, 1)).astype("float32")
    expected = native_jacobian(model, x)
    pattern = (np.abs(expected.reshape(2, -1, 36)) > 0).any(axis=0)  # given: no detection
    sparse_J = jacket.jacobian(model, x, mode="forward", sparsity=pattern)
    assert sparse_J.n_colors < 36 / 2  # a real compression
    assert_close(sparse_J.to_dense(), expected, rtol=1e-6, atol=1e-9)


def test_forward_mode_through_float32_upsampling_and_a_right_model_keeps_forward_mode(rng):
    """float32 (the default dtype) through the same layer; a model whose forward mode is right
    keeps it (the check passes: its JVP kernel is the one `jvp` uses)."""
    model = _resize_model("upsampling_bilinear", "float32")
    x = rng.uniform(-1, 1, size=(3, 3, 3, 2)).astype("float32")
    reverse = to_numpy(jacket.jacobian(model, x, mode="reverse"))
    assert np.abs(reverse).max() > 0.1
    assert_close(jacket.jacobian(model, x, mode="forward"), reverse, rtol=1e-5, atol=1e-7)

    plain = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="tanh")])
    xp = rng.normal(size=(2, 4)).astype("float32")
    v = rng.normal(size=(2, 4)).astype("float32")
    J = to_numpy(jacket.jacobian(plain, xp, mode="reverse"))
    assert_close(jacket.jvp(plain, xp, v), np.einsum("bon,bn->bo", J, v), rtol=1e-5, atol=1e-7)
    assert set(plain._jacket_state[False].forward.values()) <= {"native", "double_vjp"}


# ----------------------------------------------------------------- training mode: one mask per call


def _dropout_mlp(width: int = 8):
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            layers.Dense(width, dtype="float64"),
            layers.Dropout(0.5, dtype="float64"),
            layers.Dense(4, dtype="float64"),
        ]
    )


def _masks(model, J: np.ndarray) -> np.ndarray:
    """`m` with `J[b] = W2^T diag(m_b) W1^T` (least squares over the hidden units), after checking
    that `J[b]` is exactly of that form with every `m_b[k]` in {0, 2} (Dropout(0.5) keeps a unit
    scaled by 2 or drops it)."""
    W1 = to_numpy(model.layers[0].kernel)  # (3, width)
    W2 = to_numpy(model.layers[2].kernel)  # (width, 4)
    basis = np.stack([np.outer(W2[k], W1[:, k]).ravel() for k in range(W1.shape[1])], axis=1)
    masks = []
    for Jb in J:
        m = np.linalg.lstsq(basis, Jb.ravel(), rcond=None)[0]
        np.testing.assert_allclose(basis @ m, Jb.ravel(), atol=1e-10)  # one mask explains J[b]
        rounded = np.round(m)
        np.testing.assert_allclose(m, rounded, atol=1e-8)
        assert set(rounded) <= {0.0, 2.0}, m
        masks.append(rounded)
    return np.array(masks)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_training_mode_passes_share_one_dropout_mask(mode, strategy, rng):
    """chunk_size=1: one pass per row (or column), each calling the model; every pass must see the
    dropout mask of the others, so each sample's Jacobian is `W2^T diag(m) W1^T` for one `m`."""
    model = _dropout_mlp()
    x = rng.normal(size=(3, 3))
    J = to_numpy(
        jacket.jacobian(model, x, training=True, mode=mode, chunk_size=1, strategy=strategy)
    )
    masks = _masks(model, J)
    assert 0 < masks.mean() < 2  # some units dropped, some kept
    # the same mask for the same call in the other mode, and in one single pass
    again = to_numpy(jacket.jacobian(model, x, training=True, mode=mode, strategy=strategy))
    np.testing.assert_array_equal(_masks(model, again), masks)


def test_training_mode_jvp_and_vjp_see_the_jacobians_mask(rng):
    model = _dropout_mlp()
    x = rng.normal(size=(3, 3))
    J = to_numpy(jacket.jacobian(model, x, training=True, mode="reverse", chunk_size=1))
    _masks(model, J)
    v, u = rng.normal(size=(3, 3)), rng.normal(size=(3, 4))
    assert_close(jacket.jvp(model, x, v, training=True), np.einsum("bon,bn->bo", J, v), rtol=1e-12)
    assert_close(jacket.vjp(model, x, u, training=True), np.einsum("bo,bon->bn", u, J), rtol=1e-12)


def test_dropout_draws_as_the_readme_says(rng):
    """README, `model`: in training mode jacket never changes the model (its dropout seeds stay as
    they were) and every call sees the same draws; on TensorFlow and JAX the seed generators are
    read, never advanced (the model's own training call advances them: then jacket draws anew); on
    PyTorch each call is reseeded with `torch.initial_seed()`, so a new
    `keras.utils.set_random_seed` gives another draw and the same seed the same draw again."""
    model = _dropout_mlp()
    x = rng.normal(size=(3, 3))
    generator = model.layers[1].seed_generator

    def state():
        return to_numpy(generator.state).tolist()

    def mask():
        return _masks(model, to_numpy(jacket.jacobian(model, x, training=True)))

    before = state()
    first = mask()
    np.testing.assert_array_equal(mask(), first)  # call after call
    np.testing.assert_array_equal(
        _masks(model, to_numpy(jacket.jacobian_fn(model, training=True)(x))), first
    )
    assert state() == before  # the model's seeds as they were
    model(x, training=True)  # the user's own training call
    if BACKEND == "torch":  # Keras's Dropout draws from torch's generator, reseeded per call
        np.testing.assert_array_equal(mask(), first)
        keras.utils.set_random_seed(99)
        other = mask()
        assert (other != first).any()
        np.testing.assert_array_equal(mask(), other)
        keras.utils.set_random_seed(1234)  # conftest's seed: the first draw again
        np.testing.assert_array_equal(mask(), first)
    else:  # the model's generator moved on: jacket reads the new state
        assert state() != before
        other = mask()
        assert (other != first).any()
        np.testing.assert_array_equal(mask(), other)
        keras.utils.set_random_seed(1234)  # does not touch an existing generator
        np.testing.assert_array_equal(mask(), other)


# ------------------------------------------------------------- analyses: outputs, streams, JSMA


def _two_output_model():
    """x -> tanh(Dense 3) -> [Dense 2, Dense 1], and one single-output model per output (the same
    layers) for the oracle."""
    inputs = keras.Input((4,), dtype="float64")
    hidden = layers.Dense(3, activation="tanh", dtype="float64")(inputs)
    outs = [layers.Dense(2, dtype="float64")(hidden), layers.Dense(1, dtype="float64")(hidden)]
    return keras.Model(inputs, outs), [keras.Model(inputs, out) for out in outs]


def test_sensitivity_of_a_two_output_model_takes_the_outputs_together(rng):
    model, parts = _two_output_model()
    x = rng.normal(size=(5, 4))
    # oracle: each output's Jacobian by central differences, concatenated (5, 3, 4)
    J = np.concatenate([central_differences(p, x).reshape(5, -1, 4) for p in parts], axis=1)
    s = jacket.analysis.sensitivity(model, x, reduce="max_abs", batch_size=2)
    np.testing.assert_allclose(s.values, np.abs(J).max(axis=(0, 1)), rtol=1e-6)
    s = jacket.analysis.sensitivity(model, x, reduce="mean_abs")
    np.testing.assert_allclose(s.values, np.abs(J).mean(axis=(0, 1)), rtol=1e-6)
    # output=2: the first (only) entry of the second output
    s = jacket.analysis.sensitivity(model, x, reduce="rms", output=2, batch_size=3)
    np.testing.assert_allclose(s.values, np.sqrt((J[:, 2] ** 2).mean(axis=0)), rtol=1e-6)
    with pytest.raises(jacket.JacketValueError, match=r"`output` must index the model's 3"):
        jacket.analysis.sensitivity(model, x, output=3)


@pytest.mark.parametrize(
    "name,call",
    [
        ("jacobian_norm", lambda m, x: jacket.analysis.jacobian_norm(m, x)),
        ("jacobian_norm", lambda m, x: jacket.analysis.jacobian_norm(m, x, "nuc")),
        ("jacobian_norm", lambda m, x: jacket.analysis.jacobian_norm(m, x, 2)),
        ("lipschitz", lambda m, x: jacket.analysis.lipschitz(m, x)),
        ("logdet", lambda m, x: jacket.analysis.logdet(m, x)),
        ("saliency", lambda m, x: jacket.analysis.saliency(m, x)),
    ],
    ids=[
        "jacobian_norm-fro",
        "jacobian_norm-nuc",
        "jacobian_norm-2",
        "lipschitz",
        "logdet",
        "saliency",
    ],
)
def test_single_output_analyses_refuse_two_outputs_by_name(name, call, rng):
    model, _ = _two_output_model()
    with pytest.raises(jacket.JacketValueError, match=rf"^{name}: `model` must have one output"):
        call(model, rng.normal(size=(2, 4)))


def test_stream_items_tuples_are_pairs_and_lists_are_model_inputs(rng):
    model = keras.Sequential([keras.Input((4,), dtype="float64"), layers.Dense(2, dtype="float64")])
    x = rng.normal(size=(6, 4))
    W = to_numpy(model.layers[0].kernel)  # J[b] = W^T for every sample
    expected = np.abs(W.T).mean(axis=0)
    pairs = [(x[:3], np.zeros(3)), (x[3:], np.zeros(3), np.ones(3)), (x[:2],)]
    s = jacket.analysis.sensitivity(model, pairs, batch_size=4)
    np.testing.assert_allclose(s.values, expected, rtol=1e-12)
    assert s.samples == 8
    # a list is a model's several inputs: never silently cut to its first array
    with pytest.raises(jacket.JacketValueError, match=r"a list of 2.*yield tuples"):
        jacket.analysis.sensitivity(model, [[x[:3], x[3:]]])
    with pytest.raises(jacket.JacketValueError, match=r"a list of 2.*yield tuples"):
        jacket.analysis.lipschitz(model, iter([[x[:3], x[3:]]]))


def test_jsma_does_not_count_samples_already_of_their_target(rng):
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="float64"),
            layers.Dense(8, activation="tanh", dtype="float64"),
            layers.Dense(3, dtype="float64"),
        ]
    )
    x = rng.uniform(0.0, 0.5, size=(6, 6))
    predicted = to_numpy(model(x)).argmax(axis=1)
    target = (predicted + 1) % 3
    target[:2] = predicted[:2]  # the first two already are of their target
    r = jacket.attacks.jsma(model, x, target=target, theta=0.5, gamma=1.0)
    np.testing.assert_array_equal(r.skipped, [True, True, False, False, False, False])
    np.testing.assert_array_equal(r.x_adv[:2], x[:2])
    assert not r.success[:2].any() and (r.iterations[:2] == 0).all()
    # the others: success is the model's class on x_adv, the rate over the attacked samples only
    reached = to_numpy(model(r.x_adv)).argmax(axis=1) == target
    np.testing.assert_array_equal(r.success[2:], reached[2:])
    assert r.success_rate == pytest.approx(reached[2:].mean())
    assert r.summary()["attacked"] == 4
    everything = jacket.attacks.jsma(model, x[:2], target=predicted[:2], gamma=1.0)
    assert everything.skipped.all() and np.isnan(everything.success_rate)


# ------------------------------------------------------------- ops with no batching rule (JAX)


def _no_batching_rule_model():
    """Dense(3) then a layer whose backward pass binds a primitive with no batching rule, as
    JAX's cuDNN LSTM does on a GPU (`rnn_bwd`): its Jacobian is 2 W^T per sample."""
    import jax
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    doubled = Primitive("jacket_test_doubled")
    doubled.def_impl(lambda g: 2 * g)
    doubled.def_abstract_eval(lambda g: g)
    mlir.register_lowering(doubled, mlir.lower_fun(lambda g: 2 * g, multiple_results=False))

    @jax.custom_vjp
    def double(x):
        return 2 * x

    double.defvjp(lambda x: (2 * x, None), lambda _, g: (doubled.bind(g),))

    class Double(layers.Layer):
        def call(self, x):
            return double(x)

    return keras.Sequential([keras.Input((4,)), layers.Dense(3), Double()])


@pytest.mark.jax
def test_vmap_without_a_batching_rule_falls_back_to_a_loop(rng):
    model = _no_batching_rule_model()
    x = rng.standard_normal((5, 4)).astype("float32")
    expected = np.broadcast_to(2 * to_numpy(model.layers[0].kernel).T, (5, 3, 4))
    jac = jacket.jacobian_fn(model, mode="reverse")
    assert jac.plan(x).strategy == "vmap"  # what the cost model picks for such a model
    assert_close(jac(x), expected, rtol=1e-6)
    assert jac.plan(x).strategy == "loop"  # kept for later calls
    assert_close(jac(x), expected, rtol=1e-6)
    with pytest.raises(jacket.JacketValueError, match="strategy='vmap' cannot run on this model"):
        jacket.jacobian(model, x, strategy="vmap")
