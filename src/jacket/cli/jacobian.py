"""`jacket jacobian`, `jacket check` and `jacket plot`: Jacobians of a model at a file of inputs,
written to a file, checked against finite differences, and drawn.

`jacket jacobian` runs in this process and streams a dense result (`jacket.io.stream_jacobian`);
with `--sparse` it writes a sparse one (`jacket.cli.sparse`), and with `--scheduler` or `--workers`
it runs on Dask into a resumable store (`jacket.cli.distributed`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import distributed, sparse
from .shared import (
    BackendOption,
    Bar,
    BatchOption,
    ForceOption,
    InputsArgument,
    JsonOption,
    Mode,
    ModelArgument,
    QuietOption,
    SchedulerOption,
    SizeOption,
    UnsafeOption,
    WorkersOption,
    console,
    emit,
    need_matplotlib,
    one_line_errors,
    parse_memory_budget,
    parse_size,
    set_backend,
    usage,
)

OutOption = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Result file: .npy (one array), .npz or .zarr (one array per output x input).",
        show_default=False,
    ),
]
SparseOption = Annotated[
    bool, typer.Option("--sparse", help="Sparse: the pattern once, values per sample (.npz).")
]
SparsityOption = Annotated[
    Path | None,
    typer.Option(help="A saved pattern (jacket sparsity -o) to use; implies --sparse."),
]
ModeOption = Annotated[Mode, typer.Option(help="reverse (VJPs), forward (JVPs) or auto.")]
ChunkOption = Annotated[
    int | None, typer.Option(min=1, help="Seeds per pass (default: from the memory budget).")
]
FlattenOption = Annotated[
    bool, typer.Option("--flatten", help="Store (samples, out_size, in_size) blocks.")
]
BudgetOption = Annotated[
    str | None, typer.Option(help="Working memory per pass, e.g. 500MB (default 1GiB).")
]


def jacobian(
    model: ModelArgument,
    inputs: InputsArgument,
    out: OutOption,
    sparse_: SparseOption = False,
    sparsity: SparsityOption = None,
    mode: ModeOption = Mode.auto,
    chunk_size: ChunkOption = None,
    flatten: FlattenOption = False,
    batch_size: BatchOption = 128,
    memory_budget: BudgetOption = None,
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
    set_backend(backend)
    options = dict(mode=mode.value, chunk_size=chunk_size, flatten=flatten)
    options.update(memory_budget=parse_memory_budget(memory_budget))
    common = dict(batch_size=batch_size, force=force, quiet=quiet, as_json=as_json)
    if distributed.runs_on_dask(scheduler, workers, size=size, unsafe=unsafe):
        if sparse_ or sparsity is not None:
            usage(
                "--sparse writes one .npz file and runs in this process; --scheduler and "
                "--workers write a dense .zarr store. Pass one or the other."
            )
        return distributed.jacobian(model, inputs, out, scheduler, workers, **common, **options)
    size_hw = parse_size(size)
    if sparse_ or sparsity is not None:
        return sparse.sparse_jacobian(
            model, inputs, out, sparsity, size=size_hw, unsafe=unsafe, **common, **options
        )
    with one_line_errors("jacobian"):
        from .. import io

        io.check_sources(model, inputs)
        io.check_output(out, force=force)
        started = time.perf_counter()
        run = io.load(model, inputs, unsafe=unsafe, size=size_hw)
        import keras

        attrs = {"model": model, "inputs": inputs, "backend": keras.backend.backend()}
        with Bar("Jacobians", "samples", show=not quiet) as bar:
            layout = io.stream_jacobian(
                run.model, run.x, out, batch_size=batch_size, force=force,
                attrs={**attrs, "flatten": flatten}, on_batch=bar, **options,
            )  # fmt: skip
        seconds = time.perf_counter() - started
    batches = -(-run.samples // batch_size)
    blocks = {key: {"shape": list(shape), "dtype": dtype} for key, (shape, dtype) in layout.items()}
    summary = {"command": "jacobian", **attrs, "samples": run.samples, "batch_size": batch_size}
    summary.update(batches=batches, mode=mode.value, flatten=flatten, output=str(out))
    summary.update(format=out.suffix.lower().lstrip("."), blocks=blocks, seconds=round(seconds, 3))
    rows = [("model", model), ("inputs", f"{inputs}: {run.describe()}")]
    rows += [("backend", attrs["backend"])]
    rows += [(f"Jacobian {key}", f"{shape} {dtype}") for key, (shape, dtype) in layout.items()]
    rows += [("batches", f"{batches} of up to {batch_size} samples")]
    rows += [("time", f"{seconds:.2f} s (load, compile, compute, write)"), ("wrote", out)]
    emit(summary, "jacket jacobian", rows, as_json=as_json, quiet=quiet)


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
    set_backend(backend)
    size_hw = parse_size(size)
    with one_line_errors("check"):
        from .. import io
        from ..engine import check as check_jacobian

        run = io.load(model, inputs, unsafe=unsafe, size=size_hw)
        report = check_jacobian(run.model, run.first(samples), eps=eps, rtol=rtol, mode=mode.value)
    checked = min(samples, run.samples)
    summary = {"command": "check", "model": model, "inputs": inputs, "samples": checked}
    summary.update(ok=report.ok, max_abs_error=report.max_abs_error)
    summary.update(max_rel_error=report.max_rel_error, rtol=report.rtol, eps=report.eps)
    summary.update(reference=report.reference, shape=list(report.shape))
    summary.update(worst=list(report.worst))
    if as_json:
        emit(summary, None, [], as_json=True, quiet=quiet)
    elif not quiet:
        style = "green" if report.ok else "red"
        console.print(f"[{style}]{escape(str(report))}[/{style}]", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


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
    with one_line_errors("plot"):
        import numpy as np

        from .. import io

        target = out if out is not None else jacobian.with_suffix(".png")
        io.check_output(target, force=force, suffixes=(".png",))
        array, block = io.read_result(jacobian, key)
        _check_plottable(jacobian, block, array)
        need_matplotlib("jacket plot")
        from ..plot import jacobian_figure

        J = np.asarray(array[:samples])
        figure, description = jacobian_figure(J, input_ndim=input_ndim, max_rows=max_rows)
        io.save_figure(target, figure, force=force)
    name = f"{jacobian}{f' [{block}]' if block else ''}"
    summary = {"command": "plot", "jacobian": str(jacobian), "key": block}
    summary.update(shape=list(array.shape), figure=str(target), description=description)
    rows = [("Jacobian", f"{name}: {tuple(array.shape)}"), ("drawn", description)]
    emit(summary, "jacket plot", rows + [("wrote", target)], as_json=as_json, quiet=quiet)


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
