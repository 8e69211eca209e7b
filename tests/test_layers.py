"""Jacobians with respect to (`wrt`) and of (`of`) any layer: against float64 central differences
through the part of the model between them, written by hand from the same layers; the errors for
unknown, ambiguous and subclassed cases; every option with a cut."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import layers
from oracles import assert_close, central_differences, forward, to_numpy

import jacket
from jacket import analysis

BACKEND = keras.backend.backend()
F64 = "float64"


def residual_model():
    """x (5) -> d1 (6, tanh) -> d2 (4, tanh) -> add(d2, skip(x)) -> out (3): a path from the
    input around the layers, so a cut at d1 holds x constant for the skip."""
    x = keras.Input((5,), name="x", dtype=F64)
    h1 = layers.Dense(6, activation="tanh", name="d1", dtype=F64)(x)
    h2 = layers.Dense(4, activation="tanh", name="d2", dtype=F64)(h1)
    skip = layers.Dense(4, name="skip", dtype=F64)(x)
    out = layers.Dense(3, name="out", dtype=F64)(layers.Add(name="add", dtype=F64)([h2, skip]))
    return keras.Model(x, out)


def token_model(mask_zero=True):
    """Integer ids (7) -> Embedding(20, 4) -> LSTM(5) -> Dense(2)."""
    ids = keras.Input((7,), dtype="int32", name="ids")
    e = layers.Embedding(20, 4, mask_zero=mask_zero, name="embedding", dtype=F64)(ids)
    h = layers.LSTM(5, name="lstm", dtype=F64)(e)
    return keras.Model(ids, layers.Dense(2, name="dense", dtype=F64)(h))


def token_ids(rng, batch=3):
    ids = rng.integers(1, 20, (batch, 7)).astype("int32")
    ids[0, 4:] = 0  # padding: masked
    return ids


@pytest.fixture
def x5(rng):
    return rng.standard_normal((3, 5))


def holding(fn, *held):
    """`fn(h, *held)` on a batch of moved copies of the samples (the oracle's `(2, columns,
    batch)` rows): each held constant repeated to match, copy `r` of sample `b` at `r * B + b`."""

    def f(h):
        return fn(h, *(np.tile(c, (len(h) // len(c),) + (1,) * (c.ndim - 1)) for c in held))

    return f


# ------------------------------------------------------------------ against central differences


def test_wrt_a_middle_layer_matches_the_head_by_central_differences(x5):
    model = residual_model()
    d2, skip, add, out = (model.get_layer(n) for n in ("d2", "skip", "add", "out"))
    held = to_numpy(skip(x5))  # the input's other path, held constant
    head = holding(lambda h, c: out(add([d2(h), c])), held)
    h1 = to_numpy(model.get_layer("d1")(x5))
    J = jacket.jacobian(model, x5, wrt="d1")
    assert tuple(J.shape) == (3, 3, 6)
    assert_close(J, central_differences(head, h1), rtol=1e-7)


def test_of_a_layer_matches_the_prefix_by_central_differences(x5):
    model = residual_model()

    def prefix(x):
        return model.get_layer("d2")(model.get_layer("d1")(x))

    J = jacket.jacobian(model, x5, of="d2")
    assert_close(J, central_differences(prefix, x5), rtol=1e-7)


def test_wrt_and_of_lists_have_the_structure_of_of_over_wrt(x5):
    model = residual_model()
    J = jacket.jacobian(model, x5, wrt=["d1", "x"], of=["d2", "out"])
    assert [[tuple(b.shape) for b in row] for row in J] == [
        [(3, 4, 6), (3, 4, 5)],
        [(3, 3, 6), (3, 3, 5)],
    ]
    # with respect to d1 and x together: x's block holds d1 fixed (partial derivatives)
    skip, add, out, d2 = (model.get_layer(n) for n in ("skip", "add", "out", "d2"))
    h1 = to_numpy(model.get_layer("d1")(x5))
    around = holding(lambda x, h: out(add([d2(h), skip(x)])), h1)
    assert_close(J[1][1], central_differences(around, x5), rtol=1e-7)
    J_dict = jacket.jacobian(model, x5, wrt={"hidden": "d1"}, of="out")
    assert list(J_dict) == ["hidden"]
    assert_close(J_dict["hidden"], J[1][0], rtol=1e-12)


def test_check_with_wrt_and_of(x5):
    report = jacket.check(residual_model(), x5.astype("float32"), wrt="d1", of="add")
    assert report.ok, str(report)
    assert "cut" in report.reference


def test_nested_model_layers_by_name_and_path(rng):
    inner = keras.Sequential(
        [
            keras.Input((4,), dtype=F64),
            layers.Dense(3, activation="tanh", name="idense", dtype=F64),
            layers.Dense(2, name="idense2", dtype=F64),
        ],
        name="inner",
    )
    x_in = keras.Input((4,), name="xi", dtype=F64)
    model = keras.Model(x_in, layers.Dense(1, name="head", dtype=F64)(inner(x_in)))
    x = rng.standard_normal((2, 4))
    h = to_numpy(inner.get_layer("idense")(x))

    def after(h):
        return model.get_layer("head")(inner.get_layer("idense2")(h))

    expected = central_differences(after, h)
    assert_close(jacket.jacobian(model, x, wrt="idense"), expected, rtol=1e-7)
    assert_close(jacket.jacobian(model, x, wrt="inner/idense"), expected, rtol=1e-7)
    assert_close(
        jacket.jacobian(model, x, of="inner/idense"),
        central_differences(lambda x: inner.get_layer("idense")(x), x),
        rtol=1e-7,
    )


def test_shared_layer_is_named_with_its_call(rng):
    shared = layers.Dense(4, activation="tanh", name="shared", dtype=F64)
    x_in = keras.Input((4,), dtype=F64)
    model = keras.Model(x_in, shared(shared(x_in)))
    x = rng.standard_normal((2, 4))
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(model, x, wrt="shared")
    message = str(info.value)
    assert "layer 'shared' is called 2 times" in message and "'shared:0' or 'shared:1'" in message
    h = to_numpy(shared(x))
    expected = central_differences(shared, h)
    assert_close(jacket.jacobian(model, x, wrt="shared:0"), expected, rtol=1e-7)


def test_layer_of_several_outputs_and_one_of_them(rng):
    x_in = keras.Input((4, 3), dtype=F64)
    out, h, c = layers.LSTM(2, return_state=True, name="lstm", dtype=F64)(x_in)
    model = keras.Model(x_in, layers.Dense(1, name="d", dtype=F64)(layers.Concatenate()([out, c])))
    x = rng.standard_normal((2, 4, 3))
    J = jacket.jacobian(model, x, of="lstm")
    assert [tuple(b.shape) for b in J] == [(2, 2, 4, 3)] * 3
    J0 = jacket.jacobian(model, x, of="lstm[2]")
    assert_close(J0, J[2], rtol=1e-12)


# ------------------------------------------------------------------------- text models and traps


def test_token_model_wrt_embedding(rng):
    model = token_model()
    ids = token_ids(rng)
    J = jacket.jacobian(model, ids, wrt="embedding")
    assert tuple(J.shape) == (3, 2, 7, 4)
    J = to_numpy(J)
    assert np.abs(J[0, :, 4:]).max() == 0.0  # masked steps: the mask reaches the LSTM
    assert np.abs(J[0, :, :4]).max() > 0
    point = jacket.engine.at(model, ids, wrt="embedding")
    assert_close(point.outputs, forward(model, ids), rtol=1e-12)  # float64 kept: the oracle
    # the head by hand: the LSTM on the embeddings with the mask the ids give
    lstm, dense = model.get_layer("lstm"), model.get_layer("dense")
    mask = keras.ops.convert_to_tensor(ids != 0)
    E = to_numpy(point.wrt)
    for b in range(2):  # a padded sample and a full one
        one = central_differences(lambda e, b=b: dense(lstm(e, mask=mask[b : b + 1])), E[b : b + 1])
        assert_close(J[b : b + 1], one, rtol=1e-6)


def test_integer_input_beside_a_float_one_is_held_constant(rng):
    image = keras.Input((3,), name="image", dtype=F64)
    mask = keras.Input((3,), name="mask", dtype="int32")
    gate = layers.Activation("linear", dtype=F64)(keras.ops.cast(mask, F64))
    y = layers.Dense(2, name="y", dtype=F64)(layers.Multiply(dtype=F64)([image, gate]))
    model = keras.Model({"image": image, "mask": mask}, y)
    x = {"image": rng.standard_normal((2, 3)), "mask": np.array([[1, 0, 1], [0, 1, 1]], "int32")}
    J = jacket.jacobian(model, x)
    assert list(J) == ["image"]  # keyed by the inputs it covers
    fixed = holding(lambda im, m: model({"image": im, "mask": m}), x["mask"])
    expected = central_differences(fixed, x["image"])
    assert_close(J["image"], expected, rtol=1e-7)
    assert_close(jacket.jacobian(model, x, wrt="image"), expected, rtol=1e-7)


def test_integer_only_model_points_to_the_embedding(rng):
    with pytest.raises(jacket.JacketTypeError) as info:
        jacket.jacobian(token_model(), token_ids(rng))
    assert "declared int32" in str(info.value) and "wrt='embedding'" in str(info.value)


def test_float_ids_into_an_embedding_warn_and_name_the_layer(rng):
    model = keras.Sequential(
        [keras.Input((7,)), layers.Embedding(20, 4, name="emb"), layers.LSTM(3), layers.Dense(2)]
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", jacket.JacketWarning)
        J = jacket.jacobian(model, token_ids(rng).astype("float32"))
    (message,) = [str(w.message) for w in record if issubclass(w.category, jacket.JacketWarning)]
    assert "layer 'emb' (Embedding)" in message and "wrt='emb'" in message
    assert np.abs(to_numpy(J)).max() == 0.0


def test_a_list_in_input_order_for_a_dict_model_as_keras_takes_it(rng):
    a, b = keras.Input((2,), name="a", dtype=F64), keras.Input((3,), name="b", dtype=F64)
    model = keras.Model({"a": a, "b": b}, layers.Dense(1, dtype=F64)(layers.Concatenate()([a, b])))
    xa, xb = rng.standard_normal((2, 2)), rng.standard_normal((2, 3))
    J_list = jacket.jacobian(model, [xa, xb])
    J_dict = jacket.jacobian(model, {"a": xa, "b": xb})
    assert list(J_list) == ["a", "b"]
    assert_close(J_list["b"], J_dict["b"], rtol=1e-12)
    # `v` may come as `x` came: a list in the order of the keys
    va, vb = rng.standard_normal((2, 2)), rng.standard_normal((2, 3))
    expected = np.einsum("boi,bi->bo", to_numpy(J_dict["a"]), va) + np.einsum(
        "boi,bi->bo", to_numpy(J_dict["b"]), vb
    )
    assert_close(jacket.jvp(model, [xa, xb], [va, vb]), expected, rtol=1e-6)  # float32 concat
    assert_close(jacket.jvp(model, [xa, xb], {"a": va, "b": vb}), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------- errors


def test_unknown_layer_names_the_layers():
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(residual_model(), np.ones((1, 5)), wrt="dd1")
    message = str(info.value)
    assert "`wrt` names no layer of the model. Received: wrt='dd1'" in message
    assert "Did you mean 'd1'" in message


def test_ambiguous_name_in_two_nested_models():
    def block(name):
        return keras.Sequential(
            [keras.Input((3,), dtype=F64), layers.Dense(3, name="dense_x", dtype=F64)], name=name
        )

    x_in = keras.Input((3,), dtype=F64)
    model = keras.Model(x_in, block("b2")(block("b1")(x_in)))
    with pytest.raises(jacket.JacketValueError, match=r"'b1/dense_x', 'b2/dense_x'"):
        jacket.jacobian(model, np.ones((1, 3)), wrt="dense_x")
    assert tuple(jacket.jacobian(model, np.ones((1, 3)), wrt="b1/dense_x").shape) == (1, 3, 3)


def test_subclassed_model_says_what_works_instead():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = layers.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(jacket.JacketTypeError) as info:
        jacket.jacobian(Net(), np.ones((1, 3), "float32"), wrt="d")
    message = str(info.value)
    assert "a subclassed model (Net)" in message and "Functional API" in message


def test_of_before_wrt_is_refused(x5):
    with pytest.raises(jacket.JacketValueError, match="does not depend on `wrt`"):
        jacket.jacobian(residual_model(), x5, wrt="d2", of="d1")


# ------------------------------------------------------------------------- every option with a cut


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_modes_strategies_and_chunks_agree_with_a_cut(rng, mode):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            layers.Conv2D(2, 3, padding="same", activation="tanh", name="c1"),
            layers.Conv2D(1, 3, padding="same", name="c2"),
        ]
    )
    x = rng.standard_normal((2, 6, 6, 1)).astype("float32")
    reference = to_numpy(jacket.jacobian(model, x, wrt="c1", flatten=True))
    for strategy in ("replicate", "vmap", "loop"):
        J = jacket.jacobian(
            model, x, wrt="c1", flatten=True, mode=mode, strategy=strategy, chunk_size=5
        )
        assert_close(J, reference, rtol=1e-5)
    full = to_numpy(jacket.jacobian(model, x, wrt="c1", flatten=True, per_sample=False))
    assert_close(full[[0, 1], :, [0, 1], :], reference, rtol=1e-6)
    assert np.abs(full[0, :, 1]).max() == 0
    diagonal = jacket.jacobian(model, x, wrt="c1", flatten=True, per_sample="diagonal")
    assert_close(diagonal, reference, rtol=1e-6)
    S = jacket.jacobian(model, x, wrt="c1", flatten=True, sparse=True, mode=mode)
    assert_close(S.to_dense(), reference, rtol=1e-5)
    small = jacket.jacobian(model, x, wrt="c1", flatten=True, memory_budget=4096)
    assert_close(small, reference, rtol=1e-6)


def test_sparsity_pattern_of_a_cut():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            layers.Conv2D(2, 3, padding="same", name="c1"),
            layers.Conv2D(1, 3, padding="same", name="c2"),
        ]
    )
    P = jacket.sparsity(model, (6, 6, 1), wrt="c1", verify=True)
    assert P.shape == (36, 72)
    window = sum(min(r + 1, 5) - max(r - 1, 0) + 1 for r in range(6))  # 3x3 "same", per axis
    assert P.nnz == window**2 * 2


def test_jvp_vjp_operator_and_norms_at_a_layer(x5, rng):
    model = residual_model()
    J = to_numpy(jacket.jacobian(model, x5, wrt="d1"))
    v, u = rng.standard_normal((3, 6)), rng.standard_normal((3, 3))
    assert_close(jacket.jvp(model, x5, v, wrt="d1"), np.einsum("bij,bj->bi", J, v), rtol=1e-10)
    assert_close(jacket.vjp(model, x5, u, wrt="d1"), np.einsum("bij,bi->bj", J, u), rtol=1e-10)
    op = jacket.JacobianOperator(model, x5, wrt="d1")
    assert op.shape == (3, 3, 6)
    assert_close(op @ v, np.einsum("bij,bj->bi", J, v), rtol=1e-10)
    norm = analysis.jacobian_norm(model, x5, "fro", wrt="d1")
    assert_close(norm.value, np.sqrt((J**2).sum(axis=(1, 2))), rtol=1e-10)
    s = analysis.sensitivity(model, x5, wrt="d1")
    assert s.values.shape == (6,)


def test_coupling_probe_runs_on_the_cut(rng):
    x_in = keras.Input((3,))
    h = layers.Dense(3, name="h")(x_in)
    mixed = layers.Lambda(lambda t: t - keras.ops.mean(t, axis=0, keepdims=True))(h)
    model = keras.Model(x_in, layers.Dense(2)(mixed))
    x = rng.standard_normal((4, 3)).astype("float32")
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(model, x, wrt="h")
    assert tuple(jacket.jacobian(model, x, wrt="h", per_sample=False).shape) == (4, 2, 4, 3)


def test_training_mode_with_a_cut(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(5, name="d"),
            layers.BatchNormalization(name="bn"),
            layers.Dense(2),
        ]
    )
    x = rng.standard_normal((3, 4)).astype("float32")
    with pytest.raises(jacket.CouplingError):  # batch statistics mix the samples
        jacket.jacobian(model, x, wrt="d", training=True)
    J = jacket.jacobian(model, x, wrt="d", training=True, per_sample="diagonal")
    assert tuple(J.shape) == (3, 2, 5)
    before = [w.copy() for w in model.get_weights()]
    jacket.jacobian(model, x, wrt="d", training=True, per_sample=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.skipif(BACKEND == "torch", reason="eager PyTorch has no traces to count")
def test_jacobian_fn_with_wrt_does_not_retrace(x5):
    fn = jacket.jacobian_fn(residual_model(), wrt="d1", strategy="vmap")
    fn(x5)
    traces = fn.trace_count
    fn(x5 + 1.0)
    assert fn.trace_count == traces


def test_the_plan_cache_keys_a_cut_by_its_layers(x5):
    from jacket.engine.cut import cut_for
    from jacket.engine.model import architecture

    model = residual_model()
    keys = {architecture(cut_for("t", model, wrt, None)) for wrt in ("d1", "d2", "x")}
    assert len(keys) == 3 and architecture(model) not in keys


def test_points_move_the_layer_values(x5):
    model = residual_model()
    point = jacket.engine.at(model, x5, wrt="d1")
    moved = point.with_values(keras.ops.zeros_like(point.wrt))
    J = jacket.jacobian(model, moved)
    d2, skip, add, out = (model.get_layer(n) for n in ("d2", "skip", "add", "out"))
    head = holding(lambda h, c: out(add([d2(h), c])), to_numpy(skip(x5)))
    expected = central_differences(head, np.zeros((3, 6)))
    assert_close(J, expected, rtol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert point[0:2].batch == 2
