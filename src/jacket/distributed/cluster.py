"""Where the chunks of a dataset run go: this process, a local Dask cluster, or a running one.

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

`Cluster` makes that choice, in one place, for the library and the command line alike: it connects
(within `connect_timeout`), waits for a worker (within `workers_wait`), asks the workers for their
Keras backend, says in words where the run went (`describe`), and closes what it started.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable

from ..checks import positive_int
from ..errors import JacketTypeError, JacketValueError
from .source import Piece

IN_PROCESS_MAX_BYTES = 256 * 2**20
SCHEDULERS = ("synchronous", "processes")
CONNECT_TIMEOUT_S = 30.0
WORKERS_WAIT_S = 60.0


class Cluster:
    """Where the chunks of a run go (see NOTE: [Where the chunks run]); closes what it started.

    Pass one to `jacobian_dataset` & co. as `client=` to choose (and check) where they run before
    they start, and to learn where they ran; it stays open until closed (or its `with` block ends).

    Args:
      client: A `distributed.Client`, or a scheduler address such as "tcp://10.0.0.5:8786".
      scheduler: "synchronous", "processes" or a scheduler address (instead of `client`).
      workers: Worker processes of a local cluster (with no `client`, and scheduler None or
        "processes").
      connect_timeout: Seconds to reach a scheduler before giving up with an error.
      workers_wait: Seconds to wait for a scheduler's first worker before giving up.
      fn: The name the errors start with.

    Example:
      >>> with Cluster(scheduler="tcp://10.0.0.5:8786") as cluster:
      ...     J = jacobian_dataset("model.keras", "x.zarr", "J.zarr", client=cluster)
      ...     print(cluster.describe, cluster.backend())
      the Dask scheduler at tcp://10.0.0.5:8786 (4 workers) jax
    """

    def __init__(
        self,
        client=None,
        scheduler: str | None = None,
        workers: int | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        workers_wait: float = WORKERS_WAIT_S,
        fn: str = "Cluster",
    ):
        self.fn = fn
        if client is not None and scheduler is not None:
            raise JacketValueError(
                f"{fn}: pass `client` or `scheduler`, not both. Received: client={client!r}, "
                f"scheduler={scheduler!r}."
            )
        if workers is not None:
            workers = positive_int(fn, "workers", workers)
            if client is not None or (scheduler is not None and scheduler != "processes"):
                raise JacketValueError(
                    f"{fn}: `workers` sets the size of a local cluster, so it goes with no "
                    f"`client` and scheduler=None or 'processes'. Received: workers={workers}, "
                    f"client={client!r}, scheduler={scheduler!r}."
                )
        self.client = None
        self.address = None
        self.argument = "client"  # the argument that named the address
        self.workers = workers
        self.connect_timeout, self.workers_wait = connect_timeout, workers_wait
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
                self.kind, self.address, self.argument = "address", scheduler, "scheduler"
        self._runner = None
        self._backend: str | None = None
        self._owned: list = []  # clients and clusters this object started

    def backend(self) -> str:
        """The Keras backend the chunks run with: this process's, or the workers' (connecting to
        the scheduler and waiting for a worker the first time)."""
        if self._backend is None:
            self._backend = local_backend() if not self.remote else self._workers_backend()
        return self._backend

    @property
    def remote(self) -> bool:
        """Whether the chunks run on a scheduler this object did not start."""
        return self.kind in ("client", "address")

    @property
    def describe(self) -> str:
        """Where the chunks run, in words."""
        kind = self.kind
        if kind == "auto":
            kind = "processes" if isinstance(self._runner, Dask) else "synchronous"
        if kind == "synchronous":
            return "this process"
        if kind == "processes":
            size = f" of {self.workers} workers" if self.workers is not None else ""
            return f"a local Dask cluster{size} on 127.0.0.1"
        client = self._connect()
        address = self.address or client.scheduler.address
        count = len(client.scheduler_info(n_workers=-1)["workers"])
        return f"the Dask scheduler at {address} ({count} worker{'s' * (count != 1)})"

    def first_runner(self, chunks: int) -> InProcess | Dask:
        """Where the first of `chunks` chunks runs: this process when the choice waits for its
        size."""
        if self.kind == "auto":
            return InProcess()
        return self.runner(0, chunks)

    def runner(self, remaining_bytes: int, remaining_chunks: int) -> InProcess | Dask:
        """Where the remaining chunks run (chosen once, by their size when nothing was asked)."""
        if self._runner is None:
            kind = self.kind
            if kind == "auto":
                small = remaining_bytes <= IN_PROCESS_MAX_BYTES or remaining_chunks <= 1
                kind = "synchronous" if small else "processes"
            if kind == "synchronous":
                self._runner = InProcess()
            elif kind == "processes":
                self._runner = Dask(self._local_cluster(remaining_chunks))
            else:
                self._runner = Dask(self._connect())
        return self._runner

    def close(self) -> None:
        """Close the clients and clusters this object started."""
        while self._owned:
            self._owned.pop().close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _workers_backend(self) -> str:
        client = self._connect()
        address = self.address or client.scheduler.address
        try:
            client.wait_for_workers(1, timeout=self.workers_wait)
        except TimeoutError:
            raise JacketValueError(
                f"{self.fn}: no worker joined the Dask scheduler at {address} within "
                f"{self.workers_wait:g} s. Start workers with `dask worker {address}`."
            ) from None
        found = client.run(worker_backend)
        names = sorted(set(found.values()))
        if len(names) != 1:
            raise JacketValueError(
                f"{self.fn}: the Dask workers run different Keras backends: "
                + ", ".join(f"{worker}: {name}" for worker, name in sorted(found.items()))
                + ". Start every worker with the same KERAS_BACKEND."
            )
        return names[0]

    def _connect(self):
        if self.client is None:
            from distributed import Client

            try:
                self.client = Client(self.address, timeout=f"{self.connect_timeout:g}s")
            except (OSError, TimeoutError) as error:
                raise JacketValueError(
                    f"{self.fn}: cannot reach the Dask scheduler at {self.address} within "
                    f"{self.connect_timeout:g} s ({error}). Start one with `dask scheduler` and "
                    f"workers with `dask worker {self.address}`, or pass scheduler=None for a "
                    "local cluster."
                ) from None
            except ValueError as error:  # not an address at all
                name = self.argument
                raise JacketValueError(
                    f"{self.fn}: `{name}` must be a Dask scheduler address such as "
                    f"tcp://HOST:8786, 'processes' or 'synchronous'. Received: "
                    f"{name}={self.address!r} ({error})."
                ) from None
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
            env={"KERAS_BACKEND": local_backend()},
        )
        self._owned.append(cluster)
        client = Client(cluster)
        self._owned.append(client)
        return client


class InProcess:
    """Tasks in this process, one after the other. A runner (this or `_Dask`) has `call(fn, *args)`,
    which returns `fn(*args)`, and `run(calls, done)`, which runs every `(key, fn, args)` of
    `calls` and calls `done(key, fn(*args))` as each one finishes."""

    def call(self, fn: Callable, *args):
        return fn(*args)

    def run(self, calls: Iterable[tuple[int, Callable, tuple]], done: Callable) -> None:
        for key, fn, args in calls:
            done(key, fn(*args))


class Dask:
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
            self.client.scatter(arg) if isinstance(arg, Piece) and arg.data is not None else arg
            for arg in args
        )


def worker_backend() -> str:
    """On a worker: its Keras backend."""
    import keras

    return keras.backend.backend()


def local_backend() -> str:
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


def hostname() -> str:
    """This machine and process, for messages from a worker."""
    import socket

    return f"{socket.gethostname()}, pid {os.getpid()}"
