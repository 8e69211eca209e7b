"""`jacket demo`, `jacket info` and `jacket bench`: the bundled example, the versions, the benchmarks."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from .shared import BackendOption, JsonOption, emit, fail, one_line_errors, set_backend


def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the array and the figure.")
    ] = Path("jacket-demo"),
    batch: Annotated[int, typer.Option(min=1, max=360, help="Test digits in the batch.")] = 32,
    backend: BackendOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead.")] = False,
) -> None:
    """Per-sample Jacobians of the bundled digits classifier: timed, checked, drawn."""
    set_backend(backend)
    with one_line_errors("demo"):
        from ..demo import run_demo

        result = run_demo(out, batch=batch)
    summary = {
        "backend": result.backend,
        "batch": result.batch,
        "jacobian_shape": list(result.jacobian_shape),
        "test_accuracy": round(result.accuracy, 4),
        "first_call_s": round(result.first_call_s, 4),
        "steady_call_ms": round(result.steady_call_ms, 3),
        "plan": result.plan,
        "check_ok": result.check.ok,
        "check_max_rel_error": result.check.max_rel_error,
        "array": str(result.array),
        "figure": str(result.figure),
    }
    rows = [("backend", result.backend), ("test accuracy", f"{result.accuracy:.1%}")]
    rows += [("Jacobian", f"{result.jacobian_shape}  (batch, classes, 8, 8, 1)")]
    rows += [("plan", result.plan)]
    rows += [("first call", f"{result.first_call_s * 1e3:.1f} ms (trace + compile + run)")]
    rows += [("next calls", f"{result.steady_call_ms:.2f} ms (median)")]
    rows += [("finite differences", str(result.check))]
    rows += [("wrote", f"{result.array}\n{result.figure}")]
    title = "jacket demo: digits classifier (8x8 images, 10 classes)"
    emit(summary, title, rows, as_json=as_json, quiet=False)
    if not result.check.ok:
        raise typer.Exit(1)


def info(backend: BackendOption = None, as_json: JsonOption = False) -> None:
    """Versions, the active backend and its devices."""
    set_backend(backend)
    with one_line_errors("info"):
        import keras

        from .. import __version__

        active = keras.backend.backend()
        versions = {"jacket": __version__, "python": platform.python_version()}
        versions["keras"] = keras.__version__
        for name in ("tensorflow", "jax", "torch", "numpy", "zarr", "pillow", "h5py", "matplotlib"):
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        devices = _devices(active)
    summary = {
        "backend": active,
        "versions": versions,
        "devices": devices,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    rows = [("backend", active)]
    rows += [(name, version or "not installed") for name, version in versions.items()]
    rows += [("devices", ", ".join(devices))]
    rows += [("machine", f"{platform.machine()}, {os.cpu_count()} CPUs")]
    emit(summary, None, rows, as_json=as_json, quiet=False)


def _devices(backend: str) -> list[str]:
    try:
        if backend == "torch":  # Keras's device list has no PyTorch version
            import torch

            return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        from keras import distribution

        return list(distribution.list_devices())
    except Exception as error:  # noqa: BLE001 - devices are informative only
        return [f"unknown ({type(error).__name__}: {error})"]


def bench(
    cases: Annotated[list[str] | None, typer.Argument(help="Case names, or 'all'.")] = None,
    backends: Annotated[
        list[str] | None, typer.Option("--backend", "-b", help="Backends to run (repeatable).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 10,
) -> None:
    """The benchmark suite of a source checkout (`benchmarks/run.py`, what `make bench` runs)."""
    import subprocess

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "run.py"
    if not script.exists():
        script = Path.cwd() / "benchmarks" / "run.py"
    if not script.exists():
        fail(
            FileNotFoundError(
                "benchmarks/run.py not found: run `jacket bench` in a jacket checkout."
            )
        )
    command = [sys.executable, str(script), "--repeats", str(repeats)]
    if backends:
        command += ["--backends", *backends]
    if cases:
        command += ["--cases", *cases]
    raise typer.Exit(subprocess.run(command, stderr=sys.stderr).returncode)
