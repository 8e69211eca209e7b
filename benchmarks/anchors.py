"""jacket against each framework's own per-sample Jacobian, timed in the same process.

Run one backend per process (Keras fixes it): `KERAS_BACKEND=jax python benchmarks/anchors.py`.
`benchmarks/run.py` runs all three and prints one table. Every anchor's result is checked to agree
with jacket's before it is timed; steady-state times are medians after warm-up, and the first call
(trace + compile + run) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import jacket  # noqa: E402

BACKEND = keras.backend.backend()


# ------------------------------------------------------------------------------------------- cases


def seed_mlp():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(10, activation="relu"), keras.layers.Dense(2)]
    )


def seed_cnn():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def mlp_784():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


CASES = {
    "seed_mlp_b1": (seed_mlp, (5,), 1),
    "seed_cnn_b1": (seed_cnn, (28, 28, 1), 1),
    "seed_cnn_b32": (seed_cnn, (28, 28, 1), 32),
    "mlp784_b64": (mlp_784, (784,), 64),
}


# ----------------------------------------------------------------------------------------- anchors


def anchors(model):
    """name -> function(x) returning the per-sample Jacobian `(B, *out, *in)`, native tensors."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=False)
        def batch_jacobian(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x, training=False)
            return tape.batch_jacobian(y, x)

        def eager_batch_jacobian(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x, training=False)
            return tape.batch_jacobian(y, x)

        def seed_loop(x):
            """The seed's loop, made to work: slicing inside a persistent tape, row b of sample b."""
            rows = []
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                y = model(x, training=False)
                outs = [[y[b, i] for i in range(y.shape[1])] for b in range(x.shape[0])]
            for b in range(x.shape[0]):
                rows.append(tf.stack([tape.gradient(o, x)[b] for o in outs[b]]))
            return tf.stack(rows)

        def convert(x):
            return tf.constant(x)

        return {
            "tf.function(batch_jacobian)": batch_jacobian,
            "eager batch_jacobian": eager_batch_jacobian,
            "seed loop (fixed)": seed_loop,
        }, convert
    if BACKEND == "jax":
        import jax

        state = [v.value for v in model.variables]

        def pure(st, xi):
            with keras.StatelessScope(state_mapping=list(zip(model.variables, st))):
                return model(xi[None], training=False)[0]

        rev = jax.jit(jax.vmap(jax.jacrev(pure, argnums=1), in_axes=(None, 0)))
        fwd = jax.jit(jax.vmap(jax.jacfwd(pure, argnums=1), in_axes=(None, 0)))
        return {
            "jit(vmap(jacrev))": lambda x: rev(state, x),
            "jit(vmap(jacfwd))": lambda x: fwd(state, x),
        }, jax.numpy.asarray
    import torch

    def one(xi):
        return model(xi[None], training=False)[0]

    def vmap_jacrev(x):
        return torch.func.vmap(torch.func.jacrev(one))(x)

    def autograd_vectorized(x):
        full = torch.autograd.functional.jacobian(
            lambda t: model(t, training=False), x, vectorize=True
        )
        B = x.shape[0]
        idx = torch.arange(B)
        out_nd = full.ndim - x.ndim - 1
        moved = full.movedim(1 + out_nd, 1)
        return moved[idx, idx]

    return {
        "torch.func.vmap(jacrev)": vmap_jacrev,
        "autograd.functional.jacobian(vectorize)": autograd_vectorized,
    }, torch.as_tensor


# ------------------------------------------------------------------------------------------ timing


def _numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)


def _time(fn, x, repeats, budget_s=20.0):
    start = time.perf_counter()
    first_result = fn(x)
    _numpy(first_result)
    first = time.perf_counter() - start
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        start = time.perf_counter()
        _numpy(fn(x))
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return first, statistics.median(times), first_result


def run(case_names, repeats):
    rows = []
    for name in case_names:
        build, in_shape, batch = CASES[name]
        keras.utils.set_random_seed(0)
        model = build()
        x = np.random.default_rng(0).random((batch,) + in_shape).astype("float32")
        jac = jacket.jacobian_fn(model)
        first, steady, J = _time(jac, x, repeats)
        reference = _numpy(J)
        row = {
            "case": name,
            "backend": BACKEND,
            "jacket_ms": steady * 1e3,
            "jacket_first_s": first,
            "plan": jac.plan(x).describe(),
            "anchors": {},
        }
        funcs, convert = anchors(model)
        xt = convert(x)
        for anchor, fn in funcs.items():
            if anchor == "seed loop (fixed)" and batch * int(np.prod(reference.shape[1:2])) > 64:
                continue  # one gradient per (sample, output): minutes on the big cases
            try:
                a_first, a_steady, A = _time(fn, xt, repeats)
            except Exception as error:  # noqa: BLE001 - an anchor that cannot run is reported
                row["anchors"][anchor] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                continue
            A = _numpy(A).reshape(reference.shape)
            scale = np.abs(reference).max() or 1.0
            agree = float(np.abs(A - reference).max() / scale)
            row["anchors"][anchor] = {
                "ms": a_steady * 1e3,
                "first_s": a_first,
                "max_rel_diff": agree,
                "agrees": agree < 1e-4,
            }
        timed = [a["ms"] for a in row["anchors"].values() if "ms" in a and a["agrees"]]
        row["best_anchor_ms"] = min(timed) if timed else None
        row["ratio_to_best"] = steady * 1e3 / min(timed) if timed else None
        rows.append(row)
    return rows


def machine():
    from importlib import metadata

    versions = {}
    for package in ("keras", "tensorflow", "jax", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=str, default=None, help="write results here")
    args = parser.parse_args(argv)
    result = {"backend": BACKEND, "machine": machine(), "rows": run(args.cases, args.repeats)}
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
