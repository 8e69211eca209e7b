"""Memory: the default budget from free memory, results too large refused before any work, and
passes that run out of memory retried with half the chunk (faults injected), on every backend."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers
from memory_probe import working_memory
from oracles import assert_close, central_differences, to_numpy
from scenarios import seed_mlp

import jacket
from jacket import checks
from jacket.engine import kernels as _kernels
from jacket.engine import memory as _memory_module
from jacket.engine import options as _options

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def fresh_budget():
    def clear():
        _memory_module.default_memory_budget.cache_clear()
        _options._CHECKED.clear()  # checked options hold the budget they resolved

    clear()
    yield
    clear()


@pytest.mark.parametrize(
    "device, host, expected",
    [
        (None, 8 * GiB, 2 * GiB),  # a quarter of the host's available memory
        (None, 100 * MiB, 64 * MiB),  # at least 64 MiB
        (None, 100 * GiB, 4 * GiB),  # at most 4 GiB
        (None, None, 1 * GiB),  # nothing measurable
        (2 * GiB, 100 * GiB, 512 * MiB),  # the accelerator's free memory first
    ],
)
def test_default_budget_is_a_fraction_of_free_memory(
    device, host, expected, monkeypatch, fresh_budget
):
    from jacket.backends import memory as _memory

    monkeypatch.setattr(_memory, "device_free_memory", lambda name: device)
    monkeypatch.setattr(_memory_module, "available_memory", lambda: host)
    assert _memory_module.default_memory_budget() == expected
    monkeypatch.setattr(_memory_module, "available_memory", lambda: 2 * host if host else 3 * GiB)
    assert _memory_module.default_memory_budget() == expected  # measured once per process


def test_available_memory_reads_the_host(fresh_budget):
    with open("/proc/meminfo") as file:
        fields = dict(line.split(":", 1) for line in file)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    total = int(fields["MemTotal"].split()[0]) * 1024
    measured = _memory_module.available_memory()
    assert 0 < measured <= total
    assert abs(measured - available) < 0.25 * total  # other processes move it a little
    assert 64 * MiB <= _memory_module.default_memory_budget() <= 4 * GiB


def test_default_budget_sets_the_chunk(monkeypatch, fresh_budget, rng):
    monkeypatch.setattr(_memory_module, "available_memory", lambda: 4 * 200_000)  # 64 MiB floor
    from jacket.backends import memory as _memory

    monkeypatch.setattr(_memory, "device_free_memory", lambda name: None)
    model = keras.Sequential([layers.Input((4000,)), layers.Dense(300)])
    x = rng.normal(size=(64, 4000)).astype("float32")
    default = jacket.jacobian_fn(model).plan(x)
    explicit = jacket.jacobian_fn(model, memory_budget=64 * MiB).plan(x)
    assert default == explicit
    assert default.n_chunks > 1


def test_a_result_too_large_is_refused_with_its_size(monkeypatch, rng):
    monkeypatch.setattr(_memory_module, "available_memory", lambda: 10 * MiB)
    model = keras.Sequential([layers.Input((1000,)), layers.Dense(10)])
    x = rng.normal(size=(320, 1000)).astype("float32")
    size = 320 * 10 * 1000 * 4  # (batch, out, in) float32: 12.2 MiB
    with pytest.raises(jacket.JacketMemoryError) as info:
        jacket.jacobian(model, x)
    message = str(info.value)
    assert checks.format_bytes(size) == "12.2 MiB"
    for words in ("12.2 MiB", "10.0 MiB", "smaller batch", "sparse=True", ".zarr", "distributed"):
        assert words in message, (words, message)
    assert isinstance(info.value, MemoryError)
    J = jacket.jacobian(model, x[:80])  # a quarter of it fits
    assert_close(J, np.broadcast_to(to_numpy(model.layers[0].kernel).T, (80, 10, 1000)), rtol=0)
    with pytest.raises(jacket.JacketMemoryError, match=r"full \(batch x batch = 40\^2\)"):
        jacket.jacobian(model, x[:40], per_sample=False)  # 40 * 40 * 10 * 1000 * 4 bytes
    with pytest.raises(jacket.JacketMemoryError, match="12.2 MiB"):
        jacket.jacobian(model, x)  # refused again: a refused signature is never cached


def _backend_out_of_memory():
    """The error the active backend raises when a device allocation fails."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    if backend == "jax":
        import jax

        return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating bytes")
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _inject(monkeypatch, error, above: int) -> list:
    """Every pass with more than `above` seeds fails with `error`; returns the chunks tried."""
    tried = []
    build = _kernels.jacobian_kernel

    def faulty(backend, plan, *args, **kwargs):
        kernel = build(backend, plan, *args, **kwargs)

        def run(call, xs, start):
            tried.append(plan.chunk)
            if plan.chunk > above:
                raise error
            return kernel(call, xs, start)

        return run

    monkeypatch.setattr(_kernels, "jacobian_kernel", faulty)
    return tried


@pytest.mark.parametrize("error", ["backend", "memory_error"])
def test_out_of_memory_is_retried_with_half_the_chunk(error, monkeypatch, rng):
    error = _backend_out_of_memory() if error == "backend" else MemoryError()
    tried = _inject(monkeypatch, error, above=2)
    model = keras.Sequential(
        [layers.Input((8,), dtype="float64"), layers.Dense(5, activation="tanh", dtype="float64")]
    )
    x = rng.normal(size=(3, 8))
    jac = jacket.jacobian_fn(model, mode="forward", chunk_size=8)  # 8 columns: 8, 4, then 2
    J = jac(x)
    assert tried[:2] == [8, 4] and set(tried[2:]) == {2}
    assert_close(J, central_differences(lambda v: model(v), x), rtol=1e-6)
    assert jac.plan(x).chunk == 2  # kept for later calls
    tried.clear()
    assert_close(jac(x + 0.5), central_differences(lambda v: model(v), x + 0.5), rtol=1e-6)
    assert set(tried) <= {2}  # no failed pass again


def test_out_of_memory_at_one_seed_per_pass_is_a_clear_error(monkeypatch, rng):
    tried = _inject(monkeypatch, _backend_out_of_memory(), above=0)
    model = seed_mlp("float64")
    with pytest.raises(jacket.JacketMemoryError, match="out of memory even with one seed per pass"):
        jacket.jacobian(model, rng.normal(size=(2, 5)), chunk_size=2)
    assert tried[0] == 2 and tried[-1] == 1


def test_other_errors_are_not_retried(monkeypatch, rng):
    tried = _inject(monkeypatch, RuntimeError("a bug, not memory"), above=0)
    with pytest.raises(RuntimeError, match="a bug, not memory"):
        jacket.jacobian(seed_mlp("float64"), rng.normal(size=(2, 5)), chunk_size=2)
    # never with fewer seeds; the planner tries one other strategy before it blames the model
    # (NOTE: [Measured plans]) and then raises the first error, unchanged
    assert set(tried) == {2} and len(tried) <= 2


# ------------------------------------------------------------------------------- measured memory

_MEMORY_SETUP = """
import keras, numpy as np, jacket
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((64,)), keras.layers.Dense(8192, activation="tanh"), keras.layers.Dense(64)]
)
x = np.random.default_rng(0).normal(size=(16, 64)).astype("float32")
small = jacket.jacobian_fn(model, memory_budget="4MB", strategy="vmap")
large = jacket.jacobian_fn(model, memory_budget="1GB", strategy="vmap")
"""
# Both plans forced: with "auto" the planner may still be measuring candidates in the measured call
# (on JAX compiling one: 13 MB), which is not the budget's business. The budget sets the chunk:
# 22 passes of 3 seeds. Beyond budget + result, a pass holds copies of a kernel (2 MiB here, the
# hidden layer's kernel transposed in the pullback). Measured peaks under "4MB" (3.8 MiB) with a
# 0.25 MiB result: 5.7 MiB (TensorFlow), 8.5-9.3 MiB (JAX, since the planner change; its "loop"
# plan 3.8 MiB), 5.2 MiB (PyTorch); and 64 / 67 / 97 MiB for all 64 seeds in one pass (budget 1 GB).
SLACK = 6 * MiB


def test_working_memory_stays_within_the_budget():
    """A real dense call under a small `memory_budget` takes no more memory than the budget, the
    result and a stated slack (22 passes of 3 seeds); the same call with a large budget (one pass of
    all 64 seeds) takes many times that, which shows the measurement sees the passes' memory."""
    measured = working_memory(_MEMORY_SETUP, {"small": "small(x)", "large": "large(x)"})
    small, large = measured["small"], measured["large"]
    assert small["result"] == 16 * 64 * 64 * 4
    allowed = 4 * 10**6 + small["result"] + SLACK
    assert small["peak"] <= allowed, measured
    assert large["peak"] > 4 * allowed, measured


_ROUTES_SETUP = """
import keras, numpy as np, jacket
keras.utils.set_random_seed(0)
L = keras.layers
dense = keras.Sequential([keras.Input((32,)), L.Dense(4096, activation="tanh"), L.Dense(32)])
image = keras.Sequential([
    keras.Input((16, 16, 1)),
    L.Conv2D(32, 3, padding="same", activation="tanh"),
    L.UpSampling2D(2, interpolation="bilinear"),
    L.Conv2D(1, 3, padding="same"),
])
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 32)).astype("float32")
img = rng.normal(size=(2, 16, 16, 1)).astype("float32")
pattern = jacket.sparsity(image, (16, 16, 1))
fns = {
    "full": jacket.jacobian_fn(dense, per_sample=False, memory_budget="4MB", strategy="vmap"),
    "diagonal": jacket.jacobian_fn(dense, per_sample="diagonal", memory_budget="4MB", strategy="vmap"),
    "forward": jacket.jacobian_fn(image, mode="forward", memory_budget="4MB", strategy="vmap"),
    "sparse_reverse": jacket.jacobian_fn(image, sparsity=pattern, mode="reverse", memory_budget="4MB"),
    "sparse_forward": jacket.jacobian_fn(image, sparsity=pattern, mode="forward", memory_budget="4MB"),
}
"""
_ROUTE_INPUTS = {"full": "x", "diagonal": "x", "forward": "img", "sparse_reverse": "img",
                 "sparse_forward": "img"}  # fmt: skip


def test_every_route_stays_within_the_budget():
    """Each route that is not the plain per-sample one plans its passes within `memory_budget`:
    the full Jacobian of the batch, its diagonal blocks, forward mode (rebuilt from reverse passes
    on TensorFlow, whose bilinear upsampling has no forward rule), and sparse passes in both modes
    (the 1.60 TiB allocation of #14 item 7). Budget 4 MB; what is allowed beyond it: the result
    and the slack of the plain route (`SLACK`, measured above).

    Measured peaks (MiB) under "4MB", and under "1GB" to show that the passes' memory is seen:
    TensorFlow full 4.4 (64.1), diagonal 4.1 (64.0), forward 4.9 (388), sparse 9.4 (37.7); JAX 7.1,
    7.8, 7.0, sparse 3.4 / 2.3; PyTorch 5.6, 5.5, 3.5, sparse 2.5 / 3.0. Before the passes of a
    given pattern were sized from the model's activations, sparse forward took 19.8 (JAX) and 32.9
    (PyTorch) MiB whatever the budget."""
    calls = {name: f"fns[{name!r}]({arg})" for name, arg in _ROUTE_INPUTS.items()}
    measured = working_memory(_ROUTES_SETUP, calls)
    over = {name: m for name, m in measured.items() if m["peak"] > 4 * 10**6 + m["result"] + SLACK}
    assert not over, measured
