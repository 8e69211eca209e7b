"""The table of models the engine is tested on, each buildable in any float dtype."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[str], keras.Layer]
    in_shape: tuple
    batch: int
    out_shape: tuple
    # backends on which Keras runs this model partly in float32 even when it is float64
    # (JAX's attention kernel): the float64 checks there use float32-grade tolerances
    float32_inside: tuple = ()


def seed_mlp(dtype="float32"):
    """The seed's first model: Dense(10, relu) on 5 inputs, then Dense(2)."""
    return keras.Sequential(
        [
            layers.Input((5,), dtype=dtype),
            layers.Dense(10, activation="relu", dtype=dtype),
            layers.Dense(2, dtype=dtype),
        ]
    )


def seed_cnn(dtype="float32"):
    """The seed's third model: Conv2D(32, 3x3, relu), MaxPooling 2, Flatten, Dense(10)."""
    return keras.Sequential(
        [
            layers.Input((28, 28, 1), dtype=dtype),
            layers.Conv2D(32, (3, 3), activation="relu", dtype=dtype),
            layers.MaxPooling2D((2, 2), dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(10, dtype=dtype),
        ]
    )


def conv1d(dtype="float32"):
    return keras.Sequential(
        [layers.Input((10, 2), dtype=dtype), layers.Conv1D(3, 3, padding="same", dtype=dtype)]
    )


def lstm(dtype="float32"):
    return keras.Sequential([layers.Input((5, 3), dtype=dtype), layers.LSTM(4, dtype=dtype)])


def attention(dtype="float32"):
    inputs = keras.Input((4, 6), dtype=dtype)
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=3, dtype=dtype)(inputs, inputs)
    return keras.Model(inputs, layers.GlobalAveragePooling1D(dtype=dtype)(attended))


def batchnorm_dropout(dtype="float32"):
    model = keras.Sequential(
        [
            layers.Input((6,), dtype=dtype),
            layers.Dense(8, activation="tanh", dtype=dtype),
            layers.BatchNormalization(dtype=dtype),
            layers.Dropout(0.5, dtype=dtype),
            layers.Dense(3, dtype=dtype),
        ]
    )
    bn = model.layers[1]
    rng = np.random.default_rng(5)
    bn.moving_mean.assign(rng.normal(size=8).astype(dtype))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=8).astype(dtype))
    return model


class Subclassed(keras.Model):
    """A subclassed model with a residual connection and a smooth nonlinearity."""

    def __init__(self, dtype="float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.inner = layers.Dense(7, activation="gelu", dtype=dtype)
        self.out = layers.Dense(4, dtype=dtype)
        self.skip = layers.Dense(4, use_bias=False, dtype=dtype)

    def call(self, x):
        return self.out(self.inner(x)) + keras.ops.sin(self.skip(x))


def subclassed(dtype="float32"):
    return Subclassed(dtype=dtype)


def activation(dtype="float32"):
    return layers.Activation("tanh", dtype=dtype)


SCENARIOS = [
    Scenario("seed_mlp_batch1", seed_mlp, (5,), 1, (2,)),
    Scenario("seed_mlp_batch3", seed_mlp, (5,), 3, (2,)),
    Scenario("seed_cnn", seed_cnn, (28, 28, 1), 1, (10,)),
    Scenario("tanh", activation, (6,), 2, (6,)),
    Scenario("conv1d", conv1d, (10, 2), 2, (10, 3)),
    Scenario("lstm", lstm, (5, 3), 2, (4,)),
    Scenario("attention", attention, (4, 6), 2, (6,), float32_inside=("jax",)),
    Scenario("batchnorm_dropout", batchnorm_dropout, (6,), 3, (3,)),
    Scenario("subclassed", subclassed, (5,), 3, (4,)),
]


def dict_model(dtype="float32"):
    """Two named inputs, two named outputs."""
    image = keras.Input((4, 4, 1), name="image", dtype=dtype)
    meta = keras.Input((3,), name="meta", dtype=dtype)
    h = layers.Conv2D(2, 3, activation="tanh", dtype=dtype)(image)
    h = layers.Flatten(dtype=dtype)(h)
    h = layers.Concatenate(dtype=dtype)([h, meta])
    score = layers.Dense(1, name="score", dtype=dtype)(h)
    parts = layers.Dense(5, activation="sigmoid", name="parts", dtype=dtype)(h)
    return keras.Model({"image": image, "meta": meta}, {"score": score, "parts": parts})


def dict_inputs(rng, batch=2, dtype="float64"):
    return {
        "image": rng.normal(size=(batch, 4, 4, 1)).astype(dtype),
        "meta": rng.normal(size=(batch, 3)).astype(dtype),
    }
