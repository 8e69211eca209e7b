"""Jacobians of whole datasets, beyond memory and beyond one machine: Dask computes, zarr stores.

    >>> from jacket.distributed import jacobian_dataset, sensitivity_dataset
    >>> J = jacobian_dataset("model.keras", "inputs.zarr", "jacobians.zarr", batch_size=256)
    >>> J.shape                                   # a zarr array on disk: (n, *out_shape, *in_shape)
    >>> s = sensitivity_dataset("model.keras", "inputs.zarr", reduce="rms")   # nothing stored

The inputs are cut into chunks of `batch_size` samples. Each chunk is one task: a Dask worker loads
the model from its path (with Keras's `safe_mode`, once per worker process), reads its samples,
computes their Jacobians with `jacket.jacobian_fn` and writes them into the zarr store as one zarr
chunk. Nothing is pickled but paths, options and (for NumPy inputs) the chunk's samples; the driver
never holds more than one chunk of the result.

NOTE: [Resuming a dataset run]
The driver owns every piece of zarr metadata; workers only write chunk data. The manifest is the
JSON object under the "jacket" key of the store's root attributes: the identity of the run (the
model file's SHA-256, the Keras backend, every option, `batch_size`, the inputs' names, shapes and
dtypes), the layout of the arrays, the finished chunks (as `[start, stop)` ranges) and one record per
run (when it started, which chunks it computed, whether it completed). A chunk is marked finished by
the driver only after its task returned, and a task returns only after its data is written. zarr
rewrites `zarr.json` atomically (a temporary file renamed over it), so a run killed at any moment,
`kill -9` included, leaves either the old or the new manifest, never a torn one; a chunk written but
not yet marked is simply computed again. A rerun with the same arguments compares the identity,
computes the chunks not marked finished, and since every chunk is computed by the same code on the
same padded batch shape, the store ends identical to that of an uninterrupted run. A rerun whose
identity differs refuses with the differences (see `_differences`). Unfinished chunks read as NaN
(the arrays' fill value). A store killed before its first `zarr.json` was in place (only zarr's
temporary files in it) counts as new. `overwrite=True` renames the store aside before deleting it,
so a run killed during the deletion leaves a hidden `.{name}.deleting-*` folder, never a half
store under `out`. One driver per store at a time: two drivers on one store would overwrite each
other's manifest.

NOTE: [Where the chunks run]
- `client=` a `distributed.Client` (or `scheduler="tcp://host:port"`, which connects one): its
  workers. Every worker must see the model file and the store at the same paths (a shared file
  system), and run the same Keras backend (checked on each worker and in each task).
- `workers=N` or `scheduler="processes"`: a `distributed.LocalCluster` on 127.0.0.1 with `N` worker
  processes (default: one per CPU core, at most one per chunk), one thread each, started with this
  process's Keras backend and closed at the end.
- `scheduler="synchronous"`: in this process, one chunk after the other, no Dask at all.
- Nothing (the default): the first chunk runs in this process, which then knows the size of a
  chunk's Jacobian. If the rest is at most `IN_PROCESS_MAX_BYTES` (256 MiB) or a single chunk, it
  stays in this process; otherwise a LocalCluster as above takes over. Measured here (2 shared CPU
  cores, load average about 9): a 2-worker LocalCluster took 11-51 s to start and import Keras in
  its workers (JAX, TensorFlow), while this process wrote the 256 MiB of Jacobians of a 128 -> 128
  dense layer in 8-12 s (22-34 MB/s, TensorFlow, JAX, PyTorch): below that size the cluster cannot
  pay for its start. On two cores it rarely pays at all (the frameworks already use both); it does
  on machines with many cores, and a real cluster on many machines.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import reductions as _reductions
from ..analysis.reductions import REDUCTIONS, Sensitivity
from ..errors import JacketTypeError, JacketValueError

__all__ = [
    "jacobian_dataset",
    "sensitivity_dataset",
    "jacobian_norms_dataset",
    "DEFAULT_BATCH_SIZE",
    "IN_PROCESS_MAX_BYTES",
]

DEFAULT_BATCH_SIZE = 64
IN_PROCESS_MAX_BYTES = 256 * 2**20
FORMAT = "jacket.jacobian_dataset/1"
MANIFEST_KEY = "jacket"
SCHEDULERS = ("synchronous", "processes")
# The options of `jacket.jacobian_fn` a dataset run passes on, with their defaults (a test checks them
# against `jacket.jacobian_fn`'s signature). `per_sample` stays True: chunks hold per-sample blocks.
OPTION_DEFAULTS: dict[str, Any] = {
    "mode": "auto",
    "chunk_size": None,
    "flatten": False,
    "training": False,
    "memory_budget": None,
    "strategy": "auto",
}
_WORKER_WAIT_S = 60.0


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
        workers compute the chunks.
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
    job = _Job.prepare(fn, model_path, inputs, batch_size, options, kind="jacobian")
    store = _store_path(fn, out)
    check_flag(fn, "overwrite", overwrite)
    report = _check_progress(fn, progress)
    where = _Where(fn, client, scheduler, workers)
    try:
        job.backend = where.backend()
        identity = job.identity()
        manifest, root = _open_store(fn, store, identity, overwrite)
        job.store = str(store)
        with _Progress(report, job.n_chunks, "Jacobians") as bar:
            if manifest is None:  # a fresh store: the first chunk tells the layout
                first = where.first_runner(job.n_chunks).call(_jacobian_chunk, job, 0, job.piece(0))
                manifest = _new_manifest(job, identity, first["layout"])
                root = _create_store(store, manifest)
                _write_blocks(store, first["layout"], job.piece(0), first["blocks"])
                del first  # the driver holds one chunk at most, and not for long
                tracker = _Tracker(root, manifest)
                tracker.start()
                tracker.finished(0)
            else:
                _create_arrays(store, manifest["layout"])  # any a killed first run left out
                tracker = _Tracker(root, manifest)
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

                runner.run(((i, _jacobian_chunk, (job, i, job.piece(i))) for i in todo), done)
            tracker.complete()
    finally:
        where.close()
    return _open_result(store, manifest["layout"])


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
    `jacket._reductions`): nothing of `J` is stored or sent. The driver merges the partials in a fixed
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
    job = _Job.prepare(fn, model_path, inputs, batch_size, options, kind="sensitivity")
    if len(job.source.arrays) != 1:
        raise JacketValueError(
            f"{fn}: the sensitivity per input feature needs a model with one input. Received: "
            f"{len(job.source.arrays)} inputs ({', '.join(job.source.labels)}). Reduce the stored "
            "Jacobian blocks of `jacobian_dataset` instead."
        )
    tree = _Tree(job.n_chunks, _reductions.combine)
    _reduce(fn, job, client, scheduler, workers, progress, lambda i, r: tree.add(i, r["partial"]))
    total = tree.root
    values = _reductions.finish(total, reduce)
    return Sensitivity(
        values=values.reshape(job.source.in_shapes[0]),
        ranking=_reductions.ranking(values),
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
    on the workers (see `jacket._reductions.frobenius`); only `(n,)` numbers come back.

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
    job = _Job.prepare(fn, model_path, inputs, batch_size, options, kind="norms")
    norms = np.empty(job.source.n)

    def put(index, result):
        start = index * job.batch_size
        norms[start : start + len(result["norms"])] = result["norms"]

    _reduce(fn, job, client, scheduler, workers, progress, put)
    return norms


# -------------------------------------------------------------------------------------- the driver


def _reduce(fn, job: _Job, client, scheduler, workers, progress, put) -> None:
    """Run `job` (a reduction) over every chunk; `put(index, result)` as each one finishes."""
    report = _check_progress(fn, progress)
    where = _Where(fn, client, scheduler, workers)
    try:
        job.backend = where.backend()
        with _Progress(report, job.n_chunks, job.kind) as bar:
            first = where.first_runner(job.n_chunks).call(_reduce_chunk, job, 0, job.piece(0))
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

                runner.run(((i, _reduce_chunk, (job, i, job.piece(i))) for i in todo), done)
    finally:
        where.close()


@dataclass
class _Job:
    """What every task of a run needs: small and picklable (paths, options, no model, no result)."""

    fn: str
    kind: str  # "jacobian", "sensitivity" or "norms"
    model_path: str
    model_sha256: str
    options: dict
    batch_size: int
    source: _Source  # stays with the driver (see `__getstate__`)
    n: int
    in_skeleton: Any
    backend: str | None = None
    store: str | None = None
    layout: dict | None = None

    @classmethod
    def prepare(cls, fn, model_path, inputs, batch_size, options, *, kind) -> _Job:
        path, sha256 = _model_file(fn, model_path)
        source = _Source.open(fn, inputs)
        batch_size = _positive_int(fn, "batch_size", batch_size)
        options = _check_options(fn, options, kind)
        return cls(
            fn, kind, str(path), sha256, options, batch_size, source, source.n, source.skeleton
        )

    def piece(self, index: int) -> _Piece:
        """Chunk `index`'s samples: the NumPy data itself, or the zarr arrays to read them from."""
        start = index * self.batch_size
        stop = min(self.n, start + self.batch_size)
        arrays = self.source.arrays
        if all(isinstance(array, np.ndarray) for array in arrays):
            return _Piece(start, stop, self.in_skeleton, data=[a[start:stop] for a in arrays])
        return _Piece(start, stop, self.in_skeleton, arrays=arrays)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.batch_size)

    def identity(self) -> dict:
        """What must match for a stored run to be resumed (see NOTE: [Resuming a dataset run])."""
        return {
            "format": FORMAT,
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "options": self.options,
            "batch_size": self.batch_size,
            "inputs": self.source.describe(),
        }

    def __getstate__(self):  # the tasks carry their own piece of the inputs, not all of them
        state = dict(self.__dict__)
        state["source"] = None
        return state


class _Where:
    """Where the chunks run (see NOTE: [Where the chunks run]); closes what it started."""

    def __init__(self, fn: str, client, scheduler, workers):
        self.fn = fn
        if client is not None and scheduler is not None:
            raise JacketValueError(
                f"{fn}: pass `client` or `scheduler`, not both. Received: client={client!r}, "
                f"scheduler={scheduler!r}."
            )
        if workers is not None:
            workers = _positive_int(fn, "workers", workers)
            if client is not None or (scheduler is not None and scheduler != "processes"):
                raise JacketValueError(
                    f"{fn}: `workers` sets the size of a local cluster, so it goes with no "
                    f"`client` and scheduler=None or 'processes'. Received: workers={workers}, "
                    f"client={client!r}, scheduler={scheduler!r}."
                )
        self.client = None
        self.address = None
        self.workers = workers
        self.kind = "auto" if workers is None else "processes"
        if client is not None:
            if isinstance(client, str):
                self.kind, self.address = "address", client
            elif hasattr(client, "submit") and hasattr(client, "scheduler_info"):
                self.kind, self.client = "client", client
            else:
                raise JacketTypeError(
                    f"{fn}: `client` must be a distributed.Client or a scheduler address such as "
                    f"'tcp://host:8786'. Received: {type(client).__name__}."
                )
        elif scheduler is not None:
            if not isinstance(scheduler, str) or not scheduler:
                raise JacketTypeError(
                    f"{fn}: `scheduler` must be 'synchronous', 'processes' or a Dask scheduler "
                    f"address such as 'tcp://host:8786'. Received: scheduler={scheduler!r}."
                )
            if scheduler in SCHEDULERS:
                self.kind = scheduler
            else:
                self.kind, self.address = "address", scheduler
        self._runner = None
        self._owned: list = []  # clients and clusters this object started

    # the backend the workers run
    def backend(self) -> str:
        if self.kind not in ("client", "address"):
            return _local_backend()
        client = self._connect()
        try:
            client.wait_for_workers(1, timeout=_WORKER_WAIT_S)
        except TimeoutError as error:
            raise JacketValueError(
                f"{self.fn}: no worker joined the Dask scheduler at {client.scheduler.address} "
                f"within {_WORKER_WAIT_S:.0f} s. Start workers with `dask worker "
                f"{client.scheduler.address}`."
            ) from error
        found = client.run(_worker_backend)
        names = sorted(set(found.values()))
        if len(names) != 1:
            raise JacketValueError(
                f"{self.fn}: the Dask workers run different Keras backends: "
                + ", ".join(f"{address}: {name}" for address, name in sorted(found.items()))
                + ". Start every worker with the same KERAS_BACKEND."
            )
        return names[0]

    def first_runner(self, chunks: int) -> _InProcess | _Dask:
        """Where the first of `chunks` chunks runs: this process when the choice waits for its
        size."""
        if self.kind == "auto":
            return _InProcess()
        return self.runner(0, chunks)

    def runner(self, remaining_bytes: int, remaining_chunks: int) -> _InProcess | _Dask:
        if self._runner is None:
            kind = self.kind
            if kind == "auto":
                small = remaining_bytes <= IN_PROCESS_MAX_BYTES or remaining_chunks <= 1
                kind = "synchronous" if small else "processes"
            if kind == "synchronous":
                self._runner = _InProcess()
            elif kind == "processes":
                self._runner = _Dask(self._local_cluster(remaining_chunks))
            else:
                self._runner = _Dask(self._connect())
        return self._runner

    def _connect(self):
        if self.client is None:
            from distributed import Client

            try:
                self.client = Client(self.address, timeout="30s")
            except (OSError, TimeoutError) as error:
                raise JacketValueError(
                    f"{self.fn}: cannot reach the Dask scheduler at {self.address!r}: {error}. "
                    "Start one with `dask scheduler` (and workers with `dask worker "
                    "tcp://HOST:8786`), or pass scheduler=None for a local cluster."
                ) from error
            self._owned.append(self.client)
        return self.client

    def _local_cluster(self, chunks: int):
        from distributed import Client, LocalCluster

        n = self.workers or max(1, min(os.cpu_count() or 1, chunks))
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # any free port (None still binds 8787)
            env={"KERAS_BACKEND": _local_backend()},
        )
        self._owned.append(cluster)
        client = Client(cluster)
        self._owned.append(client)
        return client

    def close(self) -> None:
        while self._owned:
            self._owned.pop().close()


class _InProcess:
    """Tasks in this process, one after the other. A runner (this or `_Dask`) has `call(fn, *args)`,
    which returns `fn(*args)`, and `run(calls, done)`, which runs every `(key, fn, args)` of
    `calls` and calls `done(key, fn(*args))` as each one finishes."""

    def call(self, fn: Callable, *args):
        return fn(*args)

    def run(self, calls: Iterable[tuple[int, Callable, tuple]], done: Callable) -> None:
        for key, fn, args in calls:
            done(key, fn(*args))


class _Dask:
    """Tasks on a Dask cluster, at most a few per worker thread submitted at a time, so a run
    killed midway leaves little work in flight and a big dataset does not flood the scheduler."""

    def __init__(self, client):
        self.client = client

    def call(self, fn, *args):
        return self.client.submit(fn, *self._ship(args), pure=False).result()

    def run(self, calls, done):
        from distributed import as_completed

        calls = iter(calls)
        threads = sum(self.client.nthreads().values())
        window = max(4, 2 * threads)
        keys: dict = {}
        finished = as_completed()

        def submit_next() -> None:
            call = next(calls, None)
            if call is not None:
                key, fn, args = call
                future = self.client.submit(fn, *self._ship(args), pure=False)
                keys[future] = key
                finished.add(future)

        for _ in range(window):
            submit_next()
        try:
            for future in finished:
                key = keys.pop(future)
                result = future.result()  # raises the task's error, with its type
                future.release()
                done(key, result)
                submit_next()
        except BaseException:
            self.client.cancel(list(keys))
            raise

    def _ship(self, args: tuple) -> tuple:
        # samples held in memory go to the workers on their own, not inside the task graph
        return tuple(
            self.client.scatter(arg) if isinstance(arg, _Piece) and arg.data is not None else arg
            for arg in args
        )


class _Progress:
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


class _Tree:
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


# ------------------------------------------------------------------------------------- the store


def _store_path(fn: str, out) -> Path:
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise JacketTypeError(
            f"{fn}: `out` must be the path of a zarr store (a directory). "
            f"Received: {type(out).__name__}."
        )
    if "://" in str(out):
        raise JacketValueError(
            f"{fn}: `out` must be a local path (or one on a file system the workers share), since "
            f"the manifest is rewritten as chunks finish. Received: out={str(out)!r}."
        )
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise JacketValueError(
            f"{fn}: `out` must be a directory for the zarr store. Received: {str(out)!r}, an "
            "existing file. Pass a new path."
        )
    return path


def _open_store(fn: str, store: Path, identity: dict, overwrite: bool):
    """`(manifest, root node)` of a resumable store at `store`, or `(None, None)` for a fresh one."""
    import zarr

    if not store.exists() or not any(store.iterdir()):
        return None, None
    is_zarr = (store / "zarr.json").is_file()
    if not is_zarr and _only_partial_writes(store):  # killed while it wrote its first zarr.json
        shutil.rmtree(store)
        return None, None
    if overwrite:
        if not is_zarr:
            raise JacketValueError(
                f"{fn}: `out` ({store}) is a non-empty directory that is not a zarr store; "
                "overwrite=True deletes only zarr stores. Pass a new path."
            )
        # renamed first (atomic), so a run killed while deleting leaves no half store under `out`
        trash = store.with_name(f".{store.name}.deleting-{os.urandom(4).hex()}")
        store.rename(trash)
        shutil.rmtree(trash)
        return None, None
    root = zarr.open(store, mode="r+") if is_zarr else None
    manifest = root.attrs.get(MANIFEST_KEY) if root is not None else None
    if not isinstance(manifest, dict) or "identity" not in manifest:
        raise JacketValueError(
            f"{fn}: `out` ({store}) already holds something that is not a jacket dataset run. "
            "Pass a new path (or, for a zarr store you no longer need, overwrite=True)."
        )
    differences = _differences(manifest["identity"], identity)
    if differences:
        raise JacketValueError(
            f"{fn}: `out` ({store}) holds a run made with other arguments, which resuming would "
            f"mix: {'; '.join(differences)}. Pass a new `out` to keep both, or overwrite=True to "
            "discard the stored chunks and start again."
        )
    _remove_partial_writes(store)
    return manifest, root


def _remove_partial_writes(store: Path) -> None:
    """Delete the temporary files of writes a killed run left (zarr writes `name.<32 hex>.partial`
    and renames it into place); listing a group with one inside would warn."""
    for path in store.rglob("*.partial"):
        if _is_partial_write(path):
            path.unlink(missing_ok=True)


def _is_partial_write(path: Path) -> bool:
    if not path.name.endswith(".partial"):
        return False
    token = path.name[: -len(".partial")].rsplit(".", 1)[-1]
    return len(token) == 32 and all(c in "0123456789abcdef" for c in token)


def _only_partial_writes(store: Path) -> bool:
    """Whether `store` holds nothing but zarr's temporary files (and folders): what a run killed
    while it created the store leaves."""
    files = [path for path in store.rglob("*") if not path.is_dir()]
    return bool(files) and all(_is_partial_write(path) for path in files)


def _differences(stored: dict, now: dict) -> list[str]:
    """What differs between two run identities, in words (stored value first)."""
    out = []
    if stored.get("format") != now["format"]:
        return [f"format {stored.get('format')!r} stored, {now['format']!r} now"]
    if stored.get("model_sha256") != now["model_sha256"]:
        out.append(
            f"the model file (SHA-256 {str(stored.get('model_sha256'))[:12]}... stored, "
            f"{now['model_sha256'][:12]}... now)"
        )
    if stored.get("backend") != now["backend"]:
        out.append(f"the Keras backend ({stored.get('backend')!r} stored, {now['backend']!r} now)")
    stored_options = stored.get("options", {})
    for name in sorted(set(stored_options) | set(now["options"])):
        before, after = stored_options.get(name), now["options"].get(name)
        if before != after:
            out.append(f"option {name} ({before!r} stored, {after!r} now)")
    if stored.get("batch_size") != now["batch_size"]:
        out.append(f"batch_size ({stored.get('batch_size')} stored, {now['batch_size']} now)")
    if stored.get("inputs") != now["inputs"]:
        out.append(
            f"the inputs ({_describe_inputs(stored.get('inputs'))} stored, "
            f"{_describe_inputs(now['inputs'])} now)"
        )
    return out


def _describe_inputs(inputs) -> str:
    if not isinstance(inputs, list):
        return repr(inputs)
    return ", ".join(
        f"{item.get('name') or 'x'} {tuple(item.get('shape', ()))} {item.get('dtype')}"
        for item in inputs
    )


def _new_manifest(job: _Job, identity: dict, layout: dict) -> dict:
    from .. import __version__

    return {
        "identity": identity,
        "model_path": job.model_path,
        "jacket_version": __version__,
        "layout": layout,
        "chunks": {"count": job.n_chunks, "finished": []},
        "runs": [],
    }


def _create_store(store: Path, manifest: dict):
    """The root node, with the manifest in its attributes, and the arrays of the layout."""
    import zarr

    layout = manifest["layout"]
    if _is_root_array(layout):
        (spec,) = layout["arrays"]
        root = zarr.create_array(
            store=str(store),
            **_array_args(spec),
            attributes={MANIFEST_KEY: manifest},
        )
    else:
        root = zarr.create_group(store=str(store), attributes={MANIFEST_KEY: manifest})
    _create_arrays(store, layout)
    return root


def _create_arrays(store: Path, layout: dict) -> None:
    import zarr

    if _is_root_array(layout):
        return
    group = zarr.open_group(str(store), mode="r+")
    for spec in layout["arrays"]:
        try:
            array = group[spec["path"]]
        except KeyError:
            group.create_array(
                name=spec["path"],
                **_array_args(spec),
                attributes={"output": spec["output"], "input": spec["input"]},
            )
            continue
        assert tuple(array.shape) == tuple(spec["shape"]), (array.shape, spec)


def _array_args(spec: dict) -> dict:
    return {
        "shape": tuple(spec["shape"]),
        "chunks": tuple(spec["chunks"]),
        "dtype": spec["dtype"],
        "fill_value": np.nan,  # unfinished chunks read as NaN
    }


def _is_root_array(layout: dict) -> bool:
    return len(layout["arrays"]) == 1 and layout["arrays"][0]["path"] == ""


def _write_blocks(store: Path | str, layout: dict, piece: _Piece, blocks: list) -> None:
    import zarr

    for spec, block in zip(layout["arrays"], blocks):
        if spec["path"]:
            array = zarr.open_array(str(store), path=spec["path"], mode="r+")
        else:
            array = zarr.open_array(str(store), mode="r+")
        array[piece.start : piece.stop] = block.astype(spec["dtype"], copy=False)


def _open_result(store: Path, layout: dict):
    import zarr

    arrays = []
    for spec in layout["arrays"]:
        if spec["path"]:
            arrays.append(zarr.open_array(str(store), path=spec["path"], mode="r"))
        else:
            arrays.append(zarr.open_array(str(store), mode="r"))
    per_output = []
    n_in = len(_flatten_skeleton(layout["in_skeleton"]))
    for k in range(0, len(arrays), n_in):
        per_output.append(_unflatten(layout["in_skeleton"], arrays[k : k + n_in]))
    return _unflatten(layout["out_skeleton"], per_output)


class _Tracker:
    """The manifest's account of finished chunks and of this run, rewritten (atomically, by zarr)
    into the root attributes after every chunk."""

    def __init__(self, root, manifest: dict):
        self.root, self.manifest = root, manifest
        chunks = manifest["chunks"]
        self.done = _mask(chunks["finished"], chunks["count"])
        self.computed = np.zeros_like(self.done)
        self.run: dict | None = None

    def todo(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]

    def count(self) -> int:
        return int(self.done.sum())

    def start(self) -> None:
        """A new record in the manifest's `runs`."""
        self.run = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "computed": [],
            "completed": False,
        }
        self.manifest["runs"].append(self.run)
        self._save()

    def finished(self, index: int) -> None:
        self.done[index] = True
        self.computed[index] = True
        self._save()

    def complete(self) -> None:
        if self.run is not None and self.done.all():
            self.run["completed"] = True
            self._save()

    def _save(self) -> None:
        self.manifest["chunks"]["finished"] = _ranges(self.done)
        self.run["computed"] = _ranges(self.computed)
        self.root.update_attributes({MANIFEST_KEY: self.manifest})


def _ranges(mask: np.ndarray) -> list[list[int]]:
    """`[[start, stop), ...]` of the runs of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]


def _mask(ranges: list, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for start, stop in ranges:
        mask[start:stop] = True
    return mask


# ------------------------------------------------------------------------------------- the inputs


@dataclass
class _Source:
    """The inputs of a run: their structure and arrays (NumPy or zarr), never read whole."""

    skeleton: Any  # JSON form of the input structure (see `_skeleton`)
    labels: list[str]
    arrays: list
    n: int

    @classmethod
    def open(cls, fn: str, inputs) -> _Source:
        import zarr

        if isinstance(inputs, (str, os.PathLike)):
            location = str(inputs)
            if "://" not in location:
                location = str(Path(location).expanduser().resolve())
                if not Path(location).exists():
                    raise JacketValueError(
                        f"{fn}: `inputs` must be a zarr store, an array or a structure of arrays. "
                        f"Received: {str(inputs)!r}, which does not exist."
                    )
            try:
                node = zarr.open(location, mode="r")
            except (FileNotFoundError, ValueError, KeyError) as error:
                raise JacketValueError(
                    f"{fn}: `inputs` must be a zarr store. Received: {str(inputs)!r}, which zarr "
                    f"cannot open ({type(error).__name__}: {error}). Pass a NumPy array, or "
                    "convert the data once: zarr.create_array('x.zarr', data=np.load('x.npy'))."
                ) from error
            if isinstance(node, zarr.Group):
                node = dict(sorted(node.arrays()))
                if not node:
                    raise JacketValueError(
                        f"{fn}: `inputs` must hold the samples. Received: {str(inputs)!r}, a "
                        "zarr group without arrays."
                    )
            inputs = node
        try:
            skeleton, leaves = _skeleton(inputs, is_leaf=_is_array)
        except TypeError as error:
            raise JacketTypeError(f"{fn}: `inputs` {error}.") from error
        labels = [_label(path) for path, _ in leaves]
        arrays = [leaf for _, leaf in leaves]
        for label, array in zip(labels, arrays):
            name = f"inputs{label and '[' + repr(label) + ']'}"
            dtype = np.dtype(array.dtype)
            if dtype.kind not in "biuf":
                raise JacketTypeError(
                    f"{fn}: `{name}` must hold real numbers. Received: dtype {dtype}."
                )
            if len(array.shape) < 1 or array.shape[0] < 1:
                raise JacketValueError(
                    f"{fn}: `{name}` must have a leading sample axis with at least one sample, "
                    f"shape `(n, *in_shape)`. Received: shape {tuple(array.shape)}."
                )
        sizes = sorted({int(array.shape[0]) for array in arrays})
        if len(sizes) != 1:
            raise JacketValueError(
                f"{fn}: every input must have the same number of samples. Received: "
                + ", ".join(f"{label or 'x'} {tuple(a.shape)}" for label, a in zip(labels, arrays))
                + "."
            )
        return cls(skeleton, labels, arrays, sizes[0])

    @property
    def in_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in array.shape[1:]) for array in self.arrays]

    def describe(self) -> list[dict]:
        return [
            {"name": label, "shape": [int(d) for d in array.shape], "dtype": str(array.dtype)}
            for label, array in zip(self.labels, self.arrays)
        ]


@dataclass
class _Piece:
    """One chunk's samples: the NumPy data itself, or the zarr arrays to read them from."""

    start: int
    stop: int
    skeleton: Any
    data: list | None = None
    arrays: list | None = None

    def read(self, batch_size: int) -> tuple[Any, int]:
        """`(x, valid)`: the samples in the input structure, the last chunk padded to `batch_size`
        with copies of its last sample (so that every chunk has one shape and one compiled kernel),
        of which the first `valid` are real."""
        if self.data is not None:
            parts = [np.asarray(a) for a in self.data]
        else:
            parts = [np.asarray(a[self.start : self.stop]) for a in self.arrays]
        valid = self.stop - self.start
        if valid < batch_size:
            parts = [
                np.concatenate([p, np.repeat(p[-1:], batch_size - valid, axis=0)]) for p in parts
            ]
        return _unflatten(self.skeleton, parts), valid


def _is_array(value) -> bool:
    if isinstance(value, np.ndarray):
        return True
    import zarr

    return isinstance(value, zarr.Array)


# ------------------------------------------------------------------------------------ the workers

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
            found = _sha256(Path(path))
            if found != sha256:
                raise JacketValueError(
                    f"the model file {path} on this worker ({_hostname()}) has SHA-256 "
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


def _jacobian_fn(job: _Job):
    """`jacket.jacobian_fn` for the job's model and options, made once per process."""
    options = dict(job.options)
    if job.kind != "jacobian":
        options["flatten"] = True
    options = {k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]}
    key = (job.model_path, job.model_sha256, tuple(sorted(options.items())))
    jac = _JACOBIANS.get(key)
    if jac is None:
        import jacket

        model = _load_model(job.model_path, job.model_sha256)
        jac = _JACOBIANS[key] = jacket.jacobian_fn(model, **options)
    return jac


def _compute(job: _Job, index: int, piece: _Piece):
    """`(out_skeleton, blocks)` of one chunk: NumPy arrays `(valid, ...)` in layout order."""
    import keras

    backend = keras.backend.backend()
    if job.backend is not None and backend != job.backend:
        raise JacketValueError(
            f"{job.fn}: a worker ({_hostname()}) runs the Keras backend {backend!r}, but this run "
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
    out_skeleton, leaves = _split(J, job.in_skeleton)
    blocks = [np.asarray(keras.ops.convert_to_numpy(leaf))[:valid] for leaf in leaves]
    return out_skeleton, blocks


def _jacobian_chunk(job: _Job, index: int, piece: _Piece) -> dict:
    """Task: the Jacobians of chunk `index`, written to the store; or, for the first chunk of a new
    store (`job.layout` is None), returned with the layout they define."""
    out_skeleton, blocks = _compute(job, index, piece)
    if job.layout is None:
        return {"layout": _layout(job, out_skeleton, blocks), "blocks": blocks}
    for spec, block in zip(job.layout["arrays"], blocks):
        assert tuple(block.shape[1:]) == tuple(spec["shape"][1:]), (block.shape, spec)
    _write_blocks(job.store, job.layout, piece, blocks)
    return {"index": index}  # returned only once the data is written: then the chunk is finished


def _reduce_chunk(job: _Job, index: int, piece: _Piece) -> dict:
    """Task: the reduction of chunk `index` (a `Partial`, or the per-sample norms)."""
    _, blocks = _compute(job, index, piece)
    chunk_bytes = (
        sum(int(b.size) * b.dtype.itemsize for b in blocks)
        * job.batch_size
        // max(1, piece.stop - piece.start)
    )
    if job.kind == "sensitivity":
        return {"partial": _reductions.partial(blocks), "chunk_bytes": chunk_bytes}
    return {"norms": _reductions.frobenius(blocks), "chunk_bytes": chunk_bytes}


def _layout(job: _Job, out_skeleton, blocks: list) -> dict:
    out_paths = [path for path, _ in _flatten_skeleton(out_skeleton)]
    in_paths = [path for path, _ in _flatten_skeleton(job.in_skeleton)]
    arrays = []
    k = 0
    for out_path in out_paths:
        for in_path in in_paths:
            block = blocks[k]
            k += 1
            out_label, in_label = _label(out_path), _label(in_path)
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


def _worker_backend() -> str:
    import keras

    return keras.backend.backend()


# ------------------------------------------------------------------------------------ structures


def _skeleton(value, *, is_leaf: Callable) -> tuple[Any, list]:
    """`(skeleton, [(path, leaf), ...])`: a JSON form of a structure of dicts, lists and tuples
    (leaves replaced by None; dict keys in sorted order, as `keras.tree` flattens them)."""
    leaves: list = []

    def walk(node, path):
        if is_leaf(node):
            leaves.append((path, node))
            return None
        if isinstance(node, Mapping):
            for key in node:
                if not isinstance(key, str) or not key or "/" in key:
                    raise TypeError(
                        f"must use non-empty string names without '/'. Received: key {key!r}"
                    )
            return {"dict": {key: walk(node[key], path + (key,)) for key in sorted(node)}}
        if isinstance(node, (list, tuple)) and node:
            return {"list": [walk(item, path + (i,)) for i, item in enumerate(node)]}
        raise TypeError(
            "must be a NumPy or zarr array (or a zarr store path), or a list, tuple or dict of "
            f"them. Received: {type(node).__name__}. Pass np.asarray(...) or a zarr array"
        )

    return walk(value, ()), leaves


def _flatten_skeleton(skeleton) -> list[tuple[tuple, None]]:
    return _skeleton_paths(skeleton, ())


def _skeleton_paths(skeleton, path) -> list:
    if skeleton is None:
        return [(path, None)]
    if "dict" in skeleton:
        return [
            item
            for key, child in skeleton["dict"].items()
            for item in _skeleton_paths(child, path + (key,))
        ]
    return [
        item
        for i, child in enumerate(skeleton["list"])
        for item in _skeleton_paths(child, path + (i,))
    ]


def _unflatten(skeleton, leaves: list):
    """The structure `skeleton` (from `_skeleton`) with `leaves` in flattening order."""
    leaves = iter(leaves)

    def build(node):
        if node is None:
            return next(leaves)
        if "dict" in node:
            return {key: build(child) for key, child in node["dict"].items()}
        return [build(child) for child in node["list"]]

    return build(skeleton)


def _matches(node, skeleton) -> bool:
    """Whether `node` has the structure `skeleton` with array leaves."""
    if skeleton is None:
        return not isinstance(node, (Mapping, list, tuple))
    if "dict" in skeleton:
        return (
            isinstance(node, Mapping)
            and set(node) == set(skeleton["dict"])
            and all(_matches(node[k], child) for k, child in skeleton["dict"].items())
        )
    return (
        isinstance(node, (list, tuple))
        and len(node) == len(skeleton["list"])
        and all(_matches(item, child) for item, child in zip(node, skeleton["list"]))
    )


def _split(J, in_skeleton) -> tuple[Any, list]:
    """`(out_skeleton, leaves)` of a Jacobian structure (the model's outputs of its inputs): the
    output structure is what lies above the subtrees shaped like the inputs."""
    leaves: list = []

    def walk(node):
        if _matches(node, in_skeleton):
            leaves.extend(_unflatten_leaves(node, in_skeleton))
            return None
        if isinstance(node, Mapping):
            return {"dict": {key: walk(node[key]) for key in sorted(node)}}
        assert isinstance(node, (list, tuple)), type(node)
        return {"list": [walk(item) for item in node]}

    return walk(J), leaves


def _unflatten_leaves(node, skeleton) -> list:
    if skeleton is None:
        return [node]
    if "dict" in skeleton:
        return [
            leaf
            for key, child in skeleton["dict"].items()
            for leaf in _unflatten_leaves(node[key], child)
        ]
    return [
        leaf
        for item, child in zip(node, skeleton["list"])
        for leaf in _unflatten_leaves(item, child)
    ]


def _label(path: tuple) -> str:
    return ".".join(str(part) for part in path)


# --------------------------------------------------------------------------------------- checks


def _model_file(fn: str, model_path) -> tuple[Path, str]:
    if not isinstance(model_path, (str, os.PathLike)):
        raise JacketTypeError(
            f"{fn}: `model_path` must be the path of a `.keras` file, which each worker loads "
            f"itself (models are never pickled). Received: {type(model_path).__name__}. Save the "
            "model first: model.save('model.keras')."
        )
    path = Path(model_path).expanduser().resolve()
    if path.suffix != ".keras":
        raise JacketValueError(
            f"{fn}: `model_path` must be a Keras 3 `.keras` file. Received: {str(model_path)!r}. "
            "Save the model with model.save('model.keras')."
        )
    if not path.is_file():
        raise JacketValueError(
            f"{fn}: `model_path` must be an existing `.keras` file. Received: "
            f"{str(model_path)!r}, which does not exist."
        )
    return path, _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_options(fn: str, options: dict, kind: str) -> dict:
    allowed = dict(OPTION_DEFAULTS)
    if kind != "jacobian":
        del allowed["flatten"]  # reductions see flattened blocks
    checked = dict(allowed)
    for name, value in options.items():
        if name == "per_sample":
            if value is not True:
                raise JacketValueError(
                    f"{fn}: chunks hold per-sample Jacobians, so `per_sample` must stay True. "
                    f"Received: per_sample={value!r}. For the full cross-sample Jacobian of a "
                    "batch, call jacket.jacobian(model, x, per_sample=False)."
                )
            continue
        if name not in allowed:
            raise JacketTypeError(
                f"{fn}: unknown option `{name}`. Received: {name}={value!r}. Options: "
                f"{', '.join(allowed)} (those of jacket.jacobian)."
            )
        if isinstance(value, np.bool_):
            value = bool(value)
        elif isinstance(value, np.integer):
            value = int(value)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise JacketTypeError(
                f"{fn}: option `{name}` must be a plain value (None, a bool, a number or a "
                f"string). Received: {name}={value!r}."
            )
        checked[name] = value
    return checked


def _positive_int(fn: str, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise JacketTypeError(
            f"{fn}: `{name}` must be a positive integer. Received: {name}={value!r}."
        )
    if value < 1:
        raise JacketValueError(
            f"{fn}: `{name}` must be a positive integer. Received: {name}={value}."
        )
    return int(value)


def check_flag(fn: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise JacketTypeError(f"{fn}: `{name}` must be True or False. Received: {name}={value!r}.")


def _check_progress(fn: str, progress):
    if isinstance(progress, (bool, np.bool_)):
        return bool(progress)
    if callable(progress):
        return progress
    raise JacketTypeError(
        f"{fn}: `progress` must be True, False or a callable progress(done, total). "
        f"Received: {type(progress).__name__}."
    )


def _local_backend() -> str:
    """The Keras backend of this process, without importing Keras when it is not imported yet
    (Keras's own rule: KERAS_BACKEND, then keras.json, then TensorFlow)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError):
        return "tensorflow"


def _hostname() -> str:
    import socket

    return f"{socket.gethostname()}, pid {os.getpid()}"
