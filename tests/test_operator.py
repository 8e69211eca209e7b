"""JacobianOperator: products, dense form and scipy's LinearOperator against central differences."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.sparse.linalg as sla
from keras import layers
from oracles import assert_close, central_differences, to_numpy

import jacket

RTOL = 1e-7  # against float64 central differences


def small_cnn(dtype="float64"):
    """(4, 4, 2) images to 3 outputs: a multi-axis input, out_size < in_size."""
    return keras.Sequential(
        [
            layers.Input((4, 4, 2), dtype=dtype),
            layers.Conv2D(3, 3, activation="tanh", dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(3, dtype=dtype),
        ]
    )


def widening(dtype="float64"):
    """3 inputs to (2, 4) outputs: out_size > in_size and a multi-axis output."""
    return keras.Sequential(
        [
            layers.Input((3,), dtype=dtype),
            layers.Dense(8, activation="tanh", dtype=dtype),
            layers.Reshape((2, 4), dtype=dtype),
        ]
    )


@pytest.fixture(scope="module")
def cnn_case():
    # seeded here: a module fixture is made before the first test's seeding (conftest), so its
    # weights would otherwise depend on whatever ran before it
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    model = small_cnn()
    x = rng.normal(size=(3, 4, 4, 2))
    J = central_differences(model, x).reshape(3, 3, 32)  # float64: relative error about 1e-9
    return model, x, J


def test_products_match_the_dense_jacobian(cnn_case, rng):
    model, x, J = cnn_case
    op = jacket.JacobianOperator(model, x)
    assert op.shape == (3, 3, 32) and op.in_shape == (4, 4, 2) and op.out_shape == (3,)
    assert op.T.shape == (3, 32, 3) and op.T.T is op
    v = rng.normal(size=x.shape)
    u = rng.normal(size=(3, 3))
    jv, uj = to_numpy(op @ v), to_numpy(op.T @ u)
    assert jv.shape == (3, 3) and uj.shape == (3, 4, 4, 2)
    assert_close(jv, np.einsum("bij,bj->bi", J, v.reshape(3, -1)), rtol=RTOL)
    assert_close(uj.reshape(3, -1), np.einsum("bi,bij->bj", u, J), rtol=RTOL)
    # the dot-product test, exact up to rounding: <J v, u> == <v, J^T u>
    np.testing.assert_allclose(np.sum(jv * u), np.sum(v * uj), rtol=1e-12)
    # a flattened v, and k vectors per sample pushed together
    assert_close(op @ v.reshape(3, 32), np.einsum("bij,bj->bi", J, v.reshape(3, -1)), rtol=RTOL)
    V = rng.normal(size=(3, 32, 5))
    U = rng.normal(size=(3, 3, 4))
    assert_close(op @ V, np.einsum("bij,bjk->bik", J, V), rtol=RTOL)
    assert_close(op.T @ U, np.einsum("bij,bik->bjk", J, U), rtol=RTOL)


def test_products_with_a_multi_axis_output(rng):
    model = widening()
    x = rng.normal(size=(2, 3))
    J = central_differences(model, x).reshape(2, 8, 3)
    op = jacket.JacobianOperator(model, x)
    assert op.shape == (2, 8, 3) and op.out_shape == (2, 4)
    u = rng.normal(size=(2, 2, 4))
    assert_close(op.T @ u, np.einsum("bi,bij->bj", u.reshape(2, 8), J), rtol=RTOL)
    assert_close(op.T @ u.reshape(2, 8), np.einsum("bi,bij->bj", u.reshape(2, 8), J), rtol=RTOL)
    U = rng.normal(size=(2, 8, 3))
    assert_close(op.T @ U, np.einsum("bij,bik->bjk", J, U), rtol=RTOL)
    assert_close(op.T.to_dense(), np.transpose(J, (0, 2, 1)), rtol=RTOL)


def test_to_dense(cnn_case):
    model, x, J = cnn_case
    op = jacket.JacobianOperator(model, x)
    assert_close(op.to_dense(), J, rtol=RTOL)
    assert tuple(op.to_dense(flatten=False).shape) == (3, 3, 4, 4, 2)


def test_as_linear_operator_with_scipy(cnn_case, rng):
    model, x, J = cnn_case
    op = jacket.JacobianOperator(model, x)
    A = op.as_linear_operator(1)
    assert A.shape == (3, 32) and A.dtype == np.float64
    v, u = rng.normal(size=32), rng.normal(size=3)
    assert_close(A @ v, J[1] @ v, rtol=RTOL)
    assert_close(A.rmatvec(u), J[1].T @ u, rtol=RTOL)
    M = rng.normal(size=(32, 4))
    assert_close(A.matmat(M), J[1] @ M, rtol=RTOL)
    assert_close(A.rmatmat(M[:3]), J[1].T @ M[:3], rtol=RTOL)
    # scipy's own algorithms on the matrix-free operator, against NumPy's SVD of the dense J
    s = sla.svds(A, k=2, return_singular_vectors=False, random_state=0)
    expected = np.sort(np.linalg.svd(J[1], compute_uv=False))[1:]
    np.testing.assert_allclose(np.sort(s), expected, rtol=RTOL)
    last = op.as_linear_operator(-1)
    assert_close(last @ v, J[2] @ v, rtol=RTOL)


def test_float32_model_gives_a_float32_operator(rng):
    model = keras.Sequential([layers.Input((5,)), layers.Dense(3)])
    W = np.asarray(model.layers[0].get_weights()[0], np.float64)
    x = rng.normal(size=(2, 5)).astype("float32")
    op = jacket.JacobianOperator(model, x)
    assert op.dtype == np.float32
    A = op.as_linear_operator(0)
    assert A.dtype == np.float32
    v = rng.normal(size=5).astype("float32")
    np.testing.assert_allclose(A @ v, W.T @ v, rtol=1e-5, atol=1e-6)  # J = W^T
    assert (A @ v).dtype == np.float32


def test_repr_before_and_after_the_output_is_known(cnn_case):
    model, x, _ = cnn_case
    op = jacket.JacobianOperator(model, x)
    assert "out_shape=?" in repr(op)
    assert op.out_shape == (3,)
    assert "out_shape=(3,)" in repr(op) and repr(op.T).endswith(".T")


def test_errors(cnn_case, rng):
    model, x, _ = cnn_case
    with pytest.raises(jacket.JacketTypeError, match="`model` must be a Keras model"):
        jacket.JacobianOperator("model", x)
    with pytest.raises(jacket.JacketValueError, match="Received: x.shape=\\(2,\\)"):
        jacket.JacobianOperator(model, x[0, 0, 0])
    with pytest.raises(jacket.JacketValueError, match="several inputs are not supported"):
        jacket.JacobianOperator(model, [x, x])
    with pytest.raises(jacket.JacketTypeError, match="`training` must be True or False"):
        jacket.JacobianOperator(model, x, training="no")
    op = jacket.JacobianOperator(model, x)
    with pytest.raises(jacket.JacketValueError) as info:
        op @ np.ones((3, 5))
    assert "op @ v: `v` must have shape (3, 4, 4, 2), (3, 32)" in str(info.value)
    assert "Received: v.shape=(3, 5)" in str(info.value)
    with pytest.raises(jacket.JacketValueError, match="op.T @ u: `u` must have shape \\(3, 3\\)"):
        op.T @ np.ones((3, 32))
    with pytest.raises(jacket.JacketValueError, match="sample index in \\[0, 3\\). Received: b=3"):
        op.as_linear_operator(3)
    with pytest.raises(jacket.JacketTypeError, match="Received: b=1.0"):
        op.as_linear_operator(1.0)


def test_a_model_with_several_outputs_is_refused(rng):
    inputs = keras.Input((3,), dtype="float64")
    model = keras.Model(
        inputs, [layers.Dense(2, dtype="float64")(inputs), layers.Dense(1, dtype="float64")(inputs)]
    )
    op = jacket.JacobianOperator(model, rng.normal(size=(2, 3)))
    with pytest.raises(jacket.JacketValueError, match="`model` must have one output tensor"):
        op @ rng.normal(size=(2, 3))
