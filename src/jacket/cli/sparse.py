"""`jacket jacobian --sparse` (the branch `jacket.cli.jacobian` hands over to) and `jacket sparsity`.

The library's `jacket.SparsityWarning` (a dense fallback, a layer without a rule) becomes a yellow
`notice:` line on stderr, and the `notices` of the `--json` summary. The file formats are
`jacket.io.sparse_files`'s.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .shared import (
    BackendOption,
    Bar,
    ForceOption,
    JsonOption,
    ModelArgument,
    QuietOption,
    UnsafeOption,
    emit,
    errors,
    need_matplotlib,
    one_line_errors,
    set_backend,
    usage,
)

# ------------------------------------------------------------------------------- jacobian --sparse


def sparse_jacobian(
    model: str,
    inputs: str,
    out: Path,
    sparsity: Path | None,
    *,
    size: tuple[int, int] | None,
    unsafe: bool,
    batch_size: int,
    force: bool,
    quiet: bool,
    as_json: bool,
    **options,
) -> None:
    """`jacket jacobian MODEL INPUTS -o OUT.npz --sparse [--sparsity PATTERN.npz]`."""
    with one_line_errors("jacobian"):
        from .. import io
        from ..errors import JacketValueError

        if out.suffix.lower() != ".npz":
            raise JacketValueError(
                f"--sparse writes a .npz file (the pattern once, the values per sample). "
                f"Received: -o {str(out)!r}. Pass -o {str(out.with_suffix('.npz'))!r}."
            )
        io.check_sources(model, inputs)
        io.check_output(out, force=force, suffixes=(".npz",))
        pattern, meta = io.read_pattern(sparsity) if sparsity is not None else (None, {})
        started = time.perf_counter()
        run = io.load(model, inputs, unsafe=unsafe, size=size)
        if pattern is not None:
            _check_pattern_fits(sparsity, meta, run.x)
        import keras

        attrs = {"model": model, "inputs": inputs, "backend": keras.backend.backend()}
        attrs.update({} if sparsity is None else {"sparsity": str(sparsity)})
        with _notices() as notices, Bar("Jacobians", "samples", show=not quiet) as bar:
            info = io.stream_sparse_jacobian(
                run.model, run.x, out, sparsity=pattern, batch_size=batch_size, force=force,
                attrs=attrs, on_batch=bar, **options,
            )  # fmt: skip
        seconds = time.perf_counter() - started
    _show_notices(notices, quiet=quiet)
    samples, out_size, in_size = info["shape"]
    batches = -(-samples // batch_size)
    summary = {"command": "jacobian", "sparse": True, "model": model, "inputs": inputs}
    summary.update(sparsity=None if sparsity is None else str(sparsity), samples=samples)
    summary.update(batch_size=batch_size, batches=batches, backend=attrs["backend"])
    summary.update({key: info[key] for key in ("mode", "n_colors", "n_passes", "fallback")})
    summary.update(output=str(out), format="npz", shape=list(info["shape"]))
    keys = ("nnz", "density", "dtype", "in_names", "out_names", "bytes", "dense_bytes")
    summary.update({key: info[key] for key in keys})
    summary.update(notices=notices, seconds=round(seconds, 3))
    source = f"from {sparsity}" if sparsity is not None else "detected"
    size_text = f"{_megabytes(info['bytes'])} (dense: {_megabytes(info['dense_bytes'])})"
    rows = [("model", model), ("inputs", f"{inputs}: {run.describe()}")]
    rows += [("backend", attrs["backend"])]
    rows += [("pattern", f"{out_size} x {in_size}, {info['nnz']} nonzeros "
                         f"({info['density']:.2%}), {source}")]  # fmt: skip
    rows += [("plan", info["plan"])]
    rows += [("Jacobian", f"({samples}, {out_size}, {in_size}) {info['dtype']}: {size_text}")]
    rows += [("batches", f"{batches} of up to {batch_size} samples")]
    rows += [("time", f"{seconds:.2f} s (load, detect, compile, compute, write)")]
    rows += [("wrote", f"{out} (read it with jacket.io.load_sparse_jacobian)")]
    emit(summary, "jacket jacobian --sparse", rows, as_json=as_json, quiet=quiet)


def _check_pattern_fits(path: Path, meta: dict, x) -> None:
    """A pattern file that says which input shapes it was made for must match the inputs'."""
    from ..errors import JacketValueError

    wanted = meta.get("in_shapes")
    if not wanted:
        return  # a bare scipy file: the library checks `(out_size, in_size)`
    have = [[int(d) for d in leaf.shape[1:]] for leaf in _flat(x)]
    if [list(s) for s in wanted] != have:
        shown = ", ".join(str(tuple(s)) for s in wanted)
        received = ", ".join(str(tuple(s)) for s in have)
        raise JacketValueError(
            f"--sparsity {str(path)!r} was made for input shape {shown}; the inputs have "
            f"{received} per sample. Make a pattern for them: jacket sparsity MODEL "
            f"--input-shape {','.join(map(str, have[0]))} -o PATTERN.npz."
        )


# ----------------------------------------------------------------------------------------- sparsity


def sparsity(
    model: ModelArgument,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Per-sample input shape, e.g. 64,64,1 (repeat it for each input, in the order "
            "of model.inputs). Default: the shape the model declares.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Pattern file (.npz, scipy.sparse.save_npz's layout) for --sparsity.",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG of the pattern.", show_default=False),
    ] = None,
    verify: Annotated[
        int,
        typer.Option(
            "--verify",
            min=0,
            help="Check the pattern at N random inputs (exit 1 if it misses a nonzero).",
        ),
    ] = 0,
    backend: BackendOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    unsafe: UnsafeOption = False,
) -> None:
    """The sparsity pattern of MODEL's per-sample Jacobian: its size, colors, a file and a plot."""
    set_backend(backend)
    shapes = [_parse_shape(text) for text in input_shape or []]
    with one_line_errors("sparsity"):
        from .. import io

        io.check_model_source(model)
        targets = [path for path in (out, plot) if path is not None]
        for path, suffix in ((out, ".npz"), (plot, ".png")):
            if path is not None:
                io.check_output(path, force=force, suffixes=(suffix,))
        if plot is not None:
            need_matplotlib("jacket sparsity --plot")
        loaded = io.load_model(model, unsafe=unsafe)
        with _notices() as notices:
            report = _Report(model, loaded, _input_shapes(model, loaded, shapes), verify)
        figure = report.figure() if plot is not None else None
        if out is not None:
            io.save_sparsity(out, report.pattern, force=force, attrs=report.attrs)
        if figure is not None:
            io.save_figure(plot, figure, force=force)
    _show_notices(notices, quiet=quiet)
    summary = {"command": "sparsity", **report.summary(), "verified_points": verify}
    summary.update(pattern=None if out is None else str(out))
    summary.update(plot=None if plot is None else str(plot), notices=notices)
    rows = report.rows() + ([("wrote", "\n".join(map(str, targets)))] if targets else [])
    emit(summary, "jacket sparsity", rows, as_json=as_json, quiet=quiet)


class _Report:
    """What `jacket sparsity` finds: the pattern, its colorings, the plan, the check."""

    def __init__(self, source: str, model, structure, points: int):
        import keras

        from .. import sparse
        from ..api import jacobian_fn

        started = time.perf_counter()
        self.pattern = P = sparse.sparsity(model, structure)
        self.detect_seconds = time.perf_counter() - started
        started = time.perf_counter()
        self.forward = int(sparse.color(P, "columns").max(initial=-1)) + 1
        self.reverse = int(sparse.color(P, "rows").max(initial=-1)) + 1
        self.color_seconds = time.perf_counter() - started
        zeros = sparse.zeros_like_shape(model, structure)
        self.plan = jacobian_fn(model, sparse=True, sparsity=P).plan(zeros)
        if self.plan.fallback:
            warnings.warn(
                f"jacket jacobian --sparse computes this model densely: {self.plan.fallback}.",
                sparse.SparsityWarning,
                stacklevel=2,
            )
        y = model(zeros, training=False) if isinstance(model, keras.Layer) else model(zeros)
        self.in_shapes = [tuple(leaf.shape[1:]) for leaf in _flat(zeros)]
        self.out_shapes = [tuple(int(d) for d in t.shape[1:]) for t in keras.tree.flatten(y)]
        self.points = points
        self.checked = sparse.verify(model, structure, P, points=points) if points else None
        self.attrs = {
            "in_shapes": [list(s) for s in self.in_shapes],
            "out_shapes": [list(s) for s in self.out_shapes],
            "model": source,
            "backend": keras.backend.backend(),
            "forward_colors": self.forward,
            "reverse_colors": self.reverse,
        }

    def figure(self):
        from ..plot import sparsity_figure

        single = len(self.in_shapes) == 1 and len(self.out_shapes) == 1
        return sparsity_figure(
            self.pattern,
            in_shape=self.in_shapes[0] if single else None,
            out_shape=self.out_shapes[0] if single else None,
            colors={"forward": self.forward, "reverse": self.reverse},
        )

    def summary(self) -> dict:
        m, n = self.pattern.shape
        return {
            "model": self.attrs["model"],
            "backend": self.attrs["backend"],
            "in_shapes": self.attrs["in_shapes"],
            "out_shapes": self.attrs["out_shapes"],
            "shape": [m, n],
            "nnz": int(self.pattern.nnz),
            "density": self.pattern.nnz / max(m * n, 1),
            "forward_colors": self.forward,
            "reverse_colors": self.reverse,
            "dense_passes": min(m, n),
            "chosen": self.plan.mode,  # "forward", "reverse", or "dense" (fallback)
            "fallback": self.plan.fallback,
            "detect_seconds": round(self.detect_seconds, 4),
            "color_seconds": round(self.color_seconds, 4),
            "nonzero_at_points": None if self.checked is None else self.checked["nonzero"],
            "verify_method": None if self.checked is None else self.checked["method"],
        }

    def rows(self) -> list[tuple[str, str]]:
        (m, n), nnz, plan = self.pattern.shape, self.pattern.nnz, self.plan
        ins, outs = ", ".join(map(str, self.in_shapes)), ", ".join(map(str, self.out_shapes))
        rows = [("model", self.attrs["model"]), ("backend", self.attrs["backend"])]
        rows += [("shapes", f"in {ins} -> out {outs}")]
        rows += [("pattern", f"{m} x {n}, {nnz} nonzeros ({nnz / max(m * n, 1):.2%})")]
        rows += [("colors", f"forward (columns) {self.forward}, reverse (rows) {self.reverse}; "
                            f"dense: {min(m, n)} passes")]  # fmt: skip
        rows += [("chosen", f"dense fallback: {plan.fallback}" if plan.fallback else plan.mode)]
        rows += [("time", f"detection {self.detect_seconds:.3f} s, coloring "
                          f"{self.color_seconds:.3f} s")]  # fmt: skip
        if self.checked is not None:
            text = f"OK at {self.points} random point(s) ({self.checked['method']})"
            if self.checked["nonzero"] is not None:
                text += f"; {self.checked['nonzero']} of the {nnz} entries were nonzero there"
            rows += [("verified", text)]
        return rows


# ----------------------------------------------------------------------------------- shared parts


@contextlib.contextmanager
def _notices():
    """Collect the library's `SparsityWarning`s (messages, in order) instead of showing them;
    other warnings are shown as before."""
    from ..sparse import SparsityWarning

    collected: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", SparsityWarning)
        try:
            yield collected
        finally:
            for item in record:
                if issubclass(item.category, SparsityWarning):
                    text = " ".join(str(item.message).split())
                    if text not in collected:
                        collected.append(text)
                else:
                    warnings.showwarning(
                        item.message, item.category, item.filename, item.lineno, item.file
                    )


def _show_notices(notices: list[str], *, quiet: bool) -> None:
    if quiet:
        return
    for text in notices:
        errors.print(f"[yellow]notice:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.3g} MiB" if size >= 2**20 else f"{size / 2**10:.3g} KiB"


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        usage(
            f"--input-shape must be positive integers separated by commas, like 64,64,1. "
            f"Received: {text!r}."
        )
    return shape


def _input_shapes(source: str, model, given: list[tuple[int, ...]]):
    """What `jacket.sparsity` takes: the given shapes, else the model's declared ones, in the
    structure of the model's inputs."""
    import keras

    from ..engine.inputs import declared_inputs
    from ..errors import JacketValueError

    declared = declared_inputs(model)
    leaves = keras.tree.flatten(declared) if declared is not None else []
    if given:
        if leaves and len(given) != len(leaves):
            raise JacketValueError(
                f"--input-shape was given {len(given)} time(s), but {source!r} takes "
                f"{len(leaves)} inputs. Give one per input, in the order of model.inputs."
            )
        if not leaves:
            return given[0] if len(given) == 1 else list(given)
        return keras.tree.pack_sequence_as(declared, list(given))
    missing = [tuple(leaf.shape[1:]) for leaf in leaves if any(d is None for d in leaf.shape[1:])]
    if not leaves or missing:
        shown = "declares no input shape"
        if missing:
            shown = "takes " + ", ".join(
                "(" + ", ".join("?" if d is None else str(d) for d in s) + ")" for s in missing
            )
        raise JacketValueError(
            f"{source!r} {shown} per sample: pass the shape with --input-shape, e.g. "
            "--input-shape 64,64,1 (one per input)."
        )
    shapes = [tuple(int(d) for d in leaf.shape[1:]) for leaf in leaves]
    return keras.tree.pack_sequence_as(declared, shapes)


def _flat(x) -> list:
    """The arrays of `x` (an array, or a list/dict of them) in `keras.tree.flatten` order."""
    if isinstance(x, dict):
        return [x[key] for key in sorted(x)]
    return list(x) if isinstance(x, (list, tuple)) else [x]
