"""`jacket attack {fgsm,jsma,deepfool}`: `jacket.attacks` on a saved classifier and a file of inputs.

Each writes into a folder (created if missing; its parent must exist): the adversarial examples
(`x_adv.npy`), a figure of originals, adversarial examples and differences (`attack.png`) and
`summary.json`, the summary that `--json` prints. Nothing is replaced without `--force`.
"""

from __future__ import annotations

import math
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .analysis import OutDirOption
from .shared import (
    BackendOption,
    Bar,
    BatchOption,
    ForceOption,
    InputsArgument,
    JsonOption,
    ModelArgument,
    QuietOption,
    SizeOption,
    UnsafeOption,
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


class Criterion(StrEnum):
    pairs = "pairs"
    target = "target"


_NORM_NAMES = {"linf": "Linf", "l2": "L2", "l0": "L0 (fraction of features changed)"}

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


def common(options: dict) -> dict:
    """The options every attack command has, from its `locals()`."""
    names = ("batch_size", "size", "backend", "force", "quiet", "as_json", "unsafe")
    return {name: options[name] for name in names}


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
        usage(f"--eps must be a finite positive number. Received: {eps}.")
    parameters = {"eps": eps, "target": target, "clip": _parse_clip(clip)}
    parameters["logits"] = not probabilities
    _attack("fgsm", parameters, model, inputs, out, labels, max_samples_plot, **common(locals()))


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
        usage(f"--theta must be a finite nonzero number. Received: {theta}.")
    if not 0 < gamma <= 1:
        usage(f"--gamma must be a fraction of the features in (0, 1]. Received: {gamma}.")
    parameters = {"target": target, "theta": theta, "gamma": gamma, "clip": _parse_clip(clip)}
    parameters.update(criterion=criterion.value, seed=seed)
    _attack("jsma", parameters, model, inputs, out, labels, max_samples_plot, **common(locals()))


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
    _attack("deepfool", parameters, model, inputs, out, labels, max_samples_plot,
            **common(locals()))  # fmt: skip


# ----------------------------------------------------------------------------------- shared parts


def _attack(
    name: str,
    parameters: dict,
    model: str,
    inputs: str,
    out: Path,
    labels: str | None,
    max_samples_plot: int,
    *,
    batch_size: int,
    size: str | None,
    backend: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    unsafe: bool,
) -> None:
    """What the three attack commands share: load, attack, draw, write, report."""
    set_backend(backend)
    size_hw = parse_size(size)
    with one_line_errors(f"attack {name}"):
        from .. import attacks, io

        io.check_sources(model, inputs)
        need_matplotlib("jacket attack")
        raw_labels = None if labels is None else io.read_labels(labels, inputs)
        names = ["x_adv.npy", "attack.png", "summary.json"]
        with output_folder(out, names, force=force) as paths:
            started = time.perf_counter()
            run = io.load(model, inputs, unsafe=unsafe, size=size_hw)
            out_shape = run.single(f"jacket attack {name}")
            y = _check_classes(raw_labels, parameters.get("target"), run.samples, out_shape, labels)
            x = run.first(run.samples)
            options = {**parameters, **({"y": y} if name == "fgsm" else {})}
            with Bar(name.upper(), "samples", show=not quiet, total=run.samples) as bar:
                attack_started = time.perf_counter()
                result = getattr(attacks, name)(
                    run.model, x, batch_size=batch_size, progress=bar, **options
                )
                attack_seconds = time.perf_counter() - attack_started
            from ..plot import adversarial_figure

            figure = adversarial_figure(
                x, result.x_adv, labels=result.labels, adv_labels=result.predictions,
                max_samples=max_samples_plot,
            )  # fmt: skip
            clean = None if y is None else _predict(run.model, x, batch_size)
            summary = _summary(name, parameters, run, result, y, clean, batch_size)
            summary.update(seconds=round(attack_seconds, 3))
            summary.update(total_seconds=round(time.perf_counter() - started, 3))
            summary.update(files=[str(p) for p in paths.values()])
            save_all(
                paths, {"x_adv.npy": result.x_adv}, {"attack.png": figure}, summary, force=force
            )
    settings = ", ".join(f"{k}={v}" for k, v in parameters.items() if v is not None)
    kind = "targeted" if summary["targeted"] else "untargeted"
    success = f"{summary['successes']} of {summary['attacked']} ({result.success_rate:.1%})"
    if summary["attacked"] < run.samples:
        success += f"; {run.samples - summary['attacked']} already of their target, not attacked"
    mean = summary["mean_perturbation"]
    rows = [("model", model), ("inputs", f"{inputs}: {run.describe()}")]
    rows += [("backend", summary["backend"])]
    rows += [("attack", f"{name} ({kind}){': ' + settings if settings else ''}")]
    rows += [("success", success)]
    rows += [("perturbation", f"mean {_NORM_NAMES[result.norm]} {mean:.4g} over the successful "
                              "samples" if mean is not None else "none succeeded")]  # fmt: skip
    if summary["mean_iterations"] is not None:
        rows += [("iterations", f"mean {summary['mean_iterations']:.3g} steps per sample")]
    if summary["accuracy"] is not None:
        accuracy = summary["accuracy"]
        rows += [("accuracy", f"{accuracy['clean']:.1%} on INPUTS, "
                              f"{accuracy['adversarial']:.1%} on x_adv")]  # fmt: skip
    rows += [("time", f"{attack_seconds:.2f} s (attack, first call compiles)")]
    rows += [("wrote", "\n".join(map(str, paths.values())))]
    emit(summary, f"jacket attack {name}", rows, as_json=as_json, quiet=quiet)


def _summary(name, parameters, run, result, y, clean, batch_size) -> dict:
    import keras

    shown = {k: list(v) if isinstance(v, tuple) else v for k, v in parameters.items()}
    accuracy = None
    if y is not None:
        accuracy = {
            "clean": float((clean == y).mean()),
            "adversarial": float((result.predictions == y).mean()),
        }
    return {
        "command": "attack",
        "attack": name,
        "model": run.source,
        "inputs": run.inputs,
        "samples": run.samples,
        "backend": keras.backend.backend(),
        "parameters": {**shown, "batch_size": batch_size},
        "targeted": result.target is not None,
        "success_rate": number(result.success_rate),
        "successes": int(result.success.sum()),
        "attacked": int(result.attacked.sum()),
        "norm": result.norm,
        "mean_perturbation": number(result.mean_perturbation),
        "mean_iterations": None if result.iterations is None else float(result.iterations.mean()),
        "accuracy": accuracy,
    }


def _parse_clip(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    parts = value.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        usage(f"--clip must be LOW,HIGH with finite LOW < HIGH (like 0,1). Received: {value!r}.")
    return low, high


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
    import numpy as np

    from ..engine.outputs import outputs

    starts = range(0, len(x), batch_size)
    return np.concatenate([outputs(model, x[s : s + batch_size]).argmax(axis=1) for s in starts])
