"""jvp, vjp, the prepared function and its cache, check()."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from oracles import assert_close, central_differences, to_numpy
from scenarios import dict_inputs, dict_model, seed_cnn, seed_mlp

import jacket


def test_jvp_and_vjp_match_the_dense_jacobian(rng):
    model = seed_cnn("float64")
    x = rng.random((3, 28, 28, 1))
    J = to_numpy(jacket.jacobian(model, x, flatten=True))  # (3, 10, 784)
    v = rng.normal(size=x.shape)
    u = rng.normal(size=(3, 10))
    jv = to_numpy(jacket.jvp(model, x, v))
    uj = to_numpy(jacket.vjp(model, x, u))
    assert jv.shape == (3, 10) and uj.shape == (3, 28, 28, 1)
    assert_close(jv, np.einsum("bij,bj->bi", J, v.reshape(3, -1)), rtol=1e-10)
    assert_close(uj.reshape(3, -1), np.einsum("bi,bij->bj", u, J), rtol=1e-10)
    # the dot-product test: <J v, u> == <v, J^T u>
    np.testing.assert_allclose(np.sum(jv * u), np.sum(v * uj), rtol=1e-10)


def test_jvp_and_vjp_keep_structures(rng):
    model = dict_model("float64")
    x = dict_inputs(rng)
    J = jacket.jacobian(model, x, flatten=True)
    v = {k: rng.normal(size=a.shape) for k, a in x.items()}
    jv = jacket.jvp(model, x, v)
    assert set(jv) == {"score", "parts"}
    for out in jv:
        expected = sum(np.einsum("bij,bj->bi", to_numpy(J[out][k]), v[k].reshape(2, -1)) for k in x)
        assert_close(jv[out], expected, rtol=1e-10)
    u = {"score": rng.normal(size=(2, 1)), "parts": rng.normal(size=(2, 5))}
    uj = jacket.vjp(model, x, u)
    assert set(uj) == {"image", "meta"}
    for k in x:
        expected = sum(np.einsum("bi,bij->bj", u[o], to_numpy(J[o][k])) for o in u)
        assert_close(to_numpy(uj[k]).reshape(2, -1), expected, rtol=1e-10)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_second_call_does_not_retrace(backend, rng):
    if keras.backend.backend() != backend:
        pytest.skip(f"{backend} only")
    model = seed_mlp()
    jac = jacket.jacobian_fn(model)
    x = rng.random((4, 5)).astype("float32")
    jac.tune(x)  # the planner measures its candidates (NOTE: [Measured plans]); then settled
    traces = jac.trace_count
    assert traces >= 1
    jac(x + 1.0)
    jacket.jacobian(model, x * 2.0)  # the one-shot form shares the cache
    assert jac.trace_count == traces
    jac(rng.random((6, 5)).astype("float32"))  # a new signature traces once more
    assert jac.trace_count > traces
    forced = jacket.jacobian_fn(model, strategy="loop")  # nothing to measure: traced once
    forced(x)
    traces = jac.trace_count
    forced(x + 1.0)
    assert jac.trace_count == traces


def test_prepared_function_matches_one_shot(rng):
    model = seed_mlp()
    x = rng.random((3, 5)).astype("float32")
    jac = jacket.jacobian_fn(model, mode="forward", flatten=True)
    np.testing.assert_array_equal(
        to_numpy(jac(x)), to_numpy(jacket.jacobian(model, x, mode="forward", flatten=True))
    )
    plan = jac.plan(x)
    assert plan.mode == "forward" and plan.per_sample and plan.rows == 5
    assert "forward mode" in plan.describe()
    assert "JacobianFn(Sequential" in repr(jac)


def test_auto_mode_follows_the_shape(rng):
    wide = keras.Sequential([keras.Input((50,)), keras.layers.Dense(3)])
    tall = keras.Sequential([keras.Input((3,)), keras.layers.Dense(50)])
    assert jacket.jacobian_fn(wide).plan(np.ones((1, 50))).mode == "reverse"
    assert jacket.jacobian_fn(tall).plan(np.ones((1, 3))).mode == "forward"


def test_chunking_bounds_the_passes(rng):
    model = seed_mlp()
    plan = jacket.jacobian_fn(model, mode="forward", chunk_size=2).plan(np.ones((1, 5)))
    assert plan.chunk == 2 and plan.n_chunks == 3


def test_check_reports_ok_on_a_correct_jacobian(rng):
    report = jacket.check(seed_mlp(), rng.random((2, 5)).astype("float32"))
    assert report.ok
    assert report.max_rel_error < 1e-4
    assert report.shape == (2, 2, 5)
    assert report.reference == "float64 copy of the model"
    assert str(report).startswith("Jacobian check OK")


def test_check_catches_a_wrong_gradient(rng):
    """A model whose gradient lies (`stop_gradient` hides the square): check must fail."""

    def lying(x):
        return x + keras.ops.stop_gradient(x * x - x)  # value x^2, gradient 1 instead of 2x

    report = jacket.check(lying, rng.uniform(1, 2, size=(2, 3)))
    assert not report.ok
    assert report.max_rel_error > 0.1
    assert "FAILED" in str(report)


def test_check_on_a_multi_input_model(rng):
    report = jacket.check(dict_model(), dict_inputs(rng, dtype="float32"))
    assert report.ok, str(report)
    assert report.shape == (2, 6, 19)


def test_check_on_a_float32_callable_uses_its_own_dtype(rng):
    report = jacket.check(
        lambda x: keras.ops.tanh(x) * 3, rng.normal(size=(2, 4)).astype("float32")
    )
    assert report.ok, str(report)
    assert report.reference == "model in float32"


def test_memory_budget_sets_the_chunk_and_not_the_result(rng):
    model = seed_cnn("float64")
    x = rng.random((4, 28, 28, 1))
    roomy = jacket.jacobian_fn(model, memory_budget="1GiB")
    tight = jacket.jacobian_fn(model, memory_budget=200_000)
    assert roomy.plan(x).n_chunks == 1
    assert tight.plan(x).chunk < 10 and tight.plan(x).n_chunks > 1
    assert_close(tight(x), to_numpy(roomy(x)), rtol=1e-12)


@pytest.mark.parametrize(
    "budget,kind,message",
    [
        ("lots", jacket.JacketValueError, "must look like '500MB'"),
        ("5 parsecs", jacket.JacketValueError, "Received: memory_budget='5 parsecs'"),
        (0, jacket.JacketValueError, "at least one byte"),
        ([1], jacket.JacketTypeError, "must be a number of bytes"),
    ],
)
def test_memory_budget_errors(budget, kind, message):
    with pytest.raises(kind, match=message):
        jacket.jacobian_fn(seed_mlp(), memory_budget=budget)


@pytest.mark.parametrize("strategy", ["replicate", "vmap", "loop", "autotune"])
def test_every_strategy_gives_the_same_jacobian(strategy, rng):
    model = dict_model("float64")
    x = dict_inputs(rng)
    expected = jacket.jacobian(model, x, flatten=True)
    for mode in ("reverse", "forward"):
        got = jacket.jacobian(model, x, flatten=True, mode=mode, strategy=strategy)
        for out in expected:
            for name in x:
                assert_close(got[out][name], expected[out][name], rtol=1e-12, atol=1e-14)
    cnn = seed_cnn("float64")
    images = rng.random((3, 28, 28, 1))
    jac = jacket.jacobian_fn(cnn, strategy=strategy, chunk_size=4)
    assert_close(jac(images), jacket.jacobian(cnn, images), rtol=1e-12, atol=1e-14)
    if strategy != "autotune":
        assert jac.plan(images).strategy == strategy


def test_autotune_keeps_its_choice_and_drops_the_losers(rng):
    model = seed_mlp("float64")
    jac = jacket.jacobian_fn(model, strategy="autotune")
    x = rng.random((4, 5))
    J = jac(x)
    plan = jac.plan(x)
    assert plan.strategy in ("replicate", "vmap", "loop")
    assert plan.source == "autotune"
    state = model._jacket_state[False]
    kept = [key for key in state.kernels if key[0] == "jacobian"]
    assert len(kept) == 1 and kept[0][2] == plan.plan  # the winner's kernel only
    assert_close(jac(x), J, rtol=0, atol=0)
    assert jac.plan(x).plan == plan.plan


def test_bad_strategies_are_refused(rng):
    x = rng.random((2, 5)).astype("float32")
    with pytest.raises(jacket.JacketValueError, match="`strategy` must be one of"):
        jacket.jacobian(seed_mlp(), x, strategy="fastest")
    with pytest.raises(jacket.JacketValueError, match="per_sample=False"):
        jacket.jacobian(seed_mlp(), x, strategy="replicate", per_sample=False)
    with pytest.raises(jacket.JacketValueError, match="training=True"):
        jacket.jacobian_fn(seed_mlp(), strategy="replicate", training=True)


def test_the_fast_path_still_checks_its_inputs(rng):
    model = seed_mlp()
    jac = jacket.jacobian_fn(model)
    x = rng.random((3, 5)).astype("float32")
    first = to_numpy(jac(x))
    assert_close(jac(x.astype("float64")), first, rtol=1e-6)  # cast like the first call
    bad = x.copy()
    bad[1, 2] = np.inf
    with pytest.raises(jacket.JacketValueError, match=r"sample\(s\) 1 \(1 of 3\)"):
        jac(bad)
    with pytest.raises(jacket.JacketValueError, match="does not fit the model"):
        jac(rng.random((3, 4)).astype("float32"))
    assert_close(jac(np.asfortranarray(x)), first, rtol=1e-6)  # (summation order may differ)


def test_backend_tensors_take_a_fast_path_that_still_checks(monkeypatch, rng):
    import importlib

    engine_jacobian = importlib.import_module("jacket.engine.jacobian")
    model = seed_mlp()
    x = rng.random((3, 5)).astype("float32")
    xt = keras.ops.convert_to_tensor(x)
    first = to_numpy(jacket.jacobian(model, xt))
    assert_close(first, to_numpy(jacket.jacobian(model, x)), rtol=1e-6)

    def no_slow_path(*args, **kwargs):
        raise AssertionError("the second call of a signature took the slow path")

    monkeypatch.setattr(engine_jacobian, "resolve", no_slow_path)
    values = rng.random((3, 5)).astype("float32")
    other = keras.ops.convert_to_tensor(values)  # same signature, other values
    assert_close(jacket.jacobian(model, other), jacket.jacobian(model, values), rtol=1e-6)
    bad = x.copy()
    bad[2, 0] = np.nan
    with pytest.raises(jacket.JacketValueError, match=r"sample\(s\) 2 \(1 of 3\)"):
        jacket.jacobian(model, keras.ops.convert_to_tensor(bad))
    monkeypatch.undo()
    with pytest.raises(jacket.JacketValueError, match="does not fit the model"):
        jacket.jacobian(model, keras.ops.convert_to_tensor(rng.random((3, 4)).astype("float32")))
    as64 = keras.ops.convert_to_tensor(x.astype("float64"))  # cast: not the fast path's
    assert_close(jacket.jacobian(model, as64), first, rtol=1e-6)


def test_a_settled_plan_takes_the_shortest_path_and_reads_the_weights_each_call(rng, monkeypatch):
    # NOTE: [The per-call path]: a prepared callable, once its plan settled, runs a NumPy array
    # of the signature through the executor's `array_call` alone
    import importlib

    engine_jacobian = importlib.import_module("jacket.engine.jacobian")
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(3, "tanh", dtype="float64")]
    )
    fn = jacket.jacobian_fn(model)
    x = rng.standard_normal((2, 4))
    fn.tune(x)
    fn(x)  # the whole way once more, which leaves the shortcut behind
    monkeypatch.setattr(engine_jacobian, "run", lambda *a, **k: pytest.fail("the whole way"))
    values = rng.standard_normal((2, 4))
    assert_close(fn(values), central_differences(model, values), rtol=1e-7, atol=1e-9)
    model.layers[0].kernel.assign(2.0 * model.layers[0].kernel)  # new weights, same kernel
    assert_close(fn(values), central_differences(model, values), rtol=1e-7, atol=1e-9)
    bad = values.copy()
    bad[1, 2] = np.inf
    with pytest.raises(jacket.JacketValueError, match=r"sample\(s\) 1 \(1 of 2\)"):
        fn(bad)
    monkeypatch.undo()
    wider = rng.standard_normal((3, 4))  # another signature: the whole way
    assert_close(fn(wider), central_differences(model, wider), rtol=1e-7, atol=1e-9)


def test_long_loop_passes_agree_in_both_modes(rng):
    # more seeds per pass than the TensorFlow backend unrolls (a while_loop runs them there)
    model = keras.Sequential(
        [keras.Input((30,), dtype="float64"), keras.layers.Dense(26, "tanh", dtype="float64")]
    )
    x = rng.standard_normal((3, 30))
    expected = central_differences(model, x)
    for mode in ("reverse", "forward"):
        got = jacket.jacobian(model, x, mode=mode, strategy="loop", chunk_size=24)
        assert_close(got, expected, rtol=1e-7, atol=1e-9)
