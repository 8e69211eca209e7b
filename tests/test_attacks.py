"""jacket.attacks: closed forms on small models (NumPy on the framework's own Jacobian), and the bundled
digits classifier for success rates."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
from keras import layers

import jacket
from jacket import attacks, plot
from jacket.demo import digits_data, load_digits_model


def classifier(n_in=6, n_classes=4, *, hidden=8, softmax=False, dtype="float64"):
    stack = [layers.Input((n_in,), dtype=dtype)]
    if hidden:
        stack.append(layers.Dense(hidden, activation="tanh", dtype=dtype))
    stack.append(layers.Dense(n_classes, dtype=dtype))
    if softmax:
        stack.append(layers.Softmax(dtype=dtype))
    return keras.Sequential(stack)


def forward(model, x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


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


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    model = load_digits_model()
    _, _, x, _ = digits_data()
    return model, x[:8]


# -------------------------------------------------------------------------------------------- FGSM


def test_fgsm_is_the_closed_form_sign_step(rng):
    model = classifier()
    x = rng.uniform(0, 1, size=(6, 6))
    z, J = analytic(model, x)
    y = z.argmax(axis=1)
    eps = 0.05
    r = attacks.fgsm(model, x, eps=eps, clip=(0.0, 1.0), batch_size=4)  # 4 + 2 (padded)
    grad = np.einsum("bi,bij->bj", softmax(z) - np.eye(4)[y], J)  # d CE / dx
    expected = np.clip(x + eps * np.sign(grad), 0.0, 1.0)
    np.testing.assert_allclose(r.x_adv, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(r.labels, y)
    np.testing.assert_array_equal(r.predictions, forward(model, r.x_adv).argmax(axis=1))
    np.testing.assert_array_equal(r.success, r.predictions != y)
    np.testing.assert_allclose(r.perturbation, np.abs(expected - x).max(axis=1), atol=1e-12)
    assert r.norm == "linf" and r.target is None and r.x_adv.dtype == x.dtype

    target = (y + 1) % 4
    t = attacks.fgsm(model, x, eps=eps, target=target)  # no clip: the step is exactly eps
    grad_t = np.einsum("bi,bij->bj", softmax(z) - np.eye(4)[target], J)
    np.testing.assert_allclose(t.x_adv, x - eps * np.sign(grad_t), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(t.success, forward(model, t.x_adv).argmax(axis=1) == target)
    np.testing.assert_allclose(t.perturbation, eps, rtol=1e-12)

    given = attacks.fgsm(model, x, eps=eps, y=np.zeros(6, int))
    grad_y = np.einsum("bi,bij->bj", softmax(z) - np.eye(4)[np.zeros(6, int)], J)
    np.testing.assert_allclose(given.x_adv, x + eps * np.sign(grad_y), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(given.labels, 0)


def test_fgsm_on_probabilities(rng):
    model = classifier(softmax=True)
    x = rng.uniform(0, 1, size=(5, 6))
    p, J = analytic(model, x)
    y = p.argmax(axis=1)
    r = attacks.fgsm(model, x, eps=0.1, logits=False)
    # d(-log p_y)/dx = -J[y] / p_y: the sign of -J[y]
    np.testing.assert_allclose(r.x_adv, x + 0.1 * np.sign(-J[np.arange(5), y]), atol=1e-12)


def test_fgsm_respects_clip_and_attacks_digits(digits):
    model, x = digits
    r = attacks.fgsm(model, x, eps=0.3, clip=(0.0, 1.0))
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    assert np.all(r.perturbation <= 0.3 + 1e-6)
    assert r.success_rate >= 0.5  # eps 0.3 on [0, 1] pixels fools most of them
    summary = r.summary()
    assert summary["samples"] == 8 and summary["success_rate"] == r.success.mean()
    assert summary["mean_perturbation"] == pytest.approx(r.perturbation[r.success].mean())


# -------------------------------------------------------------------------------------------- JSMA


@pytest.mark.parametrize("criterion", ["pairs", "target"])
def test_jsma_first_step_is_the_saliency_maximum(criterion, rng):
    model = classifier()
    x = rng.uniform(0.0, 0.6, size=(5, 6))
    z, J = analytic(model, x)
    target = (z.argmax(axis=1) + 1) % 4
    theta = 0.3
    # gamma = 2/6: one step of two features
    r = attacks.jsma(model, x, target=target, theta=theta, gamma=2 / 6, criterion=criterion)
    for b in range(5):
        alpha = J[b, target[b]]
        beta = J[b].sum(axis=0) - alpha
        if criterion == "target":
            pair = set(np.argsort(-alpha)[:2])  # the two largest target gradients
        else:
            # Papernot et al.'s saliency over all pairs, by brute force
            best, pair = -np.inf, None
            for p, q in itertools.combinations(range(6), 2):
                a, c = alpha[p] + alpha[q], beta[p] + beta[q]
                if a > 0 and c < 0 and -a * c > best:
                    best, pair = -a * c, {p, q}
        changed = set(np.flatnonzero(r.x_adv[b] != x[b]))
        if pair is None:  # no admissible pair: nothing moves, the attack fails
            assert not changed and not r.success[b]
            continue
        assert changed == pair
        np.testing.assert_allclose(r.x_adv[b, list(pair)], x[b, list(pair)] + theta, atol=1e-12)
    steps = [len(np.flatnonzero(r.x_adv[b] != x[b])) // 2 for b in range(5)]
    np.testing.assert_array_equal(r.iterations, steps)
    np.testing.assert_allclose(r.perturbation, (r.x_adv != x).mean(axis=1))
    np.testing.assert_array_equal(r.success, forward(model, r.x_adv).argmax(axis=1) == target)


def test_jsma_on_digits_hits_its_targets(digits):
    model, x = digits
    z = forward(model, x)
    target = np.argsort(-z, axis=1)[:, 1]  # each digit's runner-up class
    r = attacks.jsma(model, x, target=target, gamma=1.0, batch_size=8)
    assert r.success_rate >= 0.75  # the paper: 97% on MNIST
    predicted = forward(model, r.x_adv).argmax(axis=1)
    np.testing.assert_array_equal(r.success, predicted == target)
    np.testing.assert_array_equal(r.target, target)
    changed = r.x_adv != x
    assert np.all(r.x_adv[changed] == 1.0)  # theta = 1 sets features to the bound
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    np.testing.assert_allclose(r.perturbation, changed.reshape(8, -1).mean(axis=1))
    assert np.all(changed.reshape(8, -1).sum(axis=1) <= 2 * r.iterations)
    # random targets: never the sample's own class, and reproducible from the seed
    a = attacks.jsma(model, x, gamma=0.2, seed=3, criterion="target")
    b = attacks.jsma(model, x, gamma=0.2, seed=3, criterion="target")
    assert np.all(a.target != a.labels)
    np.testing.assert_array_equal(a.target, b.target)
    assert np.all(a.iterations <= int(0.2 * 64 / 2))


# ---------------------------------------------------------------------------------------- DeepFool


def test_deepfool_on_an_affine_model_is_one_exact_step(rng):
    model = classifier(hidden=0)  # z = W^T x + b: the linearization is exact
    x = rng.normal(size=(7, 6))
    z, J = analytic(model, x)
    k0 = z.argmax(axis=1)
    r = attacks.deepfool(model, x, overshoot=0.02, batch_size=4)
    # DeepFool reads the logits by the model's own call (jacket.engine.outputs), which Keras runs
    # in float32 on PyTorch although the model is float64 (NOTE: [Keras and float64]): measured
    # 2.7e-7 relative there, 2e-15 on TensorFlow and JAX. Tighten when that call keeps float64.
    rel = 1e-6 if keras.backend.backend() == "torch" else 1e-9
    for b in range(7):
        w = J[b] - J[b, k0[b]]
        f = z[b] - z[b, k0[b]]
        others = np.arange(4) != k0[b]
        d = (np.abs(f[others]) / np.linalg.norm(w[others], axis=1)).min()  # nearest boundary
        assert r.perturbation[b] == pytest.approx(1.02 * (d + 1e-4), rel=rel)
    np.testing.assert_array_equal(r.iterations, 1)
    assert r.success.all() and r.norm == "l2"
    np.testing.assert_array_equal(r.predictions, forward(model, r.x_adv).argmax(axis=1))
    np.testing.assert_allclose(r.perturbation, np.linalg.norm(r.x_adv - x, axis=1))


@pytest.mark.parametrize("candidates", [10, 3])
def test_deepfool_on_digits(digits, candidates):
    model, x = digits
    r = attacks.deepfool(model, x, clip=(0.0, 1.0), candidates=candidates)
    assert r.success.all()  # the paper: every sample, with small perturbations
    predicted = forward(model, r.x_adv).argmax(axis=1)
    np.testing.assert_array_equal(r.success, predicted != r.labels)
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    np.testing.assert_allclose(
        r.perturbation,
        np.linalg.norm((r.x_adv - x).reshape(8, -1).astype(np.float64), axis=1),
        rtol=1e-6,
    )
    assert np.median(r.perturbation) < 1.0  # far less than a pixel's full range in L2


# ------------------------------------------------------------------------------- errors and figures


def test_attack_errors(digits, rng):
    model, x = digits
    with pytest.raises(jacket.JacketValueError, match="jsma: `clip` must be `\\(low, high\\)`"):
        attacks.jsma(model, x, clip=None)
    with pytest.raises(jacket.JacketValueError, match="`gamma` must be a fraction"):
        attacks.jsma(model, x, gamma=0.0)
    with pytest.raises(jacket.JacketValueError, match="`gamma` allows no step"):
        attacks.jsma(model, x, gamma=0.01)
    with pytest.raises(jacket.JacketValueError, match="`theta` must be a finite nonzero"):
        attacks.jsma(model, x, theta=0)
    with pytest.raises(jacket.JacketValueError, match="`x` must lie within `clip`"):
        attacks.jsma(model, x + 1.0)
    with pytest.raises(jacket.JacketValueError, match="`criterion` must be one of 'pairs'"):
        attacks.jsma(model, x, criterion="single")
    with pytest.raises(jacket.JacketValueError, match="`target` must hold classes in \\[0, 10\\)"):
        attacks.jsma(model, x, target=10)
    with pytest.raises(jacket.JacketValueError, match="`target` must have one class per sample"):
        attacks.fgsm(model, x, eps=0.1, target=[1, 2])
    with pytest.raises(jacket.JacketTypeError, match="`y` must be a class index"):
        attacks.fgsm(model, x, eps=0.1, y=np.ones(8))
    with pytest.raises(jacket.JacketValueError, match="`eps` must be a finite positive"):
        attacks.fgsm(model, x, eps=-0.1)
    with pytest.raises(jacket.JacketValueError, match="`clip` must be `\\(low, high\\)` with"):
        attacks.fgsm(model, x, eps=0.1, clip=(1.0, 0.0))
    with pytest.raises(jacket.JacketValueError, match="`max_iter` must be a positive integer"):
        attacks.deepfool(model, x, max_iter=0)
    regression = keras.Sequential([layers.Input((3,)), layers.Dense(1)])
    with pytest.raises(jacket.JacketValueError, match="attacks need a classifier"):
        attacks.deepfool(regression, rng.normal(size=(2, 3)))


def test_adversarial_figure(digits):
    model, x = digits
    r = attacks.fgsm(model, x[:3], eps=0.2, clip=(0.0, 1.0))
    figure = plot.adversarial_figure(x[:3], r.x_adv, labels=r.labels, adv_labels=r.predictions)
    assert len(figure.axes) == 3 * 3 + 3  # three panels and a colorbar per row
    assert [ax.get_title() for ax in figure.axes[:3]] == ["original", "adversarial", "difference"]
