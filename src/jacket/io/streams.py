"""Jacobians of a whole set of inputs, computed batch by batch and streamed to a file, so that
neither the result nor the inputs need to fit in memory.

Both streams run one prepared Jacobian over `padded_batches` (the one padded batch loop of
`jacket.batches`): every batch has one shape, so nothing re-traces, and the padding rows are
dropped before writing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JacketValueError
from .files import check_output
from .inputs import num_samples, padded_batches
from .results import SINGLE_KEY, ResultWriter, assemble_flat, jacobian_blocks, portable
from .sparse_files import SparseWriter, flat_input_names, meta_of, output_names


def stream_jacobian(
    model,
    x,
    path: str | os.PathLike,
    *,
    batch_size: int = 128,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    memory_budget: int | str | None = None,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-sample Jacobians of `model` over `x`, computed in batches and streamed to a file.

    One `jacket.jacobian_fn` serves every batch; a short last batch is padded with copies of its
    last sample (samples are independent) so it reuses the compiled kernel. The file is written
    atomically (see `ResultWriter`): on any error nothing appears under `path`.

    Args:
      model: a Keras model (see `load_model`).
      x: inputs as `read_inputs` returns them, `(samples, *in_shape)` or a list/dict of them.
      path: `.npy`, `.npz` or `.zarr`. With several blocks, `.npy` needs `flatten=True` and holds
        them assembled into one `(samples, out_size, in_size)` matrix (see `assemble_flat`).
      batch_size: samples per batch.
      force: replace an existing `path`.
      attrs: metadata for a zarr result.
      on_batch: called as `on_batch(done, samples)` after each batch.
      mode, chunk_size, flatten, memory_budget: as in `jacket.jacobian`.

    Returns:
      `{key: (shape, dtype)}` of what was written.
    """
    from ..engine import jacobian_fn

    samples = num_samples(x)
    check_output(path, force=force)
    jac = jacobian_fn(
        model, mode=mode, chunk_size=chunk_size, flatten=flatten, memory_budget=memory_budget
    )
    single_npy = Path(path).suffix.lower() == ".npy"
    with ResultWriter(path, samples, force=force, attrs=attrs) as writer:
        for batch in padded_batches(x, batch_size, model=model):
            blocks = jacobian_blocks(jac(batch.x), batch.x, model)
            blocks = {key: value[: batch.valid] for key, value in blocks.items()}
            if single_npy and len(blocks) > 1 and flatten:
                blocks = {SINGLE_KEY: assemble_flat(blocks)}
            writer.write(batch.start, blocks)
            if on_batch is not None:
                on_batch(batch.stop, samples)
        layout = writer.layout
    return layout


def stream_sparse_jacobian(
    model,
    x,
    path: str | os.PathLike,
    *,
    sparsity=None,
    batch_size: int = 128,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    memory_budget: int | str | None = None,
) -> dict[str, Any]:
    """Sparse per-sample Jacobians of `model` over `x`, in batches, streamed to a `.npz` file.

    One `jacket.jacobian_fn(model, sparse=True)` serves every batch (the pattern is detected and
    colored once); a short last batch is padded with copies of its last sample, so nothing
    re-traces. The file (NOTE: [The sparse Jacobian file, version 1] in `jacket.io.sparse_files`) is
    written atomically: on any error nothing
    appears under `path`. A dense fallback (a pattern too dense to gain) is computed and written
    the same way; the library's `jacket.SparsityWarning` says so.

    Args:
      model: A Keras model (see `jacket.io.load_model`).
      x: Inputs as `jacket.io.read_inputs` returns them, `(samples, *in_shape)` or a list/dict.
      path: The `.npz` file.
      sparsity: A known pattern `(out_size, in_size)` instead of the detected one (see
        `load_sparsity`).
      batch_size: Samples per batch.
      force: Replace an existing `path`.
      attrs: JSON-serialisable metadata stored in the file's `meta`.
      on_batch: Called as `on_batch(done, samples)` after each batch.
      mode, chunk_size, flatten, memory_budget: As in `jacket.jacobian(..., sparse=True)`.

    Returns:
      A summary: `shape` `(samples, out_size, in_size)`, `nnz`, `dtype`, `mode`, `n_colors`,
      `n_passes`, `fallback`, `plan` (one line), `bytes` (the values and the pattern) and
      `dense_bytes` (what the dense result would take).
    """
    from ..sparse import jacobian_fn

    samples = num_samples(x)
    if samples == 0:
        raise JacketValueError("the inputs hold no samples: there is nothing to write.")
    check_output(path, force=force, suffixes=(".npz",))
    jac = jacobian_fn(
        model,
        sparsity=sparsity,
        mode=mode,
        chunk_size=chunk_size,
        flatten=flatten,
        memory_budget=memory_budget,
    )
    summary: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        writer = None
        for batch in padded_batches(x, batch_size, model=model):
            S = jac(batch.x)
            values = portable(S.values[: batch.valid])
            if writer is None:
                writer = stack.enter_context(SparseWriter(path, samples, S.pattern, force=force))
                writer.meta = meta_of(S, flat_input_names(x, model), output_names(model, S), attrs)
                writer.meta["flatten"] = bool(flatten)
                summary = _sparse_summary(S, jac.plan(batch.x), samples, values.dtype)
                summary.update(in_names=writer.meta["in_names"], out_names=writer.meta["out_names"])
            writer.write(batch.start, values)
            if on_batch is not None:
                on_batch(batch.stop, samples)
    return summary


def _sparse_summary(S, plan, samples: int, dtype: np.dtype) -> dict[str, Any]:
    out_size, in_size = S.pattern.shape
    return {
        "shape": (samples, out_size, in_size),
        "nnz": S.nnz,
        "density": S.density,
        "dtype": dtype.name,
        "mode": S.mode,
        "n_colors": S.n_colors,
        "n_passes": plan.n_passes,
        "fallback": S.fallback,
        "plan": plan.describe(),
        "bytes": samples * S.nnz * dtype.itemsize
        + S.pattern.indices.nbytes
        + S.pattern.indptr.nbytes,
        "dense_bytes": samples * out_size * in_size * dtype.itemsize,
    }
