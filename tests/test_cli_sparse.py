"""`jacket jacobian --sparse`, `jacket sparsity` and their files (`jacket.io`'s sparse functions).

The commands run in this process (`CliRunner`, as in test_cli.py); one `cli`-marked case starts
`python -m jacket`. Every sparse file read back is compared with the dense `jacket.jacobian` on
the same weights and with float64 central differences, and every pattern file with
`jacket.sparsity` read back by SciPy's own reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import scipy.sparse as sp
from cli_helpers import PNG
from cli_helpers import close as _close
from cli_helpers import invoke as _invoke
from cli_helpers import ok as _ok
from cli_helpers import one_red_line as _one_red_line
from keras import layers
from oracles import central_differences

import jacket
from jacket import io, sparse

BACKEND = keras.backend.backend()


# ------------------------------------------------------------------------------------------ files


def _conv():
    """Two 3x3 convolutions on 8x8x1: each output pixel sees a 5x5 field (28% of the pairs)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(2, 3, padding="same", activation="tanh"),
            layers.Conv2D(1, 3, padding="same"),
        ]
    )


def _multi():
    image = keras.Input((5, 5, 1), name="image")
    mask = keras.Input((5, 5, 1), name="mask")
    joined = layers.Concatenate()([image, mask])
    out = layers.Conv2D(1, 3, padding="same", activation="tanh", name="out")(joined)
    side = layers.Conv2D(1, 1, name="side")(mask)
    return keras.Model([image, mask], [out, side])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("cli_sparse")

    class Files:
        path = root
        model = {}
        data = {}

    models = {
        "conv": _conv(),
        "multi": _multi(),
        "dense": keras.Sequential(
            [keras.Input((6,)), layers.Dense(4, activation="tanh"), layers.Dense(3)]
        ),
        "fcn": keras.Sequential([keras.Input((None, None, 1)), layers.Conv2D(1, 3)]),
    }
    for name, model in models.items():
        model.save(root / f"{name}.keras")
        Files.model[name] = model
    Files.data["x"] = rng.normal(size=(7, 8, 8, 1)).astype("float32")
    np.save(root / "x.npy", Files.data["x"])
    Files.data["xd"] = rng.normal(size=(4, 6)).astype("float32")
    np.save(root / "xd.npy", Files.data["xd"])
    Files.data["image"] = rng.normal(size=(3, 5, 5, 1)).astype("float32")
    Files.data["mask"] = rng.normal(size=(3, 5, 5, 1)).astype("float32")
    np.savez(root / "multi.npz", image=Files.data["image"], mask=Files.data["mask"])
    return Files


# ---------------------------------------------------------------------------------------- helpers


def _dense(model, x) -> np.ndarray:
    """The in-process dense `jacket.jacobian`, `(batch, out_size, in_size)` float64."""
    J = jacket.jacobian(model, x, flatten=True)
    blocks = [np.asarray(keras.ops.convert_to_numpy(b), np.float64) for b in keras.tree.flatten(J)]
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate([np.concatenate(blocks[2 * o : 2 * o + 2], axis=2) for o in (0, 1)], 1)


def _files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------ jacobian --sparse


def test_sparse_file_is_the_jacobian(files, tmp_path):
    out = tmp_path / "J.npz"
    result = _ok(
        "jacobian", files.path / "conv.keras", files.path / "x.npy", "-o", out, "--sparse",
        "--batch-size", 3, "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    model, x = files.model["conv"], files.data["x"]
    P = jacket.sparsity(model, (8, 8, 1))
    assert summary["batches"] == 3 and summary["samples"] == 7  # the last batch padded
    assert summary["shape"] == [7, 64, 64] and summary["nnz"] == P.nnz
    assert summary["fallback"] is None and summary["notices"] == []
    assert summary["bytes"] < summary["dense_bytes"]
    assert _files_in(tmp_path) == {"J.npz"}  # no temporaries

    # the documented layout, read with NumPy alone
    with np.load(out, allow_pickle=False) as f:
        assert str(f["format"]) == "jacket.sparse_jacobian" and int(f["version"]) == 1
        assert f["shape"].tolist() == [7, 64, 64]
        assert f["values"].shape == (7, P.nnz) and f["values"].dtype == np.float32
        np.testing.assert_array_equal(f["indptr"], P.indptr)
        np.testing.assert_array_equal(f["indices"], P.indices)
        meta = json.loads(str(f["meta"]))
        sample3 = sp.csr_array((f["values"][3], f["indices"], f["indptr"]), shape=(64, 64))
    assert meta["in_shapes"] == [[8, 8, 1]] and meta["out_shapes"] == [[8, 8, 1]]
    assert meta["backend"] == BACKEND and meta["mode"] == summary["mode"]

    S = io.load_sparse_jacobian(out)
    assert isinstance(S, jacket.SparseJacobian) and S.shape == (7, 64, 64)
    dense = _dense(model, x)
    _close(S.to_dense(flatten=True), dense)
    _close(sample3.toarray(), dense[3])
    assert S.to_dense().shape == (7, 8, 8, 1, 8, 8, 1)
    # an independent oracle: float64 central differences of the same weights
    _close(S.to_dense(), central_differences(model, x, eps=1e-3), rtol=1e-2)
    assert not (np.abs(dense) > 0)[:, ~P.toarray()].any()  # nothing lies outside the pattern

    # the in-process result saved by the library reads back the same
    again = io.save_sparse_jacobian(tmp_path / "S.npz", jacket.jacobian(model, x, sparse=True))
    np.testing.assert_array_equal(io.load_sparse_jacobian(again).values, S.values)


def test_several_inputs_and_outputs(files, tmp_path):
    out = tmp_path / "J.npz"
    result = _ok(
        "jacobian", files.path / "multi.keras", files.path / "multi.npz", "-o", out, "--sparse",
        "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["in_names"] == ["image", "mask"] and summary["out_names"] == ["out", "side"]
    S = io.load_sparse_jacobian(out)
    assert S.shape == (3, 50, 50)
    x = [files.data["image"], files.data["mask"]]
    _close(S.to_dense(), _dense(files.model["multi"], x))
    assert not S.pattern.toarray()[25:, :25].any()  # "side" reads the mask only


def test_dense_pattern_is_a_notice(files, tmp_path):
    out = tmp_path / "J.npz"
    result = _ok(
        "jacobian", files.path / "dense.keras", files.path / "xd.npy", "-o", out, "--sparse"
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("notice: "), result.stderr
    assert "computed densely" in lines[0] and "Traceback" not in result.stderr
    assert "dense fallback" in result.stdout
    S = io.load_sparse_jacobian(out)
    assert S.mode == "dense" and S.fallback and S.nnz == 18
    _close(S.to_dense(), _dense(files.model["dense"], files.data["xd"]))
    quiet = _ok(
        "jacobian", files.path / "dense.keras", files.path / "xd.npy", "-o", out, "--sparse",
        "--force", "--quiet",
    )  # fmt: skip
    assert quiet.stderr == "" and quiet.stdout == ""


# ------------------------------------------------------------------------------------ sparsity


def test_pattern_file_and_plot(files, tmp_path):
    pattern, png = tmp_path / "P.npz", tmp_path / "P.png"
    result = _ok(
        "sparsity", files.path / "conv.keras", "-o", pattern, "--plot", png, "--verify", 2,
        "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    P = jacket.sparsity(files.model["conv"], (8, 8, 1))
    assert summary["shape"] == [64, 64] and summary["nnz"] == P.nnz
    assert summary["density"] == pytest.approx(P.nnz / 64**2)
    # colors: valid colorings of the saved pattern, never under the lower bound (a row's nonzeros)
    lower = int(np.diff(P.indptr).max())
    for side, key in (("columns", "forward_colors"), ("rows", "reverse_colors")):
        colors = sparse.color(P, side)
        assert sparse.is_valid(P, colors, side) and summary[key] == colors.max() + 1 >= lower
    assert summary["chosen"] in ("forward", "reverse") and summary["fallback"] is None
    assert summary["verified_points"] == 2 and summary["nonzero_at_points"] <= P.nnz
    assert summary["detect_seconds"] >= 0 and summary["in_shapes"] == [[8, 8, 1]]
    assert png.read_bytes()[:8] == PNG
    assert _files_in(tmp_path) == {"P.npz", "P.png"}

    saved = sp.load_npz(pattern)  # SciPy's own reader
    assert saved.shape == (64, 64) and (saved != P).nnz == 0
    assert (io.load_sparsity(pattern) != P).nnz == 0
    meta = json.loads(str(np.load(pattern)["jacket"]))
    assert meta["format"] == "jacket.sparsity" and meta["in_shapes"] == [[8, 8, 1]]


def test_pattern_reuse(files, tmp_path):
    model, x = files.model["conv"], files.data["x"]
    P = jacket.sparsity(model, (8, 8, 1))
    wide_model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(1, 7, padding="same")])
    wide = jacket.sparsity(wide_model, (8, 8, 1))  # 7x7 fields: holds P, and more
    assert (P > wide).nnz == 0 and wide.nnz > P.nnz
    io.save_sparsity(tmp_path / "wide.npz", wide, attrs={"in_shapes": [[8, 8, 1]]})
    out = tmp_path / "J.npz"
    result = _ok(
        "jacobian", files.path / "conv.keras", files.path / "x.npy", "-o", out, "--sparsity",
        tmp_path / "wide.npz", "--json",
    )  # fmt: skip
    assert json.loads(result.stdout)["nnz"] == wide.nnz  # the given pattern, not the detected
    S = io.load_sparse_jacobian(out)
    assert (S.pattern != wide).nnz == 0
    _close(S.to_dense(flatten=True), _dense(model, x))

    # a sparse Jacobian file is a pattern too
    out2 = tmp_path / "J2.npz"
    _ok("jacobian", files.path / "conv.keras", files.path / "x.npy", "-o", out2, "--sparsity", out)
    _close(io.load_sparse_jacobian(out2).values, S.values, rtol=1e-6)
    assert _files_in(tmp_path) == {"wide.npz", "J.npz", "J2.npz"}


def test_input_shape_option(files, tmp_path):
    png = tmp_path / "F.png"
    result = _ok(
        "sparsity", files.path / "fcn.keras", "--input-shape", "6,7,1", "--plot", png, "--json"
    )
    summary = json.loads(result.stdout)
    P = jacket.sparsity(files.model["fcn"], (6, 7, 1))  # "valid": (4, 5, 1) outputs
    assert summary["shape"] == [20, 42] and summary["nnz"] == P.nnz == 20 * 9
    assert summary["forward_colors"] == summary["reverse_colors"] == 9
    assert png.read_bytes()[:8] == PNG and summary["pattern"] is None


def test_figure_spy_and_density():
    from jacket.plot import sparsity_figure

    P = sp.random_array((30, 40), density=0.1, format="csr", rng=0).astype(bool)
    figure = sparsity_figure(P, colors={"forward": 5, "reverse": 6})
    ax = figure.axes[0]
    (markers,) = ax.lines  # a spy plot: one marker per nonzero
    assert len(markers.get_xdata()) == P.nnz and not ax.images
    assert "forward 5, reverse 6" in figure.get_suptitle()
    assert f"{P.nnz} nonzeros" in figure.get_suptitle()

    big = sp.kron(sp.eye_array(600, format="csr"), np.ones((5, 5)), format="csr").astype(bool)
    figure = sparsity_figure(big, max_cells=256)  # 3000 x 3000: a density image, no markers
    ax = figure.axes[0]
    assert not ax.lines and len(ax.images) == 1
    cells = ax.images[0].get_array()
    assert cells.shape == (250, 250)  # 12 x 12 entries per cell
    np.testing.assert_allclose(cells.sum() * 144, big.nnz)


# ---------------------------------------------------------------------------------------- errors


def test_errors_are_one_red_line(files, tmp_path):
    conv, x = files.path / "conv.keras", files.path / "x.npy"
    for suffix in ("npy", "zarr"):
        result = _invoke("jacobian", conv, x, "-o", tmp_path / f"J.{suffix}", "--sparse")
        _one_red_line(result, "--sparse writes a .npz file", "J.npz")
    (tmp_path / "J.npz").write_bytes(b"keep")
    _one_red_line(_invoke("jacobian", conv, x, "-o", tmp_path / "J.npz", "--sparse"), "exists")
    assert (tmp_path / "J.npz").read_bytes() == b"keep"
    out = tmp_path / "K.npz"
    _one_red_line(
        _invoke("jacobian", conv, x, "-o", out, "--sparsity", tmp_path / "no.npz"), "not found"
    )
    _one_red_line(
        _invoke("jacobian", conv, x, "-o", out, "--sparsity", x), "sparse Jacobians and patterns"
    )
    np.savez(tmp_path / "arrays.npz", a=np.ones(3))
    _one_red_line(
        _invoke("jacobian", conv, x, "-o", out, "--sparsity", tmp_path / "arrays.npz"),
        "holds no sparsity pattern",
    )
    # a pattern made for other input shapes: the stored shapes, or the library's size check
    io.save_sparsity(
        tmp_path / "P9.npz", sp.eye_array(81, dtype=bool), attrs={"in_shapes": [[9, 9, 1]]}
    )
    _one_red_line(
        _invoke("jacobian", conv, x, "-o", out, "--sparsity", tmp_path / "P9.npz"),
        "made for input shape (9, 9, 1)",
    )
    sp.save_npz(tmp_path / "bare.npz", sp.eye_array(81, format="csr", dtype=bool))
    _one_red_line(
        _invoke("jacobian", conv, x, "-o", out, "--sparsity", tmp_path / "bare.npz"),
        "(out_size, in_size) = (64, 64)",
    )

    # a failure after the first batch was written: nothing under the final name, no temporaries
    bad = files.data["x"].copy()
    bad[5, 2, 2, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    result = _invoke(
        "jacobian", conv, tmp_path / "bad.npy", "-o", out, "--sparse", "--batch-size", 3
    )
    _one_red_line(result, "NaN")
    (tmp_path / "bad.npy").unlink()

    fcn = files.path / "fcn.keras"
    _one_red_line(_invoke("sparsity", fcn), "(?, ?, 1)", "--input-shape")
    _one_red_line(_invoke("sparsity", fcn, "--input-shape", "8,x"), "--input-shape", code=2)
    _one_red_line(_invoke("sparsity", conv, "--input-shape", "9,9,1"), "does not fit the model")
    _one_red_line(
        _invoke("sparsity", conv, "--input-shape", "8,8,1", "--input-shape", "2"), "takes 1 inputs"
    )
    _one_red_line(_invoke("sparsity", conv, "-o", tmp_path / "P.png"), "suffix must be one of .npz")
    _one_red_line(
        _invoke("sparsity", conv, "--plot", tmp_path / "P.npz"), "suffix must be one of .png"
    )
    assert _files_in(tmp_path) == {"J.npz", "arrays.npz", "P9.npz", "bare.npz"}


def test_verify_is_the_library_check(files):
    model = files.model["conv"]
    P = jacket.sparsity(model, (8, 8, 1))
    checked = sparse.verify(model, (8, 8, 1), P, points=3)
    assert checked["method"] == "dense Jacobian" and 0 < checked["nonzero"] <= P.nnz
    with pytest.raises(jacket.JacketValueError, match="`sparsity` must have shape"):
        sparse.verify(model, (8, 8, 1), P[:10])
    with pytest.raises(jacket.JacketValueError, match="`points` must be a positive integer"):
        sparse.verify(model, (8, 8, 1), P, points=0)


@pytest.mark.parametrize("dense_check", [True, False])
def test_verify_catches_a_wrong_pattern(files, tmp_path, dense_check, monkeypatch):
    from jacket.sparse import _deps, _detect, _sparsity

    if not dense_check:
        monkeypatch.setattr(_sparsity, "VERIFY_DENSE_ENTRIES", 0)
    # pretend a convolution reads only its own pixel: the pattern then misses the neighbours
    monkeypatch.setitem(
        _detect._SINGLE,
        "Conv2D",
        lambda layer, dep, out_shape, ctx: _deps._separable(
            dep, None, np.ones((out_shape[-1], dep.channels), bool), out_shape
        ),
    )
    result = _invoke(
        "sparsity", files.path / "conv.keras", "--verify", 2,
        "-o", tmp_path / "P.npz", "--plot", tmp_path / "P.png",
    )  # fmt: skip
    _one_red_line(result, "the pattern misses")
    assert _files_in(tmp_path) == set()


@pytest.mark.cli
@pytest.mark.slow
def test_python_m_jacket_notice(files, tmp_path):
    out = tmp_path / "J.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "jacket", "--backend", BACKEND, "jacobian"]
        + [str(files.path / "dense.keras"), str(files.path / "xd.npy"), "-o", str(out)]
        + ["--sparse", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith("notice: ") and "computed densely" in line
    assert json.loads(proc.stdout)["fallback"]
    _close(io.load_sparse_jacobian(out).to_dense(), _dense(files.model["dense"], files.data["xd"]))
