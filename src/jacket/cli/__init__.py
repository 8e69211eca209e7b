"""The `jacket` command (typer + rich): thin commands over the library and `jacket.io`.

Nothing here imports Keras at module level: `--backend` sets `KERAS_BACKEND` before the first import,
and the checks that need no model (files exist, the output can be written) run before Keras loads.
Data go to files; summaries to the terminal (`--json`: one JSON object on stdout); progress and
errors to stderr. Library and file errors become one red line and exit code 1; usage errors exit
with 2. `JACKET_TRACEBACK=1` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .distributed import SchedulerOption, WorkersOption

BACKENDS = ("tensorflow", "jax", "torch")


class _OneLineUsage(typer.core.TyperGroup):
    """Usage errors (a bad option value, a missing argument) as one red line and exit code 2,
    like every other error of the command, instead of click's usage box. (typer carries its own
    copy of click, so its exceptions are told by what they have: `exit_code`, `format_message`.)
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except Exception as error:
            kind = type(error).__name__
            if kind == "Abort":
                _error_line("aborted")
                sys.exit(1)
            if not (hasattr(error, "exit_code") and hasattr(error, "format_message")):
                raise
            if kind == "NoArgsIsHelpError":
                error.show()  # `jacket` alone, `jacket attack`: the help
                sys.exit(error.exit_code)
            message = error.format_message().rstrip()
            message += "" if message.endswith((".", "!", "?")) else "."
            context = getattr(error, "ctx", None)
            if context is not None and error.exit_code == 2:
                message += f" See `{context.command_path} --help`."
            _error_line(message)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsage,
    name="jacket",
    help="Jacobians for Keras: per-sample Jacobians of any Keras 3 model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


class Mode(StrEnum):
    auto = "auto"
    reverse = "reverse"
    forward = "forward"


# ----------------------------------------------------------------------------------- shared parts


def _set_backend(backend: str | None) -> None:
    if backend is None:
        return
    if backend not in BACKENDS:
        _usage(f"--backend must be one of {', '.join(BACKENDS)}. Received: {backend!r}.")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            _fail(RuntimeError(f"Keras is already loaded with {keras.backend.backend()}."))
    os.environ["KERAS_BACKEND"] = backend


def _error_line(message: str) -> None:
    line = " ".join(str(message).split())
    errors.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)


def _fail(error: BaseException) -> None:
    from ..errors import JacketError

    known = isinstance(error, (JacketError, RuntimeError, OSError))
    _error_line(str(error) if known else f"{type(error).__name__}: {error}")
    raise typer.Exit(1)


def _usage(message: str) -> None:
    _error_line(message)
    raise typer.Exit(2)


@contextlib.contextmanager
def _one_line_errors():
    """Any error inside: one red line on stderr and exit code 1 (130 when interrupted)."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _error_line("interrupted")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - one red line, no traceback
        if os.environ.get("JACKET_TRACEBACK"):
            raise
        _fail(error)


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1:
        _usage(f"--size must be HEIGHTxWIDTH (like 28x28) or one side. Received: {value!r}.")
    return numbers[0], numbers[1]


@contextlib.contextmanager
def _progress(show: bool, label: str, total: int):
    """A rich progress bar on stderr (only when it is a terminal); yields `update(done, total)`."""
    if not show or not errors.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=errors) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done, _total: progress.update(task, completed=done)


def _some_samples(source: str, x) -> int:
    """The number of samples in `x`, refusing none (an empty file has no Jacobian to write)."""
    from .. import io
    from ..errors import JacketValueError

    samples = io.num_samples(x)
    if samples == 0:
        raise JacketValueError(
            f"inputs {source!r} hold no samples. Received: {_describe_inputs(x)}. Pass a file "
            "with at least one sample."
        )
    return samples


def _check_plottable(path: Path, block: str | None, array) -> None:
    """A saved Jacobian `plot` can draw: real numbers, `(samples, *out_shape, *in_shape)`."""
    from ..errors import JacketValueError

    shape, dtype = tuple(array.shape), getattr(array, "dtype", None)
    name = f"{str(path)!r}" + (f" [{block}]" if block else "")
    kind = getattr(dtype, "kind", "f")
    if kind not in "biuf" and str(dtype) != "bfloat16":
        raise JacketValueError(
            f"{name} does not hold real numbers. Received: dtype {dtype}. Pass a Jacobian "
            "written by `jacket jacobian` (or any float array)."
        )
    if len(shape) < 3 or shape[0] == 0:
        raise JacketValueError(
            f"{name} is not a per-sample Jacobian `(samples, *out_shape, *in_shape)`. Received: "
            f"shape {shape}. Pass an array with at least 3 axes and one sample."
        )


def _describe_inputs(x) -> str:
    from .. import io

    if isinstance(x, dict):
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return ", ".join(str(tuple(v.shape)) for v in x)
    text = str(tuple(x.shape))
    if isinstance(x, io.ImageStack):
        text += f" from {len(x.files)} image(s)"
    return text


def _add_row(table: Table, name: str, value) -> None:
    table.add_row(Text(str(name)), Text(str(value)))  # Text: file names with [brackets] stay


def _emit(summary: dict, table: Table, *, as_json: bool, quiet: bool) -> None:
    if as_json:
        print(json.dumps(summary), flush=True)
    elif not quiet:
        console.print(table)


BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help="Keras backend: tensorflow, jax or torch (default: KERAS_BACKEND or tensorflow).",
    ),
]
ModelArgument = Annotated[
    str,
    typer.Argument(
        help="A .keras or .h5 model file, or module:function (a function returning a model).",
        show_default=False,
    ),
]
InputsArgument = Annotated[
    str,
    typer.Argument(
        help="Inputs: .npy, .npz (one array per input name), .csv, .zarr, or a folder or glob "
        "of images.",
        show_default=False,
    ),
]
SizeOption = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="Resize images to HEIGHTxWIDTH (default: the model's input size).",
        show_default=False,
    ),
]
UnsafeOption = Annotated[
    bool,
    typer.Option(
        "--unsafe",
        help="Load with Keras safe_mode off (runs a Lambda layer's saved code): trusted files only.",
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No summary and no progress bar; errors only.")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print a JSON summary on stdout instead of a table.")
]


@app.callback()
def main_options(backend: BackendOption = None) -> None:
    """Jacobians for Keras."""
    _set_backend(backend)


# -------------------------------------------------------------------------------------- commands


@app.command()
def jacobian(
    model: ModelArgument,
    inputs: InputsArgument,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Result file: .npy (one array), .npz or .zarr (one array per output x input).",
            show_default=False,
        ),
    ],
    sparse: Annotated[
        bool, typer.Option("--sparse", help="Sparse: the pattern once, values per sample (.npz).")
    ] = False,
    sparsity: Annotated[
        Path | None,
        typer.Option(help="A saved pattern (jacket sparsity -o) to use; implies --sparse."),
    ] = None,
    mode: Annotated[Mode, typer.Option(help="reverse (VJPs), forward (JVPs) or auto.")] = Mode.auto,
    chunk_size: Annotated[
        int | None, typer.Option(min=1, help="Seeds per pass (default: from the memory budget).")
    ] = None,
    flatten: Annotated[
        bool, typer.Option("--flatten", help="Store (samples, out_size, in_size) blocks.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Samples per batch streamed through.")
    ] = 128,
    memory_budget: Annotated[
        str | None, typer.Option(help="Working memory per pass, e.g. 500MB (default 1GiB).")
    ] = None,
    size: SizeOption = None,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
) -> None:
    """Per-sample Jacobians of MODEL at every sample of INPUTS, written to OUT."""
    _set_backend(backend)
    if scheduler is not None or workers is not None:  # on Dask, resumable: _cli_distributed.py
        from . import distributed as _cli_distributed

        if sparse or sparsity is not None:
            _usage(
                "--sparse writes one .npz file and runs in this process; --scheduler and "
                "--workers write a dense .zarr store. Pass one or the other."
            )

        return _cli_distributed.jacobian(
            model=model, inputs=inputs, out=out, scheduler=scheduler, workers=workers,
            mode=mode.value, chunk_size=chunk_size, flatten=flatten, batch_size=batch_size,
            memory_budget=memory_budget, size=size, force=force, quiet=quiet, as_json=as_json,
            unsafe=unsafe,
        )  # fmt: skip
    size_hw = _parse_size(size)
    if sparse or sparsity is not None:  # `jacket._cli_sparse`: the sparse file and its summary
        from .sparse import sparse_jacobian

        return sparse_jacobian(
            model, inputs, out, sparsity=sparsity, mode=mode.value, chunk_size=chunk_size,
            flatten=flatten, batch_size=batch_size, memory_budget=memory_budget, size=size_hw,
            force=force, quiet=quiet, as_json=as_json, unsafe=unsafe,
        )  # fmt: skip
    with _one_line_errors():
        from .. import io

        io.check_model_source(model)
        io.check_inputs_source(inputs)
        io.check_output(out, force=force)
        started = time.perf_counter()
        loaded = io.load_model(model, unsafe=unsafe)
        x = io.read_inputs(inputs, loaded, size=size_hw)
        samples = _some_samples(inputs, x)
        batches = math.ceil(samples / batch_size)
        import keras

        attrs = {
            "model": str(model),
            "inputs": str(inputs),
            "backend": keras.backend.backend(),
            "flatten": flatten,
        }
        with _progress(batches > 1 and not quiet, "Jacobians", samples) as update:
            layout = io.stream_jacobian(
                loaded,
                x,
                out,
                batch_size=batch_size,
                force=force,
                attrs=attrs,
                on_batch=update,
                mode=mode.value,
                chunk_size=chunk_size,
                flatten=flatten,
                memory_budget=memory_budget,
            )
        seconds = time.perf_counter() - started
    summary = {
        "command": "jacobian",
        "model": str(model),
        "inputs": str(inputs),
        "samples": samples,
        "batch_size": batch_size,
        "batches": batches,
        "backend": attrs["backend"],
        "mode": mode.value,
        "flatten": flatten,
        "output": str(out),
        "format": out.suffix.lower().lstrip("."),
        "blocks": {k: {"shape": list(s), "dtype": d} for k, (s, d) in layout.items()},
        "seconds": round(seconds, 3),
    }
    table = Table(title="jacket jacobian", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {_describe_inputs(x)}")
    _add_row(table, "backend", attrs["backend"])
    for key, (shape, dtype) in layout.items():
        _add_row(table, f"Jacobian {key}", f"{shape} {dtype}")
    _add_row(table, "batches", f"{batches} of up to {batch_size} samples")
    _add_row(table, "time", f"{seconds:.2f} s (load, compile, compute, write)")
    _add_row(table, "wrote", str(out))
    _emit(summary, table, as_json=as_json, quiet=quiet)


@app.command()
def check(
    model: ModelArgument,
    inputs: InputsArgument,
    samples: Annotated[
        int, typer.Option(min=1, help="Check the first SAMPLES samples of INPUTS.")
    ] = 16,
    eps: Annotated[
        float | None, typer.Option(help="Relative finite-difference step (default by dtype).")
    ] = None,
    rtol: Annotated[
        float | None, typer.Option(help="Tolerance on the max relative error (default by dtype).")
    ] = None,
    mode: Annotated[Mode, typer.Option(help="Mode of the checked Jacobian.")] = Mode.auto,
    size: SizeOption = None,
    backend: BackendOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
) -> None:
    """Check MODEL's Jacobians at INPUTS against float64 central differences (exit 1 if they differ)."""
    _set_backend(backend)
    size_hw = _parse_size(size)
    with _one_line_errors():
        import jacket

        from .. import io

        io.check_model_source(model)
        io.check_inputs_source(inputs)
        loaded = io.load_model(model, unsafe=unsafe)
        x = io.read_inputs(inputs, loaded, size=size_hw)
        _some_samples(inputs, x)
        _, stop, first = next(io.iter_batches(x, samples, model=loaded))
        report = jacket.check(loaded, first, eps=eps, rtol=rtol, mode=mode.value)
    summary = {
        "command": "check",
        "model": str(model),
        "inputs": str(inputs),
        "samples": stop,
        "ok": report.ok,
        "max_abs_error": report.max_abs_error,
        "max_rel_error": report.max_rel_error,
        "rtol": report.rtol,
        "eps": report.eps,
        "reference": report.reference,
        "shape": list(report.shape),
        "worst": list(report.worst),
    }
    if as_json:
        print(json.dumps(summary), flush=True)
    elif not quiet:
        style = "green" if report.ok else "red"
        console.print(f"[{style}]{escape(str(report))}[/{style}]", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def plot(
    jacobian: Annotated[
        Path,
        typer.Argument(help="A Jacobian file: .npy, .npz or .zarr.", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="PNG to write (default: beside the input, .png)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="Which block of an .npz or .zarr result, e.g. logits/image.")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Draw the first SAMPLES samples.")] = 4,
    input_ndim: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Trailing axes that are the input's (default: all but the first output axis).",
        ),
    ] = None,
    max_rows: Annotated[
        int, typer.Option(min=1, help="For image inputs: output rows drawn per sample.")
    ] = 16,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """A PNG of a saved Jacobian: a heatmap, or each output row as an image for image inputs."""
    with _one_line_errors():
        import numpy as np

        from .. import io

        target = out if out is not None else jacobian.with_suffix(".png")
        io.check_output(target, force=force, suffixes=(".png",))
        array, block = io.read_result(jacobian, key)
        _check_plottable(jacobian, block, array)
        try:
            from ..plot import jacobian_figure
        except ImportError:
            raise RuntimeError(
                'jacket plot needs matplotlib: pip install "jacket[plot]".'
            ) from None
        J = np.asarray(array[:samples])
        figure, description = jacobian_figure(J, input_ndim=input_ndim, max_rows=max_rows)
        with io.atomic_output(target, force=force) as tmp:
            figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    summary = {
        "command": "plot",
        "jacobian": str(jacobian),
        "key": block,
        "shape": list(array.shape),
        "figure": str(target),
        "description": description,
    }
    table = Table(title="jacket plot", show_header=False)
    _add_row(table, "Jacobian", f"{jacobian}{f' [{block}]' if block else ''}: {tuple(array.shape)}")
    _add_row(table, "drawn", description)
    _add_row(table, "wrote", str(target))
    _emit(summary, table, as_json=as_json, quiet=quiet)


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
    with _one_line_errors():
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
    table = Table(
        title="jacket demo: digits classifier (8x8 images, 10 classes)", show_header=False
    )
    _add_row(table, "backend", result.backend)
    _add_row(table, "test accuracy", f"{result.accuracy:.1%}")
    _add_row(table, "Jacobian", f"{result.jacobian_shape}  (batch, classes, 8, 8, 1)")
    _add_row(table, "plan", result.plan)
    _add_row(table, "first call", f"{result.first_call_s * 1e3:.1f} ms (trace + compile + run)")
    _add_row(table, "next calls", f"{result.steady_call_ms:.2f} ms (median)")
    _add_row(table, "finite differences", str(result.check))
    _add_row(table, "wrote", f"{result.array}\n{result.figure}")
    _emit(summary, table, as_json=as_json, quiet=False)
    if not result.check.ok:
        raise typer.Exit(1)


@app.command()
def info(backend: BackendOption = None, as_json: JsonOption = False) -> None:
    """Versions, the active backend and its devices."""
    _set_backend(backend)
    with _one_line_errors():
        import keras

        import jacket

        active = keras.backend.backend()
        versions = {"jacket": jacket.__version__, "python": platform.python_version()}
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
    table = Table(show_header=False)
    _add_row(table, "backend", active)
    for name, version in versions.items():
        _add_row(table, name, version or "not installed")
    _add_row(table, "devices", ", ".join(devices))
    _add_row(table, "machine", f"{platform.machine()}, {os.cpu_count()} CPUs")
    _emit(summary, table, as_json=as_json, quiet=False)


def _devices(backend: str) -> list[str]:
    try:
        if backend == "torch":  # Keras's device list has no PyTorch version
            import torch

            return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        from keras import distribution

        return list(distribution.list_devices())
    except Exception as error:  # noqa: BLE001 - devices are informative only
        return [f"unknown ({type(error).__name__}: {error})"]


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
    raise typer.Exit(subprocess.run(command, stderr=sys.stderr).returncode)


def _silence_native_stderr() -> None:
    """Keep native libraries' logs (TensorFlow's and XLA's C++ start-up lines, written straight to
    file descriptor 2) off the terminal, while Python's `sys.stderr` (errors, warnings, progress)
    still reaches it: `sys.stderr` moves to a copy of fd 2, and fd 2 itself goes to /dev/null.
    `JACKET_NATIVE_LOGS=1` keeps them."""
    if os.environ.get("JACKET_NATIVE_LOGS"):
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except Exception:  # noqa: BLE001 - no real stderr: nothing to do
        return
    sys.stderr.flush()
    python_stderr = os.fdopen(
        os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"
    )
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = python_stderr


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: temporary files are removed on the way out


def main() -> None:
    """Entry point of the `jacket` script and `python -m jacket`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter off
    # float64 on JAX (the finite-difference reference of `jacket check`, float64 models) needs it
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    signal.signal(signal.SIGTERM, _terminate)
    _silence_native_stderr()
    app()


# `jacket sensitivity`, `norms` and `attack ...` live in their own module and register on `app`
from . import analysis as _cli_analysis  # noqa: E402, F401
from . import sparse as _cli_sparse  # noqa: E402, F401 - `jacket sparsity`, `jacobian --sparse`
