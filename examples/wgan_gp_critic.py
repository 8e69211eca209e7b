"""The critic of a 2-D toy WGAN-GP, trained through `model.fit` with
`jacket.training.GradientPenalty(10, interpolate=True)`.

Real samples: eight Gaussians on a ring; generated ones: a generator network at initialisation
(held fixed). The critic's loss is the Wasserstein estimate `mean(D(fake)) - mean(D(real))`,
written as `mean(y * D(x))` with `y = +1` for generated and `-1` for real samples, plus the
gradient penalty between pairs of samples of each (shuffled, mixed) batch. After training, the
critic's gradient norm on interpolates between real and generated samples should be close to 1
(Gulrajani et al. 2017).

    KERAS_BACKEND=torch python examples/wgan_gp_critic.py          # well under a minute
"""

from __future__ import annotations

import argparse
import time

import numpy as np

N = 2048  # real and generated samples each


def samples(seed: int = 0):
    """`(x, y)`: `N` real samples (y = -1) and `N` generated ones (y = +1), float32."""
    import keras

    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * rng.integers(0, 8, N) / 8
    real = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.05 * rng.normal(size=(N, 2))
    keras.utils.set_random_seed(seed + 1)
    generator = keras.Sequential(
        [keras.Input((2,))]
        + [keras.layers.Dense(64, activation="relu") for _ in range(2)]
        + [keras.layers.Dense(2)]
    )
    fake = np.asarray(generator.predict(rng.normal(size=(N, 2)).astype("float32"), verbose=0))
    x = np.concatenate([real, fake]).astype("float32")
    y = np.concatenate([-np.ones(N), np.ones(N)]).astype("float32")[:, None]
    return x, y


def wasserstein(y, score):
    import keras

    return keras.ops.mean(y * score)


def critic_model():
    import keras

    layers = [keras.Input((2,))]
    layers += [keras.layers.Dense(128, activation="relu") for _ in range(3)]
    return keras.Sequential(layers + [keras.layers.Dense(1)])


def gradient_norms(critic, x, y, seed: int = 0) -> np.ndarray:
    """`||d D / d x||` at `eps * real + (1 - eps) * fake` for random pairs (WGAN-GP's
    interpolates), by `jacket.vjp` (inspection: no training here)."""
    import jacket

    rng = np.random.default_rng(seed + 2)
    real, fake = x[y[:, 0] < 0], x[y[:, 0] > 0]
    eps = rng.uniform(size=(len(real), 1)).astype("float32")
    points = eps * real + (1 - eps) * fake[rng.permutation(len(fake))]
    g = np.asarray(jacket.vjp(critic, points, np.ones((len(points), 1), "float32")))
    return np.linalg.norm(g, axis=1)


def run(epochs: int = 40, seed: int = 0) -> dict:
    import keras

    from jacket import training

    x, y = samples(seed)
    keras.utils.set_random_seed(seed)
    critic = critic_model()
    model = training.regularize(critic, training.GradientPenalty(10.0, interpolate=True), seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(5e-4, beta_1=0.5, beta_2=0.9), loss=wasserstein)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=256, epochs=epochs, verbose=0).history
    seconds = time.perf_counter() - start
    norms = gradient_norms(critic, x, y, seed)
    scores = np.asarray(critic.predict(x, verbose=0))[:, 0]
    return {
        "mean_norm": float(norms.mean()),
        "std_norm": float(norms.std()),
        "wasserstein": float(scores[y[:, 0] < 0].mean() - scores[y[:, 0] > 0].mean()),
        "gradient_penalty": history["gradient_penalty"][-1],
        "train_s": seconds,
    }


def main(argv=None):
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = run(args.epochs, args.seed)
    print(
        f"backend {keras.backend.backend()}: critic gradient norm on interpolates "
        f"{r['mean_norm']:.3f} +- {r['std_norm']:.3f} (target 1), Wasserstein estimate "
        f"{r['wasserstein']:.3f}, last gradient penalty {r['gradient_penalty']:.4f}, "
        f"{r['train_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
