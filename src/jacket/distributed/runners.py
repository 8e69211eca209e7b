"""The public functions of `jacket.distributed`: a run is a `Job` (what every task needs), cut into
chunks of `batch_size` samples that run where `Cluster` says (see `jacket.distributed.cluster`), and
either stored in a resumable zarr store (`jacket.distributed.store`) or reduced as they finish.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..analysis.reductions import REDUCTIONS, Sensitivity, combine, finish, ranking
from ..checks import check_flag
from ..errors import JacketTypeError, JacketValueError
from .cluster import Cluster
from .job import Job
from .store import (
    Tracker,
    create_arrays,
    create_store,
    new_manifest,
    open_result,
    open_store,
    store_path,
    write_blocks,
)
from .worker import jacobian_chunk, reduce_chunk

DEFAULT_BATCH_SIZE = 64


# --------------------------------------------------------------------------------------- public API


def jacobian_dataset(
    model_path: str | os.PathLike,
    inputs,
    out: str | os.PathLike,
    *,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: bool | Callable[[int, int], None] = False,
    **options,
):
    """Per-sample Jacobians of a whole dataset, written chunk by chunk to a zarr store; resumable.

    Args:
      model_path: Path of a `.keras` file. Each worker loads it with Keras's `safe_mode` (once per
        worker process); the model object itself never travels.
      inputs: The samples, `(n, *in_shape)`: a zarr array, the path (or URL) of a zarr store
        holding one array (or a group of arrays, one per model input, by name), or a NumPy array
        (small jobs: the driver ships each chunk's samples). For several model inputs: a list, tuple
        or dict of such arrays.
      out: Directory of the zarr (v3) store to write (local, or on a file system the workers share).
      client: A `distributed.Client` (or a scheduler address such as "tcp://10.0.0.5:8786") whose
        workers compute the chunks, or a `Cluster` (which says where, and stays open).
      scheduler: Where to run instead: "tcp://host:port" (connect to that Dask scheduler),
        "processes" (a LocalCluster on 127.0.0.1), "synchronous" (this process, no Dask). Default:
        this process for jobs whose Jacobian is at most `IN_PROCESS_MAX_BYTES`, a LocalCluster
        otherwise (see the module's NOTE: [Where the chunks run]).
      workers: Worker processes of a LocalCluster (implies one). Default: one per CPU core.
      batch_size: Samples per chunk: each zarr chunk of the result holds one batch's Jacobians.
      overwrite: Delete what `out` holds (a zarr store) and start again. Without it, a store from a
        run with the same arguments is resumed and one from other arguments is refused.
      progress: True for a progress bar (rich, on stderr), or a callable `progress(done, total)`
        called with finished chunk counts (once at the start, then after each chunk).
      **options: Options of `jacket.jacobian`: `mode`, `chunk_size`, `flatten`, `training`,
        `memory_budget`, `strategy`.

    Returns:
      The result, opened read-only: a zarr array `(n, *out_shape, *in_shape)` (with `flatten=True`,
      `(n, out_size, in_size)`), where `J[b, i..., j...] = d model(x)[b, i...] / d x[b, j...]`,
      chunked `(batch_size, ...)`. For several inputs or outputs, the model's output structure of
      its input structure of zarr arrays (`J["score"]["image"]`, `J[0][1]`), stored as the arrays
      `"{output}/{input}"` of a zarr group (`"{output}"` alone for one input, `"{input}"` alone for
      one output; a list position is its index, nested names are joined with ".").

    Raises:
      JacketValueError: for bad arguments, or when `out` holds a run with other arguments (a
        different model file, option, `batch_size`, inputs or backend): it names what differs; use a
        new `out` or `overwrite=True`.
      JacketTypeError: for arguments of the wrong type.

    Example:
      >>> J = jacobian_dataset("model.keras", x_test, "J.zarr", batch_size=128, flatten=True)
      >>> J.shape, J.chunks
      ((10000, 10, 784), (128, 10, 784))
      >>> J = jacobian_dataset("model.keras", "x.zarr", "J.zarr", scheduler="tcp://10.0.0.5:8786")
    """
    fn = "jacobian_dataset"
    job = Job.prepare(fn, model_path, inputs, batch_size, options, kind="jacobian")
    store = store_path(fn, out)
    check_flag(fn, "overwrite", overwrite)
    report = check_progress(fn, progress)
    where = _cluster(fn, client, scheduler, workers)
    try:
        job.backend = where.backend()
        identity = job.identity()
        manifest, root = open_store(fn, store, identity, overwrite)
        job.store = str(store)
        with Progress(report, job.n_chunks, "Jacobians") as bar:
            if manifest is None:  # a fresh store: the first chunk tells the layout
                first = where.first_runner(job.n_chunks).call(jacobian_chunk, job, 0, job.piece(0))
                manifest = new_manifest(job, identity, first["layout"])
                root = create_store(store, manifest)
                write_blocks(store, first["layout"], job.piece(0), first["blocks"])
                del first  # the driver holds one chunk at most, and not for long
                tracker = Tracker(root, manifest)
                tracker.start()
                tracker.finished(0)
            else:
                create_arrays(store, manifest["layout"])  # any a killed first run left out
                tracker = Tracker(root, manifest)
            job.layout = manifest["layout"]
            todo = tracker.todo()
            bar.update(tracker.count())
            if todo:
                runner = where.runner(len(todo) * job.layout["chunk_bytes"], len(todo))
                if tracker.run is None:
                    tracker.start()

                def done(index, result):
                    tracker.finished(index)
                    bar.update(tracker.count())

                runner.run(((i, jacobian_chunk, (job, i, job.piece(i))) for i in todo), done)
            tracker.complete()
    finally:
        if where is not client:
            where.close()
    return open_result(store, manifest["layout"])


def sensitivity_dataset(
    model_path: str | os.PathLike,
    inputs,
    *,
    reduce: str = "mean_abs",
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool | Callable[[int, int], None] = False,
    **options,
) -> Sensitivity:
    """Per-input-feature sensitivity over a whole dataset, reduced where the chunks are computed.

    Each chunk's Jacobian is reduced on its worker to a few `in_size` vectors (see
    `jacket.analysis.reductions`): nothing of `J` is stored or sent. The driver merges the partials in a fixed
    binary tree over the chunk index, so the result does not depend on which chunk finished first:
    `mean_abs[j] = mean_{b,i} |J[b,i,j]|`, `rms[j] = sqrt(mean_{b,i} J[b,i,j]^2)`,
    `max_abs[j] = max_{b,i} |J[b,i,j]|`, over the samples `b` and every output element `i`.

    Args:
      model_path, inputs, client, scheduler, workers, batch_size, progress: As in
        `jacobian_dataset`. The model must have one input (it may have several outputs).
      reduce: "mean_abs", "rms" or "max_abs".
      **options: Options of `jacket.jacobian` (`mode`, `chunk_size`, `training`, `memory_budget`,
        `strategy`).

    Returns:
      A `Sensitivity`: `values` (`in_shape`, float64), `ranking` (flat feature indices, most
      sensitive first), `reduce`, `samples`.

    Example:
      >>> s = sensitivity_dataset("model.keras", "x.zarr", reduce="rms", workers=4)
      >>> s.top(3)
      [((3, 4, 0), 0.91), ((4, 4, 0), 0.88), ((3, 3, 0), 0.80)]
    """
    fn = "sensitivity_dataset"
    if not isinstance(reduce, str) or reduce not in REDUCTIONS:
        raise JacketValueError(
            f"{fn}: `reduce` must be one of {', '.join(map(repr, REDUCTIONS))}. "
            f"Received: reduce={reduce!r}."
        )
    job = Job.prepare(fn, model_path, inputs, batch_size, options, kind="sensitivity")
    if len(job.source.arrays) != 1:
        raise JacketValueError(
            f"{fn}: the sensitivity per input feature needs a model with one input. Received: "
            f"{len(job.source.arrays)} inputs ({', '.join(job.source.labels)}). Reduce the stored "
            "Jacobian blocks of `jacobian_dataset` instead."
        )
    tree = Tree(job.n_chunks, combine)
    _reduce(fn, job, client, scheduler, workers, progress, lambda i, r: tree.add(i, r["partial"]))
    total = tree.root
    values = finish(total, reduce)
    return Sensitivity(
        values=values.reshape(job.source.in_shapes[0]),
        ranking=ranking(values),
        reduce=reduce,
        output=None,
        samples=total.samples,
    )


def jacobian_norms_dataset(
    model_path: str | os.PathLike,
    inputs,
    *,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool | Callable[[int, int], None] = False,
    **options,
) -> np.ndarray:
    """The Frobenius norm of each sample's Jacobian over a whole dataset, without storing `J`.

    `norms[b] = sqrt(sum_{i,j} J[b,i,j]^2)` over every element of every output and input block, made
    on the workers (see `jacket.analysis.reductions.frobenius`); only `(n,)` numbers come back.

    Args:
      model_path, inputs, client, scheduler, workers, batch_size, progress: As in
        `jacobian_dataset` (any number of inputs and outputs).
      **options: Options of `jacket.jacobian` (`mode`, `chunk_size`, `training`, `memory_budget`,
        `strategy`).

    Returns:
      `(n,)` float64 NumPy array.

    Example:
      >>> norms = jacobian_norms_dataset("model.keras", "x.zarr", scheduler="processes")
      >>> norms.argmax()             # the sample whose outputs move most
    """
    fn = "jacobian_norms_dataset"
    job = Job.prepare(fn, model_path, inputs, batch_size, options, kind="norms")
    norms = np.empty(job.source.n)

    def put(index, result):
        start = index * job.batch_size
        norms[start : start + len(result["norms"])] = result["norms"]

    _reduce(fn, job, client, scheduler, workers, progress, put)
    return norms


# -------------------------------------------------------------------------------------- the driver


def _reduce(fn, job: Job, client, scheduler, workers, progress, put) -> None:
    """Run `job` (a reduction) over every chunk; `put(index, result)` as each one finishes."""
    report = check_progress(fn, progress)
    where = _cluster(fn, client, scheduler, workers)
    try:
        job.backend = where.backend()
        with Progress(report, job.n_chunks, job.kind) as bar:
            first = where.first_runner(job.n_chunks).call(reduce_chunk, job, 0, job.piece(0))
            put(0, first)
            bar.update(1)
            todo = range(1, job.n_chunks)
            if todo:
                runner = where.runner(len(todo) * first["chunk_bytes"], len(todo))
                count = [1]

                def done(index, result):
                    put(index, result)
                    count[0] += 1
                    bar.update(count[0])

                runner.run(((i, reduce_chunk, (job, i, job.piece(i))) for i in todo), done)
    finally:
        if where is not client:
            where.close()


class Progress:
    """A rich progress bar, a callback or nothing, fed with finished chunk counts."""

    def __init__(self, report, total: int, what: str):
        self.report, self.total, self.what = report, total, what
        self.bar = self.task = None

    def __enter__(self):
        if self.report is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("chunks"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total)
        elif callable(self.report):
            self.report(0, self.total)
        return self

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif callable(self.report):
            self.report(done, self.total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


class Tree:
    """Merges the values of chunks `0..n-1` in a fixed binary tree, whatever order they come in
    (floating-point sums depend on the order), keeping only the subtrees not yet complete."""

    def __init__(self, n: int, combine: Callable):
        self.n, self.combine = n, combine
        self.height = max(0, (n - 1).bit_length())
        self.nodes: dict = {}
        self.root = None

    def add(self, index: int, value) -> None:
        level, k = 0, index
        while level < self.height:
            sibling = k ^ 1
            if (sibling << level) < self.n:  # the sibling covers some chunks: wait for it
                other = self.nodes.pop((level, sibling), None)
                if other is None:
                    self.nodes[(level, k)] = value
                    return
                value = self.combine(other, value) if sibling < k else self.combine(value, other)
            level, k = level + 1, k >> 1
        self.root = value


# --------------------------------------------------------------------------------------- checks


def check_progress(fn: str, progress):
    if isinstance(progress, (bool, np.bool_)):
        return bool(progress)
    if callable(progress):
        return progress
    raise JacketTypeError(
        f"{fn}: `progress` must be True, False or a callable progress(done, total). "
        f"Received: {type(progress).__name__}."
    )


def _cluster(fn: str, client, scheduler, workers) -> Cluster:
    """The caller's `Cluster` (left open), or one made from the arguments (closed by the caller)."""
    if isinstance(client, Cluster):
        if scheduler is not None or workers is not None:
            raise JacketValueError(
                f"{fn}: a `Cluster` passed as `client` says where to run: pass no `scheduler` "
                f"or `workers` with it. Received: scheduler={scheduler!r}, workers={workers!r}."
            )
        return client
    return Cluster(client, scheduler, workers, fn=fn)
