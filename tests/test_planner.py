"""The measured planner (NOTE: [Measured plans]) and its plan cache on disk (NOTE: [The plan cache])."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers
from oracles import assert_close, central_differences
from scenarios import seed_cnn, seed_mlp

import jacket
from jacket import backends
from jacket.engine import cache, plan, probes
from jacket.engine.rules import layers_with_rules


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JACKET_CACHE_DIR", str(tmp_path))
    cache._WARNED.clear()
    return tmp_path / "plans"


@contextlib.contextmanager
def _warns(match: str):
    """`pytest.warns(JacketWarning)`; the other warnings it records are re-emitted without their
    module (so the module filters of pyproject.toml miss them): PyTorch's NumPy conversion
    deprecation is ignored here by category."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with pytest.warns(jacket.JacketWarning, match=match):
            yield


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.json")) if folder.exists() else []


def _same_mlp(dtype="float32"):
    """The seed MLP with the same layer names and weights every time (the cache key includes
    the names: Keras numbers them per process unless its session is cleared)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return seed_mlp(dtype)


def _settle(jac, x) -> int:
    """Call until the plan is settled; returns how many calls it took."""
    for calls in range(1, 20):
        jac(x)
        if jac.plan(x).settled:
            return calls
    raise AssertionError(f"not settled after 20 calls: {jac.plan(x).describe()}")


def test_the_first_call_runs_the_prior_and_later_calls_measure(cache_dir, rng):
    model = seed_cnn("float64")
    x = rng.random((3, 28, 28, 1))
    jac = jacket.jacobian_fn(model)
    J = jac(x)
    first = jac.plan(x)
    assert first.source == "prior"
    # a max pooling run through a layer rule batches as well as the rest (NOTE: [Layer rules])
    ruled = bool(layers_with_rules(model, backends.current()))  # its max pooling, on JAX
    kind = "conv" if ruled else "max_pooling"
    assert first.strategy == plan.prior(backends.current(), kind)[0]
    assert first.plan.rules == ruled
    assert not first.timings  # nothing measured on the first call
    calls = _settle(jac, x)
    report = jac.plan(x)
    assert report.source == "calibrated"
    # every candidate the planner lists was measured (or dropped, saying why)
    measured = set(report.timings) | set(report.failures)
    assert len(measured) >= 2 and calls <= len(measured) + 1
    chosen = report.timings[report.plan.describe()]
    assert chosen == min(report.timings.values())
    assert_close(jac(x), J, rtol=1e-12, atol=1e-14)
    assert_close(J, central_differences(model, x), rtol=1e-7, atol=1e-9)
    assert len(_entries(cache_dir)) == 1  # written when settled


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_every_candidate_gives_the_same_jacobian(mode, rng):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2), dtype="float64"),
            layers.DepthwiseConv2D(3, activation="tanh", dtype="float64"),
            layers.MaxPooling2D(2, dtype="float64"),
            layers.Flatten(dtype="float64"),
            layers.Dense(3, dtype="float64"),
        ]
    )
    x = rng.standard_normal((2, 6, 6, 2))
    expected = central_differences(model, x)
    problem = plan.Problem(
        batch=2, in_size=72, out_size=3, itemsize=8, activation_size=None, per_sample=True,
        training=False, memory_budget=1 << 30, mode=mode,
    )  # fmt: skip
    for candidate in plan.candidates(problem):
        got = jacket.jacobian(model, x, mode=mode, strategy=candidate.strategy)
        assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_a_plan_is_read_back_from_the_cache_in_a_new_process(cache_dir, rng, tmp_path):
    x = np.random.default_rng(0).random((4, 5))
    report = jacket.jacobian_fn(_same_mlp("float64")).tune(x)
    assert report.source == "calibrated" and report.settled
    script = f"""
import sys, json
import numpy as np, keras, jacket
sys.path.insert(0, {str(Path(__file__).parent)!r})
from scenarios import seed_mlp
keras.backend.clear_session()
keras.utils.set_random_seed(0)
model = seed_mlp("float64")
x = np.random.default_rng(0).random((4, 5))
jac = jacket.jacobian_fn(model)
jac(x)
report = jac.plan(x)
jac(x)
print(json.dumps([report.source, report.strategy, jac.trace_count, report.describe()]))
"""
    path = tmp_path / "run.py"
    path.write_text(script)
    env = {**os.environ, "JACKET_CACHE_DIR": str(cache_dir.parent)}
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    source, strategy, traces, described = json.loads(out.stdout.strip().splitlines()[-1])
    assert source == "cache", described
    assert strategy == report.strategy
    if keras.backend.backend() != "torch":  # (PyTorch counts runs, not traces)
        assert traces == 1  # the cached plan only: nothing else compiled, nothing measured
    assert "measured" in described  # the cached timings come along


class _Doubled(keras.layers.Layer):
    """A layer of the tests' own: not built in, so the coupling probe runs on models with it."""

    def call(self, x):
        return 2.0 * x


def _probed_mlp():
    """A float64 MLP with a `_Doubled` layer, the same names and weights every time."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="float64")
    h = layers.Dense(8, activation="tanh", dtype="float64")(inputs)
    return keras.Model(inputs, layers.Dense(3, dtype="float64")(_Doubled(dtype="float64")(h)))


def test_a_cached_plan_brings_the_probes_verdict_so_a_new_process_skips_the_probe(
    cache_dir, rng, monkeypatch
):
    x = rng.random((4, 5))
    runs = []
    probe = probes._probe
    monkeypatch.setattr(probes, "_probe", lambda *args: runs.append(1) or probe(*args))
    jacket.jacobian_fn(_probed_mlp()).tune(x)  # (what `jacket tune` runs)
    assert runs == [1]  # probed once, and the verdict kept with the plan
    model = _probed_mlp()  # what a new process builds: the same architecture, no state
    jac = jacket.jacobian_fn(model)
    J = jac(x)
    assert jac.plan(x).source == "cache"
    assert runs == [1]  # no probe: the verdict came from the cache, before the probe would run
    assert_close(J, central_differences(model, x), rtol=1e-7, atol=1e-9)


def test_tuning_a_model_that_mixes_samples_says_so(cache_dir, rng):
    inputs = keras.Input((5,))
    h = layers.Dense(3)(inputs)
    mixed = keras.Model(inputs, _Doubled()(h - keras.ops.mean(h, axis=0, keepdims=True)))
    with pytest.raises(jacket.CouplingError, match="depends on other samples"):
        jacket.jacobian_fn(mixed).tune(rng.random((4, 5)).astype("float32"))
    assert not _entries(cache_dir)


def test_corrupt_stale_and_foreign_entries_are_ignored_with_a_warning(cache_dir, rng):
    x = rng.random((4, 5)).astype("float32")
    jacket.jacobian_fn(_same_mlp()).tune(x)
    (entry,) = _entries(cache_dir)
    good = entry.read_text()

    def fresh_call():
        again = jacket.jacobian_fn(_same_mlp())
        again(x)
        return again.plan(x)

    for damage, words in [
        ("{not json", "corrupt"),
        (json.dumps({**json.loads(good), "format": 0}), "stale"),
        (json.dumps({**json.loads(good), "material": {"other": 1}}), "foreign"),
        (json.dumps({k: v for k, v in json.loads(good).items() if k != "plan"}), "corrupt"),
    ]:
        entry.write_text(damage)
        cache._WARNED.clear()
        with _warns(match=words):
            report = fresh_call()
        assert report.source == "prior"  # measured again, never trusted
    entry.write_text(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jacket.JacketWarning)  # a good entry: no warning of ours
        assert fresh_call().source == "cache"


def test_a_cached_plan_that_is_no_candidate_is_measured_again(cache_dir, rng):
    x = rng.random((4, 5)).astype("float32")
    jacket.jacobian_fn(_same_mlp()).tune(x)
    (entry,) = _entries(cache_dir)
    data = json.loads(entry.read_text())
    data["plan"]["strategy"] = "unrolled"  # a plan today's planner would not make
    entry.write_text(json.dumps(data))
    jac = jacket.jacobian_fn(_same_mlp())
    jac(x)
    assert jac.plan(x).source == "prior"


def test_a_cached_choice_keeps_its_strategy_with_the_chunk_of_todays_memory(cache_dir, rng):
    x = rng.random((4, 5)).astype("float32")
    report = jacket.jacobian_fn(_same_mlp(), chunk_size=None).tune(x)
    (entry,) = _entries(cache_dir)
    data = json.loads(entry.read_text())
    data["plan"]["chunk"] = 1  # measured under another (default) memory budget
    entry.write_text(json.dumps(data))
    jac = jacket.jacobian_fn(_same_mlp())
    jac(x)
    again = jac.plan(x)
    assert again.source == "cache"
    assert (again.mode, again.strategy) == (report.mode, report.strategy)
    assert again.chunk == report.chunk  # today's chunk for that mode and strategy
    explicit = jacket.jacobian_fn(_same_mlp(), memory_budget="1GiB")
    explicit(x)
    assert explicit.plan(x).source == "prior"  # another key: a given budget is not the default


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("JACKET_CACHE_DIR", "off")
    assert cache.directory() is None
    x = rng.random((4, 5)).astype("float32")
    report = jacket.jacobian_fn(seed_mlp()).tune(x)
    assert report.source == "calibrated"
    monkeypatch.setenv("JACKET_CACHE_DIR", str(tmp_path))
    assert not _entries(tmp_path / "plans")


def test_an_unwritable_cache_is_a_warning_not_an_error(tmp_path, monkeypatch, rng):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("JACKET_CACHE_DIR", str(blocker))
    cache._WARNED.clear()
    x = rng.random((4, 5)).astype("float32")
    with _warns(match="could not be written"):
        report = jacket.jacobian_fn(seed_mlp()).tune(x)
    assert report.source == "calibrated"


@pytest.mark.one_backend
def test_concurrent_writers_leave_one_whole_entry(cache_dir, tmp_path):
    """Four processes write the same key 25 times each (the cache module alone: no framework)."""
    script = f"""
import os, sys, json
from types import SimpleNamespace
os.environ["KERAS_BACKEND"] = "numpy"
sys.path.insert(0, {str(Path(jacket.__file__).parents[1])!r})
from jacket.engine import cache, plan, probes
key = cache.Key("ab" * 32, {{"format": cache.FORMAT, "writer": "any"}})
state = SimpleNamespace(forward={{}}, independent={{}})
inputs = SimpleNamespace(signature=(4, ((5,), "float32")))
chosen = plan.Plan("reverse", True, "vmap", int(sys.argv[1]), 2)
trial = SimpleNamespace(plan=chosen, seconds=0.001, failure=None)
for _ in range(25):
    cache.store(key, state, inputs, chosen, "calibrated", [trial] * 200)
"""
    path = tmp_path / "writer.py"
    path.write_text(script)
    env = {**os.environ, "JACKET_CACHE_DIR": str(cache_dir.parent)}
    writers = [subprocess.Popen([sys.executable, str(path), str(k + 1)], env=env) for k in range(4)]
    assert all(w.wait(timeout=300) == 0 for w in writers)
    (entry,) = _entries(cache_dir)
    data = json.loads(entry.read_text())  # whole: one writer's entry, not a mixture
    assert data["format"] == cache.FORMAT and data["plan"]["chunk"] in (1, 2, 3, 4)
    assert len(data["candidates"]) == 200
    assert {c["plan"]["chunk"] for c in data["candidates"]} == {data["plan"]["chunk"]}
    assert not list(entry.parent.glob(".*.tmp"))  # no temporary file left


def test_plain_functions_are_measured_but_never_cached(cache_dir, rng):
    W = rng.standard_normal((5, 3)).astype("float32")

    def f(z):
        return keras.ops.tanh(keras.ops.matmul(z, W))

    x = rng.random((4, 5)).astype("float32")
    report = jacket.jacobian_fn(f).tune(x)
    assert report.source == "calibrated"
    assert not _entries(cache_dir)


def test_a_candidate_that_fails_is_dropped_and_a_forced_one_says_why(cache_dir, rng):
    mask = keras.ops.convert_to_tensor(rng.random((3, 8)).astype("float32"))

    def masked(z):  # closes over a per-sample tensor: a tiled batch does not broadcast with it
        return keras.ops.tanh(z) * mask

    x = rng.random((3, 8)).astype("float32")
    expected = (
        np.einsum("bi,ij->bij", keras.ops.convert_to_numpy(mask), np.eye(8))
        * (1 - np.tanh(x) ** 2)[:, None, :]
    )
    jac = jacket.jacobian_fn(masked)
    report = jac.tune(x)
    assert_close(jac(x), expected, rtol=1e-6)
    if "replicate" in plan.prior(backends.current(), "other"):  # JAX's auto never tries it
        failed = [k for k in report.failures if "replicate" in k]
        assert failed, report.describe()
    assert report.strategy != "replicate"
    with pytest.raises(Exception) as info:
        jacket.jacobian(masked, x, strategy="replicate")
    # the framework's own error, with a note that says which strategy met it
    assert not isinstance(info.value, jacket.JacketError)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "strategy='replicate'" in notes and "strategy='auto'" in notes


def test_autotune_measures_everything_on_the_first_call(cache_dir, rng):
    x = rng.random((4, 5)).astype("float32")
    jac = jacket.jacobian_fn(seed_mlp(), strategy="autotune")
    jac(x)
    report = jac.plan(x)
    assert report.source == "autotune"
    assert len(report.timings) + len(report.failures) == len(
        plan.candidates(
            plan.Problem(
                batch=4, in_size=5, out_size=2, itemsize=4, activation_size=None,
                per_sample=True, training=False, memory_budget=1 << 30,
                prior=plan.prior(backends.current(), "dense"),
            )
        )
    )  # fmt: skip


def test_candidates_follow_the_options():
    base = dict(
        batch=2, in_size=100, out_size=10, itemsize=4, activation_size=None, per_sample=True,
        training=False, memory_budget=1 << 30,
    )  # fmt: skip
    plans = plan.candidates(plan.Problem(**base))
    assert {p.strategy for p in plans} == set(plan.STRATEGIES)
    assert {p.mode for p in plans} == {"reverse"}  # 10 rows against 100 columns
    square = plan.candidates(plan.Problem(**{**base, "in_size": 20}))
    assert {p.mode for p in square} == {"reverse", "forward"}  # within 4x: both compete
    no_forward = plan.candidates(plan.Problem(**{**base, "in_size": 20, "forward_ok": False}))
    assert {p.mode for p in no_forward} == {"reverse"}
    training = plan.candidates(plan.Problem(**{**base, "training": True}))
    assert "replicate" not in {p.strategy for p in training}
    full = plan.candidates(plan.Problem(**{**base, "per_sample": False}))
    assert "replicate" not in {p.strategy for p in full}
    forced = plan.candidates(plan.Problem(**{**base, "strategy": "loop"}))
    assert [p.strategy for p in forced] == ["loop"]
    ordered = plan.candidates(plan.Problem(**{**base, "prior": ("loop", "vmap", "replicate")}))
    assert [p.strategy for p in ordered] == ["loop", "vmap", "replicate"]
    fewer = plan.candidates(plan.Problem(**{**base, "prior": ("vmap", "loop")}))
    assert [p.strategy for p in fewer] == ["vmap", "loop"]  # left out: only when forced
    forced = plan.candidates(plan.Problem(**{**base, "prior": ("vmap",), "strategy": "replicate"}))
    assert [p.strategy for p in forced] == ["replicate"]
    one_row = plan.candidates(plan.Problem(**{**base, "out_size": 1}))
    assert len(one_row) == 1  # one seed: every strategy is the same computation
