"""The main job and the command line, run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

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


def test_run_demo_writes_jacobians_and_a_figure(tmp_path):
    result = demo.run_demo(tmp_path / "out", batch=6, repeats=1)
    assert result.jacobian_shape == (6, 10, 8, 8, 1)
    assert result.check.ok, str(result.check)
    J = np.load(result.array)
    assert J.shape == (6, 10, 8, 8, 1) and np.isfinite(J).all() and np.abs(J).max() > 0
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.backend == BACKEND


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
