"""`jacket sensitivity`, `jacket norms` and `jacket attack {fgsm,jsma,deepfool}`: `jacket.analysis`
and `jacket.attacks` on a saved model and a file of inputs.

The commands register themselves on `jacket.cli.app` (which imports this module) and keep its rules:
nothing imports Keras before `--backend` is read; files, folders and labels are checked before the
model loads; every output is written under a temporary name and renamed when complete, and none is
replaced without `--force`; errors are one red line (exit 1), usage errors exit 2.

`sensitivity` and `attack` write into a folder (created if missing; its parent must exist): arrays
(`.npy`), figures (`.png`) and `summary.json`, the summary that `--json` prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import (
    BackendOption,
    ForceOption,
    InputsArgument,
    JsonOption,
    ModelArgument,
    QuietOption,
    SizeOption,
    UnsafeOption,
    _add_row,
    _describe_inputs,
    _emit,
    _one_line_errors,
    _parse_size,
    _progress,
    _set_backend,
    _usage,
    app,
)
from .distributed import SchedulerOption, WorkersOption


class Reduce(StrEnum):
    mean_abs = "mean_abs"
    rms = "rms"
    max_abs = "max_abs"


class Ord(StrEnum):
    fro = "fro"
    spectral = "2"
    nuc = "nuc"


class Criterion(StrEnum):
    pairs = "pairs"
    target = "target"


_ORD_NAMES = {"fro": "Frobenius ||J||_F", "2": "spectral ||J||_2", "nuc": "nuclear ||J||_*"}
_NORM_NAMES = {"linf": "Linf", "l2": "L2", "l0": "L0 (fraction of features changed)"}
LABEL_SUFFIXES = (".npy", ".csv")

OutDirOption = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Folder for the arrays, figures and summary.json (created if missing).",
        show_default=False,
    ),
]
BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, help="Samples per batch streamed through.")
]
ClipOption = Annotated[
    str | None,
    typer.Option(
        "--clip",
        help="Bounds of the input domain as LOW,HIGH (e.g. 0,1); the examples stay within them.",
        show_default=False,
    ),
]
LabelsOption = Annotated[
    str | None,
    typer.Option(
        "--labels",
        help="True classes: a .npy or .csv file of one class index per sample, or the name of an "
        "array in the INPUTS .npz. Reported as accuracy before and after the attack.",
        show_default=False,
    ),
]
PlotOption = Annotated[
    int,
    typer.Option(
        "--max-samples-plot", min=1, help="Rows of original / adversarial / difference drawn."
    ),
]


# ----------------------------------------------------------------------------------- shared parts


def _need_matplotlib(command: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f'jacket {command} draws its figures with matplotlib: pip install "jacket[plot]".'
        ) from None


@contextlib.contextmanager
def _output_folder(folder: Path, names: list[str], *, force: bool):
    """Check the files a command writes into `folder` before any work; yields `{name: path}`.

    The folder is created if missing (its parent must exist) and removed again if the command fails
    before writing anything into it.
    """
    from .. import io
    from ..errors import JacketValueError

    if folder.exists() and not folder.is_dir():
        raise JacketValueError(
            f"cannot write into {str(folder)!r}: it is a file. Pass a folder to -o (--out)."
        )
    created = not folder.exists()
    if created:
        if not folder.parent.is_dir():
            raise JacketValueError(
                f"cannot create folder {str(folder)!r}: {str(folder.parent)!r} does not exist. "
                "Create it first."
            )
        try:
            folder.mkdir()
        except OSError as error:
            raise JacketValueError(
                f"cannot create folder {str(folder)!r} ({error.strerror or error})."
            ) from None
    try:
        paths = {name: folder / name for name in names}
        for path in paths.values():
            io.check_output(path, force=force, suffixes=(path.suffix,))
        yield paths
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while it is still empty
        raise


def _load_single(command: str, model: str, inputs: str, size, unsafe: bool):
    """Load the model and its inputs, for commands that take one input and one output tensor.

    Returns:
      `(model, x, samples, out_shape)`, `x` possibly lazy (see `io.read_inputs`).
    """
    import keras

    from .. import io
    from ..errors import JacketValueError

    loaded = io.load_model(model, unsafe=unsafe)
    x = io.read_inputs(inputs, loaded, size=size)
    if isinstance(x, (Mapping, list, tuple)):
        raise JacketValueError(
            f"jacket {command} needs a model with one input; {model!r} takes {len(x)} "
            f"({_describe_inputs(x)}). Wrap it in a model that takes one tensor."
        )
    samples = io.num_samples(x)
    if samples == 0:
        raise JacketValueError(f"inputs {inputs!r} hold no samples.")
    _, _, first = next(io.iter_batches(x, 1, model=loaded))
    y = loaded(first)
    if keras.tree.is_nested(y):
        count = len(keras.tree.flatten(y))
        raise JacketValueError(
            f"jacket {command} needs a model with one output tensor; {model!r} returns {count} "
            f"(a {type(y).__name__}). Wrap it in a model that returns one, e.g. "
            "`keras.Model(model.inputs, model.outputs[0])`."
        )
    return loaded, x, samples, tuple(int(d) for d in y.shape[1:])


def _stream(x, batch_size: int, model):
    """The samples of `x` as NumPy batches in the model's dtype, read one batch at a time."""
    from .. import io

    return (batch for _, _, batch in io.iter_batches(x, batch_size, model=model))


def _save_npy(path: Path, array, *, force: bool) -> None:
    import numpy as np

    from .. import io

    with io.atomic_output(path, force=force) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def _save_png(path: Path, figure, *, force: bool) -> None:
    from .. import io

    with io.atomic_output(path, force=force) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _save_json(path: Path, data: dict, *, force: bool) -> None:
    from .. import io

    with io.atomic_output(path, force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _number(value) -> float | None:
    """A float for JSON: None for NaN and infinities (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _numbers(values) -> list[float | None]:
    return [_number(v) for v in values]


def _wrote(paths) -> str:
    return "\n".join(str(p) for p in paths)


# ------------------------------------------------------------------------------------ sensitivity


@app.command()
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
    _set_backend(backend)
    if scheduler is not None or workers is not None:  # on Dask: _cli_distributed.py
        from . import distributed as _cli_distributed

        return _cli_distributed.sensitivity(
            model=model, inputs=inputs, out=out, scheduler=scheduler, workers=workers,
            reduce=reduce.value, output=output, top=top, saliency=saliency,
            batch_size=batch_size, size=size, force=force, quiet=quiet, as_json=as_json,
            unsafe=unsafe,
        )  # fmt: skip
    size_hw = _parse_size(size)
    with _one_line_errors():
        from .. import analysis, io

        io.check_model_source(model)
        io.check_inputs_source(inputs)
        _need_matplotlib("sensitivity")
        names = ["sensitivity.npy", "sensitivity.png"]
        names += ["saliency.npy", "saliency.png"] if saliency else []
        with _output_folder(out, names + ["summary.json"], force=force) as paths:
            started = time.perf_counter()
            loaded, x, samples, out_shape = _load_single(
                "sensitivity", model, inputs, size_hw, unsafe
            )
            import keras

            batches = math.ceil(samples / batch_size)
            with _progress(batches > 1 and not quiet, "Sensitivity", samples) as update:
                result = analysis.sensitivity(
                    loaded,
                    _stream(x, batch_size, loaded),
                    reduce=reduce.value,
                    output=output,
                    batch_size=batch_size,
                    progress=update,
                )
            from ..plot import saliency_grid_figure, sensitivity_figure

            title = f"{reduce.value} of |dy/dx| over {result.samples} samples"
            if output is not None:
                title += f", output {output}"
            figures = {"sensitivity.png": sensitivity_figure(result.values, top=top, title=title)}
            arrays = {"sensitivity.npy": result.values}
            salient = None
            if saliency:
                _, _, first = next(io.iter_batches(x, saliency, model=loaded))
                salient = analysis.saliency(loaded, first, target=output)
                labels = [f"sample {b}, out {t}" for b, t in enumerate(salient.target)]
                figures["saliency.png"] = saliency_grid_figure(first, salient.map, labels=labels)
                arrays["saliency.npy"] = salient.gradient
            seconds = time.perf_counter() - started
            ranking = [
                {"rank": rank + 1, "feature": list(index), "flat": int(flat), "value": value}
                for rank, ((index, value), flat) in enumerate(
                    zip(result.top(top), result.ranking[:top])
                )
            ]
            summary = {
                "command": "sensitivity",
                "model": str(model),
                "inputs": str(inputs),
                "samples": result.samples,
                "batch_size": batch_size,
                "batches": batches,
                "backend": keras.backend.backend(),
                "reduce": reduce.value,
                "output": output,
                "in_shape": list(result.values.shape),
                "out_shape": list(out_shape),
                "top": ranking,
                "saliency": None
                if salient is None
                else {"samples": len(salient.target), "target": salient.target.tolist()},
                "seconds": round(seconds, 3),
                "files": [str(p) for p in paths.values()],
            }
            for name, array in arrays.items():
                _save_npy(paths[name], array, force=force)
            for name, figure in figures.items():
                _save_png(paths[name], figure, force=force)
            _save_json(paths["summary.json"], summary, force=force)
    table = Table(title="jacket sensitivity", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {_describe_inputs(x)}")
    _add_row(table, "backend", summary["backend"])
    what = "all outputs" if output is None else f"output {output}"
    _add_row(table, "reduce", f"{reduce.value} of |d y / d x| over {what}")
    _add_row(table, "batches", f"{batches} of up to {batch_size} samples")
    for entry in ranking:
        _add_row(table, f"#{entry['rank']} {tuple(entry['feature'])}", f"{entry['value']:.6g}")
    if salient is not None:
        _add_row(
            table, "saliency", f"{len(salient.target)} sample(s), outputs {salient.target.tolist()}"
        )
    _add_row(table, "time", f"{seconds:.2f} s (load, compile, compute)")
    _add_row(table, "wrote", _wrote(paths.values()))
    _emit(summary, table, as_json=as_json, quiet=quiet)


# ------------------------------------------------------------------------------------------ norms


@app.command()
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
    _set_backend(backend)
    if scheduler is not None or workers is not None:  # on Dask, Frobenius only: _cli_distributed
        from . import distributed as _cli_distributed

        return _cli_distributed.norms(
            model=model, inputs=inputs, ords=None if ord is None else [o.value for o in ord],
            out=out, scheduler=scheduler, workers=workers, lipschitz=lipschitz, logdet=logdet,
            projections=projections, batch_size=batch_size, size=size, force=force, quiet=quiet,
            as_json=as_json, unsafe=unsafe,
        )  # fmt: skip
    size_hw = _parse_size(size)
    ords = list(dict.fromkeys(o.value for o in (ord or [Ord.fro, Ord.spectral])))
    with _one_line_errors():
        import numpy as np

        from .. import analysis, io
        from ..batches import pad
        from ..errors import JacketValueError

        io.check_model_source(model)
        io.check_inputs_source(inputs)
        if out is not None:
            io.check_output(out, force=force, suffixes=(".json", ".npz"))
        started = time.perf_counter()
        loaded, x, samples, out_shape = _load_single("norms", model, inputs, size_hw, unsafe)
        in_shape = tuple(int(d) for d in x.shape[1:])
        if logdet and math.prod(out_shape) != math.prod(in_shape):
            raise JacketValueError(
                f"--logdet needs a square Jacobian (output size == input size), but {model!r} "
                f"maps {in_shape} ({math.prod(in_shape)} values) to {out_shape} "
                f"({math.prod(out_shape)}). Leave out --logdet."
            )
        import keras

        values = {o: np.empty(samples) for o in ords}
        errors = {o: np.empty(samples) for o in ords}
        methods = {}
        signs, logabs = np.empty(samples), np.empty(samples)
        batches = math.ceil(samples / batch_size)
        with _progress(batches > 1 and not quiet, "Norms", samples) as update:
            for start, stop, batch in io.iter_batches(x, batch_size, model=loaded):
                n = stop - start
                if n < batch_size and start > 0:  # the shape of the other batches: no re-trace
                    batch = pad(batch, batch_size)
                if logdet:  # first: a non-square model fails before any other work
                    det = analysis.logdet(loaded, batch)
                    signs[start:stop], logabs[start:stop] = det.sign[:n], det.logabsdet[:n]
                for o in ords:
                    options = {}
                    if o == "fro" and projections is not None:
                        options = {"method": "estimate", "n_projections": projections}
                    norm = analysis.jacobian_norm(loaded, batch, 2 if o == "2" else o, **options)
                    values[o][start:stop] = norm.value[:n]
                    errors[o][start:stop] = norm.error[:n]
                    methods[o] = norm.method
                if update is not None:
                    update(stop, samples)
        lip = None
        if lipschitz:
            with _progress(batches > 1 and not quiet, "Lipschitz", samples) as update:
                lip = analysis.lipschitz(
                    loaded, _stream(x, batch_size, loaded), batch_size=batch_size, progress=update
                )
        seconds = time.perf_counter() - started
        summary = {
            "command": "norms",
            "model": str(model),
            "inputs": str(inputs),
            "samples": samples,
            "batch_size": batch_size,
            "backend": keras.backend.backend(),
            "norms": {
                o: {
                    "method": methods[o],
                    "mean": float(values[o].mean()),
                    "min": float(values[o].min()),
                    "max": float(values[o].max()),
                    "argmax": int(values[o].argmax()),
                    "max_error": float(errors[o].max()),
                }
                for o in ords
            },
            "lipschitz": None if lip is None else {"value": lip.value, "index": lip.index},
            "logdet": None
            if not logdet
            else {
                "mean_logabsdet": _number(logabs.mean()),
                "min_logabsdet": _number(logabs.min()),
                "max_logabsdet": _number(logabs.max()),
                "positive": int((signs > 0).sum()),
                "negative": int((signs < 0).sum()),
                "singular": int((signs == 0).sum()),
            },
            "seconds": round(seconds, 3),
            "output": None if out is None else str(out),
        }
        if out is not None:
            per_sample = {}  # arrays (samples,)
            for o in ords:
                per_sample[f"norm_{o}"], per_sample[f"error_{o}"] = values[o], errors[o]
            if logdet:
                per_sample["logdet_sign"], per_sample["logdet_logabsdet"] = signs, logabs
            if lip is not None:
                per_sample["lipschitz_norms"] = lip.norms
            if out.suffix.lower() == ".npz":
                arrays = dict(per_sample)
                if lip is not None:  # the maximizing input and its singular vectors
                    arrays.update(lipschitz_x=lip.x, lipschitz_u=lip.u, lipschitz_v=lip.v)
                with io.atomic_output(out, force=force) as tmp, open(tmp, "wb") as handle:
                    np.savez(handle, **arrays)
            else:
                lists = {key: _numbers(array) for key, array in per_sample.items()}
                _save_json(out, {**summary, "per_sample": lists}, force=force)
    table = Table(title="jacket norms", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {_describe_inputs(x)}")
    _add_row(table, "backend", summary["backend"])
    for o, entry in summary["norms"].items():
        estimated = f", error <= {entry['max_error']:.3g}" if entry["method"] != "exact" else ""
        _add_row(
            table,
            f"{_ORD_NAMES[o]} ({entry['method']})",
            f"mean {entry['mean']:.6g}, max {entry['max']:.6g} at sample {entry['argmax']}"
            f"{estimated}",
        )
    if lip is not None:
        _add_row(table, "Lipschitz (max ||J||_2)", f"{lip.value:.6g} at sample {lip.index}")
    if logdet:
        entry = summary["logdet"]
        _add_row(
            table,
            "log|det J|",
            f"mean {logabs.mean():.6g}, from {logabs.min():.6g} to {logabs.max():.6g}; "
            f"det > 0: {entry['positive']}, < 0: {entry['negative']}, "
            f"singular: {entry['singular']}",
        )
    _add_row(table, "time", f"{seconds:.2f} s (load, compile, compute)")
    if out is not None:
        _add_row(table, "wrote", str(out))
    _emit(summary, table, as_json=as_json, quiet=quiet)


# ---------------------------------------------------------------------------------------- attacks

attack_app = typer.Typer(
    name="attack",
    help="Adversarial examples of a classifier: FGSM, JSMA, DeepFool (jacket.attacks).",
    no_args_is_help=True,
)
app.add_typer(attack_app, name="attack")


def _parse_clip(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    parts = value.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        _usage(f"--clip must be LOW,HIGH with finite LOW < HIGH (like 0,1). Received: {value!r}.")
    return low, high


def _read_labels(spec: str, inputs: str):
    """Labels from a file, or from an array of the INPUTS .npz: the raw array (checked later)."""
    import numpy as np

    from ..errors import JacketValueError

    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LABEL_SUFFIXES:
            raise JacketValueError(
                f"cannot read labels from {spec!r}: the suffix must be .npy or .csv. Received: "
                f"{path.suffix or 'no suffix'!r}."
            )
        try:
            if suffix == ".npy":
                return np.load(path, allow_pickle=False)
            return np.loadtxt(path, delimiter=",", ndmin=1)
        except (OSError, ValueError) as error:
            raise JacketValueError(f"cannot read labels from {spec!r}: {error}") from None
    if Path(inputs).suffix.lower() == ".npz":
        with np.load(inputs, allow_pickle=False) as archive:
            if spec in archive.files:
                return archive[spec]
            held = ", ".join(archive.files)
        raise JacketValueError(
            f"labels not found: no file {spec!r}, and {inputs!r} has no array {spec!r} (it holds "
            f"{held}). Pass a .npy file or the name of an array in INPUTS."
        )
    raise JacketValueError(
        f"labels not found: {spec!r}. Pass a .npy or .csv file of one class index per sample, or "
        "the name of an array in an .npz INPUTS file."
    )


def _check_classes(labels, target, samples: int, out_shape: tuple, spec: str | None):
    """`labels` as `(samples,)` int64 within the model's classes; `target` within them too."""
    import numpy as np

    from ..errors import JacketValueError

    if len(out_shape) != 1 or out_shape[0] < 2:
        raise JacketValueError(
            "jacket attack needs a classifier with outputs `(batch, classes)`, at least 2 classes. "
            f"Received: outputs of shape (batch, {', '.join(map(str, out_shape))})."
        )
    classes = out_shape[0]
    if target is not None and target >= classes:
        raise JacketValueError(
            f"--target {target} is not a class of the model, which has {classes} outputs. "
            f"Pass a class in [0, {classes})."
        )
    if labels is None:
        return None
    labels = np.asarray(labels)
    integral = labels.dtype.kind in "iu" or (
        labels.dtype.kind == "f"
        and np.all(np.isfinite(labels))
        and np.all(labels == labels.round())
    )
    if labels.ndim != 1 or not integral:
        raise JacketValueError(
            f"--labels {spec!r} must be one class index per sample, shape ({samples},) of "
            f"integers. Received: shape {labels.shape}, dtype {labels.dtype}."
        )
    if len(labels) != samples:
        raise JacketValueError(
            f"--labels {spec!r} holds {len(labels)} labels for {samples} samples of INPUTS. Pass "
            "one class index per sample."
        )
    if labels.min() < 0 or labels.max() >= classes:
        raise JacketValueError(
            f"--labels {spec!r} must hold classes in [0, {classes}) (the model has {classes} "
            f"outputs). Received: values from {labels.min():g} to {labels.max():g}."
        )
    return labels.astype(np.int64)


def _predict(model, x, batch_size: int):
    """The model's classes on `x`, batch by batch."""
    import keras
    import numpy as np

    classes = [
        np.asarray(keras.ops.convert_to_numpy(model(x[start : start + batch_size]))).argmax(axis=1)
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(classes)


def _attack(
    name: str,
    parameters: dict,
    *,
    model: str,
    inputs: str,
    out: Path,
    labels: str | None,
    max_samples_plot: int,
    batch_size: int,
    size: str | None,
    backend: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    unsafe: bool,
) -> None:
    """What the three attack commands share: load, attack, draw, write, report."""
    _set_backend(backend)
    size_hw = _parse_size(size)
    with _one_line_errors():
        from .. import attacks, io

        io.check_model_source(model)
        io.check_inputs_source(inputs)
        _need_matplotlib("attack")
        raw_labels = None if labels is None else _read_labels(labels, inputs)
        names = ["x_adv.npy", "attack.png", "summary.json"]
        with _output_folder(out, names, force=force) as paths:
            started = time.perf_counter()
            loaded, x, samples, out_shape = _load_single(
                f"attack {name}", model, inputs, size_hw, unsafe
            )
            import keras

            y = _check_classes(raw_labels, parameters.get("target"), samples, out_shape, labels)
            _, _, x_all = next(io.iter_batches(x, samples, model=loaded))
            options = dict(parameters)
            if name == "fgsm":
                options["y"] = y
            with _progress(samples > batch_size and not quiet, name.upper(), samples) as update:
                attack_started = time.perf_counter()
                result = getattr(attacks, name)(
                    loaded, x_all, batch_size=batch_size, progress=update, **options
                )
                attack_seconds = time.perf_counter() - attack_started
            clean = None if y is None else _predict(loaded, x_all, batch_size)
            from ..plot import adversarial_figure

            figure = adversarial_figure(
                x_all,
                result.x_adv,
                labels=result.labels,
                adv_labels=result.predictions,
                max_samples=max_samples_plot,
            )
            shown = {k: list(v) if isinstance(v, tuple) else v for k, v in parameters.items()}
            summary = {
                "command": "attack",
                "attack": name,
                "model": str(model),
                "inputs": str(inputs),
                "samples": samples,
                "backend": keras.backend.backend(),
                "parameters": {**shown, "batch_size": batch_size},
                "targeted": result.target is not None,
                "success_rate": _number(result.success_rate),
                "successes": int(result.success.sum()),
                "attacked": int(result.attacked.sum()),
                "norm": result.norm,
                "mean_perturbation": _number(result.mean_perturbation),
                "mean_iterations": None
                if result.iterations is None
                else float(result.iterations.mean()),
                "accuracy": None
                if y is None
                else {
                    "clean": float((clean == y).mean()),
                    "adversarial": float((result.predictions == y).mean()),
                },
                "seconds": round(attack_seconds, 3),
                "total_seconds": round(time.perf_counter() - started, 3),
                "files": [str(p) for p in paths.values()],
            }
            _save_npy(paths["x_adv.npy"], result.x_adv, force=force)
            _save_png(paths["attack.png"], figure, force=force)
            _save_json(paths["summary.json"], summary, force=force)
    table = Table(title=f"jacket attack {name}", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {_describe_inputs(x)}")
    _add_row(table, "backend", summary["backend"])
    settings = ", ".join(f"{k}={v}" for k, v in parameters.items() if v is not None)
    kind = "targeted" if summary["targeted"] else "untargeted"
    _add_row(table, "attack", f"{name} ({kind}){': ' + settings if settings else ''}")
    _add_row(
        table,
        "success",
        f"{summary['successes']} of {summary['attacked']} ({result.success_rate:.1%})"
        + (
            f"; {samples - summary['attacked']} already of their target, not attacked"
            if summary["attacked"] < samples
            else ""
        ),
    )
    mean = summary["mean_perturbation"]
    _add_row(
        table,
        "perturbation",
        f"mean {_NORM_NAMES[result.norm]} {mean:.4g} over the successful samples"
        if mean is not None
        else "none succeeded",
    )
    if summary["mean_iterations"] is not None:
        _add_row(table, "iterations", f"mean {summary['mean_iterations']:.3g} steps per sample")
    if summary["accuracy"] is not None:
        accuracy = summary["accuracy"]
        _add_row(
            table,
            "accuracy",
            f"{accuracy['clean']:.1%} on INPUTS, {accuracy['adversarial']:.1%} on x_adv",
        )
    _add_row(table, "time", f"{attack_seconds:.2f} s (attack, first call compiles)")
    _add_row(table, "wrote", _wrote(paths.values()))
    _emit(summary, table, as_json=as_json, quiet=quiet)


@attack_app.command("fgsm")
def fgsm(
    model: ModelArgument,
    inputs: InputsArgument,
    out: OutDirOption,
    eps: Annotated[
        float,
        typer.Option(
            help="Step size: the Linf size of the perturbation (before clipping).",
            show_default=False,
        ),
    ],
    labels: LabelsOption = None,
    target: Annotated[
        int | None,
        typer.Option(min=0, help="Target class (a targeted attack).", show_default=False),
    ] = None,
    clip: ClipOption = None,
    probabilities: Annotated[
        bool,
        typer.Option("--probabilities", help="The model outputs probabilities, not logits."),
    ] = False,
    batch_size: BatchOption = 128,
    max_samples_plot: PlotOption = 8,
    size: SizeOption = None,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
) -> None:
    """Fast gradient sign method: one step of size EPS along the sign of the loss gradient."""
    if not (math.isfinite(eps) and eps > 0):
        _usage(f"--eps must be a finite positive number. Received: {eps}.")
    parameters = {"eps": eps, "target": target, "clip": _parse_clip(clip)}
    parameters["logits"] = not probabilities
    _attack(
        "fgsm", parameters, model=model, inputs=inputs, out=out, labels=labels,
        max_samples_plot=max_samples_plot, batch_size=batch_size, size=size, backend=backend,
        force=force, quiet=quiet, as_json=as_json, unsafe=unsafe,
    )  # fmt: skip


@attack_app.command("jsma")
def jsma(
    model: ModelArgument,
    inputs: InputsArgument,
    out: OutDirOption,
    target: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Target class; default: a random class other than the predicted one per sample.",
            show_default=False,
        ),
    ] = None,
    theta: Annotated[
        float, typer.Option(help="Change per feature and step (negative: decrease features).")
    ] = 1.0,
    gamma: Annotated[
        float, typer.Option(help="Largest fraction of the features to change, in (0, 1].")
    ] = 0.145,
    clip: Annotated[
        str, typer.Option("--clip", help="Bounds of the input domain as LOW,HIGH.")
    ] = "0,1",
    criterion: Annotated[
        Criterion,
        typer.Option(
            help="pairs: the paper's saliency map over feature pairs; target: the two features "
            "of largest target gradient (the Adversarial Robustness Toolbox's choice).",
        ),
    ] = Criterion.pairs,
    seed: Annotated[int, typer.Option(help="Seed of the random targets.")] = 0,
    labels: LabelsOption = None,
    batch_size: BatchOption = 128,
    max_samples_plot: PlotOption = 8,
    size: SizeOption = None,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
) -> None:
    """JSMA (Papernot et al. 2016): change pairs of features until the target class wins."""
    if not (math.isfinite(theta) and theta != 0):
        _usage(f"--theta must be a finite nonzero number. Received: {theta}.")
    if not 0 < gamma <= 1:
        _usage(f"--gamma must be a fraction of the features in (0, 1]. Received: {gamma}.")
    parameters = {"target": target, "theta": theta, "gamma": gamma, "clip": _parse_clip(clip)}
    parameters.update(criterion=criterion.value, seed=seed)
    _attack(
        "jsma", parameters, model=model, inputs=inputs, out=out, labels=labels,
        max_samples_plot=max_samples_plot, batch_size=batch_size, size=size, backend=backend,
        force=force, quiet=quiet, as_json=as_json, unsafe=unsafe,
    )  # fmt: skip


@attack_app.command("deepfool")
def deepfool(
    model: ModelArgument,
    inputs: InputsArgument,
    out: OutDirOption,
    overshoot: Annotated[
        float, typer.Option(min=0.0, help="How far past the decision boundary to go.")
    ] = 0.02,
    max_iter: Annotated[int, typer.Option(min=1, help="Steps at most per sample.")] = 50,
    clip: ClipOption = None,
    candidates: Annotated[
        int, typer.Option(min=1, help="Classes considered: the highest-scoring on INPUTS.")
    ] = 10,
    labels: LabelsOption = None,
    batch_size: BatchOption = 128,
    max_samples_plot: PlotOption = 8,
    size: SizeOption = None,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
) -> None:
    """DeepFool (Moosavi-Dezfooli et al. 2016): small L2 steps across the nearest class boundary."""
    parameters = {"overshoot": overshoot, "max_iter": max_iter, "clip": _parse_clip(clip)}
    parameters["candidates"] = candidates
    _attack(
        "deepfool", parameters, model=model, inputs=inputs, out=out, labels=labels,
        max_samples_plot=max_samples_plot, batch_size=batch_size, size=size, backend=backend,
        force=force, quiet=quiet, as_json=as_json, unsafe=unsafe,
    )  # fmt: skip
