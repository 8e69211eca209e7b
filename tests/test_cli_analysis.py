"""`jacket sensitivity`, `jacket norms` and `jacket attack {fgsm,jsma,deepfool}`, run for real.

In-process runs (`CliRunner`, as in test_cli.py) on small models saved here and on the bundled digits
classifier: what each command writes equals what `jacket.analysis` / `jacket.attacks` compute on the
same data here, and the numbers also meet an independent oracle (float64 central differences,
`numpy.linalg` on the dense Jacobian, the model's own predictions on the adversarial examples). One
`cli`-marked case starts `python -m jacket` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from cli_helpers import PNG
from cli_helpers import close as _close
from cli_helpers import invoke as _invoke
from cli_helpers import no_temporaries as _no_temporaries
from cli_helpers import ok as _ok
from cli_helpers import one_red_line as _one_red_line
from oracles import central_differences, forward

from jacket import analysis, attacks, demo

BACKEND = keras.backend.backend()
DIGITS = demo.MODEL_PATH


def _mlp(dtype="float32"):
    return keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(6, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small models and inputs, saved once per module: `files.path`, `files.model[name]`, ..."""
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("cli_analysis")

    class Files:
        path = root
        model = {}
        data = {}

    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    two_in = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    c = keras.Input((4,))
    two_out = keras.Model(c, [keras.layers.Dense(3)(c), keras.layers.Dense(2)(c)])
    square = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(3, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    models = {"mlp": _mlp(), "mlp64": _mlp("float64"), "square": square}
    models.update(two_in=two_in, two_out=two_out)
    models["scalar"] = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    for name, model in models.items():
        model.save(root / f"{name}.keras")
        Files.model[name] = model

    x = rng.normal(size=(10, 4)).astype("float32")
    np.save(root / "x.npy", x)
    Files.data["x"] = x
    np.save(root / "x64.npy", x.astype("float64"))
    Files.data["x3"] = rng.normal(size=(7, 3))
    np.save(root / "x3.npy", Files.data["x3"])
    np.savez(root / "two.npz", a=rng.normal(size=(5, 4)), b=rng.normal(size=(5, 2)))

    _, _, x_test, y_test = demo.digits_data()
    digits, labels = x_test[:6], y_test[:6]
    np.savez(root / "digits.npz", image=digits, label=labels)
    np.save(root / "digits.npy", digits)
    np.save(root / "labels5.npy", labels[:5])
    Files.data["digits"], Files.data["labels"] = digits, labels
    Files.model["digits"] = demo.load_digits_model()
    return Files


def _same(actual, expected, rtol=1e-6):
    """Equal to what the library computes here: same code, same data, same backend."""
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=1e-9
    )


# An attack iterates on float32 Jacobians, and the two processes' planners may run different
# plans on some of its calls (the command's first calls measure them; the library here starts
# from the plan the command left in the cache), each rounding its own way: on JAX, DeepFool's
# examples differed by up to 6.7e-6 (relative) on 4 of 384 values.
ATTACK_RTOL = 1e-4


def _is_png(path: Path):
    assert path.read_bytes()[:8] == PNG, path


# ------------------------------------------------------------------------------------ sensitivity


def test_sensitivity_streams_and_matches_the_library(files, tmp_path):
    out = tmp_path / "sens"
    result = _ok(
        "sensitivity", files.path / "mlp.keras", files.path / "x.npy", "-o", out,
        "--batch-size", 4, "--reduce", "rms", "--top", 3, "--saliency", 3, "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 10 and summary["batches"] == 3 and summary["backend"] == BACKEND
    assert summary["reduce"] == "rms" and summary["in_shape"] == [4] and summary["out_shape"] == [3]
    model, x = files.model["mlp"], files.data["x"]

    values = np.load(out / "sensitivity.npy")
    _same(values, analysis.sensitivity(model, x, reduce="rms", batch_size=4).values)
    J = central_differences(model, x, eps=1e-3)  # (10, 3, 4)
    _close(values, np.sqrt((J**2).mean(axis=(0, 1))), rtol=1e-2)
    order = np.argsort(-values, kind="stable")[:3]
    assert [entry["flat"] for entry in summary["top"]] == order.tolist()
    assert [entry["feature"] for entry in summary["top"]] == [[int(j)] for j in order]
    _same([entry["value"] for entry in summary["top"]], values[order])

    gradient = np.load(out / "saliency.npy")
    predicted = forward(model, x[:3]).argmax(axis=1)
    assert summary["saliency"] == {"samples": 3, "target": predicted.tolist()}
    _same(gradient, analysis.saliency(model, x[:3]).gradient)
    _close(gradient, J[np.arange(3), predicted][:3], rtol=1e-2)
    for name in ("sensitivity.png", "saliency.png"):
        _is_png(out / name)
    _no_temporaries(out)


def test_sensitivity_of_one_output_and_the_table(files, tmp_path):
    out = tmp_path / "sens"
    result = _ok(
        "sensitivity", files.path / "mlp.keras", files.path / "x.npy", "-o", out,
        "--output", 1, "--reduce", "max_abs", "--top", 2, env={"COLUMNS": "250"},
    )  # fmt: skip
    model, x = files.model["mlp"], files.data["x"]
    values = np.load(out / "sensitivity.npy")
    _same(values, analysis.sensitivity(model, x, reduce="max_abs", output=1).values)
    J = central_differences(model, x, eps=1e-3)
    _close(values, np.abs(J[:, 1]).max(axis=0), rtol=1e-2)
    best = int(np.argmax(values))
    assert "max_abs of |d y / d x| over output 1" in result.stdout
    assert f"#1 ({best},)" in result.stdout and "sensitivity.png" in result.stdout
    assert not (out / "saliency.png").exists()

    # an output index the model does not have: the library's message, one line
    _one_red_line(
        _invoke("sensitivity", files.path / "mlp.keras", files.path / "x.npy", "-o",
                tmp_path / "other", "--output", 3),
        "`output` must index the model's 3 outputs",
    )  # fmt: skip


def test_sensitivity_progress_bar_and_quiet(files, tmp_path):
    terminal = {"TTY_COMPATIBLE": "1", "COLUMNS": "120"}
    args = ["sensitivity", files.path / "mlp.keras", files.path / "x.npy", "--batch-size", 3]
    shown = _ok(*args, "-o", tmp_path / "a", env=terminal)
    assert "Sensitivity" in shown.stderr and "10/10" in shown.stderr
    quiet = _ok(*args, "-o", tmp_path / "b", "--quiet", env=terminal)
    assert quiet.stderr == "" and quiet.stdout == ""
    np.testing.assert_allclose(  # to rounding: plans are measured (NOTE: [Measured plans])
        np.load(tmp_path / "a" / "sensitivity.npy"),
        np.load(tmp_path / "b" / "sensitivity.npy"),
        rtol=1e-6,
    )


def test_existing_outputs_need_force(files, tmp_path):
    out = tmp_path / "sens"
    args = ["sensitivity", files.path / "mlp.keras", files.path / "x.npy", "-o", out, "-q"]
    _ok(*args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["sensitivity.npy", "sensitivity.png", "summary.json"]
    _one_red_line(_invoke(*args), "sensitivity.npy", "exists", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _ok(*args, "--reduce", "max_abs", "--force")
    _same(
        np.load(out / "sensitivity.npy"),
        analysis.sensitivity(files.model["mlp"], files.data["x"], reduce="max_abs").values,
    )
    assert json.loads((out / "summary.json").read_text())["reduce"] == "max_abs"
    _no_temporaries(out)

    # an output file that exists alone is refused too, before any work
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "saliency.png").write_bytes(b"mine")
    _one_red_line(
        _invoke(*args[:3], "-o", tmp_path / "fresh", "--saliency", 2), "saliency.png", "exists"
    )
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["saliency.png"]


# ------------------------------------------------------------------------------------------ norms


def test_norms_match_numpy_on_the_dense_jacobian(files, tmp_path):
    out = tmp_path / "norms.npz"
    result = _ok(
        "norms", files.path / "mlp64.keras", files.path / "x64.npy", "--ord", "fro", "--ord", "2",
        "--ord", "nuc", "--lipschitz", "--batch-size", 4, "-o", out, "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    model, x = files.model["mlp64"], files.data["x"].astype("float64")
    singular = np.linalg.svd(central_differences(model, x), compute_uv=False)  # (10, 3)
    oracle = {
        "fro": np.sqrt((singular**2).sum(axis=1)),
        "2": singular[:, 0],
        "nuc": singular.sum(axis=1),
    }
    saved = np.load(out)
    for o, expected in oracle.items():
        library = analysis.jacobian_norm(model, x, 2 if o == "2" else o)
        _same(saved[f"norm_{o}"], library.value)
        _close(saved[f"norm_{o}"], expected, rtol=1e-6)
        entry = summary["norms"][o]
        assert entry["method"] == "exact" and entry["argmax"] == int(expected.argmax())
        _same([entry["mean"], entry["max"]], [saved[f"norm_{o}"].mean(), saved[f"norm_{o}"].max()])
    lip = analysis.lipschitz(model, x)
    assert summary["lipschitz"]["index"] == lip.index == int(oracle["2"].argmax())
    _same(summary["lipschitz"]["value"], lip.value)
    _same(saved["lipschitz_norms"], oracle["2"])
    _same(saved["lipschitz_x"], x[lip.index])
    _same(np.abs(saved["lipschitz_v"]), np.abs(lip.v))

    # the same numbers as JSON lists, and the table
    table = _ok(
        "norms", files.path / "mlp64.keras", files.path / "x64.npy", "--ord", "nuc",
        "-o", tmp_path / "norms.json", env={"COLUMNS": "250"},
    )  # fmt: skip
    lists = json.loads((tmp_path / "norms.json").read_text())["per_sample"]
    assert sorted(lists) == ["error_nuc", "norm_nuc"]
    _same(lists["norm_nuc"], saved["norm_nuc"])
    assert "nuclear ||J||_* (exact)" in table.stdout and "spectral" not in table.stdout


def test_norms_logdet_and_the_frobenius_estimate(files, tmp_path):
    model, x = files.model["square"], files.data["x3"]
    result = _ok(
        "norms", files.path / "square.keras", files.path / "x3.npy", "--logdet", "--ord", "fro",
        "--projections", 8, "--batch-size", 16, "-o", tmp_path / "n.npz", "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    saved = np.load(tmp_path / "n.npz")
    sign, logabs = np.linalg.slogdet(central_differences(model, x))
    library = analysis.logdet(model, x)
    _same(saved["logdet_sign"], library.sign)
    _same(saved["logdet_logabsdet"], library.logabsdet)
    np.testing.assert_array_equal(saved["logdet_sign"], sign)
    _close(saved["logdet_logabsdet"], logabs, rtol=1e-6)
    assert summary["logdet"]["positive"] == int((sign > 0).sum())
    assert summary["logdet"]["negative"] == int((sign < 0).sum())
    _same(summary["logdet"]["mean_logabsdet"], logabs.mean())

    # one batch: the same random projections as the library's call on the whole array
    estimate = analysis.jacobian_norm(model, x, "fro", method="estimate", n_projections=8)
    assert summary["norms"]["fro"]["method"] == "estimate"
    _same(saved["norm_fro"], estimate.value)
    _same(saved["error_fro"], estimate.error)
    exact = np.linalg.norm(central_differences(model, x), axis=(1, 2))
    assert np.all(np.abs(saved["norm_fro"] - exact) <= 5 * saved["error_fro"])


# ---------------------------------------------------------------------------------------- attacks

ATTACKS = {
    # name: (command-line options, the library call's keyword arguments)
    "fgsm": (["--eps", "0.1", "--clip", "0,1"], {"eps": 0.1, "clip": (0.0, 1.0)}),
    "jsma": (["--gamma", "0.2"], {"gamma": 0.2}),
    "deepfool": (["--clip=0,1", "--max-iter", "10"], {"clip": (0.0, 1.0), "max_iter": 10}),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_on_the_digits_matches_the_library(files, tmp_path, name):
    options, kwargs = ATTACKS[name]
    out = tmp_path / name
    result = _ok(
        "attack", name, DIGITS, files.path / "digits.npz", "-o", out, "--labels", "label",
        "--batch-size", 4, "--max-samples-plot", 3, "--json", *options,
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    x, labels = files.data["digits"], files.data["labels"]
    model = files.model["digits"]
    expected = getattr(attacks, name)(
        model, x, batch_size=4, **({"y": labels} if name == "fgsm" else {}), **kwargs
    )
    x_adv = np.load(out / "x_adv.npy")
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    _same(x_adv, expected.x_adv, ATTACK_RTOL)
    assert summary["attack"] == name and summary["samples"] == 6 and summary["backend"] == BACKEND
    assert summary["norm"] == expected.norm
    assert summary["success_rate"] == expected.success_rate
    assert summary["successes"] == int(expected.success.sum())
    assert summary["targeted"] == (name == "jsma")
    _is_png(out / "attack.png")

    # the model's own verdict on the written examples, and their size, computed here
    predicted = forward(model, x_adv).argmax(axis=1)
    clean = forward(model, x).argmax(axis=1)
    success = predicted == expected.target if name == "jsma" else predicted != labels
    assert summary["success_rate"] == success.mean()
    diff = (x_adv.astype(np.float64) - x).reshape(len(x), -1)
    size = {
        "linf": np.abs(diff).max(axis=1),
        "l2": np.linalg.norm(diff, axis=1),
        "l0": (diff != 0).mean(axis=1),
    }[expected.norm]
    if success.any():
        _same(summary["mean_perturbation"], size[success].mean())
    assert summary["accuracy"] == {
        "clean": float((clean == labels).mean()),
        "adversarial": float((predicted == labels).mean()),
    }
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    if name == "fgsm":
        np.testing.assert_allclose(size, 0.1, rtol=1e-5)  # one full step per sample, in [0, 1]
    else:
        assert summary["mean_iterations"] == expected.iterations.mean()


def test_fgsm_targeted_with_labels_from_a_file_and_the_table(files, tmp_path):
    np.save(tmp_path / "labels.npy", files.data["labels"])
    result = _ok(
        "attack", "fgsm", DIGITS, files.path / "digits.npy", "-o", tmp_path / "t",
        "--eps", "0.3", "--target", 0, "--labels", tmp_path / "labels.npy", env={"COLUMNS": "250"},
    )  # fmt: skip
    expected = attacks.fgsm(
        files.model["digits"], files.data["digits"], eps=0.3, target=0, y=files.data["labels"]
    )
    _same(np.load(tmp_path / "t" / "x_adv.npy"), expected.x_adv)
    assert "fgsm (targeted): eps=0.3, target=0" in result.stdout
    successes = int(expected.success.sum())
    assert f"{successes} of 6 ({expected.success_rate:.1%})" in result.stdout
    assert "mean Linf" in result.stdout and "on x_adv" in result.stdout


ATTACK_FAILURES = {
    # case: (command line after "attack", fragments of the one error line)
    "target out of range": (
        ["fgsm", "{digits}", "{npz}", "--eps", "0.1", "--target", "12"],
        ["--target 12 is not a class", "[0, 10)"],
    ),
    "labels of the wrong length": (
        ["deepfool", "{digits}", "{npz}", "--labels", "{labels5}"],
        ["holds 5 labels for 6 samples"],
    ),
    "labels not in the npz": (
        ["jsma", "{digits}", "{npz}", "--labels", "truth"],
        ["has no array 'truth'", "image, label"],
    ),
    "labels nowhere": (
        ["jsma", "{digits}", "{npy}", "--labels", "truth"],
        ["labels not found: 'truth'"],
    ),
    "inputs outside the clip": (
        ["jsma", "{digits}", "{npz}", "--clip", "0.2,0.5"],
        ["`x` must lie within `clip`"],
    ),
    "not a classifier": (
        ["fgsm", "{scalar}", "{x3}", "--eps", "0.1"],
        ["at least 2 classes"],
    ),
}


@pytest.mark.parametrize("case", list(ATTACK_FAILURES))
def test_attack_failures_are_one_red_line(files, tmp_path, case):
    args, fragments = ATTACK_FAILURES[case]
    names = {
        "digits": DIGITS,
        "npz": files.path / "digits.npz",
        "npy": files.path / "digits.npy",
        "labels5": files.path / "labels5.npy",
        "scalar": files.path / "scalar.keras",
        "x3": files.path / "x3.npy",
    }
    out = tmp_path / "out"
    result = _invoke("attack", *[a.format(**names) for a in args], "-o", out)
    _one_red_line(result, *fragments)
    assert not out.exists()  # the folder made for the outputs is removed again


# -------------------------------------------------------------------------------------- failures

FAILURES = {
    # case: (command line, fragments of the one error line)
    "missing model": (
        ["sensitivity", "nope.keras", "{x}", "-o", "{out}"],
        ["model file not found"],
    ),
    "missing inputs": (["norms", "{mlp}", "nope.npy"], ["inputs not found", "nope.npy"]),
    "missing model, attack": (
        ["attack", "deepfool", "nope.keras", "{x}", "-o", "{out}"],
        ["model file not found"],
    ),
    "two inputs": (
        ["sensitivity", "{two_in}", "{two}", "-o", "{out}"],
        ["needs a model with one input", "takes 2"],
    ),
    "two outputs": (
        ["norms", "{two_out}", "{x}"],
        ["needs a model with one output tensor", "returns 2"],
    ),
    "logdet of a non-square model": (
        ["norms", "{mlp}", "{x}", "--logdet"],
        ["--logdet needs a square Jacobian", "(4,) (4 values) to (3,) (3)"],
    ),
    "norms output suffix": (
        ["norms", "{mlp}", "{x}", "-o", "{tmp}/n.csv"],
        ["output suffix must be one of .json, .npz"],
    ),
    "output folder is a file": (
        ["sensitivity", "{mlp}", "{x}", "-o", "{x}"],
        ["it is a file", "Pass a folder"],
    ),
    "output folder's parent missing": (
        ["attack", "jsma", "{mlp}", "{x}", "-o", "{tmp}/no/out"],
        ["cannot create folder", "does not exist"],
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_are_one_red_line(files, tmp_path, case):
    args, fragments = FAILURES[case]
    names = {name: files.path / f"{name}.keras" for name in files.model if name != "digits"}
    names.update(x=files.path / "x.npy", two=files.path / "two.npz", out=tmp_path / "out")
    names["tmp"] = tmp_path
    result = _invoke(*[a.format(**names) for a in args])
    _one_red_line(result, *fragments)
    assert not (tmp_path / "out").exists()
    _no_temporaries(tmp_path)


def test_without_matplotlib_the_figures_are_refused(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = _invoke(
        "sensitivity", files.path / "mlp.keras", files.path / "x.npy", "-o", tmp_path / "s"
    )
    _one_red_line(result, 'pip install "jacket[plot]"')
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["sensitivity", "m.keras", "x.npy"],  # no -o
        ["sensitivity", "m.keras", "x.npy", "-o", "out", "--reduce", "median"],
        ["sensitivity", "m.keras", "x.npy", "-o", "out", "--output", "-1"],
        ["norms", "m.keras", "x.npy", "--ord", "3"],
        ["norms", "m.keras", "x.npy", "--projections", "0"],
        ["attack", "fgsm", "m.keras", "x.npy", "-o", "out"],  # no --eps
        ["attack", "fgsm", "m.keras", "x.npy", "-o", "out", "--eps", "0"],
        ["attack", "fgsm", "m.keras", "x.npy", "-o", "out", "--eps", "0.1", "--clip", "1,0"],
        ["attack", "jsma", "m.keras", "x.npy", "-o", "out", "--clip", "zero,one"],
        ["attack", "jsma", "m.keras", "x.npy", "-o", "out", "--gamma", "1.5"],
        ["attack", "jsma", "m.keras", "x.npy", "-o", "out", "--theta", "0"],
        ["attack", "jsma", "m.keras", "x.npy", "-o", "out", "--criterion", "best"],
        ["attack", "deepfool", "m.keras", "x.npy", "-o", "out", "--max-iter", "0"],
        ["attack", "cw", "m.keras", "x.npy", "-o", "out"],
    ],
    ids=[
        "no output", "reduce", "output", "ord", "projections", "no eps", "eps", "clip order",
        "clip words", "gamma", "theta", "criterion", "max iter", "unknown attack",
    ],
)  # fmt: skip
def test_usage_errors_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- the command, for real


@pytest.mark.cli
def test_python_m_jacket_attack_writes_what_the_library_computes(files, tmp_path):
    out = tmp_path / "fgsm"
    proc = subprocess.run(
        [sys.executable, "-m", "jacket", "--backend", BACKEND, "attack", "fgsm", str(DIGITS)]
        + [str(files.path / "digits.npy"), "-o", str(out), "--eps", "0.2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no framework start-up chatter, no warnings
    (line,) = proc.stdout.splitlines()  # one JSON object, nothing else on stdout
    summary = json.loads(line)
    expected = attacks.fgsm(files.model["digits"], files.data["digits"], eps=0.2)
    _same(np.load(out / "x_adv.npy"), expected.x_adv)
    assert summary["backend"] == BACKEND and summary["success_rate"] == expected.success_rate
    _is_png(out / "attack.png")


def test_a_model_from_a_function(files, tmp_path):
    """`module:function` reaches the analysis commands too (the bundled classifier)."""
    result = _ok(
        "sensitivity", "jacket.demo:load_digits_model", files.path / "digits.npy", "-o",
        tmp_path / "s", "--top", 1, "--json",
    )  # fmt: skip
    values = np.load(tmp_path / "s" / "sensitivity.npy")
    assert values.shape == (8, 8, 1)
    _same(values, analysis.sensitivity(files.model["digits"], files.data["digits"]).values)
    assert json.loads(result.stdout)["top"][0]["flat"] == int(np.argmax(values))
