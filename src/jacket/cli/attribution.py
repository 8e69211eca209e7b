"""`jacket attribute`: attribution maps (saliency, Grad-CAM, integrated gradients, SmoothGrad) of a
model at a file of inputs, streamed batch by batch into a file (`jacket.analysis.attribute`), or
computed on Dask with `--scheduler` / `--workers` (`jacket.distributed.attribution_dataset`), and
drawn over the first inputs with `--plot`.

`-o maps.npy` holds the values, `(samples, *in_shape)` (the Grad-CAM map: `(samples, H, W)`);
`-o maps.npz` holds `values`, `map`, `target` and, for integrated gradients, `delta`.
"""

from __future__ import annotations

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
    parse_memory_budget,
    parse_size,
    set_backend,
)


class Method(StrEnum):
    saliency = "saliency"
    gradcam = "gradcam"
    ig = "ig"
    smoothgrad = "smoothgrad"


class Quadrature(StrEnum):
    riemann_trapezoid = "riemann_trapezoid"
    gausslegendre = "gausslegendre"
    riemann_left = "riemann_left"
    riemann_right = "riemann_right"
    riemann_middle = "riemann_middle"


_SUFFIXES = (".npy", ".npz")


def attribute(
    model: ModelArgument,
    inputs: InputsArgument,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Result file: .npy (the values) or .npz (values, map, target, delta).",
            show_default=False,
        ),
    ],
    method: Annotated[
        Method, typer.Option(help="saliency, gradcam, ig (integrated gradients) or smoothgrad.")
    ] = Method.saliency,
    target: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="The flat output index (a class) to attribute; default: each sample's largest.",
            show_default=False,
        ),
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            help="gradcam: the layer of the feature maps (default: the last convolution); "
            "ig, smoothgrad, saliency: attribute to this layer's activations.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="ig: quadrature points.")] = 50,
    quadrature: Annotated[Quadrature, typer.Option(help="ig: the quadrature rule.")] = (
        Quadrature.riemann_trapezoid
    ),
    samples: Annotated[int, typer.Option("--n", min=1, help="smoothgrad: noisy copies.")] = 50,
    sigma: Annotated[
        float, typer.Option(min=0.0, help="smoothgrad: noise level (of each sample's range).")
    ] = 0.15,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Also draw the maps of the first samples over them (a .png).", show_default=False
        ),
    ] = None,  # fmt: skip
    plot_samples: Annotated[int, typer.Option(min=1, help="How many samples --plot draws.")] = 8,
    batch_size: BatchOption = 64,
    memory_budget: Annotated[
        str | None, typer.Option(help="Working memory per pass, e.g. 500MB (ig, smoothgrad).")
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
    """Attribution maps of MODEL at every sample of INPUTS, written to OUT (and drawn)."""
    set_backend(backend)
    on_dask = distributed.runs_on_dask(scheduler, workers, size=size, unsafe=unsafe)
    size_hw = parse_size(size)
    arguments = dict(
        method=method.value, target=target, layer=layer, steps=steps,
        quadrature=quadrature.value, n=samples, sigma=sigma,
        memory_budget=parse_memory_budget(memory_budget),
    )  # fmt: skip
    with one_line_errors("attribute"):
        from .. import io

        (distributed.check_files if on_dask else io.check_sources)(model, inputs)
        io.check_output(out, force=force, suffixes=_SUFFIXES)
        if plot is not None:
            io.check_output(plot, force=force, suffixes=(".png",))
            need_matplotlib("jacket attribute --plot")
        started = time.perf_counter()
        if on_dask:
            result, images, backend_name, ran_on = distributed.attribute(
                model, inputs, scheduler, workers, batch_size=batch_size, quiet=quiet,
                first=plot_samples if plot is not None else 0, **arguments,
            )  # fmt: skip
            total = len(result.values)
            described = f"{total} samples"
            _write(out, result, force)
            summary_extra = {"scheduler": ran_on}
        else:
            run = io.load(model, inputs, unsafe=unsafe, size=size_hw)
            run.single("jacket attribute")
            result, images = _stream(run, out, arguments, batch_size, plot_samples, force, quiet)
            total, described = run.samples, run.describe()
            backend_name = _backend()
            summary_extra = {}
        if plot is not None:
            from ..plot import attribution_figure

            shown = min(plot_samples, len(images))
            figure = attribution_figure(
                images[:shown], result.map[:shown], labels=[f"class {t}" for t in result.target],
                title=f"{method.value}",
            )  # fmt: skip
            io.save_figure(plot, figure, force=force)
        seconds = time.perf_counter() - started
    summary = {"command": "attribute", "model": model, "inputs": inputs, "samples": total}
    summary.update(method=method.value, target=target, layer=layer, backend=backend_name)
    summary.update(values_shape=list(result.values.shape), output=str(out))
    summary.update(plot=None if plot is None else str(plot), seconds=round(seconds, 3))
    counts: dict[int, int] = {}
    for t in result.target.tolist():
        counts[int(t)] = counts.get(int(t), 0) + 1
    summary.update(targets={str(k): v for k, v in sorted(counts.items())})
    if method == Method.ig:
        summary.update(steps=steps, quadrature=quadrature.value)
        summary.update(max_abs_delta=number(abs(result.delta).max()))
        summary.update(max_relative_error=number(result.relative_error.max()))
    summary.update(summary_extra)
    rows = [("model", model), ("inputs", f"{inputs}: {described}"), ("backend", backend_name)]
    rows += [("method", _method_words(method, steps, quadrature, samples, sigma, layer))]
    rows += [("values", f"{tuple(result.values.shape)} {result.values.dtype}")]
    rows += [("targets", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))]
    if method == Method.ig:
        error = summary["max_relative_error"]
        rows += [("completeness", f"|sum(attr) - (f(x) - f(x'))| <= {error:.2%} of |f(x) - f(x')|")]
    rows += [("time", f"{seconds:.2f} s (load, compile, compute, write)"), ("wrote", out)]
    if plot is not None:
        rows += [("drew", plot)]
    emit(summary, "jacket attribute", rows, as_json=as_json, quiet=quiet)


def _stream(run, out: Path, arguments: dict, batch_size: int, first: int, force: bool, quiet):
    """The maps of every batch of `run`, written to `out` as they come (`jacket.io.ResultWriter`:
    atomic), and the first `first` inputs for the figure. Returns `(Attribution, images)`."""
    import numpy as np

    from .. import io
    from ..analysis import Attribution, attribute

    step = min(batch_size, run.samples)
    kept = {"values": [], "map": [], "target": [], "delta": [], "change": []}
    images = []
    npy = out.suffix.lower() == ".npy"
    with io.ResultWriter(out, run.samples, force=force) as writer:
        with Bar("Attribution", "samples", show=not quiet, total=run.samples) as bar:
            for batch in io.padded_batches(run.x, step, model=run.model):
                result = attribute(run.model, batch.x, **arguments)
                valid = batch.valid
                blocks = {"values": result.values[:valid]}
                if not npy:
                    blocks.update(map=result.map[:valid], target=result.target[:valid])
                    if result.delta is not None:
                        blocks["delta"] = result.delta[:valid]
                writer.write(batch.start, blocks)
                for key in ("target", "delta", "change"):
                    value = getattr(result, key)
                    if value is not None:
                        kept[key].append(value[:valid])
                if sum(len(m) for m in kept["map"]) < first:
                    kept["map"].append(result.map[:valid])
                    images.append(np.asarray(batch.x)[:valid])
                bar(batch.stop, run.samples)
    maps = np.concatenate(kept["map"]) if kept["map"] else np.zeros((0,))
    delta = np.concatenate(kept["delta"]) if kept["delta"] else None
    change = np.concatenate(kept["change"]) if kept["change"] else None
    result = Attribution(
        values=_values_view(out, npy), map=maps, target=np.concatenate(kept["target"]),
        method=arguments["method"], delta=delta, change=change,
    )  # fmt: skip
    return result, (np.concatenate(images) if images else np.zeros((0,)))


def _values_view(out: Path, npy: bool):
    """The written values, memory-mapped (for the summary's shape and dtype)."""
    import numpy as np

    if npy:
        return np.load(out, mmap_mode="r")
    with np.load(out) as archive:
        return archive["values"]


def _write(out: Path, result, force: bool) -> None:
    """The maps assembled on the driver of a Dask run, written atomically."""
    from .. import io

    blocks = {"values": result.values}
    if out.suffix.lower() == ".npz":
        blocks.update(map=result.map, target=result.target)
        if result.delta is not None:
            blocks["delta"] = result.delta
    with io.ResultWriter(out, len(result.values), force=force) as writer:
        writer.write(0, blocks)


def _method_words(method, steps, quadrature, n, sigma, layer) -> str:
    words = {
        Method.saliency: "saliency (gradient of the target)",
        Method.gradcam: f"Grad-CAM at {layer or 'the last convolutional layer'}",
        Method.ig: f"integrated gradients, {steps} steps, {quadrature.value}",
        Method.smoothgrad: f"SmoothGrad, {n} noisy copies, sigma {sigma:g}",
    }[method]
    if layer is not None and method != Method.gradcam:
        words += f", at layer {layer}"
    return words


def _backend() -> str:
    import keras

    return keras.backend.backend()
