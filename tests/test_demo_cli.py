"""The main job and the command line, run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from oracles import native_jacobian
from PIL import Image

from jacket import demo

BACKEND = keras.backend.backend()


def _run(*args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "jacket", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_bundled_classifier_is_accurate():
    model = demo.load_digits_model()
    _, _, x_test, y_test = demo.digits_data()
    logits = keras.ops.convert_to_numpy(model(x_test, training=False))
    assert (logits.argmax(axis=1) == y_test).mean() > 0.95


@pytest.mark.one_backend
def test_run_demo_writes_jacobians_and_a_figure(tmp_path):
    result = demo.run_demo(tmp_path / "out", batch=6, repeats=1)
    assert result.jacobian_shape == (6, 10, 8, 8, 1)
    assert result.check.ok and result.check.max_rel_error < 1e-4, str(result.check)
    model = demo.load_digits_model()
    _, _, x_test, y_test = demo.digits_data()
    J = np.load(result.array)
    assert J.shape == (6, 10, 8, 8, 1) and J.dtype == np.float32
    # the written Jacobians against the framework's own (measured: 1.9e-7 relative on TensorFlow,
    # 0 on JAX and PyTorch)
    native = native_jacobian(model, x_test[:6])
    np.testing.assert_allclose(J, native, rtol=0, atol=1e-6 * np.abs(native).max())
    logits = keras.ops.convert_to_numpy(model(x_test, training=False))
    assert result.predictions == [int(p) for p in logits[:6].argmax(axis=1)]
    assert result.accuracy == float((logits.argmax(axis=1) == y_test).mean())
    assert "per-sample" in result.plan and result.backend == BACKEND
    # the figure: 4 samples, each an input column and 10 rows of J, colored (not blank)
    with Image.open(result.figure) as figure:
        assert figure.format == "PNG"
        pixels = np.asarray(figure.convert("RGB"))
    height, width, _ = pixels.shape
    assert 1.5 < width / height < 4.5  # 11 panels across, 4 down
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # diverging shades of J


@pytest.mark.cli
def test_cli_demo_json(tmp_path):
    out = tmp_path / "demo"
    proc = _run("--backend", BACKEND, "demo", "--json", "--batch", "4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["backend"] == BACKEND
    assert summary["jacobian_shape"] == [4, 10, 8, 8, 1]
    assert summary["check_ok"] is True
    assert (out / "jacobian_rows.png").exists() and (out / "jacobians.npy").exists()
