"""What runs on the workers of a dataset run: each task loads the model (once per process, checked
against the driver's hash), computes one chunk's Jacobians with one cached `jacobian_fn`, and writes
them to the store or reduces them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..analysis.reductions import frobenius, partial
from ..errors import JacketValueError
from ..trees import to_numpy
from .cluster import hostname, worker_backend
from .job import OPTION_DEFAULTS
from .skeletons import flatten_skeleton, path_label, split
from .source import Piece
from .source import sha256 as file_sha256
from .store import write_blocks

if TYPE_CHECKING:
    from .job import Job

_MODELS: dict = {}  # (path, sha256) -> model, in this process
_JACOBIANS: dict = {}  # (path, sha256, options) -> jacket.jacobian_fn(model, **options)
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def _load_model(path: str, sha256: str):
    """The model saved at `path`, loaded once per process by `jacket.io.load_model` (Keras's
    `safe_mode`, which refuses to run code stored in the file) after checking the file is the one
    the driver hashed."""
    key = (path, sha256)
    with _CACHE_LOCK:
        model = _MODELS.get(key)
        if model is None:
            found = file_sha256(Path(path))
            if found != sha256:
                raise JacketValueError(
                    f"the model file {path} on this worker ({hostname()}) has SHA-256 "
                    f"{found[:12]}..., not {sha256[:12]}... as on the driver: the file changed "
                    "during the run, or the workers see another file at that path. Give every "
                    "worker the same file."
                )
            from ..io import load_model  # Keras's safe_mode, and one clear error for a bad file

            model = load_model(path)
            if len(_MODELS) >= _CACHE_SIZE:
                oldest = next(iter(_MODELS))
                del _MODELS[oldest]
                for cached in [k for k in _JACOBIANS if k[:2] == oldest]:
                    del _JACOBIANS[cached]
            _MODELS[key] = model
        return model


def _jacobian_fn(job: Job):
    """`jacket.jacobian_fn` for the job's model and options, made once per process."""
    options = dict(job.options)
    if job.kind != "jacobian":
        options["flatten"] = True
    options = {k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]}
    key = (job.model_path, job.model_sha256, tuple(sorted(options.items())))
    jac = _JACOBIANS.get(key)
    if jac is None:
        from ..engine import jacobian_fn  # imports Keras: on the workers only

        model = _load_model(job.model_path, job.model_sha256)
        jac = _JACOBIANS[key] = jacobian_fn(model, **options)
    return jac


def _compute(job: Job, index: int, piece: Piece):
    """`(out_skeleton, blocks)` of one chunk: NumPy arrays `(valid, ...)` in layout order."""
    backend = worker_backend()
    if job.backend is not None and backend != job.backend:
        raise JacketValueError(
            f"{job.fn}: a worker ({hostname()}) runs the Keras backend {backend!r}, but this run "
            f"uses {job.backend!r}. Start every worker with KERAS_BACKEND={job.backend}."
        )
    jac = _jacobian_fn(job)
    x, valid = piece.read(job.batch_size)
    try:
        J = jac(x)
    except JacketValueError as error:
        raise type(error)(
            f"{job.fn}: chunk {index} (samples {piece.start} to {piece.stop - 1}): {error}"
        ) from error
    out_skeleton, leaves = split(J, job.in_skeleton)
    blocks = [to_numpy(leaf)[:valid] for leaf in leaves]
    return out_skeleton, blocks


def jacobian_chunk(job: Job, index: int, piece: Piece) -> dict:
    """Task: the Jacobians of chunk `index`, written to the store; or, for the first chunk of a new
    store (`job.layout` is None), returned with the layout they define."""
    out_skeleton, blocks = _compute(job, index, piece)
    if job.layout is None:
        return {"layout": layout(job, out_skeleton, blocks), "blocks": blocks}
    for spec, block in zip(job.layout["arrays"], blocks):
        assert tuple(block.shape[1:]) == tuple(spec["shape"][1:]), (block.shape, spec)
    write_blocks(job.store, job.layout, piece, blocks)
    return {"index": index}  # returned only once the data is written: then the chunk is finished


def reduce_chunk(job: Job, index: int, piece: Piece) -> dict:
    """Task: the reduction of chunk `index` (a `Partial`, or the per-sample norms)."""
    _, blocks = _compute(job, index, piece)
    chunk_bytes = (
        sum(int(b.size) * b.dtype.itemsize for b in blocks)
        * job.batch_size
        // max(1, piece.stop - piece.start)
    )
    if job.kind == "sensitivity":
        return {"partial": partial(blocks), "chunk_bytes": chunk_bytes}
    return {"norms": frobenius(blocks), "chunk_bytes": chunk_bytes}


def layout(job: Job, out_skeleton, blocks: list) -> dict:
    """The arrays of a run's store, from the first chunk's blocks: one per output x input."""
    out_paths = [path for path, _ in flatten_skeleton(out_skeleton)]
    in_paths = [path for path, _ in flatten_skeleton(job.in_skeleton)]
    arrays = []
    k = 0
    for out_path in out_paths:
        for in_path in in_paths:
            block = blocks[k]
            k += 1
            out_label, in_label = path_label(out_path), path_label(in_path)
            dtype = (
                block.dtype if block.dtype in (np.float16, np.float32, np.float64) else "float32"
            )
            arrays.append(
                {
                    "path": "/".join(part for part in (out_label, in_label) if part),
                    "output": out_label,
                    "input": in_label,
                    "shape": [job.n] + [int(d) for d in block.shape[1:]],
                    "chunks": [job.batch_size] + [int(d) for d in block.shape[1:]],
                    "dtype": str(np.dtype(dtype)),
                }
            )
    chunk_bytes = sum(
        job.batch_size * int(np.prod(spec["shape"][1:])) * np.dtype(spec["dtype"]).itemsize
        for spec in arrays
    )
    return {
        "out_skeleton": out_skeleton,
        "in_skeleton": job.in_skeleton,
        "arrays": arrays,
        "chunk_bytes": chunk_bytes,
    }
