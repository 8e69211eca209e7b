"""jacket.jacobian against float64 central differences and the framework's own Jacobian."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from oracles import assert_close, central_differences, native_jacobian, to_numpy
from scenarios import SCENARIOS, conv1d, dict_inputs, dict_model, seed_cnn, seed_mlp

import jacket

BACKEND = keras.backend.backend()
IDS = [s.name for s in SCENARIOS]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_matches_float64_central_differences(scenario, rng):
    model = scenario.build("float64")
    x = rng.uniform(-1, 1, size=(scenario.batch,) + scenario.in_shape)
    J = jacket.jacobian(model, x)
    assert tuple(J.shape) == (scenario.batch,) + scenario.out_shape + scenario.in_shape
    assert keras.backend.standardize_dtype(J.dtype) == "float64"
    if keras.backend.backend() in scenario.float32_inside:
        assert_close(J, central_differences(model, x, eps=1e-3), rtol=1e-3, atol=1e-6)
    else:
        assert_close(J, central_differences(model, x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_matches_framework_jacobian(scenario, rng):
    model = scenario.build("float32")
    x = rng.uniform(-1, 1, size=(scenario.batch,) + scenario.in_shape).astype("float32")
    J = jacket.jacobian(model, x)
    assert keras.backend.standardize_dtype(J.dtype) == "float32"
    assert_close(J, native_jacobian(model, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_strategies_agree(scenario, rng):
    """forward = reverse = chunked, and flatten is a reshape."""
    model = scenario.build("float64")
    x = rng.uniform(-1, 1, size=(scenario.batch,) + scenario.in_shape)
    reference = to_numpy(jacket.jacobian(model, x, mode="reverse"))
    rtol = 1e-6 if keras.backend.backend() in scenario.float32_inside else 1e-12
    for options in (
        {"mode": "forward"},
        {"mode": "reverse", "chunk_size": 1},
        {"mode": "forward", "chunk_size": 3},
        {"mode": "auto", "chunk_size": 2},
    ):
        assert_close(jacket.jacobian(model, x, **options), reference, rtol=rtol, atol=rtol / 10)
    flat = jacket.jacobian(model, x, flatten=True)
    out_size, in_size = int(np.prod(scenario.out_shape)), int(np.prod(scenario.in_shape))
    assert tuple(flat.shape) == (scenario.batch, out_size, in_size)
    # a reshape: bit-equal on CPU; GPU convolution kernels may differ in the last bits
    assert_close(flat, reference.reshape(scenario.batch, out_size, in_size), rtol=1e-14)


def test_dense_is_exactly_the_kernel_transposed(rng):
    layer = keras.layers.Dense(3)
    x = rng.normal(size=(4, 5)).astype("float32")
    J = to_numpy(jacket.jacobian(layer, x))
    W = to_numpy(layer.kernel)
    for b in range(4):
        np.testing.assert_array_equal(J[b], W.T)


def test_elementwise_activation_is_diagonal(rng):
    x = rng.normal(size=(3, 6))
    J = to_numpy(jacket.jacobian(keras.layers.Activation("tanh", dtype="float64"), x))
    for b in range(3):
        np.testing.assert_allclose(J[b], np.diag(1 - np.tanh(x[b]) ** 2), rtol=1e-12, atol=1e-15)


def test_conv1d_is_banded(rng):
    model = keras.Sequential([keras.Input((10, 1)), keras.layers.Conv1D(1, 3, padding="same")])
    J = to_numpy(jacket.jacobian(model, rng.normal(size=(2, 10, 1)).astype("float32")))[
        :, :, 0, :, 0
    ]
    i, j = np.indices((10, 10))
    assert np.all(J[:, np.abs(i - j) > 1] == 0)
    assert np.all(J[:, np.abs(i - j) <= 1] != 0)


# ------------------------------------------------------------------------------ the seed's examples


def test_seed_example_1_mlp_batch_1(rng):
    J = jacket.jacobian(seed_mlp(), rng.random((1, 5)).astype("float32"))
    assert tuple(J.shape) == (1, 2, 5)


def test_seed_example_2_mlp_batch_3_reads_each_row(rng):
    """The seed's batch loop read `gradient(...)[0]`, sample 0's row, for every sample."""
    model = seed_mlp("float64")
    x = rng.random((3, 5))
    J = to_numpy(jacket.jacobian(model, x))
    assert J.shape == (3, 2, 5)
    for b in range(3):
        assert_close(J[b], central_differences(model, x[b : b + 1])[0], rtol=1e-6, atol=1e-9)


def test_seed_example_3_cnn(rng):
    model = seed_cnn()
    x = rng.random((1, 28, 28, 1)).astype("float32")
    assert tuple(jacket.jacobian(model, x).shape) == (1, 10, 28, 28, 1)
    assert tuple(jacket.jacobian(model, x, flatten=True).shape) == (1, 10, 784)


# ------------------------------------------------------------------------- structure, full Jacobian


def test_dict_model_tree_of_blocks(rng):
    model = dict_model("float64")
    x = dict_inputs(rng)
    J = jacket.jacobian(model, x)
    assert set(J) == {"score", "parts"}
    assert set(J["score"]) == {"image", "meta"}
    assert tuple(J["score"]["image"].shape) == (2, 1, 4, 4, 1)
    assert tuple(J["parts"]["meta"].shape) == (2, 5, 3)

    # every block against central differences of one output w.r.t. one input, the other held fixed
    for out_name in ("score", "parts"):
        for in_name in ("image", "meta"):

            def f(v, out_name=out_name, in_name=in_name):
                reps = len(v) // len(x[in_name])  # the oracle stacks many moved copies of the batch
                tiled = {k: np.tile(a, (reps,) + (1,) * (a.ndim - 1)) for k, a in x.items()}
                return model({**tiled, in_name: v})[out_name]

            expected = central_differences(f, x[in_name])
            assert_close(J[out_name][in_name], expected, rtol=1e-6, atol=1e-9)
    for mode in ("forward", "reverse"):
        other = jacket.jacobian(model, x, mode=mode, chunk_size=4)
        for o in J:
            for i in J[o]:
                assert_close(other[o][i], to_numpy(J[o][i]), rtol=1e-12, atol=1e-14)


def test_list_inputs_and_outputs(rng):
    a, b = keras.Input((3,)), keras.Input((2,))
    h = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], [keras.layers.Dense(4)(h), keras.layers.Dense(1)(h)])
    x = [rng.normal(size=(2, 3)).astype("float32"), rng.normal(size=(2, 2)).astype("float32")]
    J = jacket.jacobian(model, x)
    assert isinstance(J, list) and len(J) == 2 and len(J[0]) == 2
    assert tuple(J[0][1].shape) == (2, 4, 2)
    assert tuple(J[1][0].shape) == (2, 1, 3)
    W = to_numpy(model.layers[3].kernel)  # Dense(4): rows 0..2 see `a`, 3..4 see `b`
    assert_close(J[0][1][0], W[3:].T, rtol=1e-6)


def test_full_jacobian_off_diagonal_blocks_are_zero(rng):
    model = seed_mlp("float64")
    x = rng.random((3, 5))
    full = to_numpy(jacket.jacobian(model, x, per_sample=False))
    assert full.shape == (3, 2, 3, 5)
    per = to_numpy(jacket.jacobian(model, x))
    for b in range(3):
        for c in range(3):
            if b == c:
                np.testing.assert_allclose(full[b, :, c], per[b], rtol=1e-12)
            else:
                assert np.all(full[b, :, c] == 0)
    for mode in ("forward", "reverse"):
        assert_close(
            jacket.jacobian(model, x, per_sample=False, mode=mode, chunk_size=4), full, rtol=1e-12
        )
    # flatten with per_sample=False, on a model whose input and output have several axes (on the
    # MLP above it would be a no-op): the full Jacobian's axes, each flattened
    conv = conv1d("float64")
    xc = rng.normal(size=(2, 10, 2))
    full_conv = to_numpy(jacket.jacobian(conv, xc, per_sample=False))
    assert full_conv.shape == (2, 10, 3, 2, 10, 2)
    flat = to_numpy(jacket.jacobian(conv, xc, per_sample=False, flatten=True))
    assert flat.shape == (2, 30, 2, 20)
    np.testing.assert_array_equal(flat, full_conv.reshape(2, 30, 2, 20))
    expected = central_differences(conv, xc, per_sample=False)
    assert_close(full_conv, expected, rtol=1e-6, atol=1e-9)


def test_coupled_samples_are_detected_and_the_full_jacobian_is_right(rng):
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.BatchNormalization(dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    x = rng.normal(size=(5, 4))
    with pytest.raises(jacket.CouplingError, match="per_sample=False"):
        jacket.jacobian(model, x, training=True)
    with pytest.raises(jacket.CouplingError):
        jacket.vjp(model, x, np.ones((5, 2)), training=True)
    mean_before = to_numpy(model.layers[0].moving_mean)
    full = jacket.jacobian(model, x, training=True, per_sample=False)
    # jacket never changes the model: BatchNormalization's statistics are untouched
    np.testing.assert_array_equal(to_numpy(model.layers[0].moving_mean), mean_before)

    def batch_fn(v):  # (this oracle does update the statistics, which the output does not use)
        return model(v, training=True)

    assert_close(full, central_differences(batch_fn, x, per_sample=False), rtol=1e-6, atol=1e-9)
    # in inference mode the same model is per-sample
    assert tuple(jacket.jacobian(model, x).shape) == (5, 2, 4)


def test_layer_averaging_over_the_batch_is_detected(rng):
    def batch_mean(x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)

    x = rng.normal(size=(8, 3)).astype("float32")
    with pytest.raises(jacket.CouplingError, match="depends on other samples"):
        jacket.jacobian(batch_mean, x)

    # a coupling between two samples only (3 and 6) is found too
    def pair(x):
        return x + keras.ops.where(
            keras.ops.arange(8)[:, None] == 3, x[6:7] * 0.5, keras.ops.zeros_like(x)
        )

    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(pair, x)


def test_dropout_in_training_gives_the_jacobian_of_one_mask(rng):
    """training=True: each sample's rows come from one and the same dropout mask."""
    model = keras.Sequential(
        [keras.Input((6,), dtype="float64"), keras.layers.Dropout(0.5, dtype="float64")]
    )
    x = rng.normal(size=(2, 6))
    J = to_numpy(jacket.jacobian(model, x, training=True))
    for b in range(2):
        diagonal = np.diag(J[b])
        assert np.allclose(J[b], np.diag(diagonal))  # elementwise
        assert set(np.round(diagonal, 12)) <= {0.0, 2.0}
    eval_J = to_numpy(jacket.jacobian(model, x))
    np.testing.assert_array_equal(eval_J, np.stack([np.eye(6)] * 2))


# ------------------------------------------------------------------------------------------ dtypes


# Measured relative errors against the float64 model's Jacobian (this test's seed and point), as
# TensorFlow / JAX / PyTorch: float16 6.9e-4 / 3.4e-4 / 3.1e-4, bfloat16 3.8e-3 / 2.8e-3 / 2.2e-3,
# float32 8.9e-8 / 1.0e-7 / 7.7e-8: the tolerances are about 3x the largest. (Other seeds move a
# ReLU pre-activation across 0 in bfloat16, where the Jacobian itself changes: seed-specific.)
@pytest.mark.parametrize("dtype,rtol", [("float16", 2e-3), ("bfloat16", 1.2e-2), ("float32", 3e-7)])
def test_low_precision_models_keep_their_dtype(dtype, rtol, rng):
    model64 = seed_mlp("float64")
    model = seed_mlp(dtype)
    model.set_weights(model64.get_weights())
    x = rng.random((3, 5))
    J = jacket.jacobian(model, x.astype("float32"))
    assert keras.backend.standardize_dtype(J.dtype) == dtype
    assert_close(J, native_jacobian(model64, x), rtol=rtol)


def _tanh_mlp64():
    return keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def test_float64_is_kept_where_keras_demotes_it(rng):
    """A float64 model's Jacobian is float64 throughout, on every backend, as users call jacket.

    Keras maps float64 to float32 in its type promotion on JAX and PyTorch: the user's own
    `model(x)` there runs tanh (JAX) or the matmuls (PyTorch) in float32. jacket's passes lift that
    (NOTE: [Keras and float64] in jacket.engine.dtypes); no test patches Keras around jacket.
    """
    model = _tanh_mlp64()
    (W1, b1), (W2, b2) = [[to_numpy(w) for w in layer.weights] for layer in model.layers]
    x = rng.normal(size=(3, 5))
    hidden = np.tanh(x @ W1 + b1)
    exact = np.einsum("ho,bh,ih->boi", W2, 1.0 - hidden**2, W1)  # (3, 3, 5)

    def plain_call_error():  # the model as its user calls it, against float64 NumPy
        y = to_numpy(model(x))
        y64 = hidden @ W2 + b2
        return np.abs(y - y64).max() / np.abs(y64).max()

    # Keras's doing, not jacket's: if this changes (a Keras that keeps float64), the lift can go
    demotes = BACKEND != "tensorflow"
    assert (plain_call_error() > 1e-10) == demotes, plain_call_error()
    for mode in ("reverse", "forward"):
        J = jacket.jacobian(model, x, mode=mode)
        assert keras.backend.standardize_dtype(J.dtype) == "float64"
        assert_close(J, exact, rtol=1e-13)  # float32 rounding would be ~1e-7
    v, u = rng.normal(size=(3, 5)), rng.normal(size=(3, 3))
    assert_close(jacket.jvp(model, x, v), np.einsum("boi,bi->bo", exact, v), rtol=1e-13)
    assert_close(jacket.vjp(model, x, u), np.einsum("boi,bo->bi", exact, u), rtol=1e-13)
    assert jacket.check(model, x).max_rel_error < 1e-8
    # the lift stays inside jacket: the user's own call is as Keras makes it, before and after
    assert (plain_call_error() > 1e-10) == demotes


def test_the_float64_lift_is_per_thread():
    """While jacket keeps float64 in one thread, Keras elsewhere is left as it is."""
    import threading

    from jacket.engine.dtypes import keep_float64

    plain = keras.backend.result_type("float64")  # "float32" on JAX and PyTorch
    assert plain == ("float64" if BACKEND == "tensorflow" else "float32")
    seen = {}
    with keep_float64():
        assert keras.backend.result_type("float64") == "float64"
        thread = threading.Thread(
            target=lambda: seen.update(other=keras.backend.result_type("float64"))
        )
        thread.start()
        thread.join()
        with keep_float64():  # nested
            pass
        assert keras.backend.result_type("float64") == "float64"
    assert seen["other"] == plain
    assert keras.backend.result_type("float64") == plain


def test_integer_arrays_are_cast_like_keras_casts_them():
    model = seed_mlp("float32")
    x_int = np.arange(10).reshape(2, 5)
    J = jacket.jacobian(model, x_int)
    assert keras.backend.standardize_dtype(J.dtype) == "float32"
    assert_close(J, to_numpy(jacket.jacobian(model, x_int.astype("float32"))), rtol=0)


def test_backend_tensors_are_accepted(rng):
    model = seed_mlp()
    x = rng.random((2, 5)).astype("float32")
    assert_close(
        jacket.jacobian(model, keras.ops.convert_to_tensor(x)),
        to_numpy(jacket.jacobian(model, x)),
        rtol=0,
    )


def test_any_callable(rng):
    def f(x):
        return keras.ops.stack([keras.ops.sum(x**2, axis=1), keras.ops.prod(x, axis=1)], axis=1)

    x = rng.normal(size=(3, 4))
    J = jacket.jacobian(f, x)
    assert keras.backend.standardize_dtype(J.dtype) == "float64"
    expected = np.stack([2 * x, np.prod(x, axis=1, keepdims=True) / x], axis=1)
    # A plain callable runs as given (jacket keeps float64 for Keras models only, see NOTE
    # [Keras and float64]): on PyTorch Keras's `prod` of float64 returns float32, so that row is
    # float32-grade as the user's own call is (measured 1.4e-7 relative); exact elsewhere.
    rtol = 1e-6 if BACKEND == "torch" else 1e-12
    np.testing.assert_allclose(to_numpy(J), expected, rtol=rtol)


def test_result_follows_weight_updates(rng):
    """Compiled kernels read the weights at run time: no stale weights after an update."""
    layer = keras.layers.Dense(2)
    x = rng.normal(size=(1, 3)).astype("float32")
    jacket.jacobian(layer, x)
    layer.kernel.assign(np.full((3, 2), 7.0, dtype="float32"))
    np.testing.assert_array_equal(to_numpy(jacket.jacobian(layer, x))[0], np.full((2, 3), 7.0))


def test_a_batch_mean_inside_a_functional_graph_is_detected(rng):
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(3)(inputs)
    outputs = keras.layers.Add()([hidden, keras.ops.mean(hidden, axis=0, keepdims=True)])
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(keras.Model(inputs, outputs), rng.normal(size=(4, 3)).astype("float32"))


def test_built_in_layers_in_inference_skip_the_probe(rng):
    from jacket.engine.model import keeps_samples_apart

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    assert keeps_samples_apart(model, training=False)
    assert not keeps_samples_apart(model, training=True)
    jacket.jacobian(model, rng.normal(size=(4, 4)).astype("float32"))
    state = model._jacket_state[False]
    assert not any(key[0] == "vjp" for key in state.kernels)  # no probe ran

    class Custom(keras.layers.Layer):
        def call(self, x):
            return x

    assert not keeps_samples_apart(keras.Sequential([keras.Input((4,)), Custom()]), False)
    lam = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x)])
    assert not keeps_samples_apart(lam, False)


class _Backbone(keras.Model):
    """Built as a Functional graph by its own class, its call left to Keras (as keras_hub's
    backbones are)."""

    def __init__(self, **kwargs):
        inputs = keras.Input((3, 4))
        super().__init__(inputs, keras.layers.Dense(4, activation="tanh")(inputs), **kwargs)


def test_a_functional_subclass_and_an_index_that_keeps_the_batch_skip_the_probe(rng):
    from jacket.engine.model import keeps_samples_apart

    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, keras.layers.Dense(2)(_Backbone()(inputs)[:, 0]))
    assert keeps_samples_apart(model, training=False)
    x = rng.normal(size=(3, 3, 4))
    J = jacket.jacobian(model, x.astype("float32"))
    assert not any(key[0] == "vjp" for key in model._jacket_state[False].kernels)
    assert_close(J, native_jacobian(model, x), rtol=1e-5)
    full = central_differences(model, x, per_sample=False)  # (3, 2, 3, 3, 4)
    off = full * (1 - np.eye(3))[:, None, :, None, None]
    assert np.abs(off).max() == 0.0 and np.abs(full).max() > 0.1

    class Mixing(_Backbone):  # a subclass that overrides `call` is the probe's to judge
        def call(self, x):
            h = super().call(x)
            return h - keras.ops.mean(h, axis=0, keepdims=True)

    inputs = keras.Input((3, 4))
    mixing = keras.Model(inputs, Mixing()(inputs))
    assert not keeps_samples_apart(mixing, False)
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(mixing, x.astype("float32"))
    # an index into the batch axis is not one that keeps it
    inputs = keras.Input((4,), batch_size=3)
    for index in (0, (slice(1, None), 0), (1, slice(None))):
        sliced = keras.Model(inputs, keras.layers.Dense(2)(inputs)[index])
        assert not keeps_samples_apart(sliced, False), index


def test_a_graph_of_per_sample_layers_gives_its_declared_outputs_without_a_trace(rng, monkeypatch):
    from jacket.engine import state as states

    traced = []
    original = states._symbolic_output

    def symbolic(model, inputs):
        y = original(model, inputs)
        traced.append(states._declared_output(model, inputs) is None)
        return y

    monkeypatch.setattr(states, "_symbolic_output", symbolic)
    inputs = keras.Input((3, 4))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    outputs = {"a": h[:, 0], "b": keras.layers.Flatten()(h)}
    model = keras.Model(inputs, outputs)

    def no_trace(*args, **kwargs):
        raise AssertionError("the declared outputs need no symbolic call")

    monkeypatch.setattr(model, "compute_output_spec", no_trace)
    x = rng.normal(size=(2, 3, 4))
    J = jacket.jacobian(model, x.astype("float32"))
    assert traced == [False]
    assert set(J) == {"a", "b"} and J["a"].shape == (2, 5, 3, 4) and J["b"].shape == (2, 15, 3, 4)
    for name in ("a", "b"):
        assert_close(J[name], native_jacobian(keras.Model(inputs, outputs[name]), x), rtol=1e-5)
    # a declared batch size, or a layer that is not known to keep samples apart: traced
    fixed = keras.Input((3, 4), batch_size=2)
    for model in (
        keras.Model(fixed, keras.layers.Dense(2)(fixed)),
        keras.Sequential([keras.Input((3, 4)), keras.layers.Lambda(lambda t: 2.0 * t)]),
    ):
        traced.clear()
        jacket.jacobian(model, x.astype("float32"))
        assert traced == [True]


def test_keras_hub_vit_layers_skip_the_probe(rng):
    keras_hub = pytest.importorskip("keras_hub")  # (installed with the `bench` extra)
    from keras_hub.src.models.vit.vit_layers import ViTEncoderBlock

    from jacket.engine.model import keeps_samples_apart

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3), patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8
    )
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(backbone(inputs)[:, 0]))
    assert keeps_samples_apart(model, training=False)
    x = rng.normal(size=(2, 8, 8, 3))
    J = jacket.jacobian(model, x.astype("float32"))
    assert not any(key[0] == "vjp" for key in model._jacket_state[False].kernels)
    assert_close(J, native_jacobian(model, x), rtol=1e-4)

    class Block(ViTEncoderBlock):  # a subclass may do anything: the probe decides
        pass

    sub = keras.Sequential([keras.Input((5, 8)), Block(num_heads=2, hidden_dim=8, mlp_dim=8)])
    assert not keeps_samples_apart(sub, False)


def test_elementwise_ops_in_a_functional_graph_skip_the_probe_unless_broadcast_mixes(rng):
    from jacket.engine.model import keeps_samples_apart

    inputs = keras.Input((3,))
    h = keras.layers.Dense(3)(inputs)
    residual = keras.Model(inputs, keras.ops.tanh(h + inputs) * 2.0)  # numpy.Add, Tanh, Multiply
    assert keeps_samples_apart(residual, training=False)
    x = rng.normal(size=(4, 3))
    assert_close(
        jacket.jacobian(residual, x.astype("float32")), native_jacobian(residual, x), rtol=1e-5
    )
    # (B, 1) + (B,) broadcasts to (B, B): an elementwise op that pairs samples; the probe decides
    scalar = keras.Input(())
    paired = keras.Model([inputs, scalar], keras.layers.Dense(1)(inputs) + scalar)
    assert not keeps_samples_apart(paired, training=False)
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(paired, [x.astype("float32"), x[:, 0].astype("float32")])


def test_keras_applications_own_layers_skip_the_probe_and_keep_samples_apart(rng):
    from keras.src.applications.convnext import LayerScale, StochasticDepth
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    from jacket.engine.model import keeps_samples_apart

    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    h = StochasticDepth(0.5)(LayerScale(0.5, 4)(h))
    model = keras.Model(inputs, CustomScaleLayer(0.3)([inputs, h]))
    assert keeps_samples_apart(model, training=False)
    assert not keeps_samples_apart(model, training=True)
    x = rng.normal(size=(3, 4))
    J = jacket.jacobian(model, x.astype("float32"))
    state = model._jacket_state[False]
    assert not any(key[0] == "vjp" for key in state.kernels)  # no probe ran
    assert_close(J, native_jacobian(model, x), rtol=1e-5)
    # the claim itself: the full Jacobian by central differences has no block across samples
    full = central_differences(model, x, per_sample=False)  # (3, 4, 3, 4)
    off = full * (1 - np.eye(3))[:, None, :, None]
    assert np.abs(off).max() == 0.0 and np.abs(full).max() > 0.1

    class Scaled(LayerScale):  # a subclass may do anything: the probe decides
        def call(self, x):
            return x * self.gamma

    sub = keras.Sequential([keras.Input((4,)), Scaled(0.5, 4)])
    assert not keeps_samples_apart(sub, False)
