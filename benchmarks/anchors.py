"""jacket against each framework's own per-sample Jacobian, timed in the same process.

Run one backend per process (Keras fixes it): `KERAS_BACKEND=jax python benchmarks/anchors.py`.
`benchmarks/run.py` runs all three and prints one table. Every anchor's result is checked to agree
with jacket's before it is timed; steady-state times are medians after warm-up, and the first call
(trace + compile + run) is reported apart, with the peak memory it took. Steady-state times of
jacket, of jacket with each strategy forced, and of every anchor are taken in interleaved rounds
(one call of each per round), so that the machine's drifts hit all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import jacket  # noqa: E402
from jacket.engine.state import state_of  # noqa: E402

BACKEND = keras.backend.backend()


# ------------------------------------------------------------------------------------------- cases


def seed_mlp():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(10, activation="relu"), keras.layers.Dense(2)]
    )


def image_to_image():
    """3 x Conv2D 3x3 "same" on 32x32x1: out = in = 1024 (a denoiser's shape)."""
    return keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(1, 3, padding="same"),
        ]
    )


def mobilenet():
    return keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10)


def lstm():
    return keras.Sequential([keras.Input((20, 8)), keras.layers.LSTM(32), keras.layers.Dense(4)])


def mlp_784_float64():
    model = keras.Sequential(
        [
            keras.Input((784,), dtype="float64"),
            keras.layers.Dense(512, activation="relu", dtype="float64"),
            keras.layers.Dense(512, activation="relu", dtype="float64"),
            keras.layers.Dense(10, dtype="float64"),
        ]
    )
    return model


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


def _application(name):
    def build():
        constructor = getattr(keras.applications, name)
        return constructor(weights=None, input_shape=(32, 32, 3), classes=10)

    build.__name__ = name
    return build


def small_vit():
    """A ViT from keras_hub, built from its config (no weights): 32x32x3, 4x4 patches, 4 blocks."""
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
        mlp_dim=128,
    )  # fmt: skip
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, keras.layers.Dense(10)(backbone(inputs)[:, 0]))


def attention():
    """MultiHeadAttention + LayerNormalization on (16, 8) tokens, pooled to 4 outputs."""
    inputs = keras.Input((16, 8))
    h = keras.layers.MultiHeadAttention(2, 4)(inputs, inputs)
    h = keras.layers.LayerNormalization()(h + inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h)))


def denoiser():
    """3 x Conv2D(16, 3x3, "same", tanh), 32x32x1 -> 32x32x1: an image-to-image net."""
    layers = [keras.layers.Conv2D(16, 3, padding="same", activation="tanh") for _ in range(2)]
    return keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            *layers,
            keras.layers.Conv2D(1, 3, padding="same", activation="tanh"),
        ]
    )


def unet():
    """A small U-Net, 32x32x1 -> 32x32x1: two max-pooling steps down, two bilinear up-sampling
    steps up, skip connections by concatenation."""
    conv = partial(keras.layers.Conv2D, kernel_size=3, padding="same", activation="relu")
    up = partial(keras.layers.UpSampling2D, 2, interpolation="bilinear")
    inputs = keras.Input((32, 32, 1))
    c1 = conv(8)(inputs)
    c2 = conv(16)(keras.layers.MaxPooling2D(2)(c1))
    h = conv(16)(keras.layers.MaxPooling2D(2)(c2))
    h = conv(16)(keras.layers.Concatenate()([up()(h), c2]))
    h = conv(8)(keras.layers.Concatenate()([up()(h), c1]))
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(h))


def gru():
    """A recurrent sequence classifier: a bidirectional GRU(16) over 20 steps of 8 features, a
    GRU(16) on its sequence, 4 outputs."""
    return keras.Sequential(
        [
            keras.Input((20, 8)),
            keras.layers.Bidirectional(keras.layers.GRU(16, return_sequences=True)),
            keras.layers.GRU(16),
            keras.layers.Dense(4),
        ]
    )


# name -> (builder, per-sample input shape, batch, input dtype)
CASES = {
    "seed_mlp_b1": (seed_mlp, (5,), 1, "float32"),
    "seed_cnn_b1": (seed_cnn, (28, 28, 1), 1, "float32"),
    "seed_cnn_b32": (seed_cnn, (28, 28, 1), 32, "float32"),
    "mlp784_b64": (mlp_784, (784,), 64, "float32"),
    "mlp784_b64_f64": (mlp_784_float64, (784,), 64, "float64"),
    "img2img_b1": (image_to_image, (32, 32, 1), 1, "float32"),
    "lstm_b16": (lstm, (20, 8), 16, "float32"),
    "mobilenet_b8": (mobilenet, (64, 64, 3), 8, "float32"),
}
# the models people bring (keras.applications with weights=None, a keras_hub backbone, attention,
# an image-to-image net), each at a small and a larger batch: `--cases real`
for _name, _tag in [
    ("ResNet50", "resnet50"),
    ("MobileNetV3Small", "mobilenetv3s"),
    ("EfficientNetB0", "efficientnetb0"),
    ("DenseNet121", "densenet121"),
    ("ConvNeXtTiny", "convnexttiny"),
]:
    for _batch in (2, 16):
        CASES[f"{_tag}_b{_batch}"] = (_application(_name), (32, 32, 3), _batch, "float32")
for _batch in (2, 16):
    CASES[f"vit_b{_batch}"] = (small_vit, (32, 32, 3), _batch, "float32")
    CASES[f"attention_b{_batch}"] = (attention, (16, 8), _batch, "float32")
    CASES[f"gru_b{_batch}"] = (gru, (20, 8), _batch, "float32")
for _batch in (1, 8):
    CASES[f"denoiser_b{_batch}"] = (denoiser, (32, 32, 1), _batch, "float32")
    CASES[f"unet_b{_batch}"] = (unet, (32, 32, 1), _batch, "float32")
REAL_CASES = [name for name in CASES if name.split("_b")[0] in (
    "resnet50", "mobilenetv3s", "efficientnetb0", "densenet121", "convnexttiny", "vit",
    "attention", "denoiser", "unet", "gru",
)]  # fmt: skip
DEFAULT_CASES = [n for n in CASES if n != "mobilenet_b8" and n not in REAL_CASES]


def forward_flops(model) -> int:
    """Multiply-adds x 2 of one sample's forward pass, counted on Dense, convolution and LSTM
    layers (the rest is elementwise and left out): the FLOP limit's numerator."""
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        try:
            out = layer.output.shape[1:]
            inp = layer.input.shape[1:]
        except (AttributeError, ValueError):
            continue
        name = type(layer).__name__
        if name == "Dense":
            total += 2 * int(np.prod(inp)) * layer.units
        elif name in ("Conv1D", "Conv2D", "Conv3D"):
            k = int(np.prod(layer.kernel_size))
            total += 2 * k * int(inp[-1]) * int(np.prod(out))
        elif name == "DepthwiseConv2D":
            total += 2 * int(np.prod(layer.kernel_size)) * int(np.prod(out))
        elif name in ("LSTM", "GRU"):
            steps, features = int(inp[0]), int(inp[1])
            gates = 4 if name == "LSTM" else 3
            total += 2 * steps * gates * layer.units * (features + layer.units)
    return total


def sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """The machine's float32 matrix-product rate, measured now with NumPy."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeakRSS:
    """Peak resident memory above the starting point, sampled every millisecond in a thread."""

    def __init__(self):
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import threading

        self._base = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss() - self._base)
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)


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


def _from_host(fn, convert):
    """`fn` (a one-liner that takes the backend's tensors) called on a NumPy array.

    NOTE: [Every column starts from the same NumPy array]
    jacket's columns are timed on the NumPy array a user holds, and each call moves it to the
    backend; the anchors were timed on a tensor converted once, outside the timing. On the seed
    MLP at batch 1 (JAX, 2-core CPU, `timeit`, medians of 9 interleaved blocks) that alone was
    10 us of a 25-36 us call: `jit(vmap(jacrev))` took 25.5 us on a JAX array and 36.0 us on the
    NumPy array. Each steady column now takes the same NumPy array and returns a host array
    (`_host`), so every column pays the same two moves. A JAX one-liner gets the array as it
    is, since `jax.jit` takes NumPy arrays itself: through `jnp.asarray` first, the same call
    took 152-166 us against 36 us.
    """
    if BACKEND == "jax":
        return fn
    return lambda x: fn(convert(x))


def _host(t):
    """The result as a host array in its own dtype: what a timed call must produce. (A float64
    copy, as `_numpy` makes for the comparisons, cost 1 ms of the 9.5 ms of the seed CNN at batch
    32 on JAX, a conversion neither jacket nor a framework's one-liner needs.)"""
    return keras.ops.convert_to_numpy(t)


def _first(fn, x, memory):
    """(seconds, result) of the first call (trace + compile + run), peak memory sampled."""
    with memory:
        start = time.perf_counter()
        result = fn(x)
        _host(result)
    return time.perf_counter() - start, result


def _steady(timed: dict, repeats: int, budget_s: float = 60.0, block_s: float = 0.02) -> dict:
    """Median seconds per call of each candidate, measured in interleaved rounds (one timed block
    of each per round), so that drifts of the machine (frequency, other load, allocator state) hit
    all alike. A block is as many back-to-back calls as take `block_s` (at least one), as `timeit`'s
    autorange does, and comes right after one untimed call of the same candidate.

    NOTE: [The default column and the same plan forced differed]
    With a fixed cyclic order (even rotated every round) each candidate always ran right after the
    same neighbour: jacket's default right after the last anchor of the row (on JAX
    `jit(vmap(jacfwd))`, which builds the largest intermediates), and its block measured 10-47% above
    the identical forced plan, which followed another jacket call. Freeing and re-faulting that
    neighbour's memory, and its caches, were paid by the first calls of the next block. Now the
    order is shuffled every round (seeded), and every block starts after one untimed call, so
    that no candidate pays for another's aftermath.
    """
    inner = {}
    for name, (fn, x) in timed.items():
        start = time.perf_counter()
        _host(fn(x))
        one = time.perf_counter() - start
        inner[name] = max(1, min(1000, int(block_s / max(one, 1e-7))))
    times = {name: [] for name in timed}
    deadline = time.perf_counter() + budget_s
    names = list(timed)
    order = np.random.default_rng(0)
    for round_ in range(repeats):
        for name in order.permutation(names):
            fn, x = timed[name]
            _host(fn(x))  # untimed: whatever the previous candidate left is paid here
            n = inner[name]
            start = time.perf_counter()
            for _ in range(n):
                _host(fn(x))
            times[name].append((time.perf_counter() - start) / n)
        if round_ >= 2 and time.perf_counter() > deadline:
            break
    return {name: statistics.median(values) for name, values in times.items()}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _skip(anchor, batch, out_size, in_size):
    """Anchors whose cost makes them pointless at this size (said in the output, not hidden)."""
    if anchor == "seed loop (fixed)" and batch * out_size > 64:
        return "one gradient per (sample, output): minutes"
    if "jacfwd" in anchor and (in_size > 4096 or in_size > 64 * out_size):
        return f"{in_size} forward passes (reverse mode needs {out_size})"
    if "autograd.functional" in anchor and (batch * out_size) * (batch * in_size) > 5e7:
        return "builds the full cross-sample Jacobian"
    return None


def warm_up():
    """One throwaway Jacobian by jacket and by every anchor, so that no case's first call pays for
    the process's first trace (framework start-up) on behalf of the others."""
    model = seed_mlp()
    x = np.random.default_rng(1).random((3, 5)).astype("float32")
    _numpy(jacket.jacobian(model, x))
    funcs, convert = anchors(model)
    for fn in funcs.values():
        try:
            _numpy(fn(convert(x)))
        except Exception:  # noqa: BLE001 - reported when the real cases run
            pass


def _fresh(build):
    """The case's model built anew, with the same names (Keras's name counters reset) and the same
    weights: a new object, so nothing jacket compiled for another is shared with it."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return build()


def _layer_rules_off():
    """Plans made meanwhile run no layer rule (NOTE: [Layer rules] in `jacket.engine.rules`): the
    model's kernels, compiled then, keep that choice afterwards."""
    return mock.patch.dict(os.environ, {"JACKET_LAYER_RULES": "off"})


def _settle(jac, x) -> tuple[int, float]:
    """Calls of the default until its plan is settled (NOTE: [Measured plans]): (calls, seconds)."""
    calls, start = 0, time.perf_counter()
    while not jac.plan(x).settled and calls < 50:
        _numpy(jac(x))
        calls += 1
    return calls, time.perf_counter() - start


def first_alone(name: str, who: str, cache_dir: str) -> float:
    """Seconds of one first call of `who` ("jacket" or an anchor's name) on case `name`, in a new
    process after `warm_up`, with `cache_dir` as jacket's plan cache. jacket's process then calls
    until its plan settles, so that the plan cache holds it for the next process.

    NOTE: [First calls, each in its own process]
    In one process, whichever first call comes first pays what the process does once per kind of
    model (keras_hub's first trace of its layers, the first lowering of each primitive): on the
    ViT at batch 2 on JAX, jacket's first call took 4.96 s before `jit(vmap(jacrev))`'s 2.69 s,
    and 4.37 s after its 3.16 s. So the first calls that the ratios use are each timed in a new
    process, after the same warm-up, jacket's against the row's native one-liner (its fastest
    agreeing anchor); the in-process ones are kept beside them.
    """
    command = [sys.executable, os.path.abspath(__file__), "--first-alone", name, who]
    env = {**os.environ, "JACKET_CACHE_DIR": cache_dir}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["first_s"])


def _first_alone_child(name: str, who: str) -> None:
    warm_up()
    build, in_shape, batch, dtype = CASES[name]
    model = _fresh(build)
    x = np.random.default_rng(0).random((batch,) + in_shape).astype(dtype)
    if who == "jacket":
        fn = jacket.jacobian_fn(model)
    else:
        funcs, convert = anchors(model)
        fn, x = funcs[who], convert(x)
    seconds, _ = _first(fn, x, _Nothing())
    if who == "jacket":
        _settle(fn, x)
    print(json.dumps({"first_s": seconds}))


def _firsts_alone(name: str, row: dict, repeats: int) -> dict:
    """`first_alone`, the median of `repeats` processes each: for jacket with an empty plan
    cache, then with the plan cache its process left, and for the row's native one-liner (the
    fastest agreeing anchor in steady state). Across processes one first call varies more than
    within one: jacket's on the ViT on TensorFlow took 5.1, 4.1 and 2.8 s in three in a row."""
    alone = {"jacket": [], "jacket (plan cached)": []}
    failures = row.setdefault("first_alone_failures", [])

    def timed_alone(who, cache_dir, into):
        try:
            into.append(first_alone(name, who, cache_dir))
        except RuntimeError as error:  # reported with the row; the run goes on
            failures.append(f"{who}: {error}")

    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="jacket-first-") as cache_dir:
            timed_alone("jacket", cache_dir, alone["jacket"])
            timed_alone("jacket", cache_dir, alone["jacket (plan cached)"])
    timed = {a: v["ms"] for a, v in row["anchors"].items() if "ms" in v and v["agrees"]}
    if timed:
        anchor = min(timed, key=timed.get)
        alone[anchor] = []
        with tempfile.TemporaryDirectory(prefix="jacket-first-") as cache_dir:
            for _ in range(repeats):
                timed_alone(anchor, cache_dir, alone[anchor])
    return {who: statistics.median(seconds) for who, seconds in alone.items() if seconds}


def run(case_names, repeats, strategies=True, alone=0):
    """One row per case: jacket's default (first call with an empty plan cache, the calls it
    takes to settle, steady state, and a first call that finds the plan cache), each strategy
    forced and autotune (each on a fresh copy of the model, so their first calls compile their
    own kernels), and the anchors; steady states timed together (`_steady`)."""
    rate = sgemm_gflops()
    warm_up()
    rows = []
    for name in case_names:
        build, in_shape, batch, dtype = CASES[name]
        model = _fresh(build)
        x = np.random.default_rng(0).random((batch,) + in_shape).astype(dtype)
        jac = jacket.jacobian_fn(model)
        memory = PeakRSS()
        first, J = _first(jac, x, memory)
        reference = _numpy(J)
        first_source = jac.plan(x).source
        settle_calls, settle_s = _settle(jac, x)
        in_size = int(np.prod(in_shape))
        out_size = int(np.prod(reference.shape[1:])) // in_size
        flops = batch * forward_flops(model) * (1 + min(in_size, out_size))
        limit_ms = flops / (rate * 1e9) * 1e3
        report = jac.plan(x)
        row = {
            "case": name,
            "backend": BACKEND,
            "dtype": dtype,
            "jacket_first_s": first,
            "jacket_first_source": first_source,
            "jacket_peak_mb": memory.peak / 2**20,
            "settle_calls": settle_calls,
            "settle_s": settle_s,
            "source": report.source,
            "flop_limit_ms": limit_ms,
            "plan": report.describe(),
            "anchors": {},
            "strategies": {},
        }
        timed = {"jacket": (jac, x)}
        if state_of(model, False).rule_layers():  # jacket's default with its layer rules off
            off = jacket.jacobian_fn(_fresh(build))
            with _layer_rules_off():
                off_first, _ = _first(off, x, _Nothing())
                _settle(off, x)
            row["rules_off"] = {"first_s": off_first, "plan": off.plan(x).describe()}
            timed["rules_off"] = (off, x)
        for strategy in ("replicate", "vmap", "loop", "autotune") if strategies else ():
            fn = jacket.jacobian_fn(_fresh(build), strategy=strategy)
            try:
                s_first, S = _first(fn, x, _Nothing())
            except Exception as error:  # noqa: BLE001 - a strategy that cannot run is reported
                row["strategies"][strategy] = {"error": f"{type(error).__name__}: {error}"[:160]}
                continue
            row["strategies"][strategy] = {
                "first_s": s_first,
                "plan": fn.plan(x).describe(),
                "agrees": bool(np.allclose(_numpy(S), reference, rtol=1e-4, atol=1e-6)),
            }
            timed[strategy] = (fn, x)
        funcs, convert = anchors(model)
        xt = convert(x)
        for anchor, fn in funcs.items():
            reason = _skip(anchor, batch, out_size, in_size)
            if reason:
                row["anchors"][anchor] = {"error": f"skipped: {reason}"}
                continue
            try:
                a_memory = PeakRSS()
                a_first, A = _first(fn, xt, a_memory)
            except Exception as error:  # noqa: BLE001 - an anchor that cannot run is reported
                row["anchors"][anchor] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                continue
            A = _numpy(A).reshape(reference.shape)
            scale = np.abs(reference).max() or 1.0
            agree = float(np.abs(A - reference).max() / scale)
            tolerance = 1e-10 if dtype == "float64" else 1e-4
            row["anchors"][anchor] = {
                "first_s": a_first,
                "peak_mb": a_memory.peak / 2**20,
                "max_rel_diff": agree,
                "agrees": agree < tolerance,
            }
            timed[anchor] = (_from_host(fn, convert), x)
        medians = _steady(timed, repeats)
        steady = medians.pop("jacket")
        if "rules_off" in medians:
            row["rules_off"]["ms"] = medians.pop("rules_off") * 1e3
        row["jacket_ms"] = steady * 1e3
        row["x_flop_limit"] = steady * 1e3 / limit_ms if limit_ms > 0 else None
        for strategy in row["strategies"]:
            if strategy in medians:
                row["strategies"][strategy]["ms"] = medians.pop(strategy) * 1e3
        for anchor, seconds in medians.items():
            row["anchors"][anchor]["ms"] = seconds * 1e3
        agreeing = [a["ms"] for a in row["anchors"].values() if "ms" in a and a["agrees"]]
        row["best_anchor_ms"] = min(agreeing) if agreeing else None
        row["ratio_to_best"] = steady * 1e3 / min(agreeing) if agreeing else None
        forced = {k: v["ms"] for k, v in row["strategies"].items() if "ms" in v and v.get("agrees")}
        row["best_forced"] = min(forced, key=forced.get) if forced else None
        row["ratio_to_forced"] = steady * 1e3 / min(forced.values()) if forced else None
        # a new process would find the plan in the cache: the same model built anew, first call
        again = jacket.jacobian_fn(_fresh(build))
        cached_first, _ = _first(again, x, _Nothing())
        row["cached_first_s"] = cached_first
        row["cached_source"] = again.plan(x).source
        if alone:
            row["first_alone"] = _firsts_alone(name, row, alone)
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
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="names, or 'all'")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=str, default=None, help="write results here")
    parser.add_argument(
        "--first-alone", nargs=2, metavar=("CASE", "WHO"),
        help="(internal) time one first call in this process (NOTE: [First calls, each in ...])",
    )  # fmt: skip
    parser.add_argument(
        "--alone", type=int, default=1, metavar="N",
        help="first calls each timed in N new processes per kind, the median (three kinds per "
        "case); 0 skips them",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.first_alone:
        _first_alone_child(*args.first_alone)
        return 0
    aliases = {
        "all": DEFAULT_CASES + ["mobilenet_b8"],
        "real": REAL_CASES,
        "default": DEFAULT_CASES,
    }
    cases = [c for name in args.cases for c in aliases.get(name, [name])]
    rows = run(cases, args.repeats, alone=args.alone)
    result = {"backend": BACKEND, "machine": machine(), "rows": rows}
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
