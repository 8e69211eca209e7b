"""`jacket sensitivity` and `jacket norms`: `jacket.analysis` on a saved model and a file of inputs,
in this process or, with `--scheduler` / `--workers`, on Dask (`jacket.cli.distributed`).

`sensitivity` writes into a folder (created if missing; its parent must exist): arrays (`.npy`),
figures (`.png`) and `summary.json`, the summary that `--json` prints. `norms` writes its per-sample
values to `-o` (`.npz` or `.json`) when asked. Nothing is replaced without `--force`.
"""

from __future__ import annotations

import math
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from . import distributed
from .shared import (
    BackendOption,
    Bar,
    BatchOption,
    ForceOption,
    InputsArgument,
    JsonOption,
    ModelArgument,
    QuietOption,
    SchedulerOption,
    SizeOption,
    UnsafeOption,
    WorkersOption,
    emit,
    need_matplotlib,
    number,
    one_line_errors,
    output_folder,
    parse_size,
    save_all,
    set_backend,
    usage,
)


class Reduce(StrEnum):
    mean_abs = "mean_abs"
    rms = "rms"
    max_abs = "max_abs"


class Ord(StrEnum):
    fro = "fro"
    spectral = "2"
    nuc = "nuc"


_ORD_NAMES = {"fro": "Frobenius ||J||_F", "2": "spectral ||J||_2", "nuc": "nuclear ||J||_*"}

OutDirOption = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Folder for the arrays, figures and summary.json (created if missing).",
        show_default=False,
    ),
]


# ------------------------------------------------------------------------------------ sensitivity


def sensitivity(
    model: ModelArgument,
    inputs: InputsArgument,
    out: OutDirOption,
    reduce: Annotated[
        Reduce,
        typer.Option(help="Reduction of |d y_i / d x_j| over samples and outputs."),
    ] = Reduce.mean_abs,
    output: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="A flat output index (a class) to differentiate; default: all outputs.",
            show_default=False,
        ),
    ] = None,
    top: Annotated[
        int, typer.Option(min=0, help="How many of the most sensitive features to list and draw.")
    ] = 10,
    saliency: Annotated[
        int,
        typer.Option(
            "--saliency",
            min=0,
            help="Also draw the saliency maps of the first N samples (gradient of the predicted "
            "class, or of --output): saliency.png and saliency.npy.",
        ),
    ] = 0,
    batch_size: BatchOption = 64,
    size: SizeOption = None,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
) -> None:
    """Sensitivity of MODEL's outputs to each input feature over INPUTS: an array, a map, a ranking."""
    set_backend(backend)
    on_dask = distributed.runs_on_dask(scheduler, workers, size=size, unsafe=unsafe)
    if on_dask:
        instead = "the sensitivity covers every output, and no saliency map is drawn"
        distributed.only_here({"--output": output is not None, "--saliency": saliency > 0}, instead)
    size_hw = parse_size(size)
    names = ["sensitivity.npy", "sensitivity.png"]
    names += ["saliency.npy", "saliency.png"] if saliency else []
    with one_line_errors("sensitivity"):
        from .. import analysis, io

        (distributed.check_files if on_dask else io.check_sources)(model, inputs)
        need_matplotlib("jacket sensitivity")
        with output_folder(out, names + ["summary.json"], force=force) as paths:
            started = time.perf_counter()
            salient = run = None
            if on_dask:
                result, backend_name, ran_on = distributed.sensitivity(
                    model, inputs, scheduler, workers, reduce=reduce.value,
                    batch_size=batch_size, quiet=quiet,
                )  # fmt: skip
            else:
                run = io.load(model, inputs, unsafe=unsafe, size=size_hw)
                out_shape = run.single("jacket sensitivity")
                step = min(batch_size, run.samples)  # one batch of fewer samples: no padding
                with Bar("Sensitivity", "samples", show=not quiet, total=run.samples) as bar:
                    result = analysis.sensitivity(
                        run.model, run.batches(step), reduce=reduce.value, output=output,
                        batch_size=step, progress=bar,
                    )  # fmt: skip
                if saliency:
                    salient = analysis.saliency(run.model, run.first(saliency), target=output)
                backend_name, ran_on = _backend(), None
            seconds = time.perf_counter() - started
            arrays, figures = _sensitivity_files(result, salient, run, output, top)
            summary = {"command": "sensitivity", "model": model, "inputs": inputs}
            summary.update(samples=result.samples, batch_size=batch_size)
            summary.update(batches=-(-result.samples // batch_size), backend=backend_name)
            summary.update(reduce=reduce.value, output=output, in_shape=list(result.values.shape))
            summary.update({} if on_dask else {"out_shape": list(out_shape)})
            summary.update(top=_ranking(result, top), saliency=_saliency_summary(salient))
            summary.update(seconds=round(seconds, 3), files=[str(p) for p in paths.values()])
            summary.update({"scheduler": ran_on} if on_dask else {})
            save_all(paths, arrays, figures, summary, force=force)
    shown = run.describe() if run else f"{result.samples} samples of {result.values.shape}"
    rows = _sensitivity_rows(summary, f"{inputs}: {shown}", salient)
    emit(summary, "jacket sensitivity", rows, as_json=as_json, quiet=quiet)


def _ranking(result, top: int) -> list[dict]:
    return [
        {"rank": rank + 1, "feature": list(index), "flat": int(flat), "value": value}
        for rank, ((index, value), flat) in enumerate(zip(result.top(top), result.ranking[:top]))
    ]


def _sensitivity_rows(summary: dict, inputs: str, salient) -> list[tuple]:
    output, on_dask = summary["output"], "scheduler" in summary
    what = "all outputs" if output is None else f"output {output}"
    rows = [("model", summary["model"]), ("inputs", inputs), ("backend", summary["backend"])]
    rows += [("ran on", summary["scheduler"])] if on_dask else []
    rows += [("reduce", f"{summary['reduce']} of |d y / d x| over {what}")]
    rows += [("batches", f"{summary['batches']} of up to {summary['batch_size']} samples")]
    rows += [(f"#{e['rank']} {tuple(e['feature'])}", f"{e['value']:.6g}") for e in summary["top"]]
    if salient is not None:
        targets = salient.target.tolist()
        rows += [("saliency", f"{len(targets)} sample(s), outputs {targets}")]
    work = "start-up, compute" if on_dask else "load, compile, compute"
    rows += [("time", f"{summary['seconds']:.2f} s ({work})")]
    return rows + [("wrote", "\n".join(summary["files"]))]


def _sensitivity_files(result, salient, run, output, top) -> tuple[dict, dict]:
    """The arrays and figures `jacket sensitivity` writes, by file name."""
    from ..plot import saliency_grid_figure, sensitivity_figure

    title = f"{result.reduce} of |dy/dx| over {result.samples} samples"
    title += f", output {output}" if output is not None else ""
    arrays = {"sensitivity.npy": result.values}
    figures = {"sensitivity.png": sensitivity_figure(result.values, top=top, title=title)}
    if salient is not None:
        labels = [f"sample {b}, out {t}" for b, t in enumerate(salient.target)]
        first = run.first(len(salient.target))
        figures["saliency.png"] = saliency_grid_figure(first, salient.map, labels=labels)
        arrays["saliency.npy"] = salient.gradient
    return arrays, figures


def _saliency_summary(salient) -> dict | None:
    if salient is None:
        return None
    return {"samples": len(salient.target), "target": salient.target.tolist()}


# ------------------------------------------------------------------------------------------ norms


def norms(
    model: ModelArgument,
    inputs: InputsArgument,
    ord: Annotated[
        list[Ord] | None,
        typer.Option(
            "--ord",
            help="Norm of each sample's Jacobian: fro, 2 (spectral) or nuc (nuclear); "
            "repeatable. Default: fro and 2.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Also write the per-sample values: .json (the summary and lists) or .npz.",
            show_default=False,
        ),
    ] = None,
    lipschitz: Annotated[
        bool,
        typer.Option(
            "--lipschitz",
            help="The largest spectral norm over INPUTS and its sample (a lower bound on the "
            "model's Lipschitz constant).",
        ),
    ] = False,
    logdet: Annotated[
        bool,
        typer.Option(
            "--logdet", help="Sign and log|det J| per sample (output size == input size only)."
        ),
    ] = False,
    projections: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Estimate the Frobenius norm from this many random projections (Hutchinson) "
            "instead of the dense Jacobian.",
            show_default=False,
        ),
    ] = None,
    batch_size: BatchOption = 64,
    size: SizeOption = None,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
) -> None:
    """Norms of MODEL's per-sample Jacobians over INPUTS, a Lipschitz estimate, log-determinants."""
    set_backend(backend)
    ords = list(dict.fromkeys(o.value for o in (ord or [Ord.fro, Ord.spectral])))
    on_dask = distributed.runs_on_dask(scheduler, workers, size=size, unsafe=unsafe)
    if on_dask:
        others = [o.value for o in (ord or []) if o != Ord.fro]
        if others:
            usage(
                f"--ord {others[0]} needs each sample's Jacobian whole in this process: with "
                "--scheduler or --workers, norms computes Frobenius norms only (--ord fro, the "
                "default there). Leave out --scheduler/--workers for spectral and nuclear norms."
            )
        flags = {"--lipschitz": lipschitz, "--logdet": logdet, "--projections": bool(projections)}
        distributed.only_here(flags, "norms computes exact Frobenius norms")
        ords = ["fro"]
    size_hw = parse_size(size)
    with one_line_errors("norms"):
        from .. import analysis, io

        (distributed.check_files if on_dask else io.check_sources)(model, inputs)
        if out is not None:
            io.check_output(out, force=force, suffixes=(".json", ".npz"))
        started = time.perf_counter()
        if on_dask:
            result, backend_name, ran_on = distributed.norms(
                model, inputs, scheduler, workers, batch_size=batch_size, quiet=quiet
            )
        else:
            run = io.load(model, inputs, unsafe=unsafe, size=size_hw)
            _check_square(model, run, logdet)
            step = min(batch_size, run.samples)  # one batch of fewer samples: no padding
            with Bar("Norms", "samples", show=not quiet, total=run.samples) as bar:
                result = analysis.jacobian_norms(
                    run.model, run.batches(step), [_ORDS[o] for o in ords],
                    projections=projections, logdet=logdet, lipschitz=lipschitz,
                    batch_size=step, progress=bar,
                )  # fmt: skip
            backend_name, ran_on = _backend(), None
        seconds = time.perf_counter() - started
        summary = {"command": "norms", "model": model, "inputs": inputs}
        summary.update(samples=result.samples, batch_size=batch_size, backend=backend_name)
        summary.update(norms={o: _norm_entry(result, _ORDS[o]) for o in ords})
        summary.update(lipschitz=_lipschitz_entry(result.lipschitz))
        summary.update(logdet=_logdet_entry(result.logdet), seconds=round(seconds, 3))
        summary.update(output=None if out is None else str(out))
        summary.update({"scheduler": ran_on} if on_dask else {})
        if out is not None:
            _write_norms(out, summary, result, ords, force=force)
    shown = run.describe() if not on_dask else f"{result.samples} samples"
    rows = _norms_rows(summary, f"{inputs}: {shown}", result)
    emit(summary, "jacket norms", rows, as_json=as_json, quiet=quiet)


def _norms_rows(summary: dict, inputs: str, result) -> list[tuple]:
    on_dask = "scheduler" in summary
    rows = [("model", summary["model"]), ("inputs", inputs), ("backend", summary["backend"])]
    rows += [("ran on", summary["scheduler"])] if on_dask else []
    for o, entry in summary["norms"].items():
        estimated = f", error <= {entry['max_error']:.3g}" if entry["method"] != "exact" else ""
        rows += [(f"{_ORD_NAMES[o]} ({entry['method']})",
                  f"mean {entry['mean']:.6g}, max {entry['max']:.6g} at sample {entry['argmax']}"
                  f"{estimated}")]  # fmt: skip
    if result.lipschitz is not None:
        lip = result.lipschitz
        rows += [("Lipschitz (max ||J||_2)", f"{lip.value:.6g} at sample {lip.index}")]
    if result.logdet is not None:
        entry, logabs = summary["logdet"], result.logdet.logabsdet
        rows += [("log|det J|", f"mean {logabs.mean():.6g}, from {logabs.min():.6g} to "
                                f"{logabs.max():.6g}; det > 0: {entry['positive']}, < 0: "
                                f"{entry['negative']}, singular: {entry['singular']}")]  # fmt: skip
    work = "start-up, compute" if on_dask else "load, compile, compute"
    rows += [("time", f"{summary['seconds']:.2f} s ({work})")]
    return rows + ([("wrote", summary["output"])] if summary["output"] else [])


_ORDS = {"fro": "fro", "2": 2, "nuc": "nuc"}  # the command line's --ord: the library's ord


def _check_square(model: str, run, logdet: bool) -> None:
    """One input and one output tensor; with `--logdet`, a square Jacobian (before any work)."""
    from ..errors import JacketValueError

    out_shape = run.single("jacket norms")
    in_shape = tuple(int(d) for d in run.x.shape[1:])
    if logdet and math.prod(out_shape) != math.prod(in_shape):
        raise JacketValueError(
            f"--logdet needs a square Jacobian (output size == input size), but {model!r} "
            f"maps {in_shape} ({math.prod(in_shape)} values) to {out_shape} "
            f"({math.prod(out_shape)}). Leave out --logdet."
        )


def _norm_entry(result, ord) -> dict:
    values, errors = result.values[ord], result.errors[ord]
    return {
        "method": result.methods[ord],
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
        "argmax": int(values.argmax()),
        "max_error": float(errors.max()),
    }


def _lipschitz_entry(lip) -> dict | None:
    return None if lip is None else {"value": lip.value, "index": lip.index}


def _logdet_entry(det) -> dict | None:
    if det is None:
        return None
    signs, logabs = det.sign, det.logabsdet
    return {
        "mean_logabsdet": number(logabs.mean()),
        "min_logabsdet": number(logabs.min()),
        "max_logabsdet": number(logabs.max()),
        "positive": int((signs > 0).sum()),
        "negative": int((signs < 0).sum()),
        "singular": int((signs == 0).sum()),
    }


def _write_norms(out: Path, summary: dict, result, ords: list[str], *, force: bool) -> None:
    """The per-sample values of `jacket norms -o`: arrays in an `.npz`, or the summary and lists
    (NaN and infinities as null) in a `.json`; in process or on Dask alike."""
    from .. import io

    per_sample = {}  # arrays (samples,)
    for o in ords:
        per_sample[f"norm_{o}"] = result.values[_ORDS[o]]
        per_sample[f"error_{o}"] = result.errors[_ORDS[o]]
    if result.logdet is not None:
        per_sample["logdet_sign"] = result.logdet.sign
        per_sample["logdet_logabsdet"] = result.logdet.logabsdet
    lip = result.lipschitz
    if lip is not None:
        per_sample["lipschitz_norms"] = lip.norms
    if out.suffix.lower() == ".npz":
        extra = {} if lip is None else {"lipschitz_x": lip.x, "lipschitz_u": lip.u}
        extra.update({} if lip is None else {"lipschitz_v": lip.v})  # its singular vectors
        io.save_arrays(out, {**per_sample, **extra}, force=force)
    else:
        lists = {key: [float(v) for v in array] for key, array in per_sample.items()}
        io.save_json(out, {**summary, "per_sample": lists}, force=force)


def _backend() -> str:
    import keras

    return keras.backend.backend()
