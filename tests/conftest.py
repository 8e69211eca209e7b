"""Test set-up: one Keras backend per process (KERAS_BACKEND), seeded tests, Agg figures."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 neural-network
# features (VNNI, BF16) or AMX; without them its CPU gradient of a grouped convolution is not
# implemented ("Gradients for grouped convolutions are not supported on CPU"), which the oracles'
# `batch_jacobian` needs (an AMD EPYC without AVX-512 here). jacket's own planner drops the plans
# that hit it and runs one that does not.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
if os.environ["KERAS_BACKEND"] == "jax":
    os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 models need it on JAX
# Measured plans go to a folder of this run, never the user's; under pytest-xdist, one per
# worker (a worker inherits the controller's environment, so the worker's name keys it).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if (
    "JACKET_CACHE_DIR" not in os.environ
    or os.environ.get("JACKET_TEST_CACHE_OF", _WORKER) != _WORKER
):
    import tempfile

    os.environ["JACKET_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"jacket-test-cache-{_WORKER}")
    os.environ["JACKET_TEST_CACHE_OF"] = _WORKER
if _WORKER:  # xdist's workers get COLUMNS=80, which Rich's console would keep from its import on
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# Keras's float64-to-float32 demotion on JAX and PyTorch is left as users have it: the float64
# oracles lift it around their own evaluations (`oracles.keras_float64`), and the float64 tests
# check the Jacobian jacket gives a user (see NOTE [Keras and float64] in jacket.engine.dtypes).


# What runs the same code whichever backend computes (the docs' examples, the command line in a
# subprocess, the demo) runs on one backend in the default run, and on every backend in the slow
# run (`make test-jax`): the fastest suite carries it, the others save about 3 minutes each.
ONE_BACKEND = "torch"


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        for name in ("tensorflow", "jax", "torch"):
            if name in marks and BACKEND != name:
                item.add_marker(pytest.mark.skip(reason=f"{name} only (backend is {BACKEND})"))
        if marks & {"one_backend", "cli"} and BACKEND != ONE_BACKEND:
            item.add_marker(pytest.mark.slow)


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
