"""The `jacket` command line and `jacket.io`, run for real on small files made here.

Most cases run the typer app in this process (`CliRunner`: the same code path as the command,
without paying a framework import per case); the `cli`-marked ones start `python -m jacket` or the
installed `jacket` script in a subprocess. Every Jacobian a command writes is compared with
`jacket.jacobian` run here on the same weights, and the simplest models with their exact Jacobian.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
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
from oracles import central_differences, native_jacobian
from PIL import Image

import jacket
from jacket import engine, io
from jacket.plot import is_image_shape, jacobian_figure, split_jacobian_shape

BACKEND = keras.backend.backend()
SCRIPT = Path(sys.executable).parent / "jacket"


# ------------------------------------------------------------------------------------------ files


def _mlp(dtype="float32"):
    return keras.Sequential(
        [
            keras.Input((4,), name="features", dtype=dtype),
            keras.layers.Dense(6, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


def _multi():
    a = keras.Input((4,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(5, activation="tanh")(keras.layers.Concatenate()([a, b]))
    score = keras.layers.Dense(3, name="score")(h)
    aux = keras.layers.Dense(1, activation="sigmoid", name="aux")(h)
    return keras.Model([a, b], [score, aux])


def _cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(2, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small models and inputs, saved once per module: `files.path`, `files.model[name]`, ..."""
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("cli")

    class Files:
        path = root
        model = {}
        data = {}

    models = {"mlp": _mlp(), "multi": _multi(), "cnn": _cnn()}
    models["linear"] = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    models["lambda"] = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Lambda(lambda t: t * 2.0)]
    )
    for name, model in models.items():
        model.save(root / f"{name}.keras")
        Files.model[name] = model
    models["linear"].save(root / "linear.h5")
    models["lambda"].save(root / "lambda.h5")

    x = rng.normal(size=(10, 4)).astype("float32")
    np.save(root / "x.npy", x)
    Files.data["x"] = x
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(7, 2))  # float64: cast to the model's dtype
    np.savez(root / "multi.npz", b=b, a=a, label=np.arange(7))
    Files.data["a"], Files.data["b"] = a, b
    table = rng.normal(size=(6, 5))
    (root / "linear.csv").write_text(
        "u,v,w,y,z\n" + "\n".join(",".join(f"{v:.17g}" for v in row) for row in table) + "\n"
    )
    Files.data["table"] = table
    images = root / "digits"
    images.mkdir()
    pixels = (rng.uniform(size=(3, 8, 8)) * 255).astype("uint8")
    for i, p in enumerate(pixels):
        Image.fromarray(p, "L").save(images / f"{i}.png")
    Files.data["pixels"] = pixels
    big = root / "big"
    big.mkdir()
    for i in range(2):
        Image.fromarray((rng.uniform(size=(12, 16, 3)) * 255).astype("uint8"), "RGB").save(
            big / f"{i}.jpg", quality=95
        )
    return Files


def _jac(model, x, **options):
    J = jacket.jacobian(model, x, **options)
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), J)


# ------------------------------------------------------------------------------------- jacobian


def test_jacobian_npy_in_batches_matches_the_library(files, tmp_path):
    out = tmp_path / "J.npy"
    result = _ok(
        "jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", out, "--batch-size", 4,
        "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["samples"] == 10 and summary["batches"] == 3 and summary["backend"] == BACKEND
    assert summary["blocks"] == {"J": {"shape": [10, 3, 4], "dtype": "float32"}}
    J = np.load(out)
    x = files.data["x"]
    _close(J, _jac(files.model["mlp"], x))
    # independent of jacket: the framework's own Jacobian of the float32 model, and float64 central
    # differences on a float64 copy (same weights); measured relative errors 1.9e-7 and 1.0e-7
    # (TensorFlow), 0 and 2.1e-7 (JAX), 0 and 6.0e-8 (PyTorch): the float32 rounding of J
    _close(J, native_jacobian(files.model["mlp"], x), rtol=1e-6)
    twin = _mlp("float64")
    twin.set_weights(files.model["mlp"].get_weights())
    _close(J, central_differences(twin, x.astype("float64")), rtol=1e-6)
    _no_temporaries(tmp_path)


def test_jacobian_options_reach_the_engine(files, tmp_path, monkeypatch):
    """--mode, --chunk-size, --flatten and --memory-budget reach `jacket.jacobian_fn`, and its plan
    follows them; the result does not depend on them."""
    made = []
    real = engine.jacobian_fn

    def recording(model, **options):
        fn = real(model, **options)
        made.append((options, fn))
        return fn

    monkeypatch.setattr(engine, "jacobian_fn", recording)  # what jacket.io.streams calls
    x = files.data["x"]
    out = tmp_path / "J.npy"
    _ok(
        "jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", out, "--mode",
        "forward", "--chunk-size", 1, "--flatten", "--memory-budget", "1MB", "-q",
    )  # fmt: skip
    ((options, fn),) = made
    assert options["mode"] == "forward" and options["chunk_size"] == 1
    assert options["flatten"] is True and options["memory_budget"] in ("1MB", 10**6)
    plan = fn.plan(x)
    assert (plan.mode, plan.chunk, plan.n_chunks) == ("forward", 1, 4)  # 4 inputs, one a pass
    _close(np.load(out), _jac(files.model["mlp"], x))
    made.clear()
    _ok("jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", tmp_path / "K.npy", "-q")
    ((options, fn),) = made
    assert options["mode"] == "auto" and options["chunk_size"] is None
    assert options["flatten"] is False and options["memory_budget"] is None


def test_legacy_h5_csv_to_zarr_is_the_exact_jacobian(files, tmp_path):
    zarr = pytest.importorskip("zarr")
    out = tmp_path / "J.zarr"
    result = _ok(
        "jacobian", files.path / "linear.h5", files.path / "linear.csv", "-o", out,
        "--batch-size", 4, "--flatten",
    )  # fmt: skip
    assert "wrote" in result.stdout and "(6, 2, 5)" in result.stdout
    group = zarr.open_group(str(out), mode="r")
    J = group["J"]
    assert J.shape == (6, 2, 5) and J.chunks[0] == 4
    assert group.attrs["backend"] == BACKEND and group.attrs["flatten"] is True
    kernel = np.asarray(keras.ops.convert_to_numpy(files.model["linear"].layers[0].kernel))
    _close(J[:], np.broadcast_to(kernel.T, (6, 2, 5)), rtol=1e-6)  # a Dense layer: J = W^T
    array, key = io.read_result(out)
    assert key == "J" and array.shape == (6, 2, 5)


def test_multi_input_output_npz_blocks_and_flat_npy(files, tmp_path):
    out = tmp_path / "J.npz"
    _ok(
        "jacobian", files.path / "multi.keras", files.path / "multi.npz", "-o", out,
        "--batch-size", 3, "-q",
    )  # fmt: skip
    a, b = files.data["a"].astype("float32"), files.data["b"].astype("float32")
    expected = _jac(files.model["multi"], [a, b])
    with np.load(out) as saved:
        assert list(saved.files) == ["score/a", "score/b", "aux/a", "aux/b"]
        for i, output in enumerate(("score", "aux")):
            for j, name in enumerate(("a", "b")):
                _close(saved[f"{output}/{name}"], expected[i][j])

    flat = tmp_path / "flat.npy"
    _ok(
        "jacobian", files.path / "multi.keras", files.path / "multi.npz", "-o", flat,
        "--flatten", "-q",
    )  # fmt: skip
    rows = [np.concatenate([expected[i][0], expected[i][1]], axis=2) for i in range(2)]
    _close(np.load(flat), np.concatenate(rows, axis=1))  # (7, 3 + 1, 4 + 2)

    refused = _invoke(
        "jacobian", files.path / "multi.keras", files.path / "multi.npz", "-o", tmp_path / "n.npy"
    )
    _one_red_line(refused, "an .npy file holds one array", "--flatten")
    assert not (tmp_path / "n.npy").exists()
    _no_temporaries(tmp_path)


def test_images_from_a_folder_a_glob_and_resized(files, tmp_path):
    cnn = files.model["cnn"]
    x = (files.data["pixels"].astype("float32") / 255.0)[..., None]
    expected = _jac(cnn, x)
    _ok("jacobian", files.path / "cnn.keras", files.path / "digits", "-o", tmp_path / "a.npy")
    _close(np.load(tmp_path / "a.npy"), expected)
    _ok("jacobian", files.path / "cnn.keras", files.path / "digits" / "*.png", "-o", tmp_path / "b.npy")  # fmt: skip
    _close(np.load(tmp_path / "b.npy"), expected)

    big = sorted((files.path / "big").iterdir())
    _one_red_line(
        _invoke("jacobian", files.path / "cnn.keras", files.path / "big", "-o", tmp_path / "c.npy"),
        "is 12x16",
        "--size 8x8",
    )
    _ok(
        "jacobian", files.path / "cnn.keras", files.path / "big", "-o", tmp_path / "c.npy",
        "--size", "8x8",
    )  # fmt: skip
    resized = np.stack(
        [
            np.asarray(
                Image.open(f).convert("L").resize((8, 8), Image.Resampling.BILINEAR), np.float32
            )
            / 255.0
            for f in big
        ]
    )[..., None]
    _close(np.load(tmp_path / "c.npy"), _jac(cnn, resized))


def test_model_from_a_function(files, tmp_path, monkeypatch):
    (tmp_path / "factory.py").write_text(
        "import keras\n\n"
        "def build():\n"
        "    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(\n"
        "        2, kernel_initializer=keras.initializers.Constant(0.5))])\n"
    )
    kernel = np.full((4, 2), 0.5)
    monkeypatch.chdir(tmp_path)
    _ok("jacobian", "factory:build", files.path / "x.npy", "-o", "J.npy", "-q")
    _close(np.load(tmp_path / "J.npy"), np.broadcast_to(kernel.T, (10, 2, 4)))
    _ok("jacobian", f"{tmp_path / 'factory.py'}:build", files.path / "x.npy", "-o", "K.npy", "-q")
    _close(np.load(tmp_path / "K.npy"), np.broadcast_to(kernel.T, (10, 2, 4)))
    _one_red_line(
        _invoke("jacobian", "factory:nothing", files.path / "x.npy", "-o", "L.npy"),
        "has no function 'nothing'",
    )
    _one_red_line(
        _invoke("jacobian", "no_such_module:build", files.path / "x.npy", "-o", "L.npy"),
        "no module 'no_such_module'",
    )


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layer_is_refused_without_unsafe(files, tmp_path, suffix):
    model_file = files.path / f"lambda{suffix}"
    out = tmp_path / "J.npy"
    _one_red_line(
        _invoke("jacobian", model_file, files.path / "x.npy", "-o", out),
        "Lambda layer",
        "--unsafe",
    )
    assert not out.exists()
    _one_red_line(_invoke("check", model_file, files.path / "x.npy"), "--unsafe")
    _ok("jacobian", model_file, files.path / "x.npy", "-o", out, "--unsafe", "-q")
    kernel = np.asarray(keras.ops.convert_to_numpy(files.model["lambda"].layers[0].kernel))
    _close(np.load(out), np.broadcast_to(2.0 * kernel.T, (10, 3, 4)), rtol=1e-6)  # 2 W^T


# -------------------------------------------------------------------------------------- failures


def _corrupt_files(root: Path) -> dict[str, Path]:
    keras_bytes = (root / "mlp.keras").read_bytes()
    h5_bytes = (root / "linear.h5").read_bytes()
    made = {
        "junk.keras": b"this is not a model",
        "half.keras": keras_bytes[: len(keras_bytes) // 2],
        "half.h5": h5_bytes[: len(h5_bytes) // 2],
    }
    paths = {}
    for name, data in made.items():
        (root / name).write_bytes(data)
        paths[name] = root / name
    return paths


FAILURES = {
    # case: (model, inputs, output, fragments of the one error line)
    "missing model": ("nope.keras", "x.npy", "J.npy", ["model file not found", "nope.keras"]),
    "missing inputs": ("mlp.keras", "nope.npy", "J.npy", ["inputs not found", "nope.npy"]),
    "junk model": ("junk.keras", "x.npy", "J.npy", ["corrupt, truncated or not a Keras model"]),
    "truncated .keras": ("half.keras", "x.npy", "J.npy", ["corrupt, truncated"]),
    "truncated .h5": ("half.h5", "x.npy", "J.npy", ["corrupt, truncated"]),
    "model suffix": ("x.npy", "x.npy", "J.npy", ["suffix must be one of .keras"]),
    "wrong shape": ("cnn.keras", "x.npy", "J.npy", ["do not fit the model", "(10, 4)"]),
    "csv columns": ("mlp.keras", "linear.csv", "J.npy", ["5 columns", "(4)"]),
    "npz names": ("multi.keras", "x.npy", "J.npy", ["missing 'a', 'b'"]),
    "images for a vector model": ("mlp.keras", "digits", "J.npy", ["not an image shape"]),
    "output suffix": ("mlp.keras", "x.npy", "J.txt", ["output suffix must be one of"]),
    "output folder missing": ("mlp.keras", "x.npy", "no/J.npy", ["does not exist"]),
    "output folder is a file": ("mlp.keras", "x.npy", "x.npy/J.npy", ["is not a folder"]),
    "NaN input": ("mlp.keras", "nan.npy", "J.npy", ["NaN or inf in sample(s) 2"]),
}


def _snapshot(*folders: Path) -> dict:
    """Every file under `folders` with its size and modification time, and every folder (whose
    own time changes when a writability probe comes and goes)."""
    return {
        p: "folder" if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in [folder, *folder.rglob("*")]
    }


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_are_one_red_line(files, tmp_path, case):
    _corrupt_files(files.path)
    bad = files.data["x"].copy()
    bad[2, 1] = np.nan
    np.save(files.path / "nan.npy", bad)
    model, inputs, output, fragments = FAILURES[case]
    out = files.path / output if output.startswith("x.npy") else tmp_path / output
    before = _snapshot(files.path, tmp_path)
    result = _invoke(
        "jacobian", model if ":" in model else files.path / model, files.path / inputs, "-o", out
    )
    _one_red_line(result, *fragments)
    # nothing written, created or changed: no output, no folder made for it, no temporary, and
    # x.npy (the "folder" of two cases) untouched
    assert _snapshot(files.path, tmp_path) == before


def test_unwritable_folder(files, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        # root ignores permission bits: then use a system folder that refuses writes
        if os.access(folder, os.W_OK):
            folder = next(
                (Path(p) for p in ("/sys", "/proc/sys") if Path(p).is_dir() and not _writable(p)),
                None,
            )
        if folder is None:
            pytest.skip("no folder here refuses writes to this user")
        line = _one_red_line(
            _invoke(
                "jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", folder / "J.npy"
            ),
            "is not writable",
        )
        assert str(folder) in line
    finally:
        (tmp_path / "locked").chmod(0o700)


def _writable(folder: str) -> bool:
    try:
        with open(Path(folder) / ".jacket-probe", "w"):
            pass
    except OSError:
        return False
    os.unlink(Path(folder) / ".jacket-probe")
    return True


def test_existing_output_needs_force(files, tmp_path):
    out = tmp_path / "J.npy"
    np.save(out, np.zeros(3))
    before = out.read_bytes()
    _one_red_line(
        _invoke("jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", out),
        "exists",
        "--force",
    )
    assert out.read_bytes() == before
    _ok("jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", out, "--force", "-q")
    _close(np.load(out), _jac(files.model["mlp"], files.data["x"]))

    pytest.importorskip("zarr")
    store = tmp_path / "J.zarr"
    _ok("jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", store, "-q")
    (store / "stale").write_text("from an older run")
    _one_red_line(
        _invoke("jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", store), "exists"
    )
    _ok("jacobian", files.path / "mlp.keras", files.path / "x.npy", "-o", store, "-q", "-f")
    assert not (store / "stale").exists()
    _close(io.read_result(store)[0][:], np.load(out))
    _no_temporaries(tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        ["jacobian", "m.keras", "x.npy"],  # no -o
        ["jacobian", "m.keras", "x.npy", "-o", "J.npy", "--mode", "sideways"],
        ["jacobian", "m.keras", "x.npy", "-o", "J.npy", "--batch-size", "0"],
        ["jacobian", "m.keras", "x.npy", "-o", "J.npy", "--size", "8y8"],
        ["plot"],
    ],
    ids=["no output", "mode", "batch size", "size", "plot without a file"],
)
def test_usage_errors_exit_2(args):
    result = _invoke(*args)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- check, plot, info, progress


def test_check_passes_and_fails_with_exit_code(files):
    result = _ok("check", files.path / "mlp.keras", files.path / "x.npy", "--samples", 4, "--json")
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["samples"] == 4 and report["shape"] == [4, 3, 4]
    assert report["max_rel_error"] <= report["rtol"] == 1e-4
    mine = jacket.check(files.model["mlp"], files.data["x"][:4])
    assert mine.ok and report["max_rel_error"] < 10 * mine.rtol

    human = _ok("check", files.path / "linear.h5", files.path / "linear.csv")
    assert "Jacobian check OK" in human.stdout

    failed = _invoke("check", files.path / "mlp.keras", files.path / "x.npy", "--rtol", "0")
    assert failed.exit_code == 1 and "Jacobian check FAILED" in failed.stdout
    assert "Traceback" not in failed.stderr


def test_plot_draws_heatmaps_and_image_rows(tmp_path, rng):
    rows = rng.normal(size=(3, 4, 8, 8, 1)).astype("float32")
    np.save(tmp_path / "rows.npy", rows)
    result = _ok("plot", tmp_path / "rows.npy", "--samples", 2, "--json")
    summary = json.loads(result.stdout)
    assert summary["figure"] == str(tmp_path / "rows.png")
    assert (
        "8x8x1 image" in summary["description"]
        and "2 sample(s) x 4 output" in summary["description"]
    )
    assert (tmp_path / "rows.png").read_bytes()[:8] == PNG

    io.write_result(tmp_path / "J.npz", {"y/a": rows[:, :, :, 0, 0], "y/b": rows[:, :2, 0]})
    _one_red_line(_invoke("plot", tmp_path / "J.npz"), "holds 2 arrays", "y/a, y/b")
    out = tmp_path / "heat.png"
    result = _ok("plot", tmp_path / "J.npz", "--key", "y/a", "-o", out)
    assert "heatmap of 3 sample(s), 4 outputs x 8 inputs" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 200
    _one_red_line(_invoke("plot", tmp_path / "J.npz", "--key", "y/a", "-o", out), "exists")
    _ok("plot", tmp_path / "J.npz", "--key", "y/b", "-o", out, "--force", "-q")
    _one_red_line(_invoke("plot", tmp_path / "missing.npy"), "file not found")
    _no_temporaries(tmp_path)


def test_plot_shape_rules():
    assert split_jacobian_shape((32, 10, 8, 8, 1)) == ((10,), (8, 8, 1))
    assert split_jacobian_shape((2, 3, 4)) == ((3,), (4,))
    assert split_jacobian_shape((2, 6, 6, 1, 6, 6, 1)) == ((6, 6, 1), (6, 6, 1))
    assert split_jacobian_shape((2, 3, 5, 4), input_ndim=1) == ((3, 5), (4,))
    with pytest.raises(ValueError, match="input_ndim"):
        split_jacobian_shape((2, 3, 4), input_ndim=2)
    assert is_image_shape((8, 8, 1)) and is_image_shape((28, 28)) and not is_image_shape((4,))
    assert not is_image_shape((8, 8, 7))
    figure, description = jacobian_figure(np.ones((2, 3, 6)))
    assert "heatmap" in description and len(figure.axes) == 4  # 2 panels + 2 colorbars


def test_figures_draw_the_values(rng):
    """What the panels show is the Jacobian: each heatmap is its sample's matrix, each image row
    its output's row, on a color scale symmetric about 0."""
    J = rng.normal(size=(2, 3, 6))
    figure, _ = jacobian_figure(J)
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["sample 0", "sample 1"]
    for b, ax in enumerate(panels):
        (image,) = ax.images
        np.testing.assert_array_equal(image.get_array(), J[b])
        limit = np.abs(J[b]).max()
        assert image.get_clim() == (-limit, limit)
    rows = rng.normal(size=(2, 3, 4, 5, 1))
    figure, description = jacobian_figure(rows)
    assert "drawn as a 4x5x1 image" in description
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 6 and [ax.get_title() for ax in panels[:3]] == ["out 0", "out 1", "out 2"]
    for k, ax in enumerate(panels):  # sample by sample, output by output; one scale a sample
        b, i = divmod(k, 3)
        np.testing.assert_array_equal(ax.images[0].get_array(), rows[b, i, :, :, 0])
        assert ax.images[0].get_clim() == (-np.abs(rows[b]).max(), np.abs(rows[b]).max())


def test_info_names_versions_backend_and_devices():
    info = json.loads(_ok("info", "--json").stdout)
    assert info["backend"] == BACKEND
    assert info["versions"]["keras"] == keras.__version__
    assert info["devices"] and not info["devices"][0].startswith("unknown")
    table = _ok("info", "--backend", BACKEND).stdout
    assert BACKEND in table and keras.__version__ in table and "devices" in table


ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_the_benchmark_suite_with_the_options(monkeypatch):
    """`jacket bench` runs the checkout's `benchmarks/run.py` (what `make bench` runs) with the
    cases, backends and repeats given, and exits with its code. (The suite itself runs for minutes
    per backend: its own checks live in benchmarks/; here it is not started.)"""
    ran = []

    def fake_run(command, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(subprocess, "run", fake_run)
    # in the checkout: from another folder the command finds no suite since cli/ became a package
    # (it looks in src/, `parents[2]` of cli/__init__.py): reported, not fixed here
    monkeypatch.chdir(ROOT)
    result = _invoke(
        "bench", "seed_mlp_b1", "seed_cnn_b1", "-b", "jax", "-b", "torch", "--repeats", 2
    )
    assert result.exit_code == 3  # the suite's own exit code
    ((python, script, *args),) = ran
    assert python == sys.executable and Path(script) == ROOT / "benchmarks" / "run.py"
    assert args == [
        "--repeats",
        "2",
        "--backends",
        "jax",
        "torch",
        "--cases",
        "seed_mlp_b1",
        "seed_cnn_b1",
    ]
    monkeypatch.undo()
    # the suite's own parser takes those arguments (its --help is all that runs)
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--repeats", "--backends", "--cases"):
        assert option in proc.stdout


def test_unknown_backend_is_a_usage_error():
    _one_red_line(
        _invoke("--backend", "mxnet", "info"),
        "--backend must be one of tensorflow, jax, torch",
        code=2,
    )


def test_progress_bar_on_a_terminal_and_quiet(files, tmp_path):
    terminal = {"TTY_COMPATIBLE": "1", "COLUMNS": "120"}
    args = ["jacobian", files.path / "mlp.keras", files.path / "x.npy", "--batch-size", 3]
    shown = _ok(*args, "-o", tmp_path / "a.npy", env=terminal)
    assert "Jacobians" in shown.stderr and "10/10" in shown.stderr
    quiet = _ok(*args, "-o", tmp_path / "b.npy", "--quiet", env=terminal)
    assert quiet.stderr == "" and quiet.stdout == ""
    piped = _ok(*args, "-o", tmp_path / "c.npy", "--json")  # not a terminal: no bar
    assert piped.stderr == ""
    json.loads(piped.stdout)


# ------------------------------------------------------------------------------------------- io


def test_load_and_read_labels(files, tmp_path):
    run = io.load(files.path / "mlp.keras", files.path / "x.npy")
    assert run.samples == len(files.data["x"]) and run.single("this test") == (3,)
    np.testing.assert_array_equal(run.first(2), files.data["x"][:2].astype("float32"))
    np.savez(tmp_path / "xy.npz", x=files.data["x"], y=np.arange(len(files.data["x"])))
    np.testing.assert_array_equal(io.read_labels("y", tmp_path / "xy.npz"), np.arange(10))
    np.savetxt(tmp_path / "y.csv", np.arange(3), delimiter=",")
    np.testing.assert_array_equal(io.read_labels(tmp_path / "y.csv"), np.arange(3.0))
    with pytest.raises(jacket.JacketValueError, match="has no array 'z'"):
        io.read_labels("z", tmp_path / "xy.npz")
    with pytest.raises(jacket.JacketValueError, match="labels not found: 'z'"):
        io.read_labels("z")


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "figure.png"
    with pytest.raises(RuntimeError):
        with io.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    _no_temporaries(tmp_path)
    with io.atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    with pytest.raises(jacket.JacketValueError, match="--force"):
        with io.atomic_output(target) as tmp:
            tmp.write_bytes(b"again")
    assert target.read_bytes() == b"whole"
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".zarr"])
def test_result_writer_streams_and_is_atomic(tmp_path, rng, suffix):
    if suffix == ".zarr":
        pytest.importorskip("zarr")
    J = rng.normal(size=(7, 3, 2)).astype("float32")
    path = tmp_path / f"J{suffix}"
    with pytest.raises(KeyboardInterrupt):
        with io.ResultWriter(path, 7) as writer:
            writer.write(0, {"J": J[:4]})
            raise KeyboardInterrupt
    assert not path.exists()
    _no_temporaries(tmp_path)
    writer = io.ResultWriter(path, 7)
    writer.write(0, {"J": J[:4]})
    with pytest.raises(jacket.JacketValueError, match="4 of 7 rows"):
        writer.commit()
    writer.discard()
    assert not path.exists()
    with io.ResultWriter(path, 7) as writer:
        writer.write(4, {"J": J[4:]})
        writer.write(0, {"J": J[:4]})
    assert writer.layout == {"J": ((7, 3, 2), "float32")}
    np.testing.assert_array_equal(np.asarray(io.read_result(path)[0][:]), J)
    with pytest.raises(jacket.JacketValueError, match="exists"):
        io.write_result(path, J)
    _no_temporaries(tmp_path)


def test_read_inputs_structures(files, tmp_path, rng):
    multi = files.model["multi"]
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    np.savez(tmp_path / "positional.npz", a, b)  # arr_0, arr_1: in input order
    x = io.read_inputs(tmp_path / "positional.npz", multi)
    assert isinstance(x, list) and x[0].shape == (5, 4) and x[1].shape == (5, 2)
    batches = list(io.iter_batches(x, 2, model=multi))
    assert [(s, e) for s, e, _ in batches] == [(0, 2), (2, 4), (4, 5)]
    assert batches[0][2][0].dtype == np.float32  # cast to the model's dtype
    np.testing.assert_allclose(batches[2][2][1], b[4:], rtol=1e-6)

    inp = {"u": keras.Input((3,), name="u"), "v": keras.Input((2,), name="v")}
    dict_model = keras.Model(
        inp, keras.layers.Dense(1)(keras.layers.Concatenate()(list(inp.values())))
    )
    np.savez(tmp_path / "named.npz", v=rng.normal(size=(4, 2)), u=rng.normal(size=(4, 3)))
    x = io.read_inputs(tmp_path / "named.npz", dict_model)
    assert sorted(x) == ["u", "v"] and x["u"].shape == (4, 3)
    (_, _, batch), *_ = io.iter_batches(x, 4, model=dict_model)
    blocks = io.jacobian_blocks(jacket.jacobian(dict_model, batch), batch, dict_model)
    (output,) = dict_model.output_names
    assert list(blocks) == [f"{output}/u", f"{output}/v"]
    kernel = np.asarray(keras.ops.convert_to_numpy(dict_model.layers[-1].kernel))  # (5, 1)
    _close(blocks[f"{output}/u"], np.broadcast_to(kernel[:3].T, (4, 1, 3)))
    _close(blocks[f"{output}/v"], np.broadcast_to(kernel[3:].T, (4, 1, 2)))
    np.savez(tmp_path / "uneven.npz", u=np.ones((4, 3)), v=np.ones((3, 2)))
    with pytest.raises(jacket.JacketValueError, match="same number of samples"):
        io.num_samples(io.read_inputs(tmp_path / "uneven.npz", dict_model))

    stack = io.read_inputs(files.path / "digits", files.model["cnn"])
    assert isinstance(stack, io.ImageStack) and stack.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(stack[1:2][0, ..., 0], files.data["pixels"][1] / 255.0, rtol=1e-6)


# ------------------------------------------------------------------------- the command, for real


def _run(*args, script=False, env=None, timeout=300):
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "jacket"]
    return subprocess.run(
        command + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.cli
def test_python_m_jacket_writes_what_the_library_computes(files, tmp_path):
    out = tmp_path / "J.npz"
    proc = _run(
        "--backend", BACKEND, "jacobian", files.path / "multi.keras", files.path / "multi.npz",
        "-o", out, "--batch-size", 3, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no framework start-up chatter, no warnings
    (line,) = proc.stdout.splitlines()  # one JSON object, nothing else on stdout
    summary = json.loads(line)
    assert summary["backend"] == BACKEND and summary["batches"] == 3
    a, b = files.data["a"].astype("float32"), files.data["b"].astype("float32")
    expected = _jac(files.model["multi"], [a, b])
    with np.load(out) as saved:
        for i, output in enumerate(("score", "aux")):
            for j, name in enumerate(("a", "b")):
                assert summary["blocks"][f"{output}/{name}"]["shape"] == list(expected[i][j].shape)
                _close(saved[f"{output}/{name}"], expected[i][j])


@pytest.mark.cli
def test_installed_script_fails_with_one_red_line(files, tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"no installed `jacket` script beside {sys.executable}")
    out = tmp_path / "J.npy"
    missing = _run(
        "jacobian", tmp_path / "none.keras", files.path / "x.npy", "-o", out, script=True
    )
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("error: model file not found")
    proc = _run(
        "jacobian", files.path / "lambda.keras", files.path / "x.npy", "-o", out, "--backend",
        BACKEND, script=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    # exactly one line: the frameworks' native start-up logs are kept off the terminal
    assert proc.stderr.count("\n") == 1 and "--unsafe" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not out.exists()


def _start_long_run(files, tmp_path, samples=3000):
    x = np.random.default_rng(0).normal(size=(samples, 4)).astype("float32")
    np.save(tmp_path / "many.npy", x)
    out = tmp_path / "J.npy"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jacket", "--backend", BACKEND, "jacobian"]
        + [str(files.path / "mlp.keras"), str(tmp_path / "many.npy"), "-o", str(out)]
        + ["--batch-size", "1", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".J.npy.*.part")):  # the first batch is being written
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped"
    return proc, out


@pytest.mark.cli
@pytest.mark.jax
def test_a_killed_run_leaves_no_file_under_the_final_name(files, tmp_path):
    proc, out = _start_long_run(files, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert list(tmp_path.glob(".J.npy.*.part"))  # it was killed mid-write: the temporary stays


@pytest.mark.cli
@pytest.mark.slow
def test_a_terminated_run_cleans_up(files, tmp_path):
    proc, out = _start_long_run(files, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not out.exists() and not list(tmp_path.glob(".J.npy.*"))


@pytest.mark.cli
@pytest.mark.jax
def test_progress_bar_on_a_real_terminal(files, tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 4)).astype("float32")
    np.save(tmp_path / "x40.npy", x)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jacket", "--backend", BACKEND, "jacobian"]
        + [str(files.path / "mlp.keras"), str(tmp_path / "x40.npy"), "-o", str(tmp_path / "J.npy")]
        + ["--batch-size", "4"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(follower)
    seen = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(leader)
    terminal = seen.decode(errors="replace")
    assert proc.returncode == 0, terminal[-3000:]
    assert "Jacobians" in terminal and "40/40" in terminal, terminal[-3000:]
    assert b"wrote" in stdout
    _close(np.load(tmp_path / "J.npy"), _jac(files.model["mlp"], x))
