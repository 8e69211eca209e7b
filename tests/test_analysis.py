"""jacket.analysis against NumPy on the framework's own dense Jacobian."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers
from oracles import central_differences

import jacket
from jacket import analysis, plot


def mlp(n_in=6, hidden=7, n_out=4, dtype="float64"):
    return keras.Sequential(
        [
            layers.Input((n_in,), dtype=dtype),
            layers.Dense(hidden, activation="tanh", dtype=dtype),
            layers.Dense(n_out, dtype=dtype),
        ]
    )


def image_model(dtype="float64"):
    """(4, 4, 2) images to 3 outputs."""
    return keras.Sequential(
        [
            layers.Input((4, 4, 2), dtype=dtype),
            layers.Conv2D(3, 3, activation="tanh", dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(3, dtype=dtype),
        ]
    )


def analytic(model, x):
    """NumPy forward pass and per-sample Jacobian `(batch, out, in)` of a stack of Dense layers (tanh
    or linear) and an optional final Softmax, from the weights: no autodiff involved."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    J = np.broadcast_to(np.eye(h.shape[1]), (len(h), h.shape[1], h.shape[1])).copy()
    for layer in model.layers:
        if isinstance(layer, layers.Dense):
            W, b = (np.asarray(w, np.float64) for w in layer.get_weights())
            h, J = h @ W + b, np.einsum("ji,bjk->bik", W, J)
            if layer.activation is keras.activations.tanh:
                h = np.tanh(h)
                J = (1 - h**2)[:, :, None] * J
        else:  # Softmax
            e = np.exp(h - h.max(axis=1, keepdims=True))
            h = e / e.sum(axis=1, keepdims=True)
            J = h[:, :, None] * J - h[:, :, None] * np.einsum("bi,bik->bk", h, J)[:, None, :]
    return h, J


def dense_J(model, x) -> np.ndarray:
    """`(batch, out_size, in_size)` of an `mlp`, from its weights."""
    return analytic(model, x)[1]


@pytest.fixture(scope="module")
def images():
    # seeded here: a module fixture is made before the first test's seeding (conftest), so its
    # weights would otherwise depend on whatever ran before it
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    model = image_model()
    x = rng.normal(size=(11, 4, 4, 2))
    # float64 central differences: relative error about 1e-9
    return model, x, central_differences(model, x).reshape(11, 3, 32)


# ------------------------------------------------------------------------------------ sensitivity


@pytest.mark.parametrize("reduce", ["mean_abs", "rms", "max_abs"])
def test_sensitivity_reductions_match_numpy(images, reduce):
    model, x, J = images
    s = analysis.sensitivity(model, x, reduce=reduce, batch_size=4)  # 4 + 4 + 3 (padded)
    A = np.abs(J)
    expected = {
        "mean_abs": A.mean(axis=(0, 1)),
        "rms": np.sqrt((A**2).mean(axis=(0, 1))),
        "max_abs": A.max(axis=(0, 1)),
    }[reduce]
    assert s.values.shape == (4, 4, 2) and s.samples == 11 and s.reduce == reduce
    np.testing.assert_allclose(s.values.reshape(-1), expected, rtol=1e-7)
    flat = s.values.reshape(-1)
    np.testing.assert_array_equal(s.ranking, np.argsort(-flat, kind="stable"))
    assert np.all(np.diff(flat[s.ranking]) <= 0)
    (index, value), *_ = s.top(3)
    assert np.ravel_multi_index(index, (4, 4, 2)) == s.ranking[0] and value == flat.max()


def test_sensitivity_of_one_output_streamed(images):
    model, x, J = images
    stream = [(x[:5], np.zeros(5)), (x[5:6], np.zeros(1)), (x[6:], np.zeros(5))]
    seen = []
    s = analysis.sensitivity(
        model,
        iter(stream),
        reduce="rms",
        output=2,
        batch_size=3,
        progress=lambda d, t: seen.append((d, t)),
    )
    expected = np.sqrt((J[:, 2, :] ** 2).mean(axis=0))
    np.testing.assert_allclose(s.values.reshape(-1), expected, rtol=1e-7)
    assert s.output == 2 and s.samples == 11
    assert seen == [(3, None), (6, None), (9, None), (11, None)]


def test_sensitivity_errors(images):
    model, x, _ = images
    with pytest.raises(jacket.JacketValueError, match="`reduce` must be one of 'mean_abs'"):
        analysis.sensitivity(model, x, reduce="mean")
    with pytest.raises(jacket.JacketValueError, match="`output` must index the model's 3 outputs"):
        analysis.sensitivity(model, x, output=3)
    with pytest.raises(jacket.JacketTypeError, match="`output` must be a flat output index"):
        analysis.sensitivity(model, x, output=1.5)
    with pytest.raises(jacket.JacketValueError, match="`data` has no samples"):
        analysis.sensitivity(model, iter([]))
    with pytest.raises(jacket.JacketTypeError, match="`data` must be an array"):
        analysis.sensitivity(model, 3.0)
    with pytest.raises(jacket.JacketValueError, match="`batch_size` must be a positive integer"):
        analysis.sensitivity(model, x, batch_size=0)


# ---------------------------------------------------------------------------------------- saliency


def test_saliency_is_the_target_row(images):
    model, x, J = images
    s = analysis.saliency(model, x[:4])
    logits = keras.ops.convert_to_numpy(model(x[:4], training=False))
    np.testing.assert_array_equal(s.target, logits.argmax(axis=1))
    expected = J[np.arange(4), s.target].reshape(4, 4, 4, 2)
    np.testing.assert_allclose(s.gradient, expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(s.map, np.abs(s.gradient).max(axis=-1))
    chosen = analysis.saliency(model, x[:4], target=[0, 1, 2, 0])
    np.testing.assert_allclose(
        chosen.gradient.reshape(4, -1), J[np.arange(4), [0, 1, 2, 0]], rtol=1e-7, atol=1e-9
    )
    with pytest.raises(jacket.JacketValueError, match="one index per sample \\(4\\)"):
        analysis.saliency(model, x[:4], target=[0, 1])


# ------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("shape", [(6, 7, 4), (3, 5, 8)], ids=["out<in", "out>in"])
def test_norms_match_numpy_linalg(shape, rng):
    model = mlp(*shape)
    x = rng.normal(size=(5, shape[0]))
    J = dense_J(model, x)
    fro = analysis.jacobian_norm(model, x, "fro")
    np.testing.assert_allclose(fro.value, np.linalg.norm(J, "fro", axis=(1, 2)), rtol=1e-12)
    assert fro.method == "exact" and not fro.error.any()
    nuc = analysis.jacobian_norm(model, x, "nuc")
    np.testing.assert_allclose(nuc.value, [np.linalg.norm(j, "nuc") for j in J], rtol=1e-12)
    spectral = np.array([np.linalg.norm(j, 2) for j in J])
    for method in ("exact", "lanczos"):
        r = analysis.jacobian_norm(model, x, 2, method=method, tol=1e-10)
        assert r.method == method
        np.testing.assert_allclose(r.value, spectral, rtol=1e-10)
        u, v = r.u.reshape(5, -1), r.v.reshape(5, -1)
        np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-8)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-8)
        # singular vectors: J v = s u and J^T u = s v
        np.testing.assert_allclose(np.einsum("bij,bj->bi", J, v), r.value[:, None] * u, atol=1e-8)
        np.testing.assert_allclose(np.einsum("bij,bi->bj", J, u), r.value[:, None] * v, atol=1e-8)
    assert r.converged.all() and r.iterations <= min(shape[0], shape[2]) + 1


def test_lanczos_stops_at_its_tolerance(rng):
    model = mlp(40, 60, 30)
    x = rng.normal(size=(4, 40))
    J = dense_J(model, x)
    top = np.array([np.linalg.norm(j, 2) for j in J])
    r = analysis.spectral_norm(model, x, method="lanczos", tol=1e-3, max_iter=30)
    assert r.converged.all() and r.iterations < 30
    # the residual bounds the distance to a singular value; once converged, the top one
    assert np.all(r.error <= 1e-3 * r.value)
    assert np.all(np.abs(r.value - top) <= r.error + 1e-12)
    tight = analysis.spectral_norm(model, x, method="lanczos", tol=1e-10, max_iter=31)
    np.testing.assert_allclose(tight.value, top, rtol=1e-10)


def test_spectral_norm_default_method_by_size(rng):
    small = analysis.spectral_norm(mlp(6, 7, 4), rng.normal(size=(2, 6)))
    assert small.method == "exact"
    big = mlp(40, 8, 36)
    r = analysis.spectral_norm(big, rng.normal(size=(2, 40)))
    assert r.method == "lanczos" and r.converged.all()


def frobenius_trials(model, x0, trials, k):
    """`trials` independent estimates for one sample: the sample repeated, each copy its own seeds."""
    x = np.repeat(x0[None], trials, axis=0)
    exact = np.linalg.norm(dense_J(model, x0[None])[0])
    est = analysis.jacobian_norm(model, x, "fro", method="estimate", n_projections=k, seed=5)
    return exact, est


@pytest.mark.parametrize("rank_one", [True, False], ids=["rank-1 (worst case)", "full rank"])
def test_frobenius_estimate_within_its_stated_error(rank_one, rng):
    model = mlp(6, 1, 5) if rank_one else mlp(6, 9, 5)
    exact, est = frobenius_trials(model, rng.normal(size=6), trials=400, k=16)
    assert est.method == "estimate" and est.iterations == 16
    stated = est.error.mean()
    spread = np.sqrt(np.mean((est.value - exact) ** 2))  # root-mean-square error over 400 seeds
    # the stated error bounds the spread; for rank one it is the spread (to first order)
    assert spread <= 1.15 * stated
    if rank_one:
        assert spread >= 0.8 * stated
    # unbiased for the square: mean within 4 standard errors of ||J||_F^2
    sq = est.value**2
    assert abs(sq.mean() - exact**2) <= 4 * sq.std() / np.sqrt(len(sq))
    assert np.mean(np.abs(est.value - exact) <= 2 * est.error) >= 0.9


def test_lipschitz_finds_the_sample(rng):
    model = mlp(5, 8, 3)
    x = rng.normal(size=(13, 5)) * rng.uniform(0.2, 3.0, size=(13, 1))
    J = dense_J(model, x)
    norms = np.array([np.linalg.norm(j, 2) for j in J])
    for method in ("exact", "lanczos"):
        L = analysis.lipschitz(model, x, batch_size=5, method=method, tol=1e-10)
        assert L.index == norms.argmax()
        np.testing.assert_allclose(L.value, norms.max(), rtol=1e-10)
        np.testing.assert_allclose(L.norms, norms, rtol=1e-10)
        np.testing.assert_array_equal(L.x, x[norms.argmax()])
        np.testing.assert_allclose(np.abs(J[L.index] @ L.v), L.value * np.abs(L.u), atol=1e-8)
    streamed = analysis.lipschitz(model, (x[i : i + 4] for i in range(0, 13, 4)), batch_size=3)
    assert streamed.index == norms.argmax()


def test_logdet_matches_slogdet(rng):
    model = mlp(5, 9, 5)
    x = rng.normal(size=(6, 5))
    sign, logabs = np.linalg.slogdet(dense_J(model, x))
    r = analysis.logdet(model, x)
    np.testing.assert_array_equal(r.sign, sign)
    np.testing.assert_allclose(r.logabsdet, logabs, rtol=1e-10)
    s, la = analysis.logdet(model, x)  # unpacks like numpy's
    np.testing.assert_array_equal(s, r.sign)
    with pytest.raises(jacket.JacketValueError, match="the Jacobian must be square"):
        analysis.logdet(mlp(5, 4, 3), x)


def test_jacobian_norms_in_one_pass_match_numpy(rng):
    model = mlp(5, 9, 5)
    x = rng.normal(size=(11, 5))
    J = dense_J(model, x)
    r = analysis.jacobian_norms(
        model, x, ("fro", 2, "nuc"), logdet=True, lipschitz=True, batch_size=4
    )
    assert r.samples == 11 and list(r.values) == ["fro", 2, "nuc"]
    np.testing.assert_allclose(r.values["fro"], np.linalg.norm(J, "fro", axis=(1, 2)), rtol=1e-10)
    np.testing.assert_allclose(r.values[2], np.linalg.norm(J, 2, axis=(1, 2)), rtol=1e-10)
    np.testing.assert_allclose(r.values["nuc"], np.linalg.norm(J, "nuc", axis=(1, 2)), rtol=1e-10)
    assert r.methods == {"fro": "exact", 2: "exact", "nuc": "exact"}
    sign, logabs = np.linalg.slogdet(J)
    np.testing.assert_array_equal(r.logdet.sign, sign)
    np.testing.assert_allclose(r.logdet.logabsdet, logabs, rtol=1e-10)
    assert r.lipschitz.index == int(r.values[2].argmax())
    np.testing.assert_allclose(r.lipschitz.norms, r.values[2], rtol=1e-10)
    streamed = analysis.jacobian_norms(model, (x[i : i + 3] for i in range(0, 11, 3)), "fro")
    np.testing.assert_allclose(streamed.values["fro"], r.values["fro"], rtol=1e-12)
    assert streamed.logdet is None and streamed.lipschitz is None
    with pytest.raises(jacket.JacketValueError, match="each of `ords` must be one of"):
        analysis.jacobian_norms(model, x, ("fro", 1))
    with pytest.raises(jacket.JacketValueError, match="the Jacobian must be square"):
        analysis.jacobian_norms(mlp(5, 4, 3), x, logdet=True)


def test_norm_errors(rng):
    model, x = mlp(), rng.normal(size=(2, 6))
    with pytest.raises(jacket.JacketValueError, match="`ord` must be one of 'fro', 2, 'nuc'"):
        analysis.jacobian_norm(model, x, 1)
    with pytest.raises(jacket.JacketValueError, match="`method` for ord='nuc' must be one of"):
        analysis.jacobian_norm(model, x, "nuc", method="estimate")
    with pytest.raises(jacket.JacketValueError, match="`tol` must be a finite positive"):
        analysis.spectral_norm(model, x, tol=0)
    with pytest.raises(jacket.JacketTypeError, match="`seed` must be an int"):
        analysis.jacobian_norm(model, x, "fro", method="estimate", seed="a")
    with pytest.raises(jacket.JacketValueError, match="several inputs are not supported"):
        analysis.jacobian_norm(model, [x, x])


# ----------------------------------------------------------------------------------------- figures


def test_figures(images):
    model, x, _ = images
    s = analysis.sensitivity(model, x)
    figure = plot.sensitivity_figure(s.values, top=5, title="t")
    assert len(figure.axes) == 3  # map, its colorbar, the bars
    titled = {ax.get_title(): ax for ax in figure.axes}
    heat, bars = titled["sensitivity per input feature"], titled["top 5 features"]
    # the map: the values over the image, channels averaged; the bars: the five largest, in order
    np.testing.assert_allclose(heat.images[0].get_array(), s.values.mean(axis=2), rtol=1e-12)
    widths = [patch.get_width() for patch in bars.patches]
    np.testing.assert_allclose(widths, np.sort(s.values.ravel())[::-1][:5], rtol=1e-12)
    top = np.unravel_index(int(np.argmax(s.values)), s.values.shape)
    assert bars.get_yticklabels()[0].get_text() == str(tuple(int(i) for i in top))
    sal = analysis.saliency(model, x[:5])
    grid = plot.saliency_grid_figure(x[:5], sal.map, labels=list("abcde"), columns=3)
    assert len(grid.axes) == 12 and sum(ax.axison for ax in grid.axes) == 10
    for k in range(5):  # (input, saliency) pairs, three to a row
        r, c = divmod(k, 3)
        left, right = grid.axes[6 * r + 2 * c], grid.axes[6 * r + 2 * c + 1]
        np.testing.assert_allclose(left.images[0].get_array(), x[k].mean(axis=2), rtol=1e-12)
        shown = np.abs(np.asarray(sal.map[k], np.float64))
        shown = shown.mean(axis=2) if shown.ndim == 3 else shown
        np.testing.assert_allclose(right.images[0].get_array(), shown, rtol=1e-12)
        assert left.get_title() == "abcde"[k]
    flat = plot.sensitivity_figure(np.arange(10.0), top=0)
    assert len(flat.axes) == 2


def test_importing_the_subpackages_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, jacket, jacket.analysis, jacket.attacks; "
        "jacket.analysis.__all__; jacket.attacks.__all__; "
        "print(any(m in sys.modules for m in ('keras', 'tensorflow', 'jax', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert jacket.analysis.jacobian_norm is analysis.jacobian_norm
