"""Every error message: it names the function and argument, shows what was received, says the fix."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from scenarios import dict_inputs, dict_model, seed_cnn, seed_mlp

import jacket


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(13)  # a module fixture is made before the first test's seeding
    return seed_mlp()


def test_errors_share_one_base_class():
    assert issubclass(jacket.JacketValueError, (jacket.JacketError, ValueError))
    assert issubclass(jacket.JacketTypeError, (jacket.JacketError, TypeError))
    assert issubclass(jacket.CouplingError, jacket.JacketValueError)


def test_missing_batch_axis(mlp):
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(mlp, np.ones(5, "float32"))
    message = str(info.value)
    assert "jacobian: `x` must have a leading batch axis" in message
    assert "Received: x.shape=(5,)" in message
    assert "pass `x[None]`" in message


def test_missing_batch_axis_on_an_image_model():
    with pytest.raises(jacket.JacketValueError, match=r"x.shape=\(28, 28, 1\).*x\[None\]"):
        jacket.jacobian(seed_cnn(), np.ones((28, 28, 1), "float32"))


def test_wrong_feature_shape(mlp):
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(mlp, np.ones((2, 4), "float32"))
    assert "does not fit the model, which expects shape `(batch, 5)`" in str(info.value)
    assert "Received: x.shape=(2, 4)" in str(info.value)


def test_scalar_input(mlp):
    with pytest.raises(jacket.JacketValueError, match=r"Received: x.shape=\(\)"):
        jacket.jacobian(mlp, np.float32(1.0))


def test_output_without_batch_axis():
    with pytest.raises(
        jacket.JacketValueError, match=r"`y` must start with the batch axis of size 3"
    ):
        jacket.jacobian(lambda x: keras.ops.sum(x), np.ones((3, 2), "float32"))


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_chunk_size_not_positive(mlp, chunk_size):
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(mlp, np.ones((1, 5), "float32"), chunk_size=chunk_size)
    assert (
        f"jacobian: `chunk_size` must be a positive integer. Received: chunk_size={chunk_size}"
        in str(info.value)
    )


@pytest.mark.parametrize("chunk_size", [2.5, "4", True])
def test_chunk_size_wrong_type(mlp, chunk_size):
    with pytest.raises(
        jacket.JacketTypeError, match="`chunk_size` must be a positive integer or None"
    ):
        jacket.jacobian(mlp, np.ones((1, 5), "float32"), chunk_size=chunk_size)


def test_unknown_mode(mlp):
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian_fn(mlp, mode="fwd")
    assert (
        "jacobian_fn: `mode` must be one of 'auto', 'reverse', 'forward'. Received: mode='fwd'."
        in str(info.value)
    )


def test_flags_must_be_booleans(mlp):
    with pytest.raises(
        jacket.JacketTypeError, match="`flatten` must be True or False. Received: flatten='yes'"
    ):
        jacket.jacobian(mlp, np.ones((1, 5), "float32"), flatten="yes")


def test_dict_keys_missing_and_extra(rng):
    model = dict_model()
    x = dict_inputs(rng, dtype="float32")
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(model, {"image": x["image"]})
    assert "missing ['meta']" in str(info.value)
    assert "the keys of `x` must be the model's input names ['image', 'meta']" in str(info.value)
    with pytest.raises(jacket.JacketValueError, match=r"unexpected \['extra'\]"):
        jacket.jacobian(model, {**x, "extra": x["meta"]})


def test_list_of_the_wrong_length_for_a_dict_model(rng):
    # a list in input order is taken, as Keras takes it (tests/test_layers.py); one of another
    # length is refused with the count
    x = dict_inputs(rng, dtype="float32")
    with pytest.raises(jacket.JacketValueError, match="takes 2 inputs.*list of 1 items"):
        jacket.jacobian(dict_model(), [x["image"]])


def test_nan_names_the_sample(mlp):
    x = np.ones((4, 5), "float32")
    x[2, 1] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jacobian(mlp, x)
    assert "`x` contains NaN or inf in sample(s) 2, 3 (2 of 4)" in str(info.value)


def test_nan_first_does_not_hide_coupling_later():
    def batch_mean(x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)

    x = np.ones((4, 3), "float32")
    x[1, 1] = np.nan
    with pytest.raises(jacket.JacketValueError, match="NaN or inf in sample"):
        jacket.jacobian(batch_mean, x)
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(batch_mean, np.ones((4, 3), "float32"))


def test_nan_in_a_named_input(rng):
    x = dict_inputs(rng, dtype="float32")
    x["meta"][1, 0] = np.nan
    with pytest.raises(
        jacket.JacketValueError, match=r"`x\['meta'\]` contains NaN or inf in sample\(s\) 1"
    ):
        jacket.jacobian(dict_model(), x)


def test_empty_batch(mlp):
    with pytest.raises(jacket.JacketValueError, match="`x` has an empty batch"):
        jacket.jacobian(mlp, np.ones((0, 5), "float32"))


def test_different_batch_sizes(rng):
    x = dict_inputs(rng, dtype="float32")
    x["meta"] = x["meta"][:1]
    with pytest.raises(jacket.JacketValueError, match="every input must have the same batch size"):
        jacket.jacobian(dict_model(), x)


@pytest.mark.parametrize(
    "x,kind",
    [
        (np.array([["a"] * 5]), "string"),
        (np.ones((1, 5), dtype=complex), "complex"),
        (np.array([[object()] * 5], dtype=object), "object"),
    ],
)
def test_non_real_inputs(mlp, x, kind):
    with pytest.raises(jacket.JacketTypeError, match=f"must hold real numbers.*{kind}"):
        jacket.jacobian(mlp, x)


def test_x_none(mlp):
    with pytest.raises(jacket.JacketTypeError, match="Received: x=None"):
        jacket.jacobian(mlp, None)


def test_model_not_callable():
    with pytest.raises(
        jacket.JacketTypeError,
        match="`model` must be a Keras model or layer.*Received: model of type int",
    ):
        jacket.jacobian(3, np.ones((1, 2)))


def test_integer_model_input_suggests_the_embedding_output():
    ids = keras.Input((4,), dtype="int32", name="token_ids")
    h = keras.layers.Embedding(10, 3)(ids)
    model = keras.Model(ids, keras.layers.Flatten()(h))
    with pytest.raises(jacket.JacketTypeError) as info:
        jacket.jacobian(model, np.zeros((2, 4), "int32"))
    message = str(info.value)
    assert "model input 'token_ids'" in message and "declared int32" in message
    assert "Differentiate with respect to the embedding output" in message


def test_integer_output_has_no_jacobian():
    with pytest.raises(jacket.JacketTypeError, match="only float outputs have a Jacobian"):
        jacket.jacobian(lambda x: keras.ops.argmax(x, axis=1)[:, None], np.ones((2, 3), "float32"))


def test_jvp_tangent_shape(mlp):
    with pytest.raises(jacket.JacketValueError) as info:
        jacket.jvp(mlp, np.ones((2, 5), "float32"), np.ones((2, 4), "float32"))
    assert "jvp: `v` must have shape (2, 5), like `x`. Received: v.shape=(2, 4)." in str(info.value)


def test_vjp_cotangent_structure(rng):
    x = dict_inputs(rng, dtype="float32")
    with pytest.raises(
        jacket.JacketValueError, match="`u` must have the structure of the model output"
    ):
        jacket.vjp(dict_model(), x, np.ones((2, 1), "float32"))


def test_check_rejects_bad_eps(mlp):
    with pytest.raises(
        jacket.JacketValueError, match="check: `eps` must be a positive finite number"
    ):
        jacket.check(mlp, np.ones((1, 5), "float32"), eps=0.0)
