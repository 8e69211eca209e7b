"""Sparse Jacobians of image-to-image models against the best dense anchor of each backend.

`python benchmarks/sparse.py` runs every installed backend, each in its own process (Keras fixes the
backend per process), writes `bench-results/sparse-<backend>.json` and prints one table;
`benchmarks/run.py` (`make bench`) calls it after the anchor table. One backend alone:
`KERAS_BACKEND=jax python benchmarks/sparse.py --child`.

Per case (batch 1): detection and coloring timed alone on a fresh model; the sparse Jacobian's
first call (detection, coloring, tracing, the coupling probe and the run) and its steady-state
median; the dense anchors of `benchmarks/anchors.py` (TensorFlow: `tf.function(batch_jacobian)`;
JAX: `jit(vmap(jacrev))`, `jit(vmap(jacfwd))`; PyTorch: `torch.func.vmap(jacrev)`,
`autograd.functional.jacobian(vectorize=True)`), each checked to agree with the sparse result before
it counts. "amortised" is the steady state plus detection and coloring spread over 10 calls; the
ratio is amortised over the best agreeing anchor (the target: <= 0.05 at 64x64). Memory: the sparse
result (values and the shared pattern's indices) against the dense `(batch, out_size, in_size)`.
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
AMORTISED_OVER = 10


# ------------------------------------------------------------------------------------------- cases


def conv_stack(size: int):
    """3 x Conv2D 3x3 "same" on `size x size x 1`: out = in (a denoiser's shape)."""
    import keras

    return keras.Sequential(
        [
            keras.Input((size, size, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(1, 3, padding="same"),
        ]
    )


def small_unet(size: int):
    """Two levels: 2 x Conv2D 3x3 (8), max pooling, 2 x Conv2D 3x3 (16), nearest up-sampling,
    a skip connection by concatenation, Conv2D 3x3 (8), Conv2D 1x1 (1)."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1))
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(c1)
    c2 = layers.Conv2D(16, 3, padding="same", activation="relu")(layers.MaxPooling2D(2)(c1))
    c2 = layers.Conv2D(16, 3, padding="same", activation="relu")(c2)
    merged = layers.Concatenate()([layers.UpSampling2D(2)(c2), c1])
    c3 = layers.Conv2D(8, 3, padding="same", activation="relu")(merged)
    return keras.Model(inputs, layers.Conv2D(1, 1)(c3))


CASES = {
    "conv3x3x3_32": (lambda: conv_stack(32), (32, 32, 1)),
    "conv3x3x3_64": (lambda: conv_stack(64), (64, 64, 1)),
    "unet_64": (lambda: small_unet(64), (64, 64, 1)),
}


# ------------------------------------------------------------------------------------ one backend


def _time(fn, x, repeats: int, budget_s: float = 20.0):
    """(first call s, steady-state median s, first result): the sparse result is NumPy already."""
    start = time.perf_counter()
    first_result = fn(x)
    first = time.perf_counter() - start
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return first, statistics.median(times), first_result


def _anchors_module():
    spec = importlib.util.spec_from_file_location("jacket_bench_anchors", HERE / "anchors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_child(case_names, repeats: int) -> dict:
    import keras
    import numpy as np

    import jacket
    from jacket import sparse

    anchors = _anchors_module()
    rows = []
    for name in case_names:
        build, in_shape = CASES[name]
        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).random((1,) + in_shape).astype("float32")

        fresh = build()  # detection and coloring alone, nothing cached yet
        start = time.perf_counter()
        pattern = jacket.sparsity(fresh, in_shape)
        detect_s = time.perf_counter() - start
        start = time.perf_counter()
        columns = sparse.color(pattern, "columns")
        rows_colors = sparse.color(pattern, "rows")
        color_s = time.perf_counter() - start

        keras.utils.set_random_seed(0)
        model = build()
        fn = jacket.jacobian_fn(model, sparse=True)
        with anchors.PeakRSS() as memory:
            first, steady, S = _time(fn, x, repeats)
        reference = S.to_dense(flatten=True).astype(np.float64)
        amortised = steady + (detect_s + color_s) / AMORTISED_OVER
        row = {
            "case": name,
            "backend": anchors.BACKEND,
            "in_shape": list(in_shape),
            "detect_ms": detect_s * 1e3,
            "color_ms": color_s * 1e3,
            "colors_columns": int(columns.max()) + 1,
            "colors_rows": int(rows_colors.max()) + 1,
            "plan": fn.plan(x).describe(),
            "nnz": int(pattern.nnz),
            "density": pattern.nnz / (pattern.shape[0] * pattern.shape[1]),
            "sparse_first_s": first,
            "sparse_ms": steady * 1e3,
            "sparse_peak_mb": memory.peak / 2**20,
            "amortised_ms": amortised * 1e3,
            "sparse_result_mb": S.nbytes / 2**20,
            "dense_result_mb": S.dense_nbytes / 2**20,
            "anchors": {},
        }
        funcs, convert = anchors.anchors(model)
        xt = convert(x)
        size = int(np.prod(in_shape))
        for anchor, afn in funcs.items():
            if "eager" in anchor or "seed loop" in anchor:
                continue  # slower forms of the same anchors: timed in benchmarks/anchors.py
            reason = anchors._skip(anchor, 1, size, size)
            if reason:
                row["anchors"][anchor] = {"error": f"skipped: {reason}"}
                continue
            try:
                a_first, a_steady, A = anchors._time(afn, xt, max(3, repeats // 3))
            except Exception as error:  # noqa: BLE001 - an anchor that cannot run is reported
                row["anchors"][anchor] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                continue
            A = anchors._numpy(A).reshape(reference.shape)
            agree = float(np.abs(A - reference).max() / (np.abs(reference).max() or 1.0))
            row["anchors"][anchor] = {
                "ms": a_steady * 1e3,
                "first_s": a_first,
                "max_rel_diff": agree,
                "agrees": agree < 1e-4,
            }
        timed = [a["ms"] for a in row["anchors"].values() if "ms" in a and a["agrees"]]
        row["best_anchor_ms"] = min(timed) if timed else None
        row["ratio_amortised"] = amortised * 1e3 / min(timed) if timed else None
        row["ratio_steady"] = steady * 1e3 / min(timed) if timed else None
        rows.append(row)
        print(f"[{anchors.BACKEND}] {name}: done", file=sys.stderr, flush=True)
    return {"backend": anchors.BACKEND, "machine": anchors.machine(), "rows": rows}


# --------------------------------------------------------------------------------- all backends


def run_backends(backends, out: Path, repeats: int, cases=None) -> list[dict]:
    out.mkdir(exist_ok=True)
    results = []
    for backend in backends:
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            print(f"[skip] {backend}: not installed")
            continue
        path = out / f"sparse-{backend}.json"
        command = [sys.executable, str(HERE / "sparse.py"), "--child", "--json", str(path)]
        command += ["--repeats", str(repeats)]
        if cases:
            command += ["--cases", *cases]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if backend == "jax":
            env["JAX_ENABLE_X64"] = "1"
        subprocess.run(command, check=True, env=env)
        results.append(json.loads(path.read_text()))
    print_table(results)
    return results


def print_table(results) -> None:
    print()
    print(
        f"{'backend':<11}{'case':<14}{'detect+color ms':>16}{'colors':>8}{'first s':>9}"
        f"{'sparse ms':>10}{'amortised':>10}  {'best dense anchor':<40}{'ms':>9}{'ratio':>8}"
        f"{'MB sparse/dense':>18}"
    )
    for result in results:
        for row in result["rows"]:
            best = None
            for name, a in row["anchors"].items():
                if "ms" in a and a["agrees"] and (best is None or a["ms"] < best[1]["ms"]):
                    best = (name, a)
            anchor = f"{best[0]:<40}{best[1]['ms']:>9.0f}" if best else f"{'-':<40}{'-':>9}"
            ratio = f"{row['ratio_amortised']:.3f}x" if row["ratio_amortised"] else "-"
            colors = min(row["colors_columns"], row["colors_rows"])
            print(
                f"{row['backend']:<11}{row['case']:<14}"
                f"{row['detect_ms']:>9.0f}+{row['color_ms']:<6.0f}{colors:>8}"
                f"{row['sparse_first_s']:>9.2f}{row['sparse_ms']:>10.1f}{row['amortised_ms']:>10.1f}"
                f"  {anchor}{ratio:>8}"
                f"{row['sparse_result_mb']:>10.2f}/{row['dense_result_mb']:<7.1f}"
            )
            for name, a in row["anchors"].items():
                if "error" in a or not a.get("agrees", True):
                    why = a.get("error") or f"disagrees ({a['max_rel_diff']:.2g})"
                    print(f"{'':<25}  {name}: {' '.join(why.split())[:90]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="run the active backend only")
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=str, default=None, help="(--child) write results here")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    if not args.child:
        run_backends(args.backends, Path(args.out), args.repeats, args.cases)
        return 0
    result = run_child(args.cases, args.repeats)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
