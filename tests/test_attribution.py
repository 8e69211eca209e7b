"""Attribution maps (`jacket.analysis`): integrated gradients against its completeness and exact
values, SmoothGrad, Grad-CAM and token scores against NumPy built from the engine's own gradients,
Captum on the PyTorch backend, the figures, and `jacket attribute`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest
from cli_helpers import PNG, invoke, ok, one_red_line
from keras import layers
from oracles import to_numpy

import jacket
from jacket import analysis, plot
from jacket.demo import digits_data, load_digits_model

BACKEND = keras.backend.backend()
F64 = "float64"


@pytest.fixture(scope="module")
def digits():
    _, _, x_test, _ = digits_data()
    return load_digits_model(), x_test[:16]


def tanh_mlp():
    return keras.Sequential(
        [
            keras.Input((4,), dtype=F64),
            layers.Dense(5, activation="tanh", dtype=F64),
            layers.Dense(3, dtype=F64),
        ]
    )


def mlp_gradient(model, x, target):
    """d y[target] / d x of a `tanh_mlp` from its weights (no autodiff)."""
    (W1, b1), (W2, _) = (layer.get_weights() for layer in model.layers)
    h = np.tanh(x @ W1 + b1)
    return ((1 - h**2) * W2[:, target].T) @ W1.T


def token_classifier(mask_zero=True):
    ids = keras.Input((6,), dtype="int32")
    e = layers.Embedding(12, 3, mask_zero=mask_zero, name="embedding", dtype=F64)(ids)
    h = layers.LSTM(4, name="lstm", dtype=F64)(e)
    return keras.Model(ids, layers.Dense(2, name="logits", dtype=F64)(h))


# ---------------------------------------------------------------------------- integrated gradients


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_completeness_on_the_digits_model(digits, method):
    model, x = digits
    ig = analysis.integrated_gradients(model, x, steps=50, method=method)
    assert ig.attributions.shape == x.shape
    assert float(ig.relative_error.max()) < 0.01  # the anchor: within 1% at 50 steps
    assert ig.map.shape == (16, 8, 8)
    logits = to_numpy(model(x))
    np.testing.assert_array_equal(ig.target, logits.argmax(axis=1))
    np.testing.assert_allclose(ig.outputs, logits.max(axis=1), rtol=1e-5)


def test_integrated_gradients_of_a_linear_model_is_exact(rng):
    model = keras.Sequential([keras.Input((4,), dtype=F64), layers.Dense(3, dtype=F64)])
    x, base = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    ig = analysis.integrated_gradients(model, x, baseline=base, steps=3, target=[0, 1, 2])
    W = model.layers[0].get_weights()[0]
    np.testing.assert_allclose(ig.attributions, (x - base) * W[:, [0, 1, 2]].T, rtol=1e-12)
    np.testing.assert_allclose(ig.delta, 0.0, atol=1e-12)


def test_integrated_gradients_equal_the_quadrature_in_numpy(rng):
    model = tanh_mlp()
    x = rng.standard_normal((2, 4))
    alphas, weights = analysis._attribution.quadrature("gausslegendre", 7)
    expected = x * sum(w * mlp_gradient(model, a * x, 1) for a, w in zip(alphas, weights))
    ig = analysis.integrated_gradients(model, x, steps=7, target=1, method="gausslegendre")
    np.testing.assert_allclose(ig.attributions, expected, rtol=1e-10)
    chunked = analysis.integrated_gradients(
        model, x, steps=7, target=1, method="gausslegendre", memory_budget=2000
    )
    np.testing.assert_allclose(chunked.attributions, expected, rtol=1e-10)


def test_integrated_gradients_at_a_layer_and_its_errors(digits):
    model, x = digits
    ig = analysis.integrated_gradients(model, x[:4], steps=20, wrt=model.layers[0])
    assert ig.attributions.shape == (4, 8, 8, 16)
    assert float(ig.relative_error.max()) < 0.05
    with pytest.raises(jacket.JacketValueError, match="`method` must be one of"):
        analysis.integrated_gradients(model, x, method="simpson")
    with pytest.raises(jacket.JacketValueError, match="at least 2 steps"):
        analysis.integrated_gradients(model, x, steps=1)
    with pytest.raises(jacket.JacketValueError, match="`baseline` must be shaped like `x`"):
        analysis.integrated_gradients(model, x, baseline=x[:2])
    with pytest.raises(jacket.JacketValueError, match=r"`target` must index the model's 10"):
        analysis.integrated_gradients(model, x, target=10)


# ------------------------------------------------------------------------ smoothgrad and saliency


def test_smoothgrad_without_noise_is_the_gradient_and_is_seeded(rng):
    model = tanh_mlp()
    x = rng.standard_normal((3, 4))
    sg = analysis.smoothgrad(model, x, n=4, sigma=0.0, target=2)
    np.testing.assert_allclose(sg.gradient, mlp_gradient(model, x, 2), rtol=1e-10)
    noisy = analysis.smoothgrad(model, x, n=5, sigma=0.2, target=2, seed=3)
    again = analysis.smoothgrad(model, x, n=5, sigma=0.2, target=2, seed=3)
    np.testing.assert_array_equal(noisy.gradient, again.gradient)
    # the mean of the gradients at the same noisy points, drawn as the function draws them
    rng3 = np.random.default_rng(3)
    scale = 0.2 * (x.max(axis=1) - x.min(axis=1))
    points = np.tile(x, (5, 1)) + rng3.standard_normal((15, 4)) * np.tile(scale, 5)[:, None]
    expected = mlp_gradient(model, points, 2).reshape(5, 3, 4).mean(axis=0)
    np.testing.assert_allclose(noisy.gradient, expected, rtol=1e-10)


# --------------------------------------------------------------------------------------- grad-cam


def small_cnn(data_format="channels_last"):
    shape = (8, 8, 1) if data_format == "channels_last" else (1, 8, 8)
    return keras.Sequential(
        [
            keras.Input(shape),
            layers.Conv2D(4, 3, padding="same", activation="relu", data_format=data_format),
            layers.AveragePooling2D(2, data_format=data_format),
            layers.Conv2D(
                6, 3, padding="same", activation="relu", data_format=data_format, name="last_conv"
            ),  # fmt: skip
            layers.Flatten(),
            layers.Dense(5),
        ]
    )


def test_gradcam_is_the_weighted_feature_maps(rng):
    model = small_cnn()
    x = rng.random((3, 8, 8, 1)).astype("float32")
    cam = analysis.gradcam(model, x, target=[0, 1, 2], upsample=False)
    assert cam.layer == "last_conv" and cam.cam.shape == (3, 4, 4)
    point = jacket.engine.at(model, x, wrt="last_conv")
    A = to_numpy(point.wrt)
    u = np.zeros((3, 5), "float32")
    u[[0, 1, 2], [0, 1, 2]] = 1
    G = to_numpy(jacket.vjp(model, x, u, wrt="last_conv"))
    expected = np.maximum(np.einsum("bhwk,bk->bhw", A, G.mean(axis=(1, 2))), 0)
    np.testing.assert_allclose(cam.cam, expected, rtol=1e-5, atol=1e-7)
    up = analysis.gradcam(model, x, target=[0, 1, 2])
    assert up.map.shape == (3, 8, 8)
    np.testing.assert_allclose(up.map.mean(axis=(1, 2)), expected.mean(axis=(1, 2)), rtol=1e-4)


def test_gradcam_errors(rng):
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    with pytest.raises(jacket.JacketValueError, match="no convolutional layer"):
        analysis.gradcam(model, np.ones((1, 4), "float32"))
    with pytest.raises(jacket.JacketValueError, match="must have spatial axes"):
        analysis.gradcam(model, np.ones((1, 4), "float32"), layer=model.layers[0])


# ----------------------------------------------------------------------------------------- tokens


def test_token_scores_sum_as_integrated_gradients_promise(rng):
    model = token_classifier()
    ids = rng.integers(1, 12, (3, 6)).astype("int32")
    ids[1, 4:] = 0
    t = analysis.token_attribution(model, ids, steps=50)
    assert t.scores.shape == (3, 6) and t.layer == "embedding"
    change = t.scores.sum(axis=1) - t.delta
    assert np.all(np.abs(t.delta) <= 0.01 * np.abs(change) + 1e-9)
    assert np.all(t.scores[1, 4:] == 0)  # masked tokens do not count
    gxi = analysis.token_attribution(model, ids, method="gradient_x_input", target=t.target)
    E = to_numpy(jacket.engine.at(model, ids, wrt="embedding").wrt)
    u = np.eye(2)[t.target]
    G = to_numpy(jacket.vjp(model, ids, u, wrt="embedding"))
    np.testing.assert_allclose(gxi.scores, (G * E).sum(axis=-1), rtol=1e-10)


def test_token_attribution_needs_an_embedding():
    with pytest.raises(jacket.JacketValueError, match="no Embedding layer"):
        analysis.token_attribution(tanh_mlp(), np.ones((1, 4)))


# ------------------------------------------------------------------------------------- captum


@pytest.mark.torch
@pytest.mark.skipif(
    importlib.util.find_spec("captum") is None,
    reason="Captum is not installed (pip install captum, or the `test` extra)",
)
def test_equal_to_captum(rng):
    import torch
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

    model = small_cnn("channels_first")  # Captum's LayerGradCam averages over axis 1
    x = rng.random((4, 1, 8, 8)).astype("float32")
    target = np.array([0, 1, 2, 3])
    xt, tt = torch.tensor(x), torch.tensor(target)

    def rel(ours, theirs):
        theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
        return np.abs(ours - theirs).max() / np.abs(theirs).max()

    assert rel(np.abs(analysis.saliency(model, x, target).gradient), Saliency(model).attribute(
        xt.clone().requires_grad_(True), target=tt)) <= 1e-5  # fmt: skip
    captum_ig = IntegratedGradients(model)
    for method in ("gausslegendre", "riemann_trapezoid"):
        theirs = captum_ig.attribute(
            xt, baselines=torch.zeros_like(xt), target=tt, n_steps=50, method=method
        )
        ours = analysis.integrated_gradients(model, x, steps=50, target=target, method=method)
        # Captum's trapezoid weighs the points by 1/n (halved at the ends), which sums to
        # (n - 1)/n: its attributions are ours times (n - 1)/n (see integrated_gradients)
        factor = 49 / 50 if method == "riemann_trapezoid" else 1.0
        assert rel(ours.attributions * factor, theirs) <= 1e-5
    layer = model.get_layer("last_conv")
    theirs = LayerGradCam(model, layer).attribute(xt, target=tt, relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, (8, 8), interpolate_mode="bilinear")[:, 0]
    assert rel(analysis.gradcam(model, x, target=target).map, theirs) <= 1e-5


# ------------------------------------------------------------------------------------- figures


def test_attribution_and_token_figures(digits):
    model, x = digits
    cam = analysis.gradcam(model, x[:4])
    figure = plot.attribution_figure(x[:4], cam.map, labels=cam.target)
    assert len(figure.axes) == 4
    ig = analysis.integrated_gradients(model, x[:2], steps=8)
    plot.attribution_figure(x[:2], ig.attributions.sum(axis=-1))  # signed: a diverging scale
    tokens = [["the", "film", "was", "great"], ["not", "good", "", ""]]
    scores = np.array([[0.1, -0.2, 0.0, 0.9], [-0.5, 0.4, 0.0, 0.0]])
    figure = plot.token_figure(tokens, scores, labels=["pos", "neg"])
    assert len(figure.texts) == 4 + 2 + 2  # the tokens, padding left out, and the labels
    with pytest.raises(jacket.JacketValueError, match="one entry per sample"):
        plot.attribution_figure(x[:2], cam.map)


def test_the_documentation_figure_is_drawn_by_its_script(tmp_path):
    """docs/figures.py draws docs/attribution-maps.png (one map per method on the digits)."""
    path = Path(__file__).resolve().parents[1] / "docs" / "figures.py"
    spec = importlib.util.spec_from_file_location("docs_figures", path)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    out = figures.attribution_maps(tmp_path / "maps.png", samples=2)
    assert out.read_bytes().startswith(PNG)


# ------------------------------------------------------------------------------------ the command


@pytest.mark.cli
def test_jacket_attribute(tmp_path, digits):
    model, x = digits
    model_path, inputs = tmp_path / "digits.keras", tmp_path / "x.npy"
    model.save(model_path)
    np.save(inputs, x[:10])
    out, png = tmp_path / "maps.npz", tmp_path / "maps.png"
    ok("attribute", model_path, inputs, "--method", "ig", "--steps", "20", "-o", out,
       "--plot", png, "--batch-size", "4", "--quiet")  # fmt: skip
    with np.load(out) as saved:
        assert saved["values"].shape == (10, 8, 8, 1) and saved["target"].shape == (10,)
        expected = analysis.integrated_gradients(model, x[:4], steps=20)
        np.testing.assert_allclose(saved["values"][:4], expected.attributions, rtol=1e-4, atol=1e-6)
    assert png.read_bytes().startswith(PNG)
    result = ok("attribute", model_path, inputs, "--method", "gradcam", "-o", tmp_path / "c.npy",
                "--json")  # fmt: skip
    assert '"values_shape": [10, 8, 8]' in result.stdout
    result = invoke("attribute", model_path, inputs, "--method", "gradcam", "--layer", "nope",
                    "-o", tmp_path / "bad.npy")  # fmt: skip
    one_red_line(result, "jacket attribute:", "names no layer of the model")
    result = invoke("attribute", model_path, inputs, "-o", tmp_path / "bad.txt")
    one_red_line(result, ".txt")


def test_attribution_dataset_on_dask_equals_the_direct_call(tmp_path, digits):
    """`jacket.distributed.attribution_dataset` (what `jacket attribute --workers` runs), on the
    synchronous scheduler: chunk by chunk, the same maps as one direct call."""
    from jacket import distributed

    model, x = digits
    model_path, inputs = tmp_path / "digits.keras", np.asarray(x[:6])
    model.save(model_path)
    got = distributed.attribution_dataset(
        model_path, inputs, method="ig", steps=8, batch_size=4, scheduler="synchronous"
    )
    expected = analysis.attribute(model, x[:6], method="ig", steps=8)
    assert got.values.shape == (6, 8, 8, 1) and got.method == "ig"
    np.testing.assert_array_equal(got.target, expected.target)
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.relative_error, expected.relative_error, rtol=1e-3, atol=1e-6)
    cam = distributed.attribution_dataset(
        model_path, inputs, method="gradcam", batch_size=4, scheduler="synchronous"
    )
    assert cam.values.shape == (6, 8, 8) and cam.delta is None
    with pytest.raises(jacket.JacketValueError, match="`method` must be one of"):
        distributed.attribution_dataset(model_path, inputs, method="lime", scheduler="synchronous")


@pytest.mark.cli
def test_jacket_jacobian_wrt_of(tmp_path, digits):
    model, x = digits
    model_path, inputs = tmp_path / "digits.keras", tmp_path / "x.npy"
    model.save(model_path)
    np.save(inputs, x[:3])
    loaded = keras.saving.load_model(model_path)
    conv = loaded.layers[2].name
    ok("jacobian", model_path, inputs, "--wrt", conv, "-o", tmp_path / "J.npy", "--quiet")
    J = np.load(tmp_path / "J.npy")
    np.testing.assert_allclose(
        J, to_numpy(jacket.jacobian(loaded, x[:3], wrt=conv)), rtol=1e-5, atol=1e-7
    )
    result = invoke("jacobian", model_path, inputs, "--wrt", conv, "--sparse", "-o",
                    tmp_path / "S.npz")  # fmt: skip
    assert result.exit_code == 2 and "--wrt and --of" in result.stderr
