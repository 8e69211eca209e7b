"""The same saved weights give the same Jacobian on TensorFlow, JAX and PyTorch.

Runs once (in the TensorFlow process): each backend computes in its own subprocess, since Keras fixes
the backend per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from oracles import central_differences

pytestmark = pytest.mark.tensorflow

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, keras, jacket
    model = keras.saving.load_model(sys.argv[1], safe_mode=True)
    x = np.load(sys.argv[2])
    J = jacket.jacobian(model, x)
    np.save(sys.argv[3], keras.ops.convert_to_numpy(J))
    print(keras.backend.backend())
    """
)


def _model():
    return keras.Sequential(
        [
            keras.Input((10, 10, 2)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(3, 2, padding="same", activation="gelu"),
            keras.layers.Flatten(),
            keras.layers.Dense(6, activation="sigmoid"),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_same_weights_same_jacobian_on_every_backend(backend, tmp_path, rng):
    model = _model()
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    x = rng.uniform(-1, 1, size=(3, 10, 10, 2)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / f"J-{backend}.npy"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_path), str(tmp_path / "x.npy"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == backend
    J = np.load(out)
    assert J.shape == (3, 3, 10, 10, 2)

    # this process (TensorFlow) in float32, and float64 central differences on a float64 copy
    reference = keras.ops.convert_to_numpy(__import__("jacket").jacobian(model, x))
    scale = np.abs(reference).max()
    assert np.abs(J - reference).max() <= 1e-5 * scale
    twin = keras.Sequential.from_config(
        {
            **model.get_config(),
            "layers": [
                {**layer, "config": {**layer["config"], "dtype": "float64"}}
                for layer in model.get_config()["layers"]
            ],
        }
    )
    twin.set_weights([w.astype("float64") for w in model.get_weights()])
    fd = central_differences(twin, x.astype("float64"))
    assert np.abs(J - fd).max() <= 1e-4 * np.abs(fd).max()
