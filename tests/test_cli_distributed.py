"""`jacket jacobian | sensitivity | norms ... --scheduler/--workers`: the commands on Dask.

Every backend runs the commands in this process (`--scheduler synchronous`, the same resumable
store without Dask) and their errors. On JAX (the backend whose workers start with the least
memory, as in test_distributed), a real cluster: a `dask scheduler` and a `dask worker` started as
processes of their own on 127.0.0.1, which the commands reach with `--scheduler tcp://...`, and a
command killed with SIGKILL mid-run and started again. Slow, on JAX: `--workers 2`, a LocalCluster
that the command starts and closes, and that dies with it when the command is killed. Every
Jacobian is compared with `jacket.jacobian` run here (or the exact Jacobian of a Dense layer).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import zarr
from cli_helpers import TERMINAL
from cli_helpers import close as _close
from cli_helpers import invoke as _invoke
from cli_helpers import ok as _ok
from cli_helpers import one_red_line as _one_red_line

import jacket
from jacket.cli import distributed as _cli_distributed
from jacket.distributed import store as dist_store

BACKEND = keras.backend.backend()


# ------------------------------------------------------------------------------------------ files


def _numpy(tree):
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), tree)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Models saved as `.keras` files and their inputs as `.zarr` stores (what workers read)."""
    keras.utils.set_random_seed(9)
    rng = np.random.default_rng(9)
    root = tmp_path_factory.mktemp("cli_distributed")

    class Files:
        path = root
        model = {}
        data = {}

    mlp = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)]
    )
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([a, b]))
    multi = keras.Model(
        {"a": a, "b": b},
        {"score": keras.layers.Dense(2, name="score")(h), "aux": keras.layers.Dense(3)(h)},
    )
    dense = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32, activation="tanh")])
    for name, model in {"mlp": mlp, "multi": multi, "dense": dense}.items():
        model.save(root / f"{name}.keras")
        Files.model[name] = model
    mlp.save(root / "mlp.h5")

    x = rng.standard_normal((40, 5)).astype("float32")
    zarr.create_array(root / "x.zarr", data=x, chunks=(16, 5))
    np.save(root / "x.npy", x)
    Files.data["x"] = x
    group = zarr.create_group(root / "multi.zarr")
    for name, size in (("a", 4), ("b", 3)):
        Files.data[name] = rng.standard_normal((20, size)).astype("float32")
        group.create_array(name, data=Files.data[name], chunks=(8, size))
    return Files


def _summary(*args, env=None) -> dict:
    return json.loads(_ok(*args, "--json", env=env).stdout)


def _manifest(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["jacket"]


def _finished(manifest: dict) -> set[int]:
    return {i for start, stop in manifest["chunks"]["finished"] for i in range(start, stop)}


def _dense_oracle(model, x: np.ndarray) -> np.ndarray:
    """`(n, out, in)` float64 Jacobians of one Dense+tanh layer, `(1 - y_i^2) W[j, i]`."""
    W, b = (np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in model.weights)
    y = np.tanh(x.astype(np.float64) @ W + b)
    return (1.0 - y**2)[:, :, None] * W.T[None]


def _sensitivity_oracle(J: np.ndarray, reduce: str) -> np.ndarray:
    """Per input feature, over samples and outputs, of a `(n, out, in)` Jacobian (NumPy)."""
    J = J.astype(np.float64)
    if reduce == "mean_abs":
        return np.abs(J).mean(axis=(0, 1))
    if reduce == "rms":
        return np.sqrt((J**2).mean(axis=(0, 1)))
    return np.abs(J).max(axis=(0, 1))


# ------------------------------------------------------------- in this process, on every backend


def test_jacobian_in_process_matches_jacobian_and_resumes_after_an_interrupt(
    files, tmp_path, monkeypatch
):
    out = tmp_path / "J.zarr"
    args = ["jacobian", files.path / "mlp.keras", files.path / "x.zarr", "-o", out]
    args += ["--scheduler", "synchronous", "--batch-size", 8]
    expected = _numpy(jacket.jacobian(files.model["mlp"], files.data["x"]))

    # Ctrl-C after the third chunk: one red line that says how to resume, exit code 130
    finished = dist_store.Tracker.finished

    def interrupted(self, index):
        finished(self, index)
        if self.count() == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(dist_store.Tracker, "finished", interrupted)
    _one_red_line(
        _invoke(*args), "interrupted", "rerun the same command", "3 of 5 chunks", code=130
    )
    monkeypatch.undo()
    assert _finished(_manifest(out)) == {0, 1, 2}

    summary = _summary(*args)
    assert summary["chunks"] == {"count": 5, "stored_before": 3, "computed": 2}
    assert summary["blocks"] == {"J": {"shape": [40, 3, 5], "dtype": "float32"}}
    assert summary["backend"] == BACKEND and summary["scheduler"] == "this process"
    resumed = zarr.open_array(out, mode="r")[:]
    _close(resumed, expected)
    manifest = _manifest(out)
    assert [run["computed"] for run in manifest["runs"]] == [[[0, 3]], [[3, 5]]]

    # the same command again: nothing left to compute; --force starts over (the same values up to
    # rounding: the planner may run another measured plan for these chunks, NOTE: [Measured plans])
    assert _summary(*args)["chunks"] == {"count": 5, "stored_before": 5, "computed": 0}
    summary = _summary(*args, "--force")
    assert summary["chunks"] == {"count": 5, "stored_before": 0, "computed": 5}
    assert len(_manifest(out)["runs"]) == 1
    _close(zarr.open_array(out, mode="r")[:], resumed)
    assert not list(out.rglob("*.partial"))


def test_other_arguments_are_refused_with_what_differs(files, tmp_path):
    out = tmp_path / "J.zarr"
    args = ["jacobian", files.path / "mlp.keras", files.path / "x.zarr", "-o", out]
    args += ["--scheduler", "synchronous", "--batch-size", 16]
    _ok(*args, "-q")
    before = zarr.open_array(out, mode="r")[:]
    line = _one_red_line(
        _invoke(*args, "--mode", "forward"), "--mode ('auto' stored, 'forward' now)", "--force"
    )
    assert "jacobian_dataset" not in line and "overwrite=True" not in line
    _one_red_line(_invoke(*args, "--flatten"), "--flatten (False stored, True now)")
    _one_red_line(_invoke(*args[:-1], 10), "--batch-size (16 stored, 10 now)")
    other = ["jacobian", files.path / "dense.keras", files.path / "x.zarr", "-o", out]
    _one_red_line(
        _invoke(*other, "--scheduler", "synchronous", "--batch-size", 16), "the model file"
    )
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], before)  # left as it was

    summary = _summary(*args, "--mode", "forward", "--force")
    assert summary["mode"] == "forward" and summary["chunks"]["computed"] == 3
    _close(zarr.open_array(out, mode="r")[:], before)

    # an output of the in-memory command is not a dataset run: refused, not overwritten
    plain = tmp_path / "plain.zarr"
    _ok("jacobian", files.path / "mlp.keras", files.path / "x.zarr", "-o", plain, "-q")
    _one_red_line(
        _invoke("jacobian", files.path / "mlp.keras", files.path / "x.zarr", "-o", plain,
                "--scheduler", "synchronous"),
        "not a jacket dataset run",
    )  # fmt: skip


def test_several_inputs_and_outputs_one_array_per_block(files, tmp_path):
    out = tmp_path / "J.zarr"
    summary = _summary(
        "jacobian", files.path / "multi.keras", files.path / "multi.zarr", "-o", out,
        "--scheduler", "synchronous", "--batch-size", 8,
    )  # fmt: skip
    x = {"a": files.data["a"], "b": files.data["b"]}
    expected = _numpy(jacket.jacobian(files.model["multi"], x))
    stored = zarr.open_group(out, mode="r")
    assert set(summary["blocks"]) == {f"{o}/{i}" for o in ("score", "aux") for i in "ab"}
    for key, block in summary["blocks"].items():
        output, name = key.split("/")
        assert block["shape"] == list(expected[output][name].shape)
        _close(stored[key][:], expected[output][name])


def test_sensitivity_and_norms_in_process_match_numpy(files, tmp_path):
    J = _numpy(jacket.jacobian(files.model["mlp"], files.data["x"]))
    for reduce in ("rms", "max_abs"):
        folder = tmp_path / reduce
        summary = _summary(
            "sensitivity", files.path / "mlp.keras", files.path / "x.zarr", "-o", folder,
            "--reduce", reduce, "--scheduler", "synchronous", "--batch-size", 16,
        )  # fmt: skip
        expected = _sensitivity_oracle(J, reduce)
        _close(np.load(folder / "sensitivity.npy"), expected)
        assert summary["samples"] == 40 and summary["batches"] == 3
        assert summary["top"][0]["flat"] == int(np.argmax(expected))
        assert (folder / "sensitivity.png").stat().st_size > 0
        assert json.loads((folder / "summary.json").read_text()) == summary

    out = tmp_path / "norms.npz"
    summary = _summary(
        "norms", files.path / "mlp.keras", files.path / "x.zarr", "-o", out,
        "--scheduler", "synchronous", "--batch-size", 16,
    )  # fmt: skip
    expected = np.sqrt((J.astype(np.float64) ** 2).sum(axis=(1, 2)))
    assert list(summary["norms"]) == ["fro"] and summary["norms"]["fro"]["method"] == "exact"
    assert summary["norms"]["fro"]["argmax"] == int(expected.argmax())
    with np.load(out) as saved:
        _close(saved["norm_fro"], expected)


def test_progress_bar_counts_chunks_on_a_terminal_only(files, tmp_path):
    args = ["jacobian", files.path / "mlp.keras", files.path / "x.zarr"]
    args += ["--scheduler", "synchronous", "--batch-size", 8]
    shown = _ok(*args, "-o", tmp_path / "a.zarr", env=TERMINAL)
    assert "Jacobians" in shown.stderr and "5/5" in shown.stderr and "chunks" in shown.stderr
    quiet = _ok(*args, "-o", tmp_path / "b.zarr", "-q", env=TERMINAL)
    assert quiet.stderr == "" and quiet.stdout == ""
    piped = _ok(*args, "-o", tmp_path / "c.zarr")  # not a terminal: no bar
    assert piped.stderr == ""


def _dask_args(files, out, *extra):
    return ["jacobian", files.path / "mlp.keras", files.path / "x.zarr", "-o", out, *extra]


@pytest.mark.parametrize(
    "extra, fragments, code",
    [
        (["--scheduler", "synchronous", "--workers", 2], ["--scheduler and --workers"], 2),
        (["--workers", 0], ["--workers must be a positive number", "Received: 0"], 2),
        (["--workers", -3], ["--workers must be a positive number"], 2),
        (["--scheduler", "synchronous", "--size", "8x8"], ["--size"], 2),
        (["--scheduler", "synchronous", "--unsafe"], ["--unsafe", "safe_mode"], 2),
        (["--scheduler", "synchronous", "--sparse"], ["--sparse", "one or the other"], 2),
        (["--scheduler", "no-port-here"], ["--scheduler must be a Dask scheduler address",
                                           "'no-port-here'"], 1),
    ],
)  # fmt: skip
def test_usage_errors(files, tmp_path, extra, fragments, code):
    out = tmp_path / "J.zarr"
    _one_red_line(_invoke(*_dask_args(files, out, *extra)), *fragments, code=code)
    assert list(tmp_path.iterdir()) == []


def test_files_that_workers_cannot_use_are_refused(files, tmp_path):
    mlp, x = files.path / "mlp.keras", files.path / "x.zarr"
    cases = [
        (["jacobian", mlp, files.path / "x.npy", "-o", tmp_path / "J.zarr"],
         ["INPUTS must be a .zarr store", "x.npy", "zarr.create_array"]),
        (["jacobian", mlp, x, "-o", tmp_path / "J.npy"], ["-o OUT.zarr", "J.npy"]),
        (["jacobian", files.path / "mlp.h5", x, "-o", tmp_path / "J.zarr"],
         ["MODEL must be a .keras file", "mlp.h5"]),
        (["jacobian", mlp, tmp_path / "none.zarr", "-o", tmp_path / "J.zarr"],
         ["inputs not found"]),
        (["jacobian", mlp, x, "-o", tmp_path / "no" / "J.zarr"], ["does not exist"]),
        (["sensitivity", mlp, files.path / "x.npy", "-o", tmp_path / "s"],
         ["INPUTS must be a .zarr store"]),
        (["norms", mlp, files.path / "x.npy"], ["INPUTS must be a .zarr store"]),
    ]  # fmt: skip
    for args, fragments in cases:
        _one_red_line(_invoke(*args, "--scheduler", "synchronous"), *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["norms", "--ord", "2"], "--ord 2 needs each sample's Jacobian"),
        (["norms", "--ord", "fro", "--ord", "nuc"], "--ord nuc"),
        (["norms", "--lipschitz"], "--lipschitz runs in this process only"),
        (["norms", "--logdet"], "--logdet"),
        (["norms", "--projections", "4"], "--projections"),
        (["sensitivity", "-o", "S", "--output", "1"], "--output"),
        (["sensitivity", "-o", "S", "--saliency", "2"], "--saliency"),
    ],
)
def test_analysis_options_that_need_this_process(files, tmp_path, args, fragment):
    command, *rest = args
    rest = [str(tmp_path / "S") if a == "S" else a for a in rest]
    result = _invoke(
        command, files.path / "mlp.keras", files.path / "x.zarr", *rest, "--workers", 2
    )
    _one_red_line(result, fragment, code=2)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_scheduler_fails_in_time_naming_the_address(files, tmp_path, monkeypatch):
    assert _cli_distributed.CONNECT_TIMEOUT_S <= 10
    monkeypatch.setattr(_cli_distributed, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    result = _invoke(*_dask_args(files, tmp_path / "J.zarr", "--scheduler", address))
    assert time.monotonic() - started < 10
    _one_red_line(result, f"cannot reach the Dask scheduler at {address} within 1 s",
                  "dask scheduler")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_without_workers_is_an_error_not_a_hang(files, tmp_path, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setattr(_cli_distributed, "WORKERS_WAIT_S", 1)
    with LocalCluster(
        n_workers=0,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as empty:
        address = empty.scheduler_address
        result = _invoke(*_dask_args(files, tmp_path / "J.zarr", "--scheduler", address))
    _one_red_line(result, f"no worker joined the Dask scheduler at {address} within 1 s",
                  "dask worker")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- a real cluster (processes of its own)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """`dask scheduler` and one `dask worker` (one thread, JAX), each a process of its own, as on
    a real cluster; yields the scheduler's address."""
    if BACKEND != "jax":
        pytest.skip("the cluster tests run on jax only (see the module docstring)")
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask_logs")
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = [sys.executable, "-m", "dask"]
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    commands = {
        "scheduler": dask + ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":")[-1],
                             "--no-dashboard"],
        "worker": dask + ["worker", address, "--nworkers", "1", "--nthreads", "1", "--host",
                          "127.0.0.1", "--no-dashboard", "--memory-limit", "2GB"],
    }  # fmt: skip
    processes = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "w") as log:
                processes[name] = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for name in ("worker", "scheduler"):
            if name in processes:
                processes[name].terminate()
                try:
                    processes[name].wait(timeout=30)
                except subprocess.TimeoutExpired:
                    processes[name].kill()
                    processes[name].wait()


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "jacket", *(str(a) for a in args)]


def _run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.cli
def test_a_real_scheduler_and_worker_compute_what_jacobian_does(files, tmp_path, scheduler):
    out = tmp_path / "J.zarr"
    args = _dask_args(files, out, "--scheduler", scheduler, "--batch-size", 8)
    proc = _run(*args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no Dask log lines, no warnings
    summary = json.loads(proc.stdout)
    assert summary["scheduler"] == f"the Dask scheduler at {scheduler} (1 worker)"
    assert summary["backend"] == "jax" and summary["chunks"]["computed"] == 5
    J = zarr.open_array(out, mode="r")[:]
    _close(J, _numpy(jacket.jacobian(files.model["mlp"], files.data["x"])))

    # the progress bar, fed by the futures as they complete
    bar = _dask_args(files, tmp_path / "bar.zarr", "--scheduler", scheduler, "--batch-size", 8)
    shown = _ok(*bar, env=TERMINAL)
    assert "Jacobians" in shown.stderr and "5/5" in shown.stderr and "chunks" in shown.stderr

    # sensitivity and norms reduced on the worker
    J64 = J.astype(np.float64)
    folder = tmp_path / "s"
    _ok("sensitivity", files.path / "mlp.keras", files.path / "x.zarr", "-o", folder,
        "--reduce", "rms", "--scheduler", scheduler, "--batch-size", 8, "-q")  # fmt: skip
    _close(np.load(folder / "sensitivity.npy"), _sensitivity_oracle(J64, "rms"))
    summary = _summary("norms", files.path / "mlp.keras", files.path / "x.zarr",
                       "--scheduler", scheduler, "--batch-size", 8)  # fmt: skip
    norms = np.sqrt((J64**2).sum(axis=(1, 2)))
    assert summary["norms"]["fro"]["argmax"] == int(norms.argmax())
    np.testing.assert_allclose(summary["norms"]["fro"]["max"], norms.max(), rtol=1e-5)


def test_workers_of_another_backend_are_refused(files, tmp_path, scheduler):
    out = tmp_path / "J.zarr"
    result = _invoke(
        *_dask_args(files, out, "--scheduler", scheduler), env={"KERAS_BACKEND": "torch"}
    )
    _one_red_line(result, "run the Keras backend 'jax', but this command asks for 'torch'")
    assert not out.exists()


@pytest.mark.cli
def test_a_killed_command_resumes_with_only_the_missing_chunks(files, tmp_path, scheduler):
    n, batch = 50 * 64, 64
    x = np.random.default_rng(3).standard_normal((n, 32)).astype("float32")
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(batch, 32))
    out = tmp_path / "J.zarr"
    args = ["jacobian", files.path / "dense.keras", tmp_path / "x.zarr", "-o", out]
    args += ["--scheduler", scheduler, "--batch-size", batch]
    driver = subprocess.Popen(_command(*args, "-q"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if len(_finished(_manifest(out))) >= 4:
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.01)
        assert driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.communicate()
    assert driver.returncode == -signal.SIGKILL
    killed = _manifest(out)
    finished = _finished(killed)
    assert 4 <= len(finished) < n // batch, "the command was not caught midway"
    assert not killed["runs"][-1]["completed"]
    files_done = {i: out / "c" / str(i) / "0" / "0" for i in finished}  # zarr's key of chunk i
    written = {i: file.stat().st_mtime_ns for i, file in files_done.items()}

    summary = _summary(*args)  # the same command again (here: in this process)
    assert summary["chunks"] == {
        "count": n // batch,
        "stored_before": len(finished),
        "computed": n // batch - len(finished),
    }
    after = _manifest(out)
    recomputed = {i for a, b in after["runs"][-1]["computed"] for i in range(a, b)}
    assert recomputed == set(range(n // batch)) - finished
    assert {i: file.stat().st_mtime_ns for i, file in files_done.items()} == written
    assert after["runs"][-1]["completed"] and len(after["runs"]) == 2

    whole = tmp_path / "whole.zarr"
    _ok(*args[:4], whole, *args[5:], "-q")  # an uninterrupted run of the same job
    J = zarr.open_array(out, mode="r")[:]
    _close(J, zarr.open_array(whole, mode="r")[:])  # up to rounding: plans are measured
    np.testing.assert_allclose(J, _dense_oracle(files.model["dense"], x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- a local cluster the command starts


def _children() -> set[int]:
    """This process's descendants, but multiprocessing's resource tracker (which lives as long as
    this process, once anything was spawned)."""
    import psutil

    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    }


@pytest.mark.jax
@pytest.mark.slow
def test_workers_2_start_and_close_a_local_cluster(files, tmp_path):
    before = _children()
    out = tmp_path / "J.zarr"
    result = _ok(*_dask_args(files, out, "--workers", 2, "--batch-size", 8, "--json"))
    assert result.stderr == ""  # no Dask log lines
    summary = json.loads(result.stdout)
    assert summary["scheduler"] == "a local Dask cluster of 2 workers on 127.0.0.1"
    assert summary["chunks"]["computed"] == 5
    _close(
        zarr.open_array(out, mode="r")[:],
        _numpy(jacket.jacobian(files.model["mlp"], files.data["x"])),
    )
    deadline = time.monotonic() + 30
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _children() - before, "worker processes left running"


@pytest.mark.cli
@pytest.mark.jax
@pytest.mark.slow
def test_killed_workers_command_takes_its_cluster_along_and_resumes(files, tmp_path):
    import psutil

    n, batch = 50 * 64, 64
    x = np.random.default_rng(4).standard_normal((n, 32)).astype("float32")
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(batch, 32))
    out = tmp_path / "J.zarr"
    args = ["jacobian", files.path / "dense.keras", tmp_path / "x.zarr", "-o", out]
    args += ["--workers", 2, "--batch-size", batch]
    driver = subprocess.Popen(_command(*args, "-q"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if len(_finished(_manifest(out))) >= 4:
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.01)
        assert driver.poll() is None, driver.communicate()
        cluster = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.communicate()
    assert len(cluster) >= 2  # the workers (and their nannies' helpers)
    gone, alive = psutil.wait_procs(cluster, timeout=60)
    assert not alive, f"left running after the command was killed: {alive}"
    finished = _finished(_manifest(out))
    assert 4 <= len(finished) < n // batch, "the command was not caught midway"

    summary = _summary(*args)  # the same command again
    assert summary["chunks"]["stored_before"] == len(finished)
    assert summary["chunks"]["computed"] == n // batch - len(finished)
    np.testing.assert_allclose(
        zarr.open_array(out, mode="r")[:], _dense_oracle(files.model["dense"], x), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
