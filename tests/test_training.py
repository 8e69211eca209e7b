"""jacket.training: input derivatives inside training, on the active Keras backend.

The oracles are independent of jacket: closed forms in float64 NumPy for a tanh MLP (its
Jacobian, Hessian diagonal and mixed partials), central differences of those closed forms with
respect to the weights, and the framework's own autodiff (a `GradientTape`, `jax.grad`,
`torch.autograd.grad`) for the gradient of jacket's penalties: that is also a user's own
training loop, written three ways.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import BACKEND
from oracles import assert_close, keras_float64, to_numpy

import jacket
from jacket import training

N_IN, HIDDEN, N_OUT, BATCH = 3, 5, 2, 4


# ------------------------------------------------------------------------------------- oracles


@pytest.fixture(autouse=True)
def _float64_as_in_a_float64_training():
    """jacket.training runs inside Keras's own step, where Keras demotes float64 to float32 on JAX
    and PyTorch for the user's loss as for the penalty; these tests compare with float64 closed
    forms, so Keras keeps float64 throughout here (`keras_float64`)."""
    with keras_float64():
        yield


def mlp(n_out=N_OUT, dtype="float64"):
    """`y = W2^T tanh(W1^T x + b1) + b2`."""
    return keras.Sequential(
        [
            keras.Input((N_IN,), dtype=dtype),
            keras.layers.Dense(HIDDEN, activation="tanh", dtype=dtype, name="encoder"),
            keras.layers.Dense(n_out, dtype=dtype, bias_initializer="random_normal"),
        ]
    )


def params(model) -> list[np.ndarray]:
    return [np.asarray(w, np.float64) for w in model.get_weights()]


def parts(p, x):
    W1, b1, W2, b2 = p
    t = np.tanh(x @ W1 + b1)  # (B, h)
    s = 1 - t**2  # tanh'
    s2 = -2 * t * s  # tanh''
    return W1, W2, b2, t, s, s2


def closed_y(p, x):
    W1, W2, b2, t, _, _ = parts(p, x)
    return t @ W2 + b2


def closed_J(p, x):  # (B, m, n)
    W1, W2, _, _, s, _ = parts(p, x)
    return np.einsum("ki,bk,jk->bij", W2, s, W1)


def closed_mixed(p, x, j, k):  # d^2 y_i / dx_j dx_k: (B, m)
    W1, W2, _, _, _, s2 = parts(p, x)
    return np.einsum("ki,bk,k->bi", W2, s2, W1[j] * W1[k])


def closed_u_xx(p, x):  # (B, m, n)
    return np.stack([closed_mixed(p, x, j, j) for j in range(x.shape[1])], axis=-1)


def closed_hvp(p, x, v):  # (B, m, n)
    W1, W2, _, _, _, s2 = parts(p, x)
    return np.einsum("ki,bk,jk,bk->bij", W2, s2, W1, v @ W1)


def closed_encoder_sq(p, x):  # ||d tanh(W1^T x + b1) / dx||_F^2 per sample
    W1, _, _, _, s, _ = parts(p, x)
    return (s**2) @ (W1**2).sum(axis=0)


def projections(seed, k, batch, m):
    """The unit projections jacket draws for `seed` (an int seed: the same draw every time)."""
    g = to_numpy(keras.random.normal((k, batch, m), dtype="float64", seed=seed))
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def pde_points():
    return np.random.default_rng(5).uniform(-1, 1, (6, N_IN))


def residual(x, d):
    return d.laplacian[:, 0] + d.u[:, 1] - keras.ops.sin(x[:, 0])


def closed_residual(p, pts):
    lap = closed_u_xx(p, pts).sum(-1)
    return np.mean((lap[:, 0] + closed_y(p, pts)[:, 1] - np.sin(pts[:, 0])) ** 2)


INTERPOLATE_SEED = 11
PAIR_TARGETS = np.array([[0.3], [-1.0], [2.0], [0.1]])  # distinct: no ties to break


def closed_penalty(name, p, x):
    """The penalty's value as a function of the weights `p`, in NumPy."""
    if name == "jacobian_norm_exact":
        return np.mean((closed_J(p, x) ** 2).sum(axis=(1, 2)))
    if name == "jacobian_norm_2":
        v = projections(7, 2, len(x), N_OUT)  # (k, B, m)
        vJ = np.einsum("kbi,bij->kbj", v, closed_J(p, x))
        return np.mean(N_OUT * (vJ**2).sum(-1).mean(0))
    if name == "gradient_penalty":
        norm = np.sqrt((closed_J(p, x) ** 2).sum(axis=(1, 2)) + 1e-12)
        return np.mean((norm - 1.0) ** 2)
    if name == "gradient_penalty_interpolates":
        eps = to_numpy(keras.random.uniform((len(x),), dtype="float64", seed=INTERPOLATE_SEED))
        xi = x + eps[:, None] * (np.roll(x, 1, axis=0) - x)
        norm = np.sqrt((closed_J(p, xi) ** 2).sum(axis=(1, 2)) + 1e-12)
        return np.mean((norm - 0.5) ** 2)
    if name == "gradient_penalty_pairs":  # sorted by target, first with last, ...
        eps = to_numpy(keras.random.uniform((len(x),), dtype="float64", seed=INTERPOLATE_SEED))
        order = np.argsort(PAIR_TARGETS[:, 0])
        partner = np.empty(len(x), int)
        partner[order] = order[::-1]
        xi = x + eps[:, None] * (x[partner] - x)
        norm = np.sqrt((closed_J(p, xi) ** 2).sum(axis=(1, 2)) + 1e-12)
        return np.mean((norm - 1.0) ** 2)
    if name == "contractive":
        return np.mean(closed_encoder_sq(p, x))
    if name == "pde_residual":
        return closed_residual(p, pde_points())
    raise AssertionError(name)


PENALTIES = {
    "jacobian_norm_exact": (lambda: training.JacobianNorm(1.0, "exact"), 0),
    "jacobian_norm_2": (lambda: training.JacobianNorm(1.0, 2), 7),
    "gradient_penalty": (lambda: training.GradientPenalty(1.0), 0),
    "gradient_penalty_interpolates": (
        lambda: training.GradientPenalty(1.0, 0.5, interpolate=True),
        INTERPOLATE_SEED,
    ),
    "gradient_penalty_pairs": (
        lambda: training.GradientPenalty(1.0, interpolate=True),
        INTERPOLATE_SEED,
    ),
    "contractive": (lambda: training.Contractive(1.0, "encoder"), 0),
    "pde_residual": (lambda: training.PDEResidual(residual, points=pde_points()), 0),
}


def central_differences(f, p, h=1e-6) -> np.ndarray:
    """`d f(p) / d p`, flattened over every array of `p`, by float64 central differences."""
    grads = []
    for i, w in enumerate(p):
        g = np.zeros(w.size)
        for j in range(w.size):
            up = [q.copy() for q in p]
            down = [q.copy() for q in p]
            up[i].flat[j] += h
            down[i].flat[j] -= h
            g[j] = (f(up) - f(down)) / (2 * h)
        grads.append(g)
    return np.concatenate(grads)


def autodiff_gradient(model, fn) -> np.ndarray:
    """`d fn() / d model.trainable_variables` by the framework's own autodiff, the way a user's
    training loop takes it on this backend."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        zero = tf.UnconnectedGradients.ZERO
        grads = tape.gradient(value, [v.value for v in variables], unconnected_gradients=zero)
    elif BACKEND == "jax":
        import jax

        def f(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn()

        grads = jax.grad(f)([v.value for v in variables])
    else:
        import torch

        value = fn()
        values = [v.value for v in variables]
        grads = torch.autograd.grad(value, values, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, values)]
    return np.concatenate([to_numpy(g).ravel() for g in grads])


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(BATCH, N_IN)), rng.normal(size=(BATCH, N_OUT))


# ----------------------------------------------------------------------- derivatives, functions


def test_derivatives_match_closed_forms(data):
    model = mlp()
    x, _ = data
    p = params(model)
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(BATCH, N_IN))
    J = closed_J(p, x)
    assert_close(training.jacobian(model, x), J, rtol=1e-10)
    assert_close(training.vjp(model, x, u), np.einsum("bi,bij->bj", u, J), rtol=1e-10)
    assert_close(training.jvp(model, x, v), np.einsum("bij,bj->bi", J, v), rtol=1e-10)
    assert_close(training.hvp(model, x, v), closed_hvp(p, x, v), rtol=1e-10)
    assert_close(training.laplacian(model, x), closed_u_xx(p, x).sum(-1), rtol=1e-10)
    sq = training.squared_frobenius(model, x, n_projections="exact")
    assert_close(sq, (J**2).sum(axis=(1, 2)), rtol=1e-10)
    d = training.derivatives(model, x)
    assert_close(d.u, closed_y(p, x), rtol=1e-12)
    assert_close(d.u_x, J, rtol=1e-10)
    assert_close(d.u_xx, closed_u_xx(p, x), rtol=1e-10)
    assert_close(d.partial(0, 2), closed_mixed(p, x, 0, 2), rtol=1e-10)
    assert_close(d.partial(1), J[:, :, 1], rtol=1e-10)


def test_derivatives_of_a_wide_output_and_a_structure(data):
    """More outputs than inputs (forward mode where it is native), and a model of two inputs:
    against the framework's own Jacobian, leaf by leaf."""
    x, _ = data
    model = mlp(n_out=7)
    J = closed_J(params(model), x)
    assert_close(training.jacobian(model, x), J, rtol=1e-10)
    assert_close(
        training.squared_frobenius(model, x, n_projections="exact"), (J**2).sum((1, 2)), rtol=1e-10
    )

    a = keras.Input((2,), dtype="float64", name="a")
    b = keras.Input((1,), dtype="float64", name="b")
    h = keras.layers.Concatenate(dtype="float64")([a, b])
    two = keras.Model({"a": a, "b": b}, mlp()(h))
    inputs = {"a": x[:, :2], "b": x[:, 2:]}
    p = params(two)
    g = training.vjp(two, inputs, np.ones((BATCH, N_OUT)))
    full = closed_J(p, x).sum(axis=1)
    assert_close(g["a"], full[:, :2], rtol=1e-10)
    assert_close(g["b"], full[:, 2:], rtol=1e-10)
    sq = training.squared_frobenius(two, inputs, n_projections="exact")
    assert_close(sq, (closed_J(p, x) ** 2).sum(axis=(1, 2)), rtol=1e-10)


@pytest.mark.parametrize("quantity", ["hvp", "laplacian", "jacobian", "jvp"])
def test_derivative_functions_are_differentiable_in_the_weights(quantity, data):
    """The weight gradient of each function (through the framework's own autodiff, as in a
    user's loop) against central differences of its closed form."""
    model = mlp()
    x, _ = data
    v = np.random.default_rng(2).normal(size=(BATCH, N_IN))
    weights = np.random.default_rng(4).normal(size=(BATCH, N_OUT, N_IN))
    ops = keras.ops
    w = ops.convert_to_tensor(weights)

    def jacket_value():
        if quantity == "hvp":
            return ops.sum(training.hvp(model, x, v) * w)
        if quantity == "laplacian":
            return ops.sum(ops.sin(training.laplacian(model, x)))
        if quantity == "jacobian":
            return ops.sum(training.jacobian(model, x) * w)
        return ops.sum(ops.square(training.jvp(model, x, v)))

    def closed(p):
        if quantity == "hvp":
            return np.sum(closed_hvp(p, x, v) * weights)
        if quantity == "laplacian":
            return np.sum(np.sin(closed_u_xx(p, x).sum(-1)))
        if quantity == "jacobian":
            return np.sum(closed_J(p, x) * weights)
        return np.sum(np.einsum("bij,bj->bi", closed_J(p, x), v) ** 2)

    expected = central_differences(closed, params(model))
    assert_close(autodiff_gradient(model, jacket_value), expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("name", list(PENALTIES))
def test_penalty_value_and_weight_gradient(name, data):
    """Each penalty's value against its closed form, and its gradient with respect to the weights
    (the framework's autodiff through jacket) against central differences of the closed form."""
    model = mlp()
    x, _ = data
    make, seed = PENALTIES[name]
    penalty = make()

    y = PAIR_TARGETS if name.endswith("_pairs") else None

    def value():
        return penalty.value(model, x, y, training=False, seed=seed)

    p = params(model)
    assert_close(value(), closed_penalty(name, p, x), rtol=1e-10)
    expected = central_differences(lambda q: closed_penalty(name, q, x), p)
    assert_close(autodiff_gradient(model, value), expected, rtol=1e-6, atol=1e-9)


def test_fit_step_is_the_penalized_gradient_step(data):
    """One SGD step of `fit` on the regularized model moves the weights by `-lr` times the
    gradient of `mse + 0.5 * ||J||_F^2 + 0.2 * contractive` (central differences); `evaluate`
    logs each penalty at the new weights."""
    model = mlp()
    x, y = data
    p0 = params(model)
    lr = 0.05
    reg = training.regularize(
        model, training.JacobianNorm(0.5, "exact"), training.Contractive(0.2, "encoder")
    )
    reg.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    history = reg.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    def total(p):
        mse = np.mean((closed_y(p, x) - y) ** 2)
        jn = closed_penalty("jacobian_norm_exact", p, x)
        return mse + 0.5 * jn + 0.2 * closed_penalty("contractive", p, x)

    step = np.concatenate([(a - b).ravel() for a, b in zip(params(model), p0)])
    assert_close(step, -lr * central_differences(total, p0), rtol=1e-6, atol=1e-10)
    logged = history.history
    assert set(logged) == {"loss", "jacobian_norm", "contractive"}
    assert logged["jacobian_norm"][0] == pytest.approx(closed_penalty("jacobian_norm_exact", p0, x))
    assert logged["loss"][0] == pytest.approx(total(p0))

    p1 = params(model)
    result = reg.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    assert result["jacobian_norm"] == pytest.approx(closed_penalty("jacobian_norm_exact", p1, x))
    assert result["contractive"] == pytest.approx(closed_penalty("contractive", p1, x))


def test_projection_estimate_is_unbiased(data):
    """The mean of one-projection estimates against the exact norm (closed form): many draws of
    one projection each (in one call) and 24 calls of one projection on a seed generator, each
    mean within 5 standard errors of the exact value."""
    model = mlp(n_out=6)
    x, _ = data
    exact = (closed_J(params(model), x) ** 2).sum(axis=(1, 2))
    k = 4000
    many = to_numpy(training.squared_frobenius(model, x, n_projections=k, seed=3))
    # one projection's spread, measured on the draws themselves
    one = np.stack(
        [
            to_numpy(training.squared_frobenius(model, x, n_projections=1, seed=generator))
            for generator in [keras.random.SeedGenerator(9)]
            for _ in range(24)
        ]
    )
    spread = one.std(axis=0)
    assert np.all(np.abs(many - exact) <= 5 * spread / np.sqrt(k))
    assert np.all(np.abs(one.mean(axis=0) - exact) <= 5 * spread / np.sqrt(len(one)))
    assert np.all(spread > 0)  # the generator moved: 24 different draws


def test_penalties_leave_the_model_state_alone(data):
    """A penalty's forward pass in training mode reads BatchNormalization's statistics and never
    moves them: one step with a penalty leaves them where the plain step leaves them."""
    x, y = data

    def run(penalized: bool):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((N_IN,)),
                keras.layers.Dense(HIDDEN, activation="tanh"),
                keras.layers.BatchNormalization(momentum=0.5),
                keras.layers.Dense(N_OUT),
            ]
        )
        if penalized:
            before = [to_numpy(v) for v in model.variables]
            penalty = training.JacobianNorm(0.1)
            to_numpy(penalty.value(model, x, None, training=True, seed=0))
            assert all(np.array_equal(a, to_numpy(v)) for a, v in zip(before, model.variables))
            model_to_fit = training.regularize(model, penalty, seed=0)
        else:
            model_to_fit = model
        model_to_fit.compile(optimizer="sgd", loss="mse")
        model_to_fit.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        bn = model.layers[1]
        return to_numpy(bn.moving_mean), to_numpy(bn.moving_variance)

    plain, penalized = run(False), run(True)
    assert_close(penalized[0], plain[0], rtol=1e-6)
    assert_close(penalized[1], plain[1], rtol=1e-6)


def test_saving_and_loading_a_model_trained_with_a_penalty(data, tmp_path):
    x, y = data
    model = mlp(dtype="float32")
    reg = training.regularize(model, training.JacobianNorm(0.01), seed=1)
    reg.compile(optimizer="adam", loss="mse")
    reg.fit(x, y, epochs=2, verbose=0)
    expected = to_numpy(model(x))
    assert_close(reg.predict(x, verbose=0), expected, rtol=1e-6)

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert_close(loaded(x), expected, rtol=1e-6)

    reg.save(tmp_path / "regularized.keras")
    again = keras.saving.load_model(tmp_path / "regularized.keras")
    assert isinstance(again, training.Regularized)
    assert [p.get_config() for p in again.penalties] == [p.get_config() for p in reg.penalties]
    assert_close(again.model(x), expected, rtol=1e-6)
    history = again.fit(x, y, epochs=1, verbose=0)  # reloaded with its optimizer: trains on
    assert np.isfinite(history.history["jacobian_norm"][0])


def test_penalties_only_and_a_custom_penalty(data):
    """Compiled without a loss, the penalties are the loss; a Penalty subclass built on
    jacket.training's functions trains as the built-in ones do."""

    class OutputJacobian(training.Penalty):
        default_name = "output_jacobian"

        def value(self, model, x, y, *, training, seed):
            J = jacket.training.jacobian(model, x, training=training)
            return keras.ops.mean(keras.ops.square(J - 1.0))

    x, _ = data
    model = mlp(dtype="float32")
    reg = training.regularize(model, OutputJacobian(1.0))
    reg.compile(optimizer=keras.optimizers.Adam(0.05))
    history = reg.fit(x.astype("float32"), epochs=30, batch_size=BATCH, verbose=0)
    logged = history.history["output_jacobian"]
    assert logged[-1] < 0.5 * logged[0]
    assert history.history["loss"][-1] == pytest.approx(logged[-1], rel=0.2)


# ------------------------------------------------------------------------------------ errors


def test_errors(data):
    x, _ = data
    model = mlp()
    with pytest.raises(jacket.JacketTypeError, match="regularize: `model` must be a Keras model"):
        training.regularize(lambda t: t, training.JacobianNorm(1.0))
    with pytest.raises(jacket.JacketValueError, match="pass at least one penalty"):
        training.regularize(model)
    with pytest.raises(jacket.JacketTypeError, match=r"Received: list\. Pass them one by one"):
        training.regularize(model, [training.JacobianNorm(1.0)])
    with pytest.raises(jacket.JacketTypeError, match="`seed` must be an int or None"):
        training.regularize(model, training.JacobianNorm(1.0), seed="0")
    with pytest.raises(jacket.JacketValueError, match="JacobianNorm: `weight` must be a finite"):
        training.JacobianNorm(-1.0)
    with pytest.raises(jacket.JacketValueError, match="positive integer or 'exact'"):
        training.JacobianNorm(1.0, "full")
    with pytest.raises(jacket.JacketValueError, match=r"n_projections=0"):
        training.squared_frobenius(model, x, n_projections=0)
    with pytest.raises(jacket.JacketValueError, match="`name` must be a metric name"):
        training.JacobianNorm(1.0, name="my norm")
    with pytest.raises(jacket.JacketTypeError, match="`interpolate` must be True or False"):
        training.GradientPenalty(10.0, interpolate="yes")
    with pytest.raises(jacket.JacketTypeError, match="`encoder` must be a Keras layer"):
        training.Contractive(1.0, encoder=3)
    with pytest.raises(jacket.JacketValueError, match="no layer named 'coder'"):
        training.Contractive(1.0, "coder").value(model, x, None, training=False, seed=0)
    with pytest.raises(jacket.JacketTypeError, match="`residual` must be a function"):
        training.PDEResidual(3.0)
    with pytest.raises(jacket.JacketValueError, match=r"points\[:, None\]"):
        training.PDEResidual(residual, points=np.linspace(0, 1, 5))
    with pytest.raises(jacket.JacketTypeError, match="Received: x.dtype=int32"):
        training.jacobian(model, np.ones((2, N_IN), "int32"))
    with pytest.raises(jacket.JacketValueError, match=r"`u` must have the shape of the model's"):
        training.vjp(model, x, np.ones((BATCH, N_OUT + 1)))
    with pytest.raises(jacket.JacketValueError, match="the model must have one input here"):
        training.jacobian(model, [x, x])
    with pytest.raises(jacket.JacketValueError, match=r"an int in \[0, 3\)"):
        training.derivatives(model, x).partial(3)


# ------------------------------------------------------------------------------------ examples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "script, argv, printed",
    [
        ("poisson_pinn", ["--steps", "8"], "relative L2 error"),
        pytest.param(
            "wgan_gp_critic",
            ["--epochs", "1"],
            "critic gradient norm on interpolates",
            marks=pytest.mark.slow,
        ),  # 4096 samples; its snippet in docs/training.md runs in test_readme.py
        pytest.param(
            "digits_jacobian", ["--epochs", "1"], "FGSM@0.1", marks=pytest.mark.slow
        ),  # evaluation: an exact Jacobian and two attacks on 397 digits
    ],
)
def test_examples_run(script, argv, printed, monkeypatch, capsys):
    """The examples of the guide (`examples/*.py`), each a few steps on the active backend: they
    run end to end and print their line; the numbers themselves are `benchmarks/training.py`'s."""
    if script == "digits_jacobian":
        pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(script)
    module.main(argv)
    assert printed in capsys.readouterr().out
