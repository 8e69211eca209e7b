"""Test set-up: one Keras backend per process (KERAS_BACKEND), seeded tests, Agg figures."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "jax":
    os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 models need it on JAX
if (
    "JACKET_CACHE_DIR" not in os.environ
):  # measured plans go to a folder of this run, never the user's
    import tempfile

    os.environ["JACKET_CACHE_DIR"] = tempfile.mkdtemp(prefix="jacket-test-cache-")

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# Keras's type promotion maps float64 to float32 on JAX and PyTorch (keras.backend.result_type), so a
# float64 model there runs some ops in float32. The float64 oracles below need real float64, so the
# tests lift that mapping for the whole session; jacket's own code never relies on it.
if BACKEND != "tensorflow":
    from keras.src.backend.common import dtypes as _keras_dtypes

    _keras_dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        for name in ("tensorflow", "jax", "torch"):
            if name in marks and BACKEND != name:
                item.add_marker(pytest.mark.skip(reason=f"{name} only (backend is {BACKEND})"))


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
