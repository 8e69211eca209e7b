"""`jacket jacobian --sparse` (the branch `jacket.cli.jacobian` hands over to) and `jacket sparsity`.

The command registers itself on `jacket.cli.app` (which imports this module) and keeps its rules:
nothing imports Keras before `--backend` is read; files are checked before the model loads; every
output is written under a temporary name and renamed when complete, and none is replaced without
`--force`; errors are one red line (exit 1), usage errors exit 2. The library's
`jacket.SparsityWarning` (a dense fallback, a layer without a rule) becomes a yellow `notice:` line
on stderr, and the `notices` of the `--json` summary. The file formats are `jacket._sparse_io`'s.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from . import (
    BackendOption,
    ForceOption,
    JsonOption,
    ModelArgument,
    QuietOption,
    UnsafeOption,
    _add_row,
    _describe_inputs,
    _emit,
    _one_line_errors,
    _progress,
    _set_backend,
    _usage,
    app,
    errors,
)

# `--verify N` compares with the dense Jacobian up to this many entries (all points), else it
# compares `J v` and `u^T J` of the sparse Jacobian with `jacket.jvp` / `jacket.vjp`
VERIFY_DENSE_ENTRIES = 1 << 22


# ---------------------------------------------------------------------------------- jacobian --sparse


def sparse_jacobian(
    model: str,
    inputs: str,
    out: Path,
    *,
    sparsity: Path | None,
    mode: str,
    chunk_size: int | None,
    flatten: bool,
    batch_size: int,
    memory_budget: str | None,
    size: tuple[int, int] | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    unsafe: bool,
) -> None:
    """`jacket jacobian MODEL INPUTS -o OUT.npz --sparse [--sparsity PATTERN.npz]`."""
    with _one_line_errors():
        from .. import io
        from ..errors import JacketValueError
        from ..io import sparse_files as _sparse_io

        if out.suffix.lower() != ".npz":
            raise JacketValueError(
                f"--sparse writes a .npz file (the pattern once, the values per sample). "
                f"Received: -o {str(out)!r}. Pass -o {str(out.with_suffix('.npz'))!r}."
            )
        io.check_model_source(model)
        io.check_inputs_source(inputs)
        io.check_output(out, force=force, suffixes=(".npz",))
        pattern, pattern_meta = (None, {})
        if sparsity is not None:
            pattern, pattern_meta = _sparse_io.read_pattern(sparsity)
        started = time.perf_counter()
        loaded = io.load_model(model, unsafe=unsafe)
        x = io.read_inputs(inputs, loaded, size=size)
        samples = io.num_samples(x)
        if pattern is not None:
            _check_pattern_fits(sparsity, pattern_meta, x)
        batches = math.ceil(samples / batch_size)
        import keras

        attrs = {"model": str(model), "inputs": str(inputs), "backend": keras.backend.backend()}
        if sparsity is not None:
            attrs["sparsity"] = str(sparsity)
        with _notices() as notices:
            with _progress(batches > 1 and not quiet, "Jacobians", samples) as update:
                info = io.stream_sparse_jacobian(
                    loaded,
                    x,
                    out,
                    sparsity=pattern,
                    batch_size=batch_size,
                    force=force,
                    attrs=attrs,
                    on_batch=update,
                    mode=mode,
                    chunk_size=chunk_size,
                    flatten=flatten,
                    memory_budget=memory_budget,
                )
        seconds = time.perf_counter() - started
    _show_notices(notices, quiet=quiet)
    samples_, out_size, in_size = info["shape"]
    summary = {
        "command": "jacobian",
        "sparse": True,
        "model": str(model),
        "inputs": str(inputs),
        "sparsity": None if sparsity is None else str(sparsity),
        "samples": samples,
        "batch_size": batch_size,
        "batches": batches,
        "backend": attrs["backend"],
        "mode": info["mode"],
        "n_colors": info["n_colors"],
        "n_passes": info["n_passes"],
        "fallback": info["fallback"],
        "output": str(out),
        "format": "npz",
        "shape": list(info["shape"]),
        "nnz": info["nnz"],
        "density": info["density"],
        "dtype": info["dtype"],
        "in_names": info["in_names"],
        "out_names": info["out_names"],
        "bytes": info["bytes"],
        "dense_bytes": info["dense_bytes"],
        "notices": notices,
        "seconds": round(seconds, 3),
    }
    table = Table(title="jacket jacobian --sparse", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {_describe_inputs(x)}")
    _add_row(table, "backend", attrs["backend"])
    source = f"from {sparsity}" if sparsity is not None else "detected"
    _add_row(
        table,
        "pattern",
        f"{out_size} x {in_size}, {info['nnz']} nonzeros ({info['density']:.2%}), {source}",
    )
    _add_row(table, "plan", info["plan"])
    _add_row(
        table,
        "Jacobian",
        f"({samples_}, {out_size}, {in_size}) {info['dtype']}: {_megabytes(info['bytes'])} "
        f"(dense: {_megabytes(info['dense_bytes'])})",
    )
    _add_row(table, "batches", f"{batches} of up to {batch_size} samples")
    _add_row(table, "time", f"{seconds:.2f} s (load, detect, compile, compute, write)")
    _add_row(table, "wrote", f"{out} (read it with jacket.io.load_sparse_jacobian)")
    _emit(summary, table, as_json=as_json, quiet=quiet)


def _check_pattern_fits(path: Path, meta: dict, x) -> None:
    """A pattern file that says which input shapes it was made for must match the inputs'."""
    from ..errors import JacketValueError

    wanted = meta.get("in_shapes")
    if not wanted:
        return  # a bare scipy file: the library checks `(out_size, in_size)`
    if isinstance(x, dict):
        leaves = [x[key] for key in sorted(x)]  # keras.tree.flatten order
    else:
        leaves = list(x) if isinstance(x, (list, tuple)) else [x]
    have = [list(int(d) for d in leaf.shape[1:]) for leaf in leaves]
    if [list(s) for s in wanted] != have:
        shown = ", ".join(str(tuple(s)) for s in wanted)
        received = ", ".join(str(tuple(s)) for s in have)
        raise JacketValueError(
            f"--sparsity {str(path)!r} was made for input shape {shown}; the inputs have "
            f"{received} per sample. Make a pattern for them: jacket sparsity MODEL "
            f"--input-shape {','.join(map(str, have[0]))} -o PATTERN.npz."
        )


# ----------------------------------------------------------------------------------------- sparsity


@app.command()
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
    _set_backend(backend)
    shapes = [_parse_shape(text) for text in input_shape or []]
    with _one_line_errors():
        from .. import io
        from ..io import sparse_files as _sparse_io

        io.check_model_source(model)
        targets = []
        if out is not None:
            io.check_output(out, force=force, suffixes=(".npz",))
            targets.append(out)
        if plot is not None:
            io.check_output(plot, force=force, suffixes=(".png",))
            targets.append(plot)
        if plot is not None:
            _need_matplotlib()
        loaded = io.load_model(model, unsafe=unsafe)
        import keras

        import jacket

        from .. import sparse

        structure = _input_shapes(model, loaded, shapes)
        in_shapes = [tuple(s) for s in _flat_shapes(structure)]
        with _notices() as notices:
            started = time.perf_counter()
            P = jacket.sparsity(loaded, structure)
            detect_seconds = time.perf_counter() - started
            started = time.perf_counter()
            forward = int(sparse.color(P, "columns").max(initial=-1)) + 1
            reverse = int(sparse.color(P, "rows").max(initial=-1)) + 1
            color_seconds = time.perf_counter() - started
            zeros = _zeros(loaded, structure, 1)
            plan = jacket.jacobian_fn(loaded, sparse=True, sparsity=P).plan(zeros)
            out_shapes = _out_shapes(loaded, zeros)
            checked = _verify(loaded, structure, P, verify) if verify else None
        if plan.fallback:
            notices.append(
                f"jacket jacobian --sparse computes this model densely: {plan.fallback}."
            )
        m, n = P.shape
        colors = {"forward": forward, "reverse": reverse}
        attrs = {
            "in_shapes": [list(s) for s in in_shapes],
            "out_shapes": [list(s) for s in out_shapes],
            "model": str(model),
            "backend": keras.backend.backend(),
            "forward_colors": forward,
            "reverse_colors": reverse,
        }
        figure = None
        if plot is not None:
            from ..plot import sparsity_figure

            single = len(in_shapes) == 1 and len(out_shapes) == 1
            figure = sparsity_figure(
                P,
                in_shape=in_shapes[0] if single else None,
                out_shape=out_shapes[0] if single else None,
                colors=colors,
            )
        if out is not None:
            _sparse_io.save_sparsity(out, P, force=force, attrs=attrs)
        if figure is not None:
            with io.atomic_output(plot, force=force) as tmp:
                figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _show_notices(notices, quiet=quiet)
    chosen = plan.mode  # "forward", "reverse", or "dense" (fallback)
    summary = {
        "command": "sparsity",
        "model": str(model),
        "backend": attrs["backend"],
        "in_shapes": attrs["in_shapes"],
        "out_shapes": attrs["out_shapes"],
        "shape": [m, n],
        "nnz": int(P.nnz),
        "density": P.nnz / max(m * n, 1),
        "forward_colors": forward,
        "reverse_colors": reverse,
        "dense_passes": min(m, n),
        "chosen": chosen,
        "fallback": plan.fallback,
        "detect_seconds": round(detect_seconds, 4),
        "color_seconds": round(color_seconds, 4),
        "verified_points": verify,
        "nonzero_at_points": None if checked is None else checked.get("nonzero"),
        "verify_method": None if checked is None else checked["method"],
        "pattern": None if out is None else str(out),
        "plot": None if plot is None else str(plot),
        "notices": notices,
    }
    table = Table(title="jacket sparsity", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "backend", attrs["backend"])
    _add_row(
        table,
        "shapes",
        f"in {', '.join(map(str, in_shapes))} -> out {', '.join(map(str, out_shapes))}",
    )
    _add_row(table, "pattern", f"{m} x {n}, {P.nnz} nonzeros ({summary['density']:.2%})")
    _add_row(
        table,
        "colors",
        f"forward (columns) {forward}, reverse (rows) {reverse}; dense: {min(m, n)} passes",
    )
    _add_row(table, "chosen", f"dense fallback: {plan.fallback}" if plan.fallback else chosen)
    _add_row(table, "time", f"detection {detect_seconds:.3f} s, coloring {color_seconds:.3f} s")
    if checked is not None:
        text = f"OK at {verify} random point(s) ({checked['method']})"
        if checked.get("nonzero") is not None:
            text += f"; {checked['nonzero']} of the {P.nnz} entries were nonzero there"
        _add_row(table, "verified", text)
    if targets:
        _add_row(table, "wrote", "\n".join(str(t) for t in targets))
    _emit(summary, table, as_json=as_json, quiet=quiet)


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


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError(
            'jacket sparsity --plot draws with matplotlib: pip install "jacket[plot]".'
        ) from None


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        _usage(
            f"--input-shape must be positive integers separated by commas, like 64,64,1. "
            f"Received: {text!r}."
        )
    return shape


def _input_shapes(source: str, model, given: list[tuple[int, ...]]):
    """What `jacket.sparsity` takes: the given shapes, else the model's declared ones, in the
    structure of the model's inputs."""
    import keras

    from .. import io
    from ..errors import JacketValueError

    declared = io.inputs.declared_inputs(model)
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


def _flat_shapes(structure) -> list[tuple[int, ...]]:
    if isinstance(structure, dict):
        return [tuple(structure[key]) for key in sorted(structure)]
    if isinstance(structure, list) or (
        isinstance(structure, tuple) and structure and isinstance(structure[0], tuple)
    ):
        return [tuple(s) for s in structure]
    return [tuple(structure)]


def _map_shapes(structure, fn):
    if isinstance(structure, dict):
        return {key: fn(shape) for key, shape in structure.items()}
    if isinstance(structure, list) or (
        isinstance(structure, tuple) and structure and isinstance(structure[0], tuple)
    ):
        return [fn(shape) for shape in structure]
    return fn(structure)


def _dtypes(model, structure):
    """The float dtype of each input (the model's declared one, else float32)."""
    import keras

    from .. import io

    declared = io.inputs.declared_inputs(model)
    leaves = keras.tree.flatten(declared) if declared is not None else []
    names = [str(getattr(leaf, "dtype", "") or "") for leaf in leaves]
    floats = [d if d in ("float16", "float32", "float64") else "float32" for d in names]
    if len(floats) != len(_flat_shapes(structure)):
        floats = ["float32"] * len(_flat_shapes(structure))
    return floats


def _zeros(model, structure, batch: int, rng=None):
    """A batch with the structure of `structure` (zeros, or standard normal with `rng`)."""
    dtypes = iter(_dtypes(model, structure))
    order = _flat_shapes(structure)
    made = {}
    for shape in order:
        dtype = next(dtypes)
        if rng is None:
            made[len(made)] = np.zeros((batch, *shape), dtype=dtype)
        else:
            made[len(made)] = rng.standard_normal((batch, *shape)).astype(dtype)
    arrays = [made[i] for i in range(len(order))]
    if isinstance(structure, dict):
        return dict(zip(sorted(structure), arrays))
    if len(arrays) == 1 and not isinstance(structure, list):
        return arrays[0]
    return arrays


def _out_shapes(model, x) -> list[tuple[int, ...]]:
    import keras

    y = model(x, training=False) if isinstance(model, keras.Layer) else model(x)
    return [tuple(int(d) for d in leaf.shape[1:]) for leaf in keras.tree.flatten(y)]


def _flat_numpy(tree, batch: int) -> np.ndarray:
    """A structure of `(batch, ...)` tensors -> `(batch, total)` float64, in flatten order."""
    import keras

    return np.concatenate(
        [
            np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64).reshape(batch, -1)
            for t in keras.tree.flatten(tree)
        ],
        axis=1,
    )


def _verify(model, structure, P, points: int) -> dict[str, Any]:
    """Check that `P` holds every nonzero of the Jacobian at `points` random inputs.

    Small patterns: against the dense `jacket.jacobian` (exact: any nonzero outside `P` is a
    miss). Large ones: `J v` and `u^T J` of the sparse Jacobian computed with `P` against
    `jacket.jvp` / `jacket.vjp` for random `v`, `u` per point; a missed entry `(i, j)` changes
    them by `J[i, j] v[j]`, caught when it exceeds about `sqrt(eps)` of the row's scale.

    Raises:
      SparsityError: naming the first miss.
    """
    import keras

    import jacket

    from ..sparse import SparsityError

    rng = np.random.default_rng(0)
    x = _zeros(model, structure, points, rng)
    m, n = P.shape
    if m * n * points <= VERIFY_DENSE_ENTRIES:
        J = jacket.jacobian(model, x, flatten=True)
        blocks = [np.asarray(keras.ops.convert_to_numpy(b)) for b in keras.tree.flatten(J)]
        n_in = len(_flat_shapes(structure))
        n_out = len(blocks) // n_in
        dense = np.concatenate(
            [np.concatenate(blocks[o * n_in : (o + 1) * n_in], axis=2) for o in range(n_out)],
            axis=1,
        )
        nonzero = (dense != 0).any(axis=0)
        pattern = P.toarray()
        missed = nonzero & ~pattern
        if missed.any():
            i, j = np.argwhere(missed)[0]
            raise SparsityError(
                f"sparsity: the pattern misses {int(missed.sum())} nonzero(s) of the Jacobian "
                f"at {points} random input(s), e.g. output {i} / input {j}: a rule is wrong; "
                "please report the model's layers."
            )
        return {"method": "dense Jacobian", "nonzero": int((nonzero & pattern).sum())}
    S = jacket.jacobian(model, x, sparsity=P)
    eps = float(np.finfo(np.float32 if S.dtype.itemsize <= 4 else np.float64).eps)
    y = model(x, training=False)

    def like(t):
        dtype = keras.backend.standardize_dtype(t.dtype)
        dtype = dtype if dtype in ("float16", "float32", "float64") else "float32"
        return rng.standard_normal(tuple(t.shape)).astype(dtype)

    v = keras.tree.map_structure(like, x)
    u = keras.tree.map_structure(like, y)
    checks = (
        ("J v", _flat_numpy(jacket.jvp(model, x, v), points), _flat_numpy(v, points), False),
        ("u^T J", _flat_numpy(jacket.vjp(model, x, u), points), _flat_numpy(u, points), True),
    )
    for name, got, w, transpose in checks:
        for b in range(points):
            M = S.to_scipy(b).astype(np.float64)
            M = M.T if transpose else M
            expected = M @ w[b]
            scale = abs(M) @ np.abs(w[b]) + np.abs(got[b])
            bad = np.abs(got[b] - expected) > math.sqrt(eps) * scale + eps * scale.max(initial=0.0)
            if bad.any():
                raise SparsityError(
                    f"sparsity: the pattern misses nonzeros of the Jacobian at a random input: "
                    f"{name} of the sparse Jacobian differs from jacket's exact product at "
                    f"{int(bad.sum())} position(s), e.g. {int(np.argmax(bad))}: a rule is "
                    "wrong; please report the model's layers."
                )
    return {"method": "J v and u^T J products", "nonzero": None}
