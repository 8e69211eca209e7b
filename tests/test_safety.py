"""Interacting samples (`per_sample="diagonal"`, the cached coupling probe) and non-differentiable
paths (zeros with a `JacketWarning` naming where the gradient stops), on every backend."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
from keras import layers, ops
from oracles import assert_close, central_differences, native_jacobian, to_numpy
from scenarios import seed_mlp

import jacket
from jacket import _api

# ------------------------------------------------------------------------------ interacting samples


class BatchMean(layers.Layer):
    """Subtracts the batch mean: every sample's output depends on every sample's input."""

    def call(self, x):
        return x - ops.mean(x, axis=0, keepdims=True)


class Square(layers.Layer):
    """A custom (so probed) layer that keeps samples apart."""

    def call(self, x):
        return x * x


def batchnorm_model():
    return keras.Sequential(
        [
            layers.Input((3,), dtype="float64"),
            layers.Dense(4, activation="tanh", dtype="float64"),
            layers.BatchNormalization(dtype="float64"),
            layers.Dense(2, dtype="float64"),
        ]
    )


def batch_mean_model():
    return keras.Sequential(
        [
            layers.Input((3,), dtype="float64"),
            layers.Dense(4, activation="tanh", dtype="float64"),
            BatchMean(dtype="float64"),
            layers.Dense(2, dtype="float64"),
        ]
    )


def _diagonal_oracle(call, x):
    """The per-sample blocks of the full Jacobian, by central differences of the whole batch."""
    full = central_differences(call, x, per_sample=False)  # (B, *out, B, *in)
    out_nd = full.ndim - 2 * x.ndim + 1
    moved = np.moveaxis(full, 1 + out_nd, 1)  # (B, B, *out, *in)
    return np.stack([moved[b, b] for b in range(x.shape[0])])


@pytest.mark.parametrize(
    "build, training",
    [(batchnorm_model, True), (batch_mean_model, False)],
    ids=["batchnorm_training", "batch_mean"],
)
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("flatten", [False, True])
def test_diagonal_blocks_of_coupled_models_match_finite_differences(
    build, training, chunk_size, flatten, rng
):
    model = build()
    x = rng.normal(size=(5, 3))
    with pytest.raises(jacket.CouplingError, match="per_sample='diagonal'|per_sample=\"diagonal\""):
        jacket.jacobian(model, x, training=training)
    J = jacket.jacobian(
        model, x, training=training, per_sample="diagonal", chunk_size=chunk_size, flatten=flatten
    )
    expected = _diagonal_oracle(lambda v: model(v, training=training), x)  # (5, 2, 3)
    assert tuple(J.shape) == (5, 2, 3)
    assert_close(J, expected, rtol=1e-6)
    # and the blocks are those of the full Jacobian jacket gives (a second strategy)
    full = to_numpy(jacket.jacobian(model, x, training=training, per_sample=False))
    np.testing.assert_allclose(to_numpy(J), np.stack([full[b, :, b] for b in range(5)]), 0, 1e-12)


def test_diagonal_equals_per_sample_where_samples_do_not_interact(rng):
    model = seed_mlp("float64")
    x = rng.normal(size=(4, 5))
    diagonal = jacket.jacobian_fn(model, per_sample="diagonal")
    assert not diagonal.plan(x).per_sample  # computed through the full Jacobian
    assert_close(diagonal(x), to_numpy(jacket.jacobian(model, x)), rtol=1e-12)


def test_diagonal_option_errors():
    model = seed_mlp()
    with pytest.raises(
        jacket.JacketValueError,
        match="must be True, False or 'diagonal'. Received: per_sample='diag'",
    ):
        jacket.jacobian_fn(model, per_sample="diag")
    with pytest.raises(
        jacket.JacketValueError, match="Received: per_sample='diagonal' with sparse"
    ):
        jacket.jacobian_fn(model, per_sample="diagonal", sparse=True)
    with pytest.raises(jacket.JacketValueError, match="strategy='replicate' with per_sample='diag"):
        jacket.jacobian_fn(model, per_sample="diagonal", strategy="replicate")


def _count_probe_vjps(monkeypatch) -> list:
    """Patch the engine so that every VJP its probe runs is counted."""
    calls = []
    probe = _api._Engine._probe

    def counted_probe(self, inputs, entry):
        vjp = self.vjp

        def counting(inputs_):
            kernel = vjp(inputs_)

            def run(*args):
                calls.append(inputs_.signature)
                return kernel(*args)

            return run

        self.vjp = counting
        try:
            return probe(self, inputs, entry)
        finally:
            del self.vjp

    monkeypatch.setattr(_api._Engine, "_probe", counted_probe)
    return calls


def test_coupling_probe_runs_once_per_model_and_shape(monkeypatch, rng):
    calls = _count_probe_vjps(monkeypatch)
    f64 = dict(dtype="float64")
    model = keras.Sequential([layers.Input((3,), **f64), layers.Dense(4, **f64), Square(**f64)])
    x = rng.normal(size=(6, 3))
    J = jacket.jacobian(model, x)
    per_signature = 2 * math.ceil(math.log2(6))  # both halves of every bit of the sample index
    assert len(calls) == per_signature
    jacket.jacobian(model, x + 1)  # the same signature: the verdict is cached
    jacket.jacobian(model, x, flatten=True)  # other options, same model and shape
    jacket.vjp(model, x, np.ones((6, 4)))
    assert len(calls) == per_signature
    jacket.jacobian(model, x[:3])  # a new shape: probed again
    assert len(calls) == per_signature + 2 * math.ceil(math.log2(3))
    # the probe's verdict was right: the per-sample blocks are those of the full Jacobian
    assert_close(J, central_differences(lambda v: model(v), x), rtol=1e-6)

    coupled = keras.Sequential([layers.Input((3,)), layers.Dense(4), BatchMean()])
    before = len(calls)
    for _ in range(2):
        with pytest.raises(jacket.CouplingError):
            jacket.jacobian(coupled, x)
    # a coupled model stops at the first leaking bit, and only the first call probes
    assert 1 <= len(calls) - before <= 2 * math.ceil(math.log2(6))
    after_first = len(calls)
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(coupled, x)
    assert len(calls) == after_first


# ------------------------------------------------------------------------ non-differentiable paths


class RoundLayer(layers.Layer):
    def call(self, x):
        return ops.round(x)


class ArgmaxLayer(layers.Layer):
    def call(self, x):
        return ops.cast(ops.argmax(x, axis=-1), x.dtype)[:, None]


class MaskRelu(layers.Layer):
    """ReLU written with a comparison: differentiable through `x`, so no warning."""

    def call(self, x):
        return x * ops.cast(x > 0, x.dtype)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(dtype="float64")
        self.dense = layers.Dense(4, dtype="float64")
        self.stop = StopLayer(dtype="float64", name="stopper")

    def call(self, x):
        return self.stop(self.dense(x))


class StopLayer(layers.Layer):
    def call(self, x):
        return ops.stop_gradient(x) * 2.0


def _functional(cut):
    x = keras.Input((3,), dtype="float64")
    h = layers.Dense(4, dtype="float64")(x)
    return keras.Model(x, cut(h))


CUT_MODELS = {
    # name: (build, words the warning must hold: where the gradient stops[, oracle])
    # stop_gradient changes the derivative, not the function: its oracle is the framework's own
    # Jacobian; the others' is finite differences (zero away from the steps)
    "sequential_round": (
        lambda: keras.Sequential(
            [
                layers.Input((3,), dtype="float64"),
                layers.Dense(4, dtype="float64"),
                RoundLayer(dtype="float64", name="rounder"),
                layers.Dense(2, dtype="float64"),
            ]
        ),
        ["layer 'rounder' (RoundLayer)", "(Round)"],
    ),
    "functional_argmax": (
        lambda: _functional(lambda h: ops.cast(ops.argmax(h, axis=-1), "float64")[:, None]),
        ["(Argmax)", "integer output"],
    ),
    "functional_cast_int32": (
        lambda: _functional(lambda h: ops.cast(ops.cast(h * 10, "int32"), "float64")),
        ["(Cast)", "integer output"],
    ),
    "functional_stop_gradient": (
        lambda: _functional(lambda h: ops.stop_gradient(h) + 1.0),
        ["(StopGradient)"],
        "native",
    ),
    "functional_comparison": (
        lambda: _functional(lambda h: ops.cast(ops.greater(h, 0.0), "float64")),
        ["(Greater)", "integer output"],
    ),
    "custom_layer_argmax": (
        lambda: ArgmaxLayer(dtype="float64", name="picker"),
        ["layer 'picker' (ArgmaxLayer)", "(Argmax)"],
    ),
    "subclassed_stop_gradient": (
        Subclassed,
        ["layer 'stopper' (StopLayer)", "(StopGradient)"],
        "native",
    ),
}


@pytest.mark.parametrize("name", sorted(CUT_MODELS))
def test_cut_gradients_give_zeros_and_one_warning_naming_the_layer(name, rng):
    build, words, *oracle = CUT_MODELS[name]
    model = build()
    x = rng.normal(size=(3, 3)) + 0.123  # away from rounding and sign boundaries
    with pytest.warns(jacket.JacketWarning) as record:
        J = jacket.jacobian(model, x)
    (warning,) = [w for w in record if issubclass(w.category, jacket.JacketWarning)]
    message = str(warning.message)
    for word in words:
        assert word in message, (word, message)
    if oracle == ["native"]:
        expected = native_jacobian(model, x)
    else:
        expected = central_differences(lambda v: model(v), x, eps=1e-7)
    assert np.all(expected == 0.0)  # the oracle agrees the gradient is cut
    assert_close(J, expected, rtol=0.0, atol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        jacket.jacobian(model, x[:2])


def test_one_cut_output_warns_and_the_other_is_exact(rng):
    x_in = keras.Input((3,), dtype="float64")
    h = layers.Dense(4, activation="tanh", dtype="float64")(x_in)
    model = keras.Model(x_in, [ops.floor(h * 3.0), layers.Dense(2, dtype="float64")(h)])
    x = rng.normal(size=(2, 3))
    with pytest.warns(jacket.JacketWarning, match=r"operation 'floor[_0-9]*' \(Floor\)"):
        J = jacket.jacobian(model, x)
    assert np.all(to_numpy(J[0]) == 0.0)
    assert_close(J[1], central_differences(lambda v: model(v)[1], x), rtol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        lambda: seed_mlp("float64"),
        lambda: keras.Sequential(
            [
                layers.Input((3,), dtype="float64"),
                MaskRelu(dtype="float64"),
                layers.Dense(2, dtype="float64"),
            ]
        ),
        lambda: _functional(lambda h: h + ops.stop_gradient(ops.round(h))),  # a side path
        lambda: _functional(lambda h: ops.where(h > 0, h, 0.1 * h)),
        lambda: layers.Dense(2, dtype="float64"),
    ],
    ids=["mlp", "mask_relu", "stop_gradient_side_path", "where", "dense_layer"],
)
def test_no_warning_when_every_output_carries_a_gradient(build, rng):
    model = build()
    in_size = (
        5
        if getattr(model, "name", "").startswith("sequential")
        and len(model.layers) == 2
        and model.layers[0].__class__ is layers.Dense
        else 3
    )
    x = rng.normal(size=(2, in_size)) + 0.123
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J = jacket.jacobian(model, x)
    assert np.abs(to_numpy(J)).max() > 0
    assert_close(J, central_differences(lambda v: model(v), x), rtol=1e-5)


def test_a_zero_jacobian_without_a_cut_is_legal_and_silent(rng):
    model = keras.Sequential(
        [layers.Input((3,), dtype="float64"), layers.Dense(2, dtype="float64")]
    )
    model.layers[0].kernel.assign(np.zeros((3, 2)))
    x = rng.normal(size=(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J = jacket.jacobian(model, x)
    assert np.all(to_numpy(J) == 0.0)


def test_the_walk_leaves_the_models_graph_as_it_was(rng):
    model = Subclassed()
    model(rng.normal(size=(2, 3)))
    before = {id(layer): len(layer._inbound_nodes) for layer in model._flatten_layers()}
    with pytest.warns(jacket.JacketWarning):
        jacket.jacobian(model, rng.normal(size=(2, 3)))
    after = {id(layer): len(layer._inbound_nodes) for layer in model._flatten_layers()}
    assert after == before
