"""`jacket demo`, `jacket info`, `jacket bench` and `jacket tune`: the bundled example, the versions,
the benchmarks, and plans measured ahead of time."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from .shared import (
    BackendOption,
    JsonOption,
    Mode,
    ModelArgument,
    UnsafeOption,
    emit,
    fail,
    one_line_errors,
    parse_memory_budget,
    set_backend,
    usage,
)


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


def tune(
    model: ModelArgument,
    input_shape: Annotated[
        str | None,
        typer.Option(
            help="Shape of one sample, e.g. 32,32,3 (default: the model's declared input shape).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        str, typer.Option(help="Batch sizes to measure, comma-separated, e.g. 1,8,32.")
    ] = "1",
    mode: Annotated[Mode, typer.Option(help="reverse (VJPs), forward (JVPs) or auto.")] = Mode.auto,
    memory_budget: Annotated[
        str | None, typer.Option(help="Working memory per pass, e.g. 500MB.")
    ] = None,
    backend: BackendOption = None,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
) -> None:
    """Measure the plans of MODEL now and keep them in the plan cache (jacket.tune)."""
    set_backend(backend)
    shape = _numbers("--input-shape", input_shape) if input_shape is not None else None
    sizes = _numbers("--batch-size", batch_size)
    with one_line_errors("tune"):
        from .. import io
        from ..engine import cache, tune

        loaded = io.load_model(model, unsafe=unsafe)
        reports = tune(
            loaded, sizes, input_shape=shape, mode=mode.value,
            memory_budget=parse_memory_budget(memory_budget),
        )  # fmt: skip
        folder = cache.directory()
    plans = [
        {
            "batch": batch,
            "plan": report.plan.describe(),
            "source": report.source,
            "measured_ms": {k: round(v, 4) for k, v in report.timings.items()},
            "dropped": report.failures,
        }
        for batch, report in zip(sizes, reports)
    ]
    summary = {"command": "tune", "model": str(model), "plans": plans}
    summary["cache"] = str(folder) if folder is not None else None
    rows = [("model", str(model))]
    for item in plans:
        rows += [(f"batch {item['batch']}", f"{item['plan']} ({item['source']})")]
        rows += [("", f"{ms:.3g} ms  {name}") for name, ms in item["measured_ms"].items()]
        rows += [("", f"dropped  {name}: {why}") for name, why in item["dropped"].items()]
    rows += [("plan cache", summary["cache"] or "off (JACKET_CACHE_DIR=off)")]
    emit(summary, "jacket tune", rows, as_json=as_json, quiet=False)


def _numbers(option: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        usage(f"{option} must be positive integers separated by commas. Received: {text!r}.")
    return values
