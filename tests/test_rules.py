"""Layer rules (NOTE: [Layer rules] in `jacket.engine.rules`): every rule gives the plain layer's
outputs and Jacobian on every backend (ties and edge padding included), a subclass runs as written,
and nothing of the rules is seen outside jacket's own passes."""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
from keras import layers
from oracles import assert_close, native_jacobian

import jacket
from jacket import backends
from jacket.engine import rules
from jacket.engine.state import state_of

BACKEND = keras.backend.backend()


@pytest.fixture
def with_max_pooling(monkeypatch):
    """The max pooling rule on this backend, whichever backend it is."""
    monkeypatch.setattr(backends.current(), "LAYER_RULES", ("max_pooling",))
    monkeypatch.delenv("JACKET_LAYER_RULES", raising=False)


def _ruled(model):
    """`model` called with its rules on, as jacket's passes call it."""
    pairs = rules.layers_with_rules(model, backends.current())

    def call(x, training=False):
        with rules.applied(pairs):
            return model(x, training=training)

    return call, pairs


def _in_format(shape, data_format):
    """A channels-last per-sample `shape` in `data_format` (skipped where the backend lacks it)."""
    if data_format == "channels_last":
        return shape
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU kernels have no channels_first convolution or pooling")
    return shape[-1:] + shape[:-1]


def _pooling_model(cls, shape, data_format, **kw):
    inputs = keras.Input(shape)
    h = layers.Conv1D if len(shape) == 2 else layers.Conv2D if len(shape) == 3 else layers.Conv3D
    y = h(3, 1, data_format=data_format)(inputs)  # mixes channels: a Jacobian with structure
    y = cls(data_format=data_format, **kw)(y)
    return keras.Model(inputs, layers.Flatten()(y))


# every case channels first too in the slow run; `test_channels_first` covers it in the default run
DATA_FORMATS = ["channels_last", pytest.param("channels_first", marks=pytest.mark.slow)]

POOLING = [
    (layers.MaxPooling1D, (9, 2), {"pool_size": 2}),
    (layers.MaxPooling1D, (9, 2), {"pool_size": 3, "padding": "same"}),
    (layers.MaxPooling2D, (5, 7, 2), {"pool_size": 2, "padding": "same"}),
    (layers.MaxPooling2D, (7, 7, 2), {"pool_size": (3, 2)}),
    (layers.MaxPooling2D, (8, 7, 2), {"pool_size": 3, "padding": "same"}),
    (layers.MaxPooling3D, (4, 5, 3, 2), {"pool_size": 2, "padding": "same"}),
    (layers.MaxPooling2D, (9, 8, 2), {"pool_size": 3, "strides": 2}),  # ResNet's, overlapping
    (layers.MaxPooling2D, (8, 9, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
    (layers.MaxPooling1D, (10, 2), {"pool_size": 2, "strides": 3}),  # gaps between windows
    (layers.MaxPooling3D, (5, 4, 4, 1), {"pool_size": (2, 3, 2), "strides": 1, "padding": "same"}),
]


@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("cls, shape, kw", POOLING, ids=lambda v: getattr(v, "__name__", str(v)))
def test_max_pooling_rule_gives_the_layers_values_and_jacobian(
    with_max_pooling, cls, shape, kw, data_format
):
    shape = _in_format(shape, data_format)
    model = _pooling_model(cls, shape, data_format, **kw)
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(3,) + shape).astype("float32")  # many ties in every window
    if BACKEND == "tensorflow" and cls is layers.MaxPooling3D:
        # TensorFlow's MaxPool3DGrad sends the cotangent to every tied maximum (a window of equal
        # values passes 8 times the cotangent back), not to the first as its 2D kernel and the
        # other backends do: no rule could match it, and TensorFlow runs no rule (LAYER_RULES)
        x = rng.permutation(x.size).reshape(x.shape).astype("float32")
    call, pairs = _ruled(model)
    assert [type(layer) for layer, _ in pairs] == [cls]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(call(x)), keras.ops.convert_to_numpy(model(x))
    )  # the same outputs, bit for bit
    np.testing.assert_array_equal(native_jacobian(call, x), native_jacobian(model, x))


@pytest.fixture
def with_every_rule(monkeypatch):
    names = tuple(sorted({rule.name for found in rules.RULES.values() for rule in found}))
    monkeypatch.setattr(backends.current(), "LAYER_RULES", names)
    monkeypatch.delenv("JACKET_LAYER_RULES", raising=False)


CONVOLUTIONS = [
    ("conv2d", (7, 6, 3), lambda f: layers.Conv2D(4, 3, data_format=f, activation="tanh")),
    ("conv2d same", (7, 6, 3), lambda f: layers.Conv2D(4, (2, 3), padding="same", data_format=f)),
    ("conv1d same", (9, 2), lambda f: layers.Conv1D(3, 4, padding="same", data_format=f)),
    ("conv3d", (4, 4, 3, 1), lambda f: layers.Conv3D(2, 2, data_format=f)),
    ("depthwise same", (6, 6, 4), lambda f: layers.DepthwiseConv2D(3, padding="same", data_format=f)),
    ("depthwise strided x2", (7, 7, 3), lambda f: layers.DepthwiseConv2D(
        3, strides=2, depth_multiplier=2, data_format=f, activation="relu")),
    ("depthwise dilated", (7, 8, 2), lambda f: layers.DepthwiseConv2D(
        (2, 3), dilation_rate=2, padding="same", data_format=f, use_bias=False)),
    ("depthwise 1d", (9, 4), lambda f: layers.DepthwiseConv1D(3, strides=2, data_format=f)),
    ("grouped as depthwise", (7, 7, 4), lambda f: layers.Conv2D(  # ConvNeXt's 7x7
        8, 3, groups=4, padding="same", data_format=f, activation="gelu")),
    ("grouped 1d strided", (9, 3), lambda f: layers.Conv1D(3, 2, strides=2, groups=3, data_format=f)),
]  # fmt: skip


@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("name, shape, make", CONVOLUTIONS, ids=[c[0] for c in CONVOLUTIONS])
def test_convolution_rules_give_the_layers_values_and_jacobian(
    with_every_rule, name, shape, make, data_format
):
    shape = _in_format(shape, data_format)
    inputs = keras.Input(shape)
    layer = make(data_format)
    model = keras.Model(inputs, layers.Flatten()(layer(inputs)))
    rng = np.random.default_rng(4)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    x = rng.standard_normal((2,) + shape).astype("float32")
    call, pairs = _ruled(model)
    assert [type(p) for p, _ in pairs] == [type(layer)]
    assert_close(call(x), model(x), rtol=1e-5)  # float32: another order of the same sums
    assert_close(native_jacobian(call, x), native_jacobian(model, x), rtol=1e-5)


def _attention(causal):
    class Attend(layers.Layer):  # self-attention in a Sequential-friendly wrapper
        def __init__(self):
            super().__init__()
            self.mha = layers.MultiHeadAttention(2, 3)

        def call(self, x):
            return self.mha(x, x, use_causal_mask=causal)

    return Attend()


OTHER_LAYERS = [
    ("bilinear x2", (5, 4, 3), lambda f: layers.UpSampling2D(2, f, interpolation="bilinear")),
    ("bilinear 3x1", (4, 5, 2), lambda f: layers.UpSampling2D((3, 1), f, interpolation="bilinear")),
    ("attention", (6, 5), lambda f: _attention(False)),
    ("causal attention", (6, 5), lambda f: _attention(True)),
    ("gru", (5, 3), lambda f: layers.GRU(4, return_sequences=True, go_backwards=True)),
    ("gru reset before", (5, 3), lambda f: layers.GRU(4, reset_after=False)),
    ("lstm", (5, 3), lambda f: layers.LSTM(3, return_sequences=True)),
    ("simple rnn", (5, 3), lambda f: layers.SimpleRNN(4)),
]  # fmt: skip


def _random_weights(layer, rng):
    """Random weights; variances (moving ones included) positive."""
    for w in layer.weights:
        value = rng.standard_normal(w.shape)
        w.assign((np.abs(value) + 0.5 if "variance" in w.path else value).astype("float32"))


@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("name, shape, make", OTHER_LAYERS, ids=[c[0] for c in OTHER_LAYERS])
def test_other_rules_give_the_layers_values_and_jacobian(
    with_every_rule, name, shape, make, data_format
):
    if data_format == "channels_first":
        if len(shape) != 3:
            pytest.skip("no data format")
        shape = _in_format(shape, data_format)
    inputs = keras.Input(shape)
    layer = make(data_format)
    model = keras.Model(inputs, layers.Flatten()(layer(inputs)))
    rng = np.random.default_rng(6)
    _random_weights(layer, rng)
    x = rng.standard_normal((2,) + shape).astype("float32")
    call, pairs = _ruled(model)
    assert len(pairs) == 1
    assert_close(call(x), model(x), rtol=1e-5)
    assert_close(native_jacobian(call, x), native_jacobian(model, x), rtol=1e-5)


def test_bilinear_upsampling_of_any_size(with_every_rule):
    """Spatial sizes unknown to the model: the rule builds its matrices from the sizes it is run at."""
    inputs = keras.Input((None, None, 2))
    model = keras.Model(inputs, layers.UpSampling2D(2, interpolation="bilinear")(inputs))
    x = np.random.default_rng(11).standard_normal((2, 3, 4, 2)).astype("float32")
    call, pairs = _ruled(model)
    assert len(pairs) == 1
    assert_close(call(x), model(x), rtol=1e-5)
    J = jacket.jacobian(model, x)
    assert_close(J, native_jacobian(model, x), rtol=1e-5)


def test_recurrent_rules_keep_masks_and_long_sequences(with_every_rule, monkeypatch):
    """A masked sequence runs through the unrolled recurrence with the mask; one longer than
    `UNROLL_STEPS` runs as written."""
    inputs = keras.Input((6, 3))
    gru = layers.GRU(4, return_sequences=True)
    model = keras.Model(inputs, layers.Flatten()(gru(layers.Masking(0.0)(inputs))))
    _random_weights(gru, np.random.default_rng(7))
    x = np.random.default_rng(8).standard_normal((3, 6, 3)).astype("float32")
    x[0, 4:] = 0.0  # masked steps: their outputs repeat the last state
    x[2, :2] = 0.0
    call, pairs = _ruled(model)
    assert [p for p, _ in pairs] == [gru]
    assert_close(call(x), model(x), rtol=1e-5)
    assert_close(jacket.jacobian(model, x), native_jacobian(model, x), rtol=1e-5)
    monkeypatch.setattr(rules, "UNROLL_STEPS", 4)
    ran = []
    monkeypatch.setattr(layers.GRU, "inner_loop", lambda self, *a, **k: ran.append(1) or (
        layers.RNN.inner_loop(self, *a, **k)))  # fmt: skip
    assert_close(call(x), model(x), rtol=1e-5)
    assert len(ran) == 2  # the plain call and the ruled one, too long to unroll


def test_channels_first(with_every_rule):
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU kernels have no channels_first convolution or pooling")
    f = "channels_first"
    inputs = keras.Input((2, 9, 8))
    h = layers.Conv2D(4, 3, padding="same", data_format=f)(inputs)  # patches
    h = layers.MaxPooling2D(3, strides=2, padding="same", data_format=f)(h)
    h = layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, data_format=f)(h)
    h = layers.Conv2D(8, 2, groups=8, padding="same", data_format=f, activation="tanh")(h)
    model = keras.Model(inputs, layers.Flatten()(h))
    x = np.random.default_rng(5).standard_normal((2, 2, 9, 8)).astype("float32")
    call, pairs = _ruled(model)
    assert len(pairs) == 4
    assert_close(call(x), model(x), rtol=1e-5)
    assert_close(native_jacobian(call, x), native_jacobian(model, x), rtol=1e-5)


def test_a_convolution_rule_covers_what_it_says(with_every_rule):
    inputs = keras.Input((8, 8, 3))
    strided = layers.Conv2D(4, 3, strides=2)(inputs)  # stride 2: runs as written
    wide = layers.Conv2D(4, 3)(layers.Conv2D(8, 1, strides=2)(inputs))  # 8 channels in: too
    pairs = layers.Conv2D(4, 3, groups=2)(layers.Conv2D(4, 1, strides=2)(inputs))  # 2 per group
    ruled = layers.Conv2D(4, 3)(inputs)
    model = keras.Model(inputs, [strided, wide, pairs, ruled])
    covered = [layer for layer, _ in rules.layers_with_rules(model, backends.current())]
    assert covered == [model.layers[-1]]


def test_overlapping_windows_and_subclasses_run_as_written(with_max_pooling):
    class OwnPool(layers.MaxPooling2D):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    class SamePool(layers.MaxPooling2D):  # no `call` of its own, still not Keras's own class
        pass

    inputs = keras.Input((6, 6, 2))
    a = OwnPool(2)(inputs)
    b = SamePool(2)(inputs)
    c = layers.AveragePooling2D(2)(inputs)  # no rule
    model = keras.Model(inputs, [a, b, c])
    assert rules.layers_with_rules(model, backends.current()) == []
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 2)).astype("float32")
    J = jacket.jacobian(model, x)
    np.testing.assert_allclose(
        np.asarray(J[0]), 2 * np.asarray(J[1]), rtol=0, atol=0
    )  # OwnPool's call ran


def test_no_rule_is_seen_outside_jackets_passes(with_max_pooling, monkeypatch):
    """A rule that marks its output: seen by jacket's calls only, never by the user's model, another
    thread's call while jacket's runs, or after it (the instance left as it was)."""
    marked = rules.Rule("max_pooling", lambda layer: True, lambda layer, x: layer.__class__.call(
        layer, x) + 100.0)  # fmt: skip
    monkeypatch.setitem(rules.RULES, layers.MaxPooling2D, (marked,))
    inputs = keras.Input((4, 4, 1))
    pool = layers.MaxPooling2D(2)
    model = keras.Model(inputs, layers.Flatten()(pool(inputs)))
    x = np.arange(32, dtype="float32").reshape(2, 4, 4, 1)
    plain = keras.ops.convert_to_numpy(model(x))
    pairs = rules.layers_with_rules(model, backends.current())
    assert pairs == [(pool, marked)]
    seen = {}

    def other_thread():
        seen["other"] = keras.ops.convert_to_numpy(model(x))

    with rules.applied(pairs):
        with rules.applied(pairs):  # nested: the outer one still holds the instance
            pass
        seen["inside"] = keras.ops.convert_to_numpy(model(x))
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    np.testing.assert_array_equal(seen["inside"], plain + 100.0)
    np.testing.assert_array_equal(seen["other"], plain)
    assert "call" not in pool.__dict__
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), plain)
    jacket.jacobian(model, x, strategy="vmap")
    assert "call" not in pool.__dict__  # after jacket's own passes too
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), plain)


def test_the_planner_measures_the_plan_without_rules_against_the_winner(with_max_pooling):
    model = _pooling_model(layers.MaxPooling2D, (8, 8, 2), "channels_last", pool_size=2)
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 2)).astype("float32")
    report = jacket.jacobian_fn(model, strategy="autotune").tune(x)
    with_rules = [d for d in report.timings if d.endswith("layer rules")]
    # (timed, or dropped by its lower bound: on a loaded machine one VJP's time may rule it out)
    tried = list(report.timings) + list(report.failures)
    without = [d for d in tried if not d.endswith("layer rules")]
    assert with_rules and len(without) == 1  # the winner among the ruled plans, once without
    winner = min(with_rules, key=report.timings.get)
    assert without[0] + ", layer rules" == winner
    J = jacket.jacobian(model, x)  # the plan kept, with or without rules
    np.testing.assert_array_equal(np.asarray(J), np.asarray(jacket.jacobian(model, x)))
    assert_close(J, native_jacobian(model, x), rtol=1e-6)
    state = state_of(model, False)
    assert state.entries and all(e.kind != "max_pooling" for e in state.entries.values())


def test_a_large_rule_program_opens_with_the_plain_plan(monkeypatch):
    """NOTE: [A rule's program]: where the rules write many operations the first call compiles
    the plan without them; the plans with them are tried on later calls and may win."""
    model = keras.Sequential(
        [keras.Input((8, 8, 2)), layers.DepthwiseConv2D(3, padding="same"), layers.Flatten()]
    )
    pairs = rules.layers_with_rules(model, backends.current())
    if not pairs:
        pytest.skip("no depthwise rule on this backend")
    assert rules.program_size(pairs) == 9  # one product per tap
    monkeypatch.setattr(rules, "LARGE_PROGRAM", 8)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 2)).astype("float32")
    jac = jacket.jacobian_fn(model)
    J = jac(x)
    (tuning,) = state_of(model, False).tunings.values()
    first = tuning.order[0]
    assert not first.rules and jac.plan(x).plan == first  # what the first call ran
    assert any(p.rules for p in tuning.order[1:])
    for _ in range(10):
        if jac.plan(x).settled:
            break
        jac(x)
    report = jac.plan(x)
    assert report.settled and any(d.endswith("layer rules") for d in report.timings)
    assert_close(jac(x), J, rtol=1e-6)
    assert_close(J, native_jacobian(model, x.astype("float64")), rtol=1e-5)
    forced = jacket.jacobian_fn(model, strategy="vmap")
    forced(x)
    assert forced.plan(x).plan.rules  # a forced strategy runs with the rules, as asked


def test_a_model_whose_rules_do_not_open_starts_with_the_plain_plan():
    """NOTE: [A rule's program]: the convolution as patches (`Rule.opens` False) costs a first
    call more than it saves it; a max pooling rule beside it opens with the rules."""
    conv = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(3, 3, padding="same")])
    pairs = rules.layers_with_rules(conv, backends.current())
    if not pairs:
        pytest.skip("no convolution rule on this backend")
    assert [rule.name for _, rule in pairs] == ["conv_patches"] and rules.plain_first(pairs)
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 1)).astype("float32")
    jac = jacket.jacobian_fn(conv)
    J = jac(x)
    (tuning,) = state_of(conv, False).tunings.values()
    assert not tuning.order[0].rules and jac.plan(x).plan == tuning.order[0]
    assert any(p.rules for p in tuning.order[1:])  # tried on later calls
    assert_close(J, native_jacobian(conv, x.astype("float64")), rtol=1e-5)
    pooled = keras.Sequential(conv.layers + [layers.MaxPooling2D(2)])
    if any(
        rule.name == "max_pooling"
        for _, rule in rules.layers_with_rules(pooled, backends.current())
    ):
        assert not rules.plain_first(rules.layers_with_rules(pooled, backends.current()))


def test_rules_switched_off_are_another_plan_cache_entry(with_max_pooling, monkeypatch, tmp_path):
    monkeypatch.setenv("JACKET_CACHE_DIR", str(tmp_path))

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 2), name="x")
        y = layers.MaxPooling2D(2, name="pool")(layers.Conv2D(3, 1, name="mix")(inputs))
        return keras.Model(inputs, layers.Flatten(name="flat")(y), name="same")

    x = np.random.default_rng(1).standard_normal((2, 8, 8, 2)).astype("float32")
    jacket.jacobian_fn(build()).tune(x)
    monkeypatch.setenv("JACKET_LAYER_RULES", "off")
    off = jacket.jacobian_fn(build())
    report = off.tune(x)  # measured: the plan kept with rules on is not one of its candidates
    assert not report.plan.rules and not any("layer rules" in d for d in report.timings)
    assert len(list(tmp_path.glob("plans/*/*.json"))) == 2
    again = jacket.jacobian_fn(build())
    again(x)
    assert again.plan(x).source == "cache"  # its own entry, read back
