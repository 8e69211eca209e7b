"""A physics-informed network through `model.fit`: the 1-D Poisson problem
`-u'' = pi^2 sin(pi x)` on `[0, 1]`, `u(0) = u(1) = 0` (solution `sin(pi x)`).

The network fits the two boundary values as ordinary data (`loss="mse"`), and the equation enters
as a `jacket.training.PDEResidual` on collocation points: `u_xx` is differentiated through on every
step, on TensorFlow, JAX and PyTorch alike.

    KERAS_BACKEND=jax python examples/poisson_pinn.py              # 10000 steps, a minute or two
    KERAS_BACKEND=torch python examples/poisson_pinn.py --steps 3000

The set-up is DeepXDE's own Poisson example (`benchmarks/training.py` runs both): 3 x 50 tanh
layers, Glorot uniform, Adam 1e-3, the mean squared residual on 18 points plus the mean squared
boundary error, relative L2 error on 100 test points.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

STEPS_PER_EPOCH = 500  # the two boundary points, repeated: one epoch of that many steps


def build():
    import keras

    layers = [keras.Input((1,))]
    layers += [keras.layers.Dense(50, activation="tanh") for _ in range(3)]
    return keras.Sequential(layers + [keras.layers.Dense(1)])


def residual(x, d):
    """`-u'' - pi^2 sin(pi x)` at the collocation points."""
    import keras

    return -d.u_xx[:, 0, 0] - np.pi**2 * keras.ops.sin(np.pi * x[:, 0])


def relative_error(net) -> float:
    x = np.linspace(0, 1, 100, dtype="float32")[:, None]
    u = np.asarray(net.predict(x, verbose=0), np.float64)
    exact = np.sin(np.pi * x)
    return float(np.linalg.norm(u - exact) / np.linalg.norm(exact))


def run(
    steps: int = 10000,
    seed: int = 0,
    *,
    points=None,
    steps_per_execution: int = 1,
    equation: bool = True,
) -> dict:
    """Train; returns the relative L2 error, the steady time per step (ms, the first epoch left
    out) and the first epoch's time (trace, compile and `STEPS_PER_EPOCH` steps). With
    `equation=False` the network fits the boundary values alone (Keras's own cost of a step)."""
    import keras

    from jacket import training

    keras.utils.set_random_seed(seed)
    if points is None:
        points = np.linspace(0, 1, 18)[:, None]
    net = build()
    pinn = net
    if equation:
        pde = training.PDEResidual(residual, points=np.asarray(points, "float32"))
        pinn = training.regularize(net, pde, seed=seed)
    pinn.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="mse", steps_per_execution=steps_per_execution
    )
    per_epoch = min(STEPS_PER_EPOCH, max(1, steps // 4))
    x_bc = np.tile(np.array([[0.0], [1.0]], "float32"), (per_epoch, 1))
    u_bc = np.zeros_like(x_bc)
    epochs = max(1, steps // per_epoch)
    start = time.perf_counter()
    pinn.fit(x_bc, u_bc, batch_size=2, epochs=1, shuffle=False, verbose=0)
    first = time.perf_counter() - start
    history = None
    start = time.perf_counter()
    if epochs > 1:
        history = pinn.fit(
            x_bc, u_bc, batch_size=2, epochs=epochs - 1, shuffle=False, verbose=0
        ).history
    steady = time.perf_counter() - start
    return {
        "steps": epochs * per_epoch,
        "error": relative_error(net),
        "ms_per_step": 1000 * steady / max(1, (epochs - 1) * per_epoch),
        "first_epoch_s": first,
        "pde_residual": history["pde_residual"][-1] if history and equation else None,
    }


def main(argv=None):
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = run(args.steps, args.seed)
    print(
        f"backend {keras.backend.backend()}: {r['steps']} steps, relative L2 error "
        f"{r['error']:.2e}, {r['ms_per_step']:.2f} ms/step (first epoch {r['first_epoch_s']:.1f} s)"
    )


if __name__ == "__main__":
    main()
