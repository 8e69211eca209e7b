"""jacket.distributed: datasets on Dask, results in zarr, resumable.

The in-process path runs on every backend. The tests that need a Dask cluster (a LocalCluster of two
worker processes on 127.0.0.1, started once for the module) run on JAX only, whose workers start with
the least memory (about 315 MB after importing Keras, against 550 MB for PyTorch and 770 MB for
TensorFlow) and which runs the whole dataset path the same way as the others.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import zarr
from oracles import assert_close

import jacket
from jacket import JacketTypeError, JacketValueError
from jacket import distributed as jd
from jacket.distributed import cluster as cluster_module
from jacket.distributed import runners
from jacket.distributed import store as dist_store

BACKEND = keras.backend.backend()
CLUSTER_BACKEND = "jax"
cluster_only = pytest.mark.jax  # the cluster tests: one backend (see the module docstring)


# ------------------------------------------------------------------------------------------ models


def _to_numpy(tree):
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), tree)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small models saved as `.keras` files: what workers load."""
    keras.utils.set_random_seed(7)
    folder = tmp_path_factory.mktemp("models")
    built = {}

    mlp = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)]
    )
    built["mlp"] = mlp

    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh")])
    built["other"] = other

    x = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh")(x)
    built["two_out"] = keras.Model(x, [keras.layers.Dense(3)(h), keras.layers.Dense(2)(h)])

    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([a, b]))
    built["multi"] = keras.Model(
        {"a": a, "b": b},
        {"score": keras.layers.Dense(2, name="score")(h), "aux": keras.layers.Dense(3)(h)},
    )

    image = keras.Input((6, 5, 1))  # images in, images out, dropout between
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh")(image)
    built["images"] = keras.Model(image, keras.layers.Dropout(0.5)(h))

    paths = {}
    for name, model in built.items():
        paths[name] = folder / f"{name}.keras"
        model.save(paths[name])
    return {"paths": paths, "models": built}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """`{width: (path, model)}`: one Dense+tanh layer, `width -> width`, whose Jacobian has an exact
    NumPy oracle (`_dense_oracle`): 4 KiB of Jacobian per sample for width 32, 64 KiB for 128."""
    keras.utils.set_random_seed(8)
    folder = tmp_path_factory.mktemp("dense")
    out = {}
    for width in (32, 128):
        model = keras.Sequential(
            [keras.Input((width,)), keras.layers.Dense(width, activation="tanh")]
        )
        model.save(folder / f"dense{width}.keras")
        out[width] = (folder / f"dense{width}.keras", model)
    return out


DENSE_BATCH = 64


def _manifest(store) -> dict:
    """The manifest as it is on disk (the root zarr.json's attributes)."""
    return json.loads((store / "zarr.json").read_text())["attributes"]["jacket"]


def _finished(manifest) -> set[int]:
    return {i for start, stop in manifest["chunks"]["finished"] for i in range(start, stop)}


def _dense_oracle(model, x: np.ndarray) -> np.ndarray:
    """`(n, out, in)` float64 Jacobians of one Dense+tanh layer, `(1 - y_i^2) W[j, i]`."""
    W, b = (np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in model.weights)
    y = np.tanh(x.astype(np.float64) @ W + b)
    return (1.0 - y**2)[:, :, None] * W.T[None]


# ------------------------------------------------------------------------ in-process, every backend


def test_jacobian_dataset_matches_in_memory_jacobian(models, tmp_path):
    path, model = models["paths"]["mlp"], models["models"]["mlp"]
    x = np.random.default_rng(0).standard_normal((50, 5)).astype("float32")
    seen = []
    J = jd.jacobian_dataset(
        path, x, tmp_path / "J.zarr", batch_size=16, progress=lambda d, t: seen.append((d, t))
    )
    expected = _to_numpy(jacket.jacobian(model, x))
    assert isinstance(J, zarr.Array) and J.shape == (50, 3, 5) and J.chunks == (16, 3, 5)
    np.testing.assert_allclose(J[:], expected, rtol=1e-5, atol=1e-6)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    manifest = _manifest(tmp_path / "J.zarr")
    assert manifest["chunks"] == {"count": 4, "finished": [[0, 4]]}
    assert manifest["identity"]["backend"] == BACKEND
    assert manifest["runs"][-1]["completed"] and manifest["runs"][-1]["computed"] == [[0, 4]]

    # inputs from a zarr store, flattened blocks
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(7, 5))
    flat = jd.jacobian_dataset(path, str(tmp_path / "x.zarr"), tmp_path / "F.zarr", flatten=True)
    assert flat.shape == (50, 3, 5) and flat.chunks == (64, 3, 5)
    np.testing.assert_allclose(flat[:], expected, rtol=1e-5, atol=1e-6)


def test_several_inputs_and_outputs_are_one_array_per_block(models, tmp_path):
    path, model = models["paths"]["multi"], models["models"]["multi"]
    rng = np.random.default_rng(1)
    x = {"a": rng.standard_normal((20, 4)), "b": rng.standard_normal((20, 3))}
    x = {k: v.astype("float32") for k, v in x.items()}
    group = zarr.create_group(tmp_path / "x.zarr")
    for name, array in x.items():
        group.create_array(name, data=array, chunks=(8,) + array.shape[1:])
    J = jd.jacobian_dataset(path, tmp_path / "x.zarr", tmp_path / "J.zarr", batch_size=8)
    expected = _to_numpy(jacket.jacobian(model, x))
    assert set(J) == {"score", "aux"} and all(set(J[o]) == {"a", "b"} for o in J)
    stored = zarr.open_group(tmp_path / "J.zarr", mode="r")
    for out in ("score", "aux"):
        for name in ("a", "b"):
            assert J[out][name].shape == expected[out][name].shape
            assert stored[f"{out}/{name}"].chunks[0] == 8
            np.testing.assert_allclose(J[out][name][:], expected[out][name], rtol=1e-5, atol=1e-6)


def _check_training_rows(J, inference):
    """Through the final Dropout(0.5): each row of each sample's Jacobian is the inference row
    dropped (0) or kept and scaled by 2, and both happen."""
    n = len(J)
    trained, rows = J.reshape(n, 60, 30), inference.reshape(n, 60, 30)
    kept = np.abs(trained - 2 * rows).max(axis=2) <= 1e-5 * np.abs(rows).max()
    dropped = np.abs(trained).max(axis=2) == 0
    assert (kept ^ dropped).all()
    assert 0.3 < kept.mean() < 0.7


def test_image_inputs_and_training_mode(models, tmp_path):
    """Images from a zarr store in, image Jacobians out; `training=True` reaches every chunk."""
    path, model = models["paths"]["images"], models["models"]["images"]
    x = np.random.default_rng(3).standard_normal((20, 6, 5, 1)).astype("float32")
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(8, 6, 5, 1))
    J = jd.jacobian_dataset(path, tmp_path / "x.zarr", tmp_path / "J.zarr", batch_size=8)
    assert J.shape == (20, 6, 5, 2, 6, 5, 1) and J.chunks == (8, 6, 5, 2, 6, 5, 1)
    inference = _to_numpy(jacket.jacobian(model, x))
    np.testing.assert_allclose(J[:], inference, rtol=1e-5, atol=1e-6)
    trained = jd.jacobian_dataset(
        path, tmp_path / "x.zarr", tmp_path / "T.zarr", batch_size=8, training=True
    )
    _check_training_rows(trained[:], inference)
    assert _manifest(tmp_path / "T.zarr")["identity"]["options"]["training"] is True


def test_rerun_computes_only_missing_chunks_and_refuses_other_arguments(models, tmp_path):
    path = models["paths"]["mlp"]
    x = np.random.default_rng(2).standard_normal((50, 5)).astype("float32")
    out = tmp_path / "J.zarr"
    whole = jd.jacobian_dataset(path, x, out, batch_size=16)[:]

    # as a killed run leaves it: chunks 1 and 3 not marked finished, one of them half-written
    root = zarr.open_array(out, mode="r+")
    manifest = root.attrs["jacket"]
    manifest["chunks"]["finished"] = [[0, 1], [2, 3]]
    manifest["runs"][-1]["completed"] = False
    root.update_attributes({"jacket": manifest})
    root[16:24] = 99.0
    leftover = out / f"zarr.{'0' * 32}.partial"  # a write killed before its rename
    leftover.write_text("{")
    J = jd.jacobian_dataset(path, x, out, batch_size=16)
    assert not leftover.exists()
    after = _manifest(out)
    assert [run["computed"] for run in after["runs"]] == [[[0, 4]], [[1, 2], [3, 4]]]
    assert after["runs"][-1]["completed"] and after["chunks"]["finished"] == [[0, 4]]
    assert_close(J[:], whole, rtol=1e-6)  # plans are measured: equal up to float32 rounding

    def refused(match, model=path, inputs=x, **kw):
        with pytest.raises(JacketValueError, match=match) as info:
            jd.jacobian_dataset(model, inputs, out, **{"batch_size": 16, **kw})
        assert "overwrite=True" in str(info.value) and "new `out`" in str(info.value)

    refused(r"option mode \('auto' stored, 'forward' now\)", mode="forward")
    refused(r"the model file \(SHA-256 [0-9a-f]{12}\.\.\. stored", model=models["paths"]["other"])
    refused(r"batch_size \(16 stored, 10 now\)", batch_size=10)
    refused(r"the inputs \(x \(50, 5\) float32 stored, x \(49, 5\) float32 now\)", inputs=x[:49])
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], whole)  # left as it was

    J = jd.jacobian_dataset(path, x, out, batch_size=10, mode="forward", overwrite=True)
    assert J.chunks == (10, 3, 5) and len(_manifest(out)["runs"]) == 1
    np.testing.assert_allclose(J[:], whole, rtol=1e-5, atol=1e-6)

    zarr.create_array(tmp_path / "other.zarr", data=x)
    with pytest.raises(JacketValueError, match="not a jacket dataset run"):
        jd.jacobian_dataset(path, x, tmp_path / "other.zarr")


def test_sensitivity_and_norms_match_numpy_on_the_dense_jacobian(models, tmp_path):
    path, model = models["paths"]["two_out"], models["models"]["two_out"]
    x = np.random.default_rng(3).standard_normal((40, 5)).astype("float32")
    blocks = _to_numpy(jacket.jacobian(model, x))  # [(40, 3, 5), (40, 2, 5)]
    J = np.concatenate(blocks, axis=1).astype(np.float64)  # every output of each sample
    expected = {
        "mean_abs": np.abs(J).mean(axis=(0, 1)),
        "rms": np.sqrt((J**2).mean(axis=(0, 1))),
        "max_abs": np.abs(J).max(axis=(0, 1)),
    }
    for reduce, values in expected.items():
        s = jd.sensitivity_dataset(path, x, reduce=reduce, batch_size=16)
        assert s.values.shape == (5,) and s.samples == 40 and s.reduce == reduce
        np.testing.assert_allclose(s.values, values, rtol=1e-5)
        np.testing.assert_array_equal(s.ranking, np.argsort(-s.values, kind="stable"))
        assert s.top(1) == [((int(s.ranking[0]),), float(s.values[s.ranking[0]]))]

    norms = jd.jacobian_norms_dataset(path, x, batch_size=16)
    np.testing.assert_allclose(norms, np.sqrt((J**2).sum(axis=(1, 2))), rtol=1e-5)

    multi, mx = models["paths"]["multi"], {"a": x[:, :4], "b": x[:, 2:]}
    dense = _to_numpy(jacket.jacobian(models["models"]["multi"], mx))
    squares = sum((dense[o][i].astype(np.float64) ** 2).sum(axis=(1, 2)) for o in dense for i in mx)
    norms = jd.jacobian_norms_dataset(multi, mx, batch_size=16)
    np.testing.assert_allclose(norms, np.sqrt(squares), rtol=1e-5)


def test_progress_bar_on_stderr(models, tmp_path, capsys):
    x = np.ones((20, 5), "float32")
    jd.jacobian_dataset(models["paths"]["mlp"], x, tmp_path / "J.zarr", batch_size=8, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_merge_tree_gives_the_same_bits_in_any_order():
    rng = np.random.default_rng(4)
    values = [rng.standard_normal(3) * 10.0 ** rng.integers(-8, 8) for _ in range(23)]
    results = []
    for order in (range(23), rng.permutation(23), range(22, -1, -1)):
        tree = runners.Tree(23, lambda a, b: a + b)
        for i in order:
            tree.add(int(i), values[i])
        results.append(tree.root)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_allclose(results[0], np.sum(values, axis=0), rtol=1e-12)
    one = runners.Tree(1, lambda a, b: a + b)
    one.add(0, values[0])
    assert one.root is values[0]


def test_a_cluster_passed_as_client_says_where_and_stays_open(models, tmp_path):
    x = np.random.default_rng(8).standard_normal((10, 5)).astype("float32")
    path = models["paths"]["mlp"]
    with jd.Cluster(scheduler="synchronous") as cluster:
        J = jd.jacobian_dataset(path, x, tmp_path / "J.zarr", batch_size=4, client=cluster)
        norms = jd.jacobian_norms_dataset(path, x, batch_size=4, client=cluster)
        assert cluster.describe == "this process" and not cluster.remote
        assert cluster.backend() == keras.backend.backend()
    np.testing.assert_allclose(norms, np.sqrt((J[:].astype(np.float64) ** 2).sum(axis=(1, 2))))
    with pytest.raises(JacketValueError, match="pass no `scheduler` or `workers` with it"):
        jd.jacobian_norms_dataset(path, x, client=jd.Cluster(), scheduler="synchronous")


def test_option_defaults_are_those_of_jacobian_fn():
    signature = inspect.signature(jacket.jacobian_fn).parameters
    for name, default in jd.OPTION_DEFAULTS.items():
        assert signature[name].default == default, name


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p, x, o: jd.jacobian_dataset(object(), x, o), JacketTypeError, "path of a `.keras`"),
        (lambda p, x, o: jd.jacobian_dataset("m.h5", x, o), JacketValueError, "Keras 3 `.keras`"),
        (lambda p, x, o: jd.jacobian_dataset("no.keras", x, o), JacketValueError, "does not exist"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, per_sample=False), JacketValueError, "per_sample"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, foo=1), JacketTypeError, "unknown option `foo`"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, batch_size=0), JacketValueError, "batch_size=0"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, progress="yes"), JacketTypeError, "progress"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, overwrite=1), JacketTypeError, "overwrite"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, client="tcp://h:1", scheduler="synchronous"),
         JacketValueError, "not both"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, client="tcp://h:1", workers=2),
         JacketValueError, "`workers` sets the size of a local cluster"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, o, client=3), JacketTypeError, "distributed.Client"),
        (lambda p, x, o: jd.jacobian_dataset(p, [1.0, 2.0], o), JacketTypeError, "NumPy or zarr array"),
        (lambda p, x, o: jd.jacobian_dataset(p, x.astype(complex), o), JacketTypeError, "real numbers"),
        (lambda p, x, o: jd.jacobian_dataset(p, [x, x[:3]], o), JacketValueError, "same number of samples"),
        (lambda p, x, o: jd.jacobian_dataset(p, o / "none.zarr", o), JacketValueError, "does not exist"),
        (lambda p, x, o: jd.jacobian_dataset(p, x, "s3://bucket/J.zarr"), JacketValueError, "local path"),
        (lambda p, x, o: jd.sensitivity_dataset(p, x, reduce="mean"), JacketValueError, "`reduce` must be"),
        (lambda p, x, o: jd.sensitivity_dataset(p, [x, x]), JacketValueError, "one input"),
        (lambda p, x, o: jd.sensitivity_dataset(p, x, flatten=True), JacketTypeError, "unknown option"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument_and_the_fix(models, tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(models["paths"]["mlp"], np.ones((4, 5), "float32"), tmp_path)


def test_overwrite_deletes_only_zarr_stores(models, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(JacketValueError, match="not a zarr store"):
        jd.jacobian_dataset(models["paths"]["mlp"], np.ones((4, 5), "f4"), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_stores_killed_while_made_or_deleted_start_afresh(models, tmp_path, monkeypatch):
    path, model = models["paths"]["mlp"], models["models"]["mlp"]
    x = np.random.default_rng(12).standard_normal((20, 5)).astype("float32")
    expected = _to_numpy(jacket.jacobian(model, x))
    out = tmp_path / "J.zarr"
    out.mkdir()  # killed before zarr renamed its first zarr.json into place
    (out / f"zarr.{'0' * 32}.partial").write_text('{"zarr_format"')
    J = jd.jacobian_dataset(path, x, out, batch_size=8)
    np.testing.assert_allclose(J[:], expected, rtol=1e-5, atol=1e-6)

    def killed(folder, *args, **kwargs):  # killed before deleting anything
        raise KeyboardInterrupt

    monkeypatch.setattr(dist_store.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        jd.jacobian_dataset(path, x, out, batch_size=8, overwrite=True)
    monkeypatch.undo()
    assert not out.exists()  # the store was moved aside first: nothing half-deleted under `out`
    (aside,) = tmp_path.glob(".J.zarr.deleting-*")
    J = jd.jacobian_dataset(path, x, out, batch_size=8)
    np.testing.assert_allclose(J[:], expected, rtol=1e-5, atol=1e-6)
    assert len(_manifest(out)["runs"]) == 1


# ------------------------------------------------------------------------------ on a Dask cluster


def _start_sampler(dask_worker):
    """On a worker: sample the process's RSS every 5 ms until `_stop_sampler`."""
    import threading

    import psutil

    process = psutil.Process()
    state = {"start": process.memory_info().rss, "peak": 0, "stop": False}

    def sample():
        while not state["stop"]:
            state["peak"] = max(state["peak"], process.memory_info().rss)
            time.sleep(0.005)

    state["thread"] = threading.Thread(target=sample, daemon=True)
    state["thread"].start()
    dask_worker._jacket_rss = state


def _stop_sampler(dask_worker):
    state = dask_worker._jacket_rss
    state["stop"] = True
    state["thread"].join()
    return state["start"], state["peak"]


def _peak_rss() -> int:
    """This process's peak RSS in bytes. (Not `ru_maxrss`, which survives `execve`: a process
    started from pytest would report pytest's own size.)"""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


@pytest.fixture(scope="module")
def cluster():
    if BACKEND != CLUSTER_BACKEND:
        pytest.skip(f"the cluster tests run on {CLUSTER_BACKEND} only")
    import cloudpickle
    from distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the samplers above
    local = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # any free port (None still binds 8787)
        memory_limit="2GB",
        env={"KERAS_BACKEND": BACKEND, "JAX_ENABLE_X64": os.environ.get("JAX_ENABLE_X64", "")},
    )
    client = Client(local)
    yield client
    client.close()
    local.close()


def _driver(code: str) -> subprocess.Popen:
    """A driver in its own process, connected to the module's cluster (it never imports Keras)."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@cluster_only
def test_cluster_matches_in_process(models, tmp_path, cluster):
    path, model = models["paths"]["mlp"], models["models"]["mlp"]
    x = np.random.default_rng(5).standard_normal((60, 5)).astype("float32")
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(25, 5))
    here = jd.jacobian_dataset(path, x, tmp_path / "here.zarr", batch_size=16)
    there = jd.jacobian_dataset(path, tmp_path / "x.zarr", tmp_path / "there.zarr", client=cluster,
                                batch_size=16)  # fmt: skip
    # equal up to rounding: each process measures its own plans (NOTE: [Measured plans])
    assert_close(there[:], here[:], rtol=1e-6)
    np.testing.assert_allclose(there[:], _to_numpy(jacket.jacobian(model, x)), rtol=1e-5, atol=1e-6)

    # NumPy inputs travel to the workers chunk by chunk; the merge tree keeps the order of the sums
    address = cluster.scheduler.address
    local = jd.sensitivity_dataset(path, x, reduce="rms", batch_size=8)
    remote = jd.sensitivity_dataset(path, x, reduce="rms", batch_size=8, scheduler=address)
    assert_close(remote.values, local.values, rtol=1e-6)
    norms = jd.jacobian_norms_dataset(path, x, batch_size=8, client=cluster)
    np.testing.assert_allclose(norms, np.linalg.norm(here[:].reshape(60, -1), axis=1), rtol=1e-5)


@cluster_only
def test_cluster_with_image_inputs_and_training_mode(models, tmp_path, cluster):
    path, model = models["paths"]["images"], models["models"]["images"]
    x = np.random.default_rng(4).standard_normal((20, 6, 5, 1)).astype("float32")
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(8, 6, 5, 1))
    J = jd.jacobian_dataset(path, tmp_path / "x.zarr", tmp_path / "J.zarr", client=cluster,
                            batch_size=8)  # fmt: skip
    inference = _to_numpy(jacket.jacobian(model, x))
    np.testing.assert_allclose(J[:], inference, rtol=1e-5, atol=1e-6)
    trained = jd.jacobian_dataset(path, tmp_path / "x.zarr", tmp_path / "T.zarr", client=cluster,
                                  batch_size=8, training=True)  # fmt: skip
    _check_training_rows(trained[:], inference)


@cluster_only
def test_big_jobs_leave_the_driver_for_a_local_cluster(models, tmp_path, cluster, monkeypatch):
    started = []

    def local_cluster(self, chunks):
        started.append(chunks)
        return cluster

    monkeypatch.setattr(jd.Cluster, "_local_cluster", local_cluster)
    monkeypatch.setattr(
        cluster_module, "IN_PROCESS_MAX_BYTES", 1000
    )  # bytes: 2 chunks of 16 x 3 x 5 float32
    x = np.random.default_rng(6).standard_normal((64, 5)).astype("float32")
    path = models["paths"]["mlp"]
    J = jd.jacobian_dataset(path, x, tmp_path / "small.zarr", batch_size=32)
    assert started == []  # 1 chunk left after the first: stays here
    J = jd.jacobian_dataset(path, x, tmp_path / "big.zarr", batch_size=16)
    assert started == [3]  # 3 chunks x 960 bytes left: a cluster
    # each process measures its own plans: equal up to rounding (NOTE: [Measured plans])
    assert_close(J[:], zarr.open_array(tmp_path / "small.zarr")[:], rtol=1e-6)


@cluster_only
def test_killed_driver_resumes_with_only_the_missing_chunks(dense, tmp_path, cluster):
    path, model = dense[32]
    n, batch = 100 * DENSE_BATCH, DENSE_BATCH
    x = np.random.default_rng(8).standard_normal((n, 32)).astype("float32")
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(batch, 32))
    out = tmp_path / "J.zarr"
    args = f"{str(path)!r}, {str(tmp_path / 'x.zarr')!r}, {str(out)!r}, batch_size={batch}"
    driver = _driver(
        "from jacket.distributed import jacobian_dataset\n"
        f"jacobian_dataset({args}, client={cluster.scheduler.address!r})\n"
    )
    deadline = time.monotonic() + 120
    done: set[int] = set()
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                done = _finished(_manifest(out))
            except (FileNotFoundError, KeyError, ValueError):
                done = set()
            if len(done) >= 4:
                break
            time.sleep(0.01)
        assert driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.communicate()
    killed = _manifest(out)
    finished = _finished(killed)
    assert 4 <= len(finished) < n // batch, "the run was not caught midway"
    assert not killed["runs"][-1]["completed"]
    files = {i: out / "c" / str(i) / "0" / "0" for i in finished}  # zarr's key of chunk (i, 0, 0)
    written = {i: file.stat().st_mtime_ns for i, file in files.items()}

    J = jd.jacobian_dataset(path, tmp_path / "x.zarr", out, client=cluster, batch_size=batch)
    after = _manifest(out)
    recomputed = {i for a, b in after["runs"][-1]["computed"] for i in range(a, b)}
    assert recomputed == set(range(n // batch)) - finished
    assert {i: file.stat().st_mtime_ns for i, file in files.items()} == written  # not rewritten
    assert after["runs"][-1]["completed"] and len(after["runs"]) == 2

    whole = jd.jacobian_dataset(
        path, tmp_path / "x.zarr", tmp_path / "whole.zarr", client=cluster, batch_size=batch
    )
    # equal up to rounding: the planner may run another measured plan (NOTE: [Measured plans])
    assert_close(J[:], whole[:], rtol=1e-6)
    np.testing.assert_allclose(J[:], _dense_oracle(model, x), rtol=1e-5, atol=1e-6)


@cluster_only
def test_result_four_times_the_memory_the_job_gets(dense, tmp_path, cluster):
    """The driver and each worker grow by far less than the result.

    NOTE: [What the out-of-core test measures]
    A worker with Keras and JAX loaded holds about 315 MB before any work (PyTorch 550 MB,
    TensorFlow 770 MB), so a memory limit below the result would need results of several GB,
    minutes of work here (see the slow test below, which does it). This one writes a 256 MiB result
    (4096 samples of a 128 x 128 Jacobian, 64 chunks of 4 MiB) and measures what the job adds: the
    peak RSS of each worker during the job, sampled every 5 ms, over its RSS before; and the peak
    RSS of the driver (a process of its own, which never imports Keras) over its RSS once connected.
    Each must stay under a quarter of the result.
    """
    path, model = dense[128]
    n, batch = 4096, DENSE_BATCH
    rng = np.random.default_rng(9)
    inputs = zarr.create_array(tmp_path / "x.zarr", shape=(n, 128), chunks=(batch, 128), dtype="f4")
    inputs[:] = rng.standard_normal((n, 128)).astype("float32")
    out = tmp_path / "J.zarr"
    cluster.run(_start_sampler)
    driver = _driver(
        "import json, psutil\n"
        "from distributed import Client\n"
        "from jacket.distributed import jacobian_dataset\n"
        f"client = Client({cluster.scheduler.address!r})\n"
        "before = psutil.Process().memory_info().rss\n"
        f"J = jacobian_dataset({str(path)!r}, {str(tmp_path / 'x.zarr')!r}, {str(out)!r}, "
        f"batch_size={batch}, client=client)\n"
        "peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024\n"
        "print(json.dumps({'before': before, 'peak': peak, 'nbytes': J.nbytes, "
        "'keras': __import__('sys').modules.get('keras') is not None}))\n"
    )
    stdout, stderr = driver.communicate(timeout=300)
    workers = cluster.run(_stop_sampler)
    assert driver.returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    result = report["nbytes"]
    assert result == n * 128 * 128 * 4 == 256 * 2**20
    assert not report["keras"]
    assert report["peak"] - report["before"] < result / 4, report
    for address, (start, peak) in workers.items():
        assert peak - start < result / 4, (address, start, peak)

    J = zarr.open_array(out, mode="r")
    for start in range(0, n, 4 * batch):  # every 4th chunk, against the exact Jacobian
        rows = slice(start, start + batch)
        np.testing.assert_allclose(
            J[rows], _dense_oracle(model, inputs[rows]), rtol=1e-5, atol=1e-6
        )


@cluster_only
@pytest.mark.slow
def test_workers_start_a_local_cluster_with_this_backend(models, tmp_path):
    path, model = models["paths"]["two_out"], models["models"]["two_out"]
    x = np.random.default_rng(11).standard_normal((40, 5)).astype("float32")
    here = jd.sensitivity_dataset(path, x, batch_size=8, reduce="max_abs")
    seen = []
    J = jd.jacobian_dataset(path, x, tmp_path / "J.zarr", batch_size=8, workers=2,
                            progress=lambda d, t: seen.append(d))  # fmt: skip
    expected = _to_numpy(jacket.jacobian(model, x))
    for block, reference in zip(J, expected):
        np.testing.assert_allclose(block[:], reference, rtol=1e-5, atol=1e-6)
    assert seen[0] == 0 and seen[-1] == 5 and seen == sorted(seen)
    there = jd.sensitivity_dataset(path, x, batch_size=8, reduce="max_abs", scheduler="processes")
    assert_close(there.values, here.values, rtol=1e-6)  # plans measured per process


@cluster_only
@pytest.mark.slow
def test_result_four_times_the_workers_memory_limit(dense, tmp_path):
    """A worker whose memory limit (enforced by its nanny, which kills it at 95%) is a quarter of
    the result: 1 worker limited to 700 MB, a 2.8 GB result, inputs read from zarr."""
    from distributed import Client, LocalCluster

    path, model = dense[128]
    limit = 700 * 10**6
    n, batch = -(-4 * limit // (128 * 128 * 4 * 128)) * 128, 128
    inputs = zarr.create_array(tmp_path / "x.zarr", shape=(n, 128), chunks=(batch, 128), dtype="f4")
    rng = np.random.default_rng(10)
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        inputs[start:stop] = rng.standard_normal((stop - start, 128)).astype("float32")
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # any free port (None still binds 8787)
            memory_limit=limit,
            env={"KERAS_BACKEND": BACKEND},
        ) as local,
        Client(local) as client,
    ):
        J = jd.jacobian_dataset(path, tmp_path / "x.zarr", tmp_path / "J.zarr", client=client,
                                batch_size=batch)  # fmt: skip
        assert J.nbytes >= 4 * limit
        (peak,) = client.run(_peak_rss).values()
        assert peak < limit
    for start in range(0, n, 64 * batch):
        rows = slice(start, start + batch)
        np.testing.assert_allclose(
            J[rows], _dense_oracle(model, inputs[rows]), rtol=1e-5, atol=1e-6
        )
