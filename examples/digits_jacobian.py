"""Jacobian regularization on the digits classifier: the same network trained with and without
`jacket.training.JacobianNorm`, then measured: clean accuracy, mean `||J||_F` over the test set,
FGSM accuracy at eps 0.1 and 0.2 (`jacket.attacks.fgsm`) and accuracy under Gaussian noise.

    KERAS_BACKEND=jax python examples/digits_jacobian.py                 # weights 0 and 0.01
    KERAS_BACKEND=torch python examples/digits_jacobian.py --weights 0 0.01 0.05 --seeds 0 1 2

The settings are those of the issue's hand-written TensorFlow reference: Conv2D(16) + Dense(32) +
Dense(10), Adam 1e-3, 30 epochs, batch 64, one random projection, the first 1400 of
scikit-learn's 1797 digits to train and the rest to test (a few seconds to a minute per run on a
CPU, by backend).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

TRAIN = 1400
NOISE_SIGMA = 0.2
FGSM_EPS = (0.1, 0.2)


def data():
    """`(x_train, y_train, x_test, y_test)`: the 8x8 digits in [0, 1], `(n, 8, 8, 1)` float32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def build():
    import keras

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def train(weight: float, seed: int = 0, *, epochs: int = 30, n_projections=1):
    """The classifier trained with `weight * ||J||_F^2` (one projection) in its loss; with
    weight 0 it trains plainly (no penalty computed). Returns `(model, seconds)`."""
    import keras

    from jacket import training

    keras.utils.set_random_seed(seed)
    x_train, y_train, _, _ = data()
    model = build()
    fitted = model
    if weight > 0:
        fitted = training.regularize(model, training.JacobianNorm(weight, n_projections), seed=seed)
    fitted.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    fitted.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    return model, time.perf_counter() - start


def evaluate(model, seed: int = 0) -> dict:
    """Clean accuracy, mean `||J||_F` (exact, per test digit), FGSM and noise accuracies."""
    import jacket

    _, _, x_test, y_test = data()

    def accuracy(x):
        logits = model.predict(x, batch_size=512, verbose=0)
        return float((np.asarray(logits).argmax(axis=1) == y_test).mean())

    J = np.asarray(jacket.jacobian(model, x_test, flatten=True))  # (n, 10, 64)
    result = {
        "accuracy": accuracy(x_test),
        "jacobian_fro": float(np.linalg.norm(J, axis=(1, 2)).mean()),
    }
    for eps in FGSM_EPS:
        attack = jacket.attacks.fgsm(model, x_test, eps=eps, y=y_test, clip=(0.0, 1.0))
        result[f"fgsm_{eps}"] = accuracy(attack.x_adv)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, x_test.shape)
    result[f"noise_{NOISE_SIGMA}"] = accuracy(np.clip(x_test + noise, 0, 1).astype("float32"))
    return result


def run(weight: float, seed: int = 0, *, epochs: int = 30) -> dict:
    model, seconds = train(weight, seed, epochs=epochs)
    return {"weight": weight, "seed": seed, "train_s": seconds, **evaluate(model, seed)}


def main(argv=None):
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.01])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"backend {keras.backend.backend()}")
    print(f"{'weight':>7}{'seed':>5}{'acc':>7}{'||J||_F':>9}{'FGSM@0.1':>9}{'FGSM@0.2':>9}"
          f"{'noise':>7}{'train s':>8}")  # fmt: skip
    for weight in args.weights:
        for seed in args.seeds:
            r = run(weight, seed, epochs=args.epochs)
            print(
                f"{weight:>7g}{seed:>5}{r['accuracy']:>7.1%}{r['jacobian_fro']:>9.2f}"
                f"{r['fgsm_0.1']:>9.1%}{r['fgsm_0.2']:>9.1%}{r[f'noise_{NOISE_SIGMA}']:>7.1%}"
                f"{r['train_s']:>8.1f}"
            )


if __name__ == "__main__":
    main()
