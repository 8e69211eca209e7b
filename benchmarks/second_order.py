"""Second order: Laplacians, Hessians and divergences against each framework's own one-liners.

`python benchmarks/second_order.py` runs every installed backend, each in its own process (Keras fixes
the backend per process), writes `bench-results/second-order-<backend>.json` and prints one table;
`benchmarks/run.py` (`make bench`) calls it after the other tables. One backend alone:
`KERAS_BACKEND=jax python benchmarks/second_order.py --child`.

Cases (float32):
- `lap_d3`, `lap_d64`: the Laplacian of a tanh MLP `d -> 64 -> 64 -> 64 -> 1` at batch 4096.
  jacket's `laplacian` ("auto", and "forward" and "hessian" forced) against the backend's Hessian
  trace one-liner (JAX: `jit(vmap(hessian))` then the trace; TensorFlow: nested tapes and
  `batch_jacobian` in a `tf.function`; PyTorch: `torch.func.vmap(torch.func.hessian)`), on JAX also
  folx's `forward_laplacian` and forward-over-forward JVPs, and DeepXDE's `dde.grad.hessian` route
  (`sum_i H[i, i]`, its own gradient cache) where it runs. Targets: `d = 3` at most 0.8x, `d = 64` at
  most 0.5x the Hessian trace one-liner; on JAX within 1.2x of folx.
- `hess_mlp` (the seed MLP 5 -> 10 -> 2, batch 256) and `hess_cnn` (the bundled digits CNN,
  8x8x1 -> 10, batch 32): `jacket.hessian` against the per-sample Hessian one-liner (JAX
  `jit(vmap(hessian))`; TensorFlow nested `batch_jacobian`s; PyTorch `torch.func.vmap(hessian)`).
  Target: at most 1.0x.
- `div_d64`: the divergence of a square tanh MLP `64 -> 128 -> 128 -> 64` at batch 1024, exact,
  against `vmap(jacfwd)` then the trace (TensorFlow: `batch_jacobian` then the trace). Target: at
  most 1.0x. And Hutchinson's error bar: over 200 seeds (32 vectors each, batch 8), how often the
  exact divergence lies within 2 standard errors of the estimate (target: at least 90%).

Every anchor is checked to agree with jacket (relative 1e-3) before its time counts. Steady-state
times are medians over interleaved rounds (one block of calls of each per round, the order rotated),
so that the machine's drifts hit all alike; the first call (trace + compile + run) is reported apart.
The ratio is jacket's "auto" over the target anchor of the case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
CASES = ("lap_d3", "lap_d64", "hess_mlp", "hess_cnn", "div_d64")
TARGETS = {"lap_d3": 0.8, "lap_d64": 0.5, "hess_mlp": 1.0, "hess_cnn": 1.0, "div_d64": 1.0}


# ------------------------------------------------------------------------------------------ models


def tanh_mlp(d: int, widths=(64, 64, 64), out: int = 1):
    import keras

    layers = [keras.Input((d,))]
    layers += [keras.layers.Dense(w, activation="tanh") for w in widths]
    layers.append(keras.layers.Dense(out))
    return keras.Sequential(layers)


def seed_mlp():
    import keras

    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(10, activation="relu"), keras.layers.Dense(2)]
    )


def build(case: str):
    """`(model, x)` of a case."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if case in ("lap_d3", "lap_d64"):
        d = int(case.split("_d")[1])
        return tanh_mlp(d), rng.uniform(-1, 1, (4096, d)).astype("float32")
    if case == "hess_mlp":
        return seed_mlp(), rng.normal(size=(256, 5)).astype("float32")
    if case == "hess_cnn":
        from jacket.demo import digits_data, load_digits_model

        return load_digits_model(), digits_data()[2][:32]
    if case == "div_d64":
        return tanh_mlp(64, (128, 128), 64), rng.uniform(-1, 1, (1024, 64)).astype("float32")
    raise ValueError(case)


# ----------------------------------------------------------------------------------------- anchors


def _anchors_module():
    spec = importlib.util.spec_from_file_location("jacket_bench_anchors", HERE / "anchors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(case: str, model, backend: str) -> tuple[dict, object, str]:
    """`(name -> fn(x), convert, target name)`: the case's one-liners, each returning what jacket's
    function returns (Laplacian `(B, 1)`, Hessian `(B, m, n, n)`, divergence `(B,)`)."""
    kind = case.split("_")[0]
    if backend == "jax":
        return _jax_anchors(kind, model)
    if backend == "tensorflow":
        return _tf_anchors(kind, model)
    return _torch_anchors(kind, model)


def _jax_anchors(kind: str, model):
    import jax
    import jax.numpy as jnp
    import keras

    state = [v.value for v in model.variables]

    def one(st, xi):  # one sample, the weights as arguments (as jacket's own kernels run)
        with keras.StatelessScope(state_mapping=list(zip(model.variables, st))):
            return model(xi[None], training=False)[0]

    out = {}
    if kind == "lap":

        def trace(st, x):
            H = jax.vmap(jax.hessian(lambda xi: one(st, xi)[0]))(x)
            return jnp.trace(H, axis1=1, axis2=2)[:, None]

        def jvp_jvp(st, x):
            def lap(xi):
                f = lambda z: one(st, z)[0]  # noqa: E731

                def second(v):
                    return jax.jvp(lambda z: jax.jvp(f, (z,), (v,))[1], (xi,), (v,))[1]

                return jax.vmap(second)(jnp.eye(xi.shape[0], dtype=xi.dtype)).sum()

            return jax.vmap(lap)(x)[:, None]

        hessian_trace = jax.jit(trace)
        forward_forward = jax.jit(jvp_jvp)
        out["jit(vmap(hessian)) trace"] = lambda x: hessian_trace(state, x)
        out["forward-over-forward JVPs"] = lambda x: forward_forward(state, x)
        try:
            import folx

            def by_folx(st, x):
                lap = folx.forward_laplacian(lambda xi: one(st, xi)[0])
                return jax.vmap(lambda xi: lap(xi).laplacian)(x)[:, None]

            folx_fn = jax.jit(by_folx)
            out["folx.forward_laplacian"] = lambda x: folx_fn(state, x)
        except ImportError:
            out["folx.forward_laplacian"] = "folx is not installed (pip install folx)"
        out["deepxde dde.grad.hessian"] = _deepxde("jax", model, one, state)
        return out, jnp.asarray, "jit(vmap(hessian)) trace"
    if kind == "hess":
        fn = jax.jit(lambda st, x: jax.vmap(jax.hessian(lambda xi: one(st, xi)))(x))
        out["jit(vmap(hessian))"] = lambda x: fn(state, x)
        return out, jnp.asarray, "jit(vmap(hessian))"
    fn = jax.jit(
        lambda st, x: jnp.trace(jax.vmap(jax.jacfwd(lambda xi: one(st, xi)))(x), axis1=1, axis2=2)
    )
    out["jit(vmap(jacfwd)) trace"] = lambda x: fn(state, x)
    return out, jnp.asarray, "jit(vmap(jacfwd)) trace"


def _tf_anchors(kind: str, model):
    import tensorflow as tf

    out = {}
    if kind == "lap":

        @tf.function(reduce_retracing=False)
        def trace(x):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    y = model(x, training=False)
                g = inner.gradient(y, x)
            return tf.linalg.trace(outer.batch_jacobian(g, x))[:, None]

        out["tf.function(tapes, batch_jacobian) trace"] = trace
        out["deepxde dde.grad.hessian"] = _deepxde("tensorflow", model)
        return out, tf.constant, "tf.function(tapes, batch_jacobian) trace"
    if kind == "hess":

        @tf.function(reduce_retracing=False)
        def hessian(x):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    y = model(x, training=False)
                J = inner.batch_jacobian(y, x)
            return outer.batch_jacobian(J, x)

        out["tf.function(nested batch_jacobian)"] = hessian
        return out, tf.constant, "tf.function(nested batch_jacobian)"

    @tf.function(reduce_retracing=False)
    def divergence(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
        return tf.linalg.trace(tape.batch_jacobian(y, x))

    out["tf.function(batch_jacobian) trace"] = divergence
    return out, tf.constant, "tf.function(batch_jacobian) trace"


def _torch_anchors(kind: str, model):
    import torch

    def one(xi):
        return model(xi[None], training=False)[0]

    out = {}
    if kind == "lap":

        def trace(x):
            H = torch.func.vmap(torch.func.hessian(lambda xi: one(xi)[0]))(x)
            return torch.diagonal(H, dim1=1, dim2=2).sum(1, keepdim=True)

        out["torch.func.vmap(hessian) trace"] = trace
        out["deepxde dde.grad.hessian"] = _deepxde("pytorch", model)
        return out, torch.as_tensor, "torch.func.vmap(hessian) trace"
    if kind == "hess":
        out["torch.func.vmap(hessian)"] = lambda x: torch.func.vmap(torch.func.hessian(one))(x)
        return out, torch.as_tensor, "torch.func.vmap(hessian)"

    def divergence(x):
        J = torch.func.vmap(torch.func.jacfwd(one))(x)
        return torch.diagonal(J, dim1=1, dim2=2).sum(1)

    out["torch.func.vmap(jacfwd) trace"] = divergence
    return out, torch.as_tensor, "torch.func.vmap(jacfwd) trace"


def _deepxde(dde_backend: str, model, one=None, state=None):
    """DeepXDE's route to a Laplacian: `sum_i dde.grad.hessian(y, x, i=i, j=i)` (reverse mode, its
    own cache of the gradient), or why it cannot run here."""
    os.environ["DDE_BACKEND"] = dde_backend
    try:
        import deepxde as dde
    except Exception as error:  # noqa: BLE001 - reported in the table
        return f"deepxde does not import: {type(error).__name__}: {error}"
    from deepxde.backend import backend_name

    if backend_name != dde_backend:
        return f"deepxde runs on its {backend_name} backend in this process"
    if dde_backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=False)
        def laplacian(x):
            dde.grad.clear()
            y = model(x, training=False)
            d = x.shape[1]
            return tf.add_n([dde.grad.hessian(y, x, i=i, j=i) for i in range(d)])

        return laplacian
    if dde_backend == "pytorch":

        def laplacian(x):
            dde.grad.clear()
            x = x.detach().requires_grad_(True)
            y = model(x, training=False)
            d = x.shape[1]
            return sum(dde.grad.hessian(y, x, i=i, j=i) for i in range(d)).detach()

        return laplacian
    import jax

    def pointwise(xi):
        return one(state, xi)

    def laplacian(x):
        dde.grad.clear()
        y = jax.vmap(pointwise)(x)
        d = x.shape[1]
        total = 0
        for i in range(d):
            total = total + dde.grad.hessian((y, pointwise), x, i=i, j=i)[0]
        return total

    return laplacian


# ------------------------------------------------------------------------------------------ timing


def _numpy(t):
    import keras
    import numpy as np

    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)


def _first(fn, x):
    start = time.perf_counter()
    result = _numpy(fn(x))
    return time.perf_counter() - start, result


def _steady(timed: dict, repeats: int, budget_s: float = 60.0, block_s: float = 0.05) -> dict:
    """Median seconds per call of each `name: (fn, x)`, in interleaved rounds, the order rotated
    every round; a block is as many calls as take `block_s`."""
    inner = {}
    for name, (fn, x) in timed.items():
        start = time.perf_counter()
        _numpy(fn(x))
        inner[name] = max(1, min(100, int(block_s / max(time.perf_counter() - start, 1e-7))))
    times = {name: [] for name in timed}
    names = list(timed)
    deadline = time.perf_counter() + budget_s
    for round_ in range(repeats):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            fn, x = timed[name]
            start = time.perf_counter()
            for _ in range(inner[name]):
                _numpy(fn(x))
            times[name].append((time.perf_counter() - start) / inner[name])
        if round_ >= 2 and time.perf_counter() > deadline:
            break
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------------------------- one backend


def jacket_functions(case: str, model) -> dict:
    import jacket

    kind = case.split("_")[0]
    if kind == "lap":
        return {
            "jacket auto": lambda x: jacket.laplacian(model, x),
            "jacket forward": lambda x: jacket.laplacian(model, x, method="forward"),
            "jacket hessian": lambda x: jacket.laplacian(model, x, method="hessian"),
        }
    if kind == "hess":
        return {"jacket auto": lambda x: jacket.hessian(model, x)}
    return {"jacket auto": lambda x: jacket.divergence(model, x)}


def run_case(case: str, repeats: int, backend: str) -> dict:
    import numpy as np

    model, x = build(case)
    row = {"case": case, "backend": backend, "batch": int(x.shape[0]), "jacket": {}, "anchors": {}}
    timed = {}
    reference = None
    for name, fn in jacket_functions(case, model).items():
        first, result = _first(fn, x)
        row["jacket"][name] = {"first_s": first}
        if reference is None:
            reference = result
        timed[name] = (fn, x)
    funcs, convert, target = anchors(case, model, backend)
    row["target"] = target
    xt = convert(x)
    scale = float(np.abs(reference).max()) or 1.0
    for name, fn in funcs.items():
        if isinstance(fn, str):
            row["anchors"][name] = {"error": fn}
            continue
        try:
            first, result = _first(fn, xt)
        except Exception as error:  # noqa: BLE001 - an anchor that cannot run is reported
            row["anchors"][name] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
            continue
        diff = float(np.abs(result.reshape(reference.shape) - reference).max() / scale)
        row["anchors"][name] = {"first_s": first, "max_rel_diff": diff, "agrees": diff < 1e-3}
        timed[name] = (fn, xt)
    steady = _steady(timed, repeats)
    for name, seconds in steady.items():
        where = row["jacket"] if name.startswith("jacket") else row["anchors"]
        where[name]["ms"] = seconds * 1e3
    anchor = row["anchors"].get(target, {})
    ok = "ms" in anchor and anchor.get("agrees")
    row["ratio"] = row["jacket"]["jacket auto"]["ms"] / anchor["ms"] if ok else None
    folx = row["anchors"].get("folx.forward_laplacian", {})
    if "ms" in folx and folx.get("agrees"):
        row["ratio_folx"] = row["jacket"]["jacket auto"]["ms"] / folx["ms"]
    print(f"[{backend}] {case}: done", file=sys.stderr, flush=True)
    return row


def hutchinson_coverage(seeds: int = 200) -> dict:
    """How often the exact divergence lies within 2 standard errors of Hutchinson's estimate."""
    import numpy as np

    import jacket

    model = tanh_mlp(16, (32,), 16)
    x = np.random.default_rng(1).uniform(-1, 1, (8, 16)).astype("float32")
    exact = _numpy(jacket.divergence(model, x))
    inside = np.zeros(len(x))
    for seed in range(seeds):
        value, stderr = jacket.divergence(model, x, method="hutchinson", seed=seed)
        inside += np.abs(_numpy(value) - exact) <= 2 * _numpy(stderr)
    coverage = inside / seeds
    return {"seeds": seeds, "mean": float(coverage.mean()), "min": float(coverage.min())}


def run_child(cases, repeats: int) -> dict:
    import keras

    backend = keras.backend.backend()
    rows = [run_case(case, repeats, backend) for case in cases]
    return {
        "backend": backend,
        "machine": _anchors_module().machine(),
        "rows": rows,
        "hutchinson": hutchinson_coverage(),
    }


# --------------------------------------------------------------------------------- all backends


def print_table(results) -> None:
    print()
    print(
        "Second order (steady-state ms, medians of interleaved rounds; ratio = jacket auto / target)"
    )
    print(
        f"{'backend':<11}{'case':<10}{'auto':>9}{'forward':>9}{'hessian':>9}{'first s':>8}  "
        f"{'target one-liner':<42}{'ms':>9}{'ratio':>8}{'goal':>6}  others (ms)"
    )
    for result in results:
        for row in result["rows"]:
            j = row["jacket"]
            cells = "".join(
                f"{j[name]['ms']:>9.2f}" if name in j else f"{'-':>9}"
                for name in ("jacket auto", "jacket forward", "jacket hessian")
            )
            target = row["anchors"].get(row["target"], {})
            target_ms = f"{target['ms']:>9.2f}" if "ms" in target else f"{'-':>9}"
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
            others = []
            for name, a in row["anchors"].items():
                if name == row["target"]:
                    continue
                if "ms" in a:
                    flag = "" if a["agrees"] else f" (disagrees {a['max_rel_diff']:.1e})"
                    others.append(f"{name} {a['ms']:.2f}{flag}")
                else:
                    others.append(f"{name}: {' '.join(a['error'].split())[:70]}")
            if "ratio_folx" in row:
                others.append(f"auto/folx {row['ratio_folx']:.2f}x (goal 1.2)")
            print(
                f"{row['backend']:<11}{row['case']:<10}{cells}{j['jacket auto']['first_s']:>8.2f}  "
                f"{row['target'][:41]:<42}{target_ms}{ratio:>8}{TARGETS[row['case']]:>6.1f}  "
                + "; ".join(others)
            )
        h = result["hutchinson"]
        print(
            f"{result['backend']:<11}Hutchinson divergence: exact value within 2 standard errors "
            f"in {100 * h['mean']:.1f}% of {h['seeds']} seeds (worst sample {100 * h['min']:.1f}%;"
            " goal >= 90%)"
        )


def run_backends(backends, out: Path, repeats: int, cases=None) -> list[dict]:
    out.mkdir(exist_ok=True)
    results = []
    for backend in backends:
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            print(f"[skip] {backend}: not installed")
            continue
        path = out / f"second-order-{backend}.json"
        command = [sys.executable, str(HERE / "second_order.py"), "--child", "--json", str(path)]
        command += ["--repeats", str(repeats)]
        if cases:
            command += ["--cases", *cases]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        subprocess.run(command, check=True, env=env)
        results.append(json.loads(path.read_text()))
    print_table(results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--child", action="store_true", help="run the active backend only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        result = run_child(args.cases, args.repeats)
        text = json.dumps(result, indent=1)
        if args.json:
            Path(args.json).write_text(text)  # the parent prints every backend's table
        else:
            print_table([result])
        return 0
    run_backends(args.backends, Path(args.out), args.repeats, args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
