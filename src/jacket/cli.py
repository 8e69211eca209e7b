"""The `jacket` command (typer + rich): thin commands over the library.

Nothing here imports Keras at module level: `--backend` sets `KERAS_BACKEND` before the first import.
Library errors become one red line and exit code 1; usage errors exit with 2.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

BACKENDS = ("tensorflow", "jax", "torch")

app = typer.Typer(
    name="jacket",
    help="Jacobians for Keras: per-sample Jacobians of any Keras 3 model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def _set_backend(backend: str | None) -> None:
    if backend is None:
        return
    if backend not in BACKENDS:
        errors.print(
            f"[red]error:[/red] --backend must be one of {', '.join(BACKENDS)}. Received: {backend!r}."
        )
        raise typer.Exit(2)
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            errors.print(
                f"[red]error:[/red] Keras is already loaded with {keras.backend.backend()}."
            )
            raise typer.Exit(1)
    os.environ["KERAS_BACKEND"] = backend


BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help="Keras backend: tensorflow, jax or torch (default: KERAS_BACKEND or tensorflow).",
    ),
]


@app.callback()
def main_options(backend: BackendOption = None) -> None:
    """Jacobians for Keras."""
    _set_backend(backend)


def _fail(error: Exception) -> None:
    errors.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the array and the figure.")
    ] = Path("jacket-demo"),
    batch: Annotated[int, typer.Option(min=1, max=360, help="Test digits in the batch.")] = 32,
    backend: BackendOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead.")] = False,
) -> None:
    """Per-sample Jacobians of the bundled digits classifier: timed, checked, drawn."""
    _set_backend(backend)
    from .demo import run_demo

    try:
        result = run_demo(out, batch=batch)
    except Exception as error:  # noqa: BLE001 - one red line, no traceback
        _fail(error)
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
    if as_json:
        print(json.dumps(summary))
    else:
        table = Table(
            title="jacket demo: digits classifier (8x8 images, 10 classes)", show_header=False
        )
        table.add_row("backend", result.backend)
        table.add_row("test accuracy", f"{result.accuracy:.1%}")
        table.add_row("Jacobian", f"{result.jacobian_shape}  (batch, classes, 8, 8, 1)")
        table.add_row("plan", result.plan)
        table.add_row("first call", f"{result.first_call_s * 1e3:.1f} ms (trace + compile + run)")
        table.add_row("next calls", f"{result.steady_call_ms:.2f} ms (median)")
        table.add_row("finite differences", str(result.check))
        table.add_row("wrote", f"{result.array}\n{result.figure}")
        console.print(table)
    if not result.check.ok:
        raise typer.Exit(1)


@app.command()
def info(backend: BackendOption = None) -> None:
    """Versions, the active backend and its devices."""
    _set_backend(backend)
    import keras

    table = Table(show_header=False)
    table.add_row("jacket", metadata.version("jacket"))
    table.add_row("python", platform.python_version())
    table.add_row("keras", keras.__version__)
    table.add_row("backend", keras.backend.backend())
    for name in ("tensorflow", "jax", "torch", "numpy"):
        try:
            table.add_row(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            table.add_row(name, "not installed")
    try:
        from keras import distribution

        table.add_row("devices", ", ".join(distribution.list_devices()))
    except Exception as error:  # noqa: BLE001 - devices are informative only
        table.add_row("devices", f"unknown ({error})")
    table.add_row("machine", f"{platform.machine()}, {os.cpu_count()} CPUs")
    console.print(table)


@app.command()
def bench(
    cases: Annotated[list[str] | None, typer.Argument(help="Case names, or 'all'.")] = None,
    backends: Annotated[
        list[str] | None, typer.Option("--backend", "-b", help="Backends to run (repeatable).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 10,
) -> None:
    """The benchmark suite of a source checkout (`benchmarks/run.py`, what `make bench` runs)."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
    if not script.exists():
        script = Path.cwd() / "benchmarks" / "run.py"
    if not script.exists():
        _fail(
            FileNotFoundError(
                "benchmarks/run.py not found: run `jacket bench` in a jacket checkout."
            )
        )
    command = [sys.executable, str(script), "--repeats", str(repeats)]
    if backends:
        command += ["--backends", *backends]
    if cases:
        command += ["--cases", *cases]
    raise typer.Exit(subprocess.run(command).returncode)


def main() -> None:
    os.environ.setdefault(
        "TF_CPP_MIN_LOG_LEVEL", "2"
    )  # TensorFlow's start-up chatter off the terminal
    app()
