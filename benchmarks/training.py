"""Derivatives inside training (`jacket.training`): step time, the Poisson PINN against DeepXDE,
the WGAN-GP toy critic and the digits sweep of Jacobian-penalty weights.

`python benchmarks/training.py` runs every installed backend, each in its own process (Keras fixes
the backend per process; DeepXDE too, in a process of its own), writes
`bench-results/training-<backend>.json` and prints four tables; `make bench` runs its step-time
part last, `make bench ARGS="--training all"` all of it. One backend alone: `KERAS_BACKEND=jax python benchmarks/training.py --child`.

- Step time: the issue's digits CNN (Conv2D(16) + Dense(32) + Dense(10)), batch 64, Adam, through
  `fit`: the plain step, the step with `JacobianNorm(0.01)` (one projection) and a hand-written
  penalty step (the framework's own nested derivative in a `compute_loss` override: nested tapes,
  `jax.vjp`, `create_graph=True`) as the anchor. One warm-up epoch each (its time is reported as
  "first s"), then interleaved rounds of one epoch each; medians of ms per step. Target: jacket /
  plain <= 2.5.
- PINN: `examples/poisson_pinn.py` against DeepXDE's own code on the same problem (the collocation
  points DeepXDE samples, 3 x 50 tanh, Glorot uniform, Adam 1e-3, the same number of steps, mean
  squared residual plus mean squared boundary error), per seed; relative L2 error on 100 points
  and steady ms per step (the first 500 steps left out of both), median [min, max] over seeds
  (the final error of Adam at this step size moves by orders of magnitude from seed to seed). jacket runs `fit` with
  `steps_per_execution=1` and, where Keras allows it (TensorFlow, JAX), 50; "no PDE ms" is the
  same `fit` on the boundary values alone (Keras's own cost of a step, at the larger setting).
  Targets: error <= 1e-2 and no worse than DeepXDE's; time <= 1.0x DeepXDE's (the time ratio:
  jacket at the larger setting over DeepXDE).
- WGAN-GP: `examples/wgan_gp_critic.py`; the critic's mean gradient norm on real-generated
  interpolates (target: within 0.1 of 1).
- Digits sweep: `examples/digits_jacobian.py` for each weight and seed: clean accuracy, mean
  `||J||_F` on the test digits, FGSM accuracy at eps 0.1 and 0.2, accuracy under Gaussian noise
  (sigma 0.2); mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples"
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
DEEPXDE_BACKEND = {"tensorflow": "tensorflow", "jax": "jax", "torch": "pytorch"}
PINN_WARM = 500  # steps left out of the steady time, for jacket and DeepXDE alike


def _examples():
    sys.path.insert(0, str(EXAMPLES))
    import digits_jacobian
    import poisson_pinn
    import wgan_gp_critic

    return digits_jacobian, poisson_pinn, wgan_gp_critic


# ------------------------------------------------------------------------------------ step time


def hand_written(model, weight: float):
    """The anchor: Jacobian regularization as a user writes it for one backend, the framework's
    own derivative inside a `compute_loss` override (one random projection, unit sphere)."""
    import keras

    backend = keras.backend.backend()
    ops = keras.ops
    if backend == "tensorflow":
        import tensorflow as tf

        def vjp_x(f, x, v):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = f(x)
            return tape.gradient(y, x, output_gradients=v)
    elif backend == "jax":
        import jax

        def vjp_x(f, x, v):
            _, pullback = jax.vjp(f, x)
            return pullback(v)[0]
    else:
        import torch

        def vjp_x(f, x, v):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                return torch.autograd.grad(f(x), x, v, create_graph=True)[0]

    class HandWritten(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.seed_generator = keras.random.SeedGenerator(0)

        def call(self, x, training=None):
            return self.inner(x, training=training)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
            v = keras.random.normal(ops.shape(y_pred), seed=self.seed_generator)
            v = v / ops.sqrt(ops.sum(v * v, axis=1, keepdims=True))
            x = ops.convert_to_tensor(x)
            g = vjp_x(lambda t: self.inner(t, training=training), x, v)
            sq = 10.0 * ops.sum(ops.reshape(g * g, (ops.shape(g)[0], -1)), axis=1)
            return loss + weight * ops.mean(sq)

    return HandWritten()


def step_time(rounds: int) -> dict:
    import keras

    from jacket import training

    digits, _, _ = _examples()
    x, y, _, _ = digits.data()
    fitted = {}
    for name in ("plain", "jacket", "hand-written"):
        keras.utils.set_random_seed(0)
        model = digits.build()
        if name == "jacket":
            model = training.regularize(model, training.JacobianNorm(0.01), seed=0)
        elif name == "hand-written":
            model = hand_written(model, 0.01)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        fitted[name] = model
    steps = -(-len(x) // 64)
    first, times = {}, {name: [] for name in fitted}
    for name, model in fitted.items():
        start = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        first[name] = time.perf_counter() - start
    for r in range(rounds):
        names = list(fitted)
        for name in names[r % 3 :] + names[: r % 3]:  # rotate who goes first
            start = time.perf_counter()
            fitted[name].fit(x, y, batch_size=64, epochs=1, verbose=0)
            times[name].append(1e3 * (time.perf_counter() - start) / steps)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {
        "ms": ms,
        "first_s": first,
        "ratio": ms["jacket"] / ms["plain"],
        "hand_written_ratio": ms["hand-written"] / ms["plain"],
        "steps_per_round": steps,
        "rounds": rounds,
    }


# ----------------------------------------------------------------------------------------- PINN


def pinn_jacket(steps: int, seeds: list[int], points) -> dict:
    import keras

    _, pinn, _ = _examples()
    runs = []
    spes = [1] if keras.backend.backend() == "torch" else [50, 1]
    for spe in spes:
        for seed in seeds if spe == spes[0] else seeds[:1]:
            r = pinn.run(steps, seed, points=points, steps_per_execution=spe)
            runs.append({"seed": seed, "steps_per_execution": spe, **r})
    # Keras's own share: the same fit on the boundary values alone, without the equation
    plain = pinn.run(min(steps, 2000), seeds[0], steps_per_execution=spes[0], equation=False)
    return {"runs": runs, "keras_alone_ms": plain["ms_per_step"]}


DEEPXDE_CHILD = r"""
import json, sys, time
import numpy as np
import deepxde as dde
from deepxde import backend as bkd
steps, seeds, warm = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
geom = dde.geometry.Interval(0, 1)

def pde(x, y):
    dy_xx = dde.grad.hessian(y, x)
    dy_xx = dy_xx[0] if isinstance(dy_xx, tuple) else dy_xx  # JAX: (value, function)
    return -dy_xx - np.pi**2 * bkd.sin(np.pi * x)

bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on_boundary: on_boundary)
x_test = np.linspace(0, 1, 100, dtype="float32")[:, None]
runs, points = [], None
for seed in seeds:
    dde.config.set_random_seed(seed)
    data = dde.data.PDE(geom, pde, bc, 16, 2, solution=lambda x: np.sin(np.pi * x), num_test=100)
    points = data.train_x_all.tolist()
    net = dde.nn.FNN([1] + [50] * 3 + [1], "tanh", "Glorot uniform")
    model = dde.Model(data, net)
    model.compile("adam", lr=1e-3)
    start = time.perf_counter()
    model.train(iterations=warm, display_every=10**9, verbose=0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.train(iterations=steps - warm, display_every=10**9, verbose=0)
    steady = time.perf_counter() - start
    u = np.asarray(model.predict(x_test), np.float64)
    exact = np.sin(np.pi * x_test)
    runs.append({"seed": seed, "error": float(np.linalg.norm(u - exact) / np.linalg.norm(exact)),
                 "ms_per_step": 1e3 * steady / (steps - warm), "first_s": first})
print("RESULT " + json.dumps({"runs": runs, "points": points, "version": dde.__version__}))
"""


def pinn_deepxde(backend: str, steps: int, seeds: list[int]) -> dict:
    """DeepXDE on `backend`, one fresh process per seed (seeded by `dde.config.set_random_seed`;
    its TensorFlow backend gave one same result for every seed run in one process)."""
    if importlib.util.find_spec("deepxde") is None:
        return {"error": "DeepXDE is not installed (pip install deepxde)"}
    env = {**os.environ, "DDE_BACKEND": DEEPXDE_BACKEND[backend], "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    result: dict = {"runs": []}
    for seed in seeds:
        command = [sys.executable, "-c", DEEPXDE_CHILD, str(steps), str(seed), str(PINN_WARM)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-1:])
            return {"error": f"DeepXDE did not run on {backend}: {tail[:200]}"}
        one = json.loads(lines[0][len("RESULT ") :])
        result["runs"] += one["runs"]
        result["points"], result["version"] = one["points"], one["version"]
    return result


# ------------------------------------------------------------------------------------ one backend


def run_child(args) -> dict:
    import keras

    backend = keras.backend.backend()
    _, _, wgan = _examples()
    result = {"backend": backend, "machine": machine()}
    if "step" in args.parts:
        result["step"] = step_time(args.rounds)
        print(f"[{backend}] step time done", flush=True)
    if "pinn" in args.parts:
        deepxde = pinn_deepxde(backend, args.pinn_steps, args.pinn_seeds)
        points = deepxde.get("points")
        result["pinn"] = {
            "steps": args.pinn_steps,
            "jacket": pinn_jacket(args.pinn_steps, args.pinn_seeds, points),
            "deepxde": {k: v for k, v in deepxde.items() if k != "points"},
            "points": "DeepXDE's" if points is not None else "18 evenly spaced",
        }
        print(f"[{backend}] PINN done", flush=True)
    if "wgan" in args.parts:
        result["wgan"] = [wgan.run(seed=seed) for seed in args.seeds]
        print(f"[{backend}] WGAN-GP done", flush=True)
    if "sweep" in args.parts:
        digits, _, _ = _examples()
        result["epochs"] = args.epochs
        result["sweep"] = [
            digits.run(weight, seed, epochs=args.epochs)
            for weight in args.weights
            for seed in args.seeds
        ]
        print(f"[{backend}] sweep done", flush=True)
    return result


def machine() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("keras", "tensorflow", "jax", "torch", "numpy", "deepxde"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "versions": versions,
    }


# ------------------------------------------------------------------------------------------ table


def _median_range(values) -> str:
    """`median [min, max]`: the PINN's final errors spread over orders of magnitude by seed."""
    values = sorted(values)
    if len(values) == 1:
        return f"{values[0]:.2g}"
    return f"{statistics.median(values):.2g} [{values[0]:.1g}, {values[-1]:.1g}]"


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} +- {statistics.stdev(values):.2g}"


def print_tables(results: list[dict]) -> None:
    print("\nJacobian penalty step: digits CNN, batch 64, JacobianNorm(0.01, one projection)")
    print(
        f"{'backend':<11}{'plain ms':>9}{'jacket ms':>10}{'ratio':>7}{'target':>8}"
        f"{'hand-written ms':>16}{'ratio':>7}   first s (plain / jacket / hand-written)"
    )
    for r in results:
        s = r.get("step")
        if s:
            ms, first = s["ms"], s["first_s"]
            print(
                f"{r['backend']:<11}{ms['plain']:>9.2f}{ms['jacket']:>10.2f}{s['ratio']:>6.2f}x"
                f"{'<= 2.5':>8}{ms['hand-written']:>16.2f}{s['hand_written_ratio']:>6.2f}x   "
                f"{first['plain']:.1f} / {first['jacket']:.1f} / {first['hand-written']:.1f}"
            )
    pinns = [r for r in results if r.get("pinn")]
    if pinns:
        steps = pinns[0]["pinn"]["steps"]
        print(
            f"\nPoisson PINN, -u'' = pi^2 sin(pi x) on [0, 1]: {steps} Adam steps, relative L2 "
            "error (median [min, max] over seeds), steady ms per step (median)"
        )
        print(
            f"{'backend':<11}{'jacket error':>22}{'ms (spe=50)':>13}{'ms (spe=1)':>12}"
            f"{'no PDE ms':>11}{'DeepXDE error':>22}{'ms':>8}{'time ratio':>12}"
        )
        for r in pinns:
            p = r["pinn"]
            runs = p["jacket"]["runs"]
            spe = max(run["steps_per_execution"] for run in runs)
            main = [run for run in runs if run["steps_per_execution"] == spe]
            one = [run["ms_per_step"] for run in runs if run["steps_per_execution"] == 1]
            fast = statistics.median(run["ms_per_step"] for run in main)
            dx = p["deepxde"]
            if "runs" in dx:
                dx_err = _median_range([run["error"] for run in dx["runs"]])
                dx_ms = statistics.median(run["ms_per_step"] for run in dx["runs"])
                ratio = f"{fast / dx_ms:.2f}x"
                dx_cells = f"{' ' + dx_err:>22}{dx_ms:>8.2f}{ratio:>12}"  # (a space: 22 wide)
            else:
                dx_cells = f"  {dx.get('error', '-')[:60]}"
            print(
                f"{r['backend']:<11}{' ' + _median_range([run['error'] for run in main]):>22}"
                f"{(f'{fast:.2f}' if spe > 1 else '-'):>13}"
                f"{(f'{statistics.median(one):.2f}' if one else '-'):>12}"
                f"{p['jacket']['keras_alone_ms']:>11.2f}{dx_cells}"
            )
    wgans = [r for r in results if r.get("wgan")]
    if wgans:
        print(
            "\nWGAN-GP toy critic: gradient norm on real-generated interpolates (target 1 +- 0.1)"
        )
        for r in wgans:
            norms = [run["mean_norm"] for run in r["wgan"]]
            spread = [run["std_norm"] for run in r["wgan"]]
            print(
                f"{r['backend']:<11}mean {_mean_std(norms)} over seeds; per-point spread "
                f"{statistics.mean(spread):.3f}; train {statistics.mean(run['train_s'] for run in r['wgan']):.1f} s"
            )
    sweeps = [r for r in results if r.get("sweep")]
    if sweeps:
        print(
            f"\nDigits: Conv2D(16) + Dense(32) + Dense(10), {sweeps[0]['epochs']} epochs, batch 64, "
            "Adam 1e-3, JacobianNorm(weight, 1 projection); mean +- std over seeds"
        )
        print(
            f"{'backend':<11}{'weight':>7}{'accuracy':>17}{'||J||_F':>16}{'FGSM@0.1':>17}"
            f"{'FGSM@0.2':>17}{'noise 0.2':>17}"
        )
        for r in sweeps:
            weights = sorted({run["weight"] for run in r["sweep"]})
            for w in weights:
                runs = [run for run in r["sweep"] if run["weight"] == w]
                cells = "".join(
                    f"{_pct(runs, key):>17}" if key != "jacobian_fro" else f"{_num(runs, key):>16}"
                    for key in ("accuracy", "jacobian_fro", "fgsm_0.1", "fgsm_0.2", "noise_0.2")
                )
                print(f"{r['backend']:<11}{w:>7g}{cells}")


def _pct(runs, key) -> str:
    values = [100 * run[key] for run in runs]
    if len(values) == 1:
        return f"{values[0]:.1f}%"
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}%"


def _num(runs, key) -> str:
    values = [run[key] for run in runs]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--parts", nargs="*", default=["step", "pinn", "wgan", "sweep"],
        help="step, pinn, wgan, sweep",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="*", default=[0, 0.005, 0.01, 0.05, 0.1])
    parser.add_argument("--epochs", type=int, default=30, help="digits sweep epochs")
    parser.add_argument("--pinn-steps", type=int, default=5000)
    parser.add_argument("--pinn-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=7, help="step-time rounds of one epoch")
    parser.add_argument("--child", action="store_true", help="run the active backend only")
    parser.add_argument("--json", default=None, help="(--child) write results here")
    args = parser.parse_args(argv)
    if args.child:
        result = run_child(args)
        text = json.dumps(result, indent=1)
        if args.json:
            Path(args.json).write_text(text)
        else:
            print(text)
        return 0
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    results = []
    for backend in args.backends:
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            print(f"[skip] {backend}: not installed")
            continue
        path = out / f"training-{backend}.json"
        command = [sys.executable, str(HERE / "training.py"), "--child", "--json", str(path)]
        command += ["--parts", *args.parts, "--seeds", *map(str, args.seeds)]
        command += ["--weights", *map(str, args.weights), "--epochs", str(args.epochs)]
        command += ["--pinn-steps", str(args.pinn_steps), "--rounds", str(args.rounds)]
        command += ["--pinn-seeds", *map(str, args.pinn_seeds)]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        subprocess.run(command, check=True, env=env)
        results.append(json.loads(path.read_text()))
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
