"""`--scheduler` and `--workers` of `jacket jacobian`, `jacket sensitivity` and `jacket norms`: the
same commands on Dask, through `jacket.distributed`.

    jacket jacobian model.keras x.zarr -o J.zarr --scheduler tcp://10.0.0.5:8786
    jacket jacobian model.keras x.zarr -o J.zarr --workers 4          # a local cluster
    jacket norms model.keras x.zarr --scheduler processes

The commands in `cli.py` and `_cli_analysis.py` hand over to the functions here when either flag is
given, and keep their own rules: nothing imports Keras before `--backend` is read (the driver of a
Dask run never imports it: the workers load the model), files are checked before any work, errors
are one red line (exit 1), usage errors exit 2.

NOTE: [The command line on Dask]
- `--scheduler tcp://HOST:PORT` connects to a running `dask scheduler` (at most `CONNECT_TIMEOUT_S`
  seconds, then an error naming the address); `--scheduler processes` or `--workers N` start a
  `distributed.LocalCluster` on 127.0.0.1 (one worker per core, or N) for this command;
  `--scheduler synchronous` runs the chunks in this process without Dask (a resumable store all the
  same).
- MODEL must be a `.keras` file and INPUTS a `.zarr` store, which every worker reads itself from
  the same path (`--unsafe` and `--size` do not apply: workers load with Keras's `safe_mode`, and
  images are not read); `jacket jacobian` writes OUT as a `.zarr` store, chunk by chunk.
- Resuming: OUT is not refused when it exists. `jacobian_dataset` resumes a store made with the same
  arguments (only missing chunks are computed), and refuses one made with other arguments, naming
  what differs; `--force` deletes the store and starts over. See `jacket.distributed`'s NOTE:
  [Resuming a dataset run].
- The Keras backend is the workers'. With `--scheduler tcp://...`, a backend asked for on this side
  (`--backend` or `KERAS_BACKEND`) must be the one the workers run: a mismatch is refused before any
  work rather than computed with another framework.
- The progress bar counts chunks as their Dask futures complete (`progress=` of
  `jacket.distributed`); like the other commands' bars it is drawn on stderr, only on a terminal,
  never with `--quiet`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Annotated

import typer

CONNECT_TIMEOUT_S = 10
WORKERS_WAIT_S = 60
LOCAL = ("processes", "synchronous")

SchedulerOption = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Run on Dask: tcp://HOST:PORT (a running `dask scheduler`), 'processes' (a local "
        "cluster on 127.0.0.1, one worker per core) or 'synchronous' (this process). INPUTS "
        "must be a .zarr store; a rerun resumes.",
        show_default=False,
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Run on a local Dask cluster of N worker processes on 127.0.0.1 (see --scheduler).",
        show_default=False,
    ),
]


# -------------------------------------------------------------------------------------- commands


def jacobian(
    *,
    model: str,
    inputs: str,
    out: Path,
    scheduler: str | None,
    workers: int | None,
    mode: str,
    chunk_size: int | None,
    flatten: bool,
    batch_size: int,
    memory_budget: str | None,
    size: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    unsafe: bool,
) -> None:
    """`jacket jacobian ... --scheduler/--workers`: `jacket.distributed.jacobian_dataset`."""
    from rich.table import Table

    from . import _add_row, _emit, _one_line_errors

    _check_flags(scheduler, workers, size=size, unsafe=unsafe)
    with _one_line_errors():
        from .. import io
        from ..errors import JacketValueError

        _check_model(model)
        _check_inputs(inputs)
        if out.suffix.lower() != ".zarr":
            raise JacketValueError(
                f"cannot write {str(out)!r}: with --scheduler or --workers the result is a "
                "resumable zarr store, written chunk by chunk by the workers. Pass -o OUT.zarr."
            )
        io.check_output(out, force=True, suffixes=(".zarr",))  # the folder exists and is writable
        stored = 0 if force else _stored_chunks(out)
        started = time.perf_counter()
        with _Dask(scheduler, workers) as where, _library_words():
            from ..distributed import jacobian_dataset

            with _chunk_bar(not quiet, "Jacobians", out) as progress:
                jacobian_dataset(
                    model,
                    inputs,
                    out,
                    batch_size=batch_size,
                    overwrite=force,
                    progress=progress,
                    mode=mode,
                    chunk_size=chunk_size,
                    flatten=flatten,
                    memory_budget=memory_budget,
                    **where.arguments,
                )
        seconds = time.perf_counter() - started
        manifest = _manifest(out)
        blocks = {
            spec["path"] or "J": {"shape": spec["shape"], "dtype": spec["dtype"]}
            for spec in manifest["layout"]["arrays"]
        }
    identity = manifest["identity"]
    count = manifest["chunks"]["count"]
    summary = {
        "command": "jacobian",
        "model": str(model),
        "inputs": str(inputs),
        "samples": _samples(identity),
        "batch_size": batch_size,
        "batches": count,
        "backend": identity["backend"],
        "mode": mode,
        "flatten": flatten,
        "output": str(out),
        "format": "zarr",
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "scheduler": where.describe,
        "chunks": {"count": count, "stored_before": stored, "computed": count - stored},
    }
    table = Table(title="jacket jacobian", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {_describe(identity)}")
    _add_row(table, "backend", identity["backend"])
    _add_row(table, "ran on", where.describe)
    for key, block in blocks.items():
        _add_row(table, f"Jacobian {key}", f"{tuple(block['shape'])} {block['dtype']}")
    resumed = f"; {stored} were stored already (resumed)" if stored else ""
    _add_row(table, "chunks", f"{count} of up to {batch_size} samples, {count - stored} computed"
             f"{resumed}")  # fmt: skip
    _add_row(table, "time", f"{seconds:.2f} s (start-up, compute, write)")
    _add_row(table, "wrote", str(out))
    _emit(summary, table, as_json=as_json, quiet=quiet)


def sensitivity(
    *,
    model: str,
    inputs: str,
    out: Path,
    scheduler: str | None,
    workers: int | None,
    reduce: str,
    output: int | None,
    top: int,
    saliency: int,
    batch_size: int,
    size: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    unsafe: bool,
) -> None:
    """`jacket sensitivity ... --scheduler/--workers`: `jacket.distributed.sensitivity_dataset`."""
    from rich.table import Table

    from . import _add_row, _emit, _one_line_errors, _usage
    from .analysis import _need_matplotlib, _output_folder, _save_json, _save_npy, _save_png

    _check_flags(scheduler, workers, size=size, unsafe=unsafe)
    if output is not None:
        _usage(
            "--output (one output's sensitivity) runs in this process only: with --scheduler or "
            "--workers the sensitivity covers every output. Leave out one or the other."
        )
    if saliency:
        _usage(
            "--saliency draws from the model in this process: leave it out with --scheduler or "
            "--workers, or run it without them."
        )
    with _one_line_errors():
        _check_model(model)
        _check_inputs(inputs)
        _need_matplotlib("sensitivity")
        names = ["sensitivity.npy", "sensitivity.png", "summary.json"]
        with _output_folder(out, names, force=force) as paths:
            started = time.perf_counter()
            with _Dask(scheduler, workers) as where, _library_words():
                from ..distributed import sensitivity_dataset

                with _chunk_bar(not quiet, "Sensitivity", None) as progress:
                    result = sensitivity_dataset(
                        model,
                        inputs,
                        reduce=reduce,
                        batch_size=batch_size,
                        progress=progress,
                        **where.arguments,
                    )
            from ..plot import sensitivity_figure

            title = f"{reduce} of |dy/dx| over {result.samples} samples"
            figure = sensitivity_figure(result.values, top=top, title=title)
            seconds = time.perf_counter() - started
            ranking = [
                {"rank": rank + 1, "feature": list(index), "flat": int(flat), "value": value}
                for rank, ((index, value), flat) in enumerate(
                    zip(result.top(top), result.ranking[:top])
                )
            ]
            batches = math.ceil(result.samples / batch_size)
            summary = {
                "command": "sensitivity",
                "model": str(model),
                "inputs": str(inputs),
                "samples": result.samples,
                "batch_size": batch_size,
                "batches": batches,
                "backend": where.backend,
                "reduce": reduce,
                "output": None,
                "in_shape": list(result.values.shape),
                "top": ranking,
                "saliency": None,
                "seconds": round(seconds, 3),
                "files": [str(p) for p in paths.values()],
                "scheduler": where.describe,
            }
            _save_npy(paths["sensitivity.npy"], result.values, force=force)
            _save_png(paths["sensitivity.png"], figure, force=force)
            _save_json(paths["summary.json"], summary, force=force)
    table = Table(title="jacket sensitivity", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {result.samples} samples of {result.values.shape}")
    _add_row(table, "backend", where.backend)
    _add_row(table, "ran on", where.describe)
    _add_row(table, "reduce", f"{reduce} of |d y / d x| over all outputs")
    _add_row(table, "batches", f"{batches} of up to {batch_size} samples")
    for entry in ranking:
        _add_row(table, f"#{entry['rank']} {tuple(entry['feature'])}", f"{entry['value']:.6g}")
    _add_row(table, "time", f"{seconds:.2f} s (start-up, compute)")
    _add_row(table, "wrote", "\n".join(str(p) for p in paths.values()))
    _emit(summary, table, as_json=as_json, quiet=quiet)


def norms(
    *,
    model: str,
    inputs: str,
    ords: list[str] | None,
    out: Path | None,
    scheduler: str | None,
    workers: int | None,
    lipschitz: bool,
    logdet: bool,
    projections: int | None,
    batch_size: int,
    size: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    unsafe: bool,
) -> None:
    """`jacket norms ... --scheduler/--workers`: Frobenius norms by
    `jacket.distributed.jacobian_norms_dataset`."""
    import numpy as np
    from rich.table import Table

    from . import _add_row, _emit, _one_line_errors, _usage
    from .analysis import _ORD_NAMES, _numbers, _save_json

    _check_flags(scheduler, workers, size=size, unsafe=unsafe)
    others = [o for o in (ords or []) if o != "fro"]
    if others:
        _usage(
            f"--ord {others[0]} needs each sample's Jacobian whole in this process: with "
            "--scheduler or --workers, norms computes Frobenius norms only (--ord fro, the "
            "default there). Leave out --scheduler/--workers for spectral and nuclear norms."
        )
    for flag, given in (
        ("--lipschitz", lipschitz),
        ("--logdet", logdet),
        ("--projections", projections is not None),
    ):
        if given:
            _usage(
                f"{flag} runs in this process only: with --scheduler or --workers, norms "
                "computes exact Frobenius norms. Leave out one or the other."
            )
    with _one_line_errors():
        from .. import io

        _check_model(model)
        _check_inputs(inputs)
        if out is not None:
            io.check_output(out, force=force, suffixes=(".json", ".npz"))
        started = time.perf_counter()
        with _Dask(scheduler, workers) as where, _library_words():
            from ..distributed import jacobian_norms_dataset

            with _chunk_bar(not quiet, "Norms", None) as progress:
                values = jacobian_norms_dataset(
                    model, inputs, batch_size=batch_size, progress=progress, **where.arguments
                )
        seconds = time.perf_counter() - started
        samples = len(values)
        entry = {
            "method": "exact",
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "argmax": int(values.argmax()),
            "max_error": 0.0,
        }
        summary = {
            "command": "norms",
            "model": str(model),
            "inputs": str(inputs),
            "samples": samples,
            "batch_size": batch_size,
            "backend": where.backend,
            "norms": {"fro": entry},
            "lipschitz": None,
            "logdet": None,
            "seconds": round(seconds, 3),
            "output": None if out is None else str(out),
            "scheduler": where.describe,
        }
        if out is not None:
            per_sample = {"norm_fro": values, "error_fro": np.zeros(samples)}
            if out.suffix.lower() == ".npz":
                with io.atomic_output(out, force=force) as tmp, open(tmp, "wb") as handle:
                    np.savez(handle, **per_sample)
            else:
                lists = {key: _numbers(array) for key, array in per_sample.items()}
                _save_json(out, {**summary, "per_sample": lists}, force=force)
    table = Table(title="jacket norms", show_header=False)
    _add_row(table, "model", str(model))
    _add_row(table, "inputs", f"{inputs}: {samples} samples")
    _add_row(table, "backend", where.backend)
    _add_row(table, "ran on", where.describe)
    _add_row(
        table,
        f"{_ORD_NAMES['fro']} (exact)",
        f"mean {entry['mean']:.6g}, max {entry['max']:.6g} at sample {entry['argmax']}",
    )
    _add_row(table, "time", f"{seconds:.2f} s (start-up, compute)")
    if out is not None:
        _add_row(table, "wrote", str(out))
    _emit(summary, table, as_json=as_json, quiet=quiet)


# ---------------------------------------------------------------------------------------- checks


def _check_flags(scheduler, workers, *, size, unsafe) -> None:
    """Usage errors (exit 2) of the flags themselves, before anything is read."""
    from . import _usage

    if scheduler is not None and workers is not None:
        _usage(
            f"--scheduler and --workers go alone: --workers {workers} starts a local cluster, "
            f"--scheduler {scheduler} names where to run. Pass one of them."
        )
    if workers is not None and workers < 1:
        _usage(f"--workers must be a positive number of worker processes. Received: {workers}.")
    if scheduler is not None and not scheduler.strip():
        _usage("--scheduler must be tcp://HOST:PORT, 'processes' or 'synchronous'. Received: ''.")
    if size is not None:
        _usage(
            "--size resizes images, but with --scheduler or --workers INPUTS is a .zarr store: "
            "leave out --size."
        )
    if unsafe:
        _usage(
            "--unsafe does not apply with --scheduler or --workers: every worker loads the model "
            "with Keras's safe_mode. Save a model without Lambda layers, or run without them."
        )


def _check_model(model: str) -> None:
    from ..errors import JacketValueError

    path = Path(model)
    if path.suffix.lower() != ".keras":
        raise JacketValueError(
            f"with --scheduler or --workers, MODEL must be a .keras file, which each worker loads "
            f"itself. Received: {model!r}. Save the model once with model.save('model.keras')."
        )
    if not path.is_file():
        raise JacketValueError(f"model file not found: {model!r}. Pass an existing .keras file.")


def _check_inputs(inputs: str) -> None:
    from ..errors import JacketValueError

    if "://" in inputs:  # a remote store (s3://...): the workers open it themselves
        return
    path = Path(inputs)
    if path.suffix.lower() != ".zarr":
        raise JacketValueError(
            f"with --scheduler or --workers, INPUTS must be a .zarr store, which each worker "
            f"reads its chunks from. Received: {inputs!r}. Convert it once, e.g. "
            "zarr.create_array('x.zarr', data=np.load('x.npy'))."
        )
    if not path.is_dir():
        raise JacketValueError(f"inputs not found: {inputs!r}. Pass an existing .zarr store.")


def _stored_chunks(out: Path) -> int:
    """How many chunks a resumable store at `out` holds already (0 when there is none)."""
    try:
        return sum(b - a for a, b in _manifest(out)["chunks"]["finished"])
    except Exception:  # noqa: BLE001 - no store or not one of ours: jacobian_dataset decides
        return 0


def _manifest(out: Path) -> dict:
    import zarr

    return zarr.open(store=str(out), mode="r").attrs["jacket"]


def _samples(identity: dict) -> int:
    return int(identity["inputs"][0]["shape"][0])


def _describe(identity: dict) -> str:
    return ", ".join(
        f"{item['name'] + ': ' if item['name'] else ''}{tuple(item['shape'])}"
        for item in identity["inputs"]
    )


# ----------------------------------------------------------------------------------- where to run


def _workers_backend() -> str:
    """On a worker: its Keras backend."""
    import keras

    return keras.backend.backend()


class _Dask:
    """Where the chunks run: the keyword arguments for `jacket.distributed`, and the connection to
    a scheduler, made here with a timeout (so an unreachable one fails in `CONNECT_TIMEOUT_S`
    seconds, naming its address) and closed at the end."""

    def __init__(self, scheduler: str | None, workers: int | None):
        self.scheduler, self.workers = scheduler, workers
        self.client = None
        self.arguments: dict = {}
        self.backend = ""
        self.describe = ""
        self._levels: dict[str, int] = {}

    def __enter__(self) -> _Dask:
        self._levels = _quiet_dask_logs(dask=self.scheduler != "synchronous")
        try:
            self._choose()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _choose(self) -> None:
        from ..distributed.cluster import local_backend as _local_backend

        if self.workers is not None:
            self.arguments = {"workers": self.workers}
            self.describe = f"a local Dask cluster of {self.workers} workers on 127.0.0.1"
        elif self.scheduler == "processes":
            self.arguments = {"scheduler": "processes"}
            self.describe = "a local Dask cluster on 127.0.0.1"
        elif self.scheduler == "synchronous":
            self.arguments = {"scheduler": "synchronous"}
            self.describe = "this process"
        else:
            self.client = self._connect(self.scheduler)
            self.arguments = {"client": self.client}
            return
        self.backend = _local_backend()

    def _connect(self, address: str):
        from distributed import Client

        from ..errors import JacketValueError

        try:
            client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as error:
            raise JacketValueError(
                f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT_S} s "
                f"({error}). Start one with `dask scheduler` and workers with `dask worker "
                f"{address}`, or run on this machine with --workers N."
            ) from None
        except ValueError as error:  # not an address at all
            raise JacketValueError(
                f"--scheduler must be a Dask scheduler address such as tcp://HOST:8786, "
                f"'processes' or 'synchronous'. Received: {address!r} ({error})."
            ) from None
        try:
            try:
                client.wait_for_workers(1, timeout=WORKERS_WAIT_S)
            except TimeoutError:
                raise JacketValueError(
                    f"no worker joined the Dask scheduler at {address} within "
                    f"{WORKERS_WAIT_S} s. Start workers with `dask worker {address}`."
                ) from None
            found = sorted(set(client.run(_workers_backend).values()))
            asked = os.environ.get("KERAS_BACKEND")
            if len(found) == 1 and asked and found[0] != asked:
                raise JacketValueError(
                    f"the Dask workers at {address} run the Keras backend {found[0]!r}, but this "
                    f"command asks for {asked!r} (--backend or KERAS_BACKEND). Pass --backend "
                    f"{found[0]}, or start the workers with KERAS_BACKEND={asked}."
                )
        except BaseException:
            client.close()
            raise
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        self.backend = found[0]  # several: jacket.distributed refuses, naming each worker's
        self.describe = f"the Dask scheduler at {address} ({workers} worker{'s' * (workers != 1)})"
        return client

    def __exit__(self, *exc) -> bool:
        try:
            if self.client is not None:
                self.client.close()
        finally:
            for name, level in self._levels.items():
                logging.getLogger(name).setLevel(level)
        return False


def _quiet_dask_logs(*, dask: bool) -> dict[str, int]:
    """Keep Dask's own log lines off the terminal while the command runs (what goes wrong reaches
    the command as an error: one red line; `JACKET_TRACEBACK=1` keeps them). Returns the levels to
    restore."""
    levels = {}
    if not os.environ.get("JACKET_TRACEBACK"):
        if dask:
            import distributed  # noqa: F401 - its import sets the levels: set them after it
        for name in ("distributed", "dask"):
            logger = logging.getLogger(name)
            levels[name] = logger.level
            logger.setLevel(logging.CRITICAL)
    return levels


@contextlib.contextmanager
def _library_words():
    """`jacket.distributed`'s errors in the command line's words: no function name in front,
    flags for the arguments (`--force` for `overwrite=True`, `-o` for `out`)."""
    from ..errors import JacketError

    try:
        yield
    except JacketError as error:
        message = str(error)
        for prefix in ("jacobian_dataset: ", "sensitivity_dataset: ", "jacobian_norms_dataset: "):
            message = message.removeprefix(prefix)
        for library, command in (
            ("overwrite=True", "--force"),
            ("Pass a new `out`", "Pass another -o"),
            ("`out`", "OUT"),
            ("option chunk_size", "--chunk-size"),
            ("option memory_budget", "--memory-budget"),
            ("option mode", "--mode"),
            ("option flatten", "--flatten"),
            ("batch_size (", "--batch-size ("),
        ):
            message = message.replace(library, command)
        raise type(error)(message) from None


@contextlib.contextmanager
def _chunk_bar(show: bool, label: str, out: Path | None):
    """A rich progress bar on stderr, fed with finished chunks (`progress(done, total)` of
    `jacket.distributed`, called as their futures complete); only on a terminal. An interrupted
    run (Ctrl-C) is one red line that says how to resume, exit code 130."""
    from . import _error_line, errors

    seen = {"done": 0, "total": 0}
    bar = task = None
    if show and errors.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("chunks"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=errors,
        )

    def progress(done: int, total: int) -> None:
        nonlocal task
        seen.update(done=done, total=total)
        if bar is not None:
            if task is None:
                task = bar.add_task(label, total=total)
            bar.update(task, completed=done)

    try:
        if bar is not None:
            with bar:
                yield progress
        else:
            yield progress
    except KeyboardInterrupt:
        resume = ""
        if out is not None:  # the manifest's count: a chunk may be marked but not yet shown
            resume = (
                f"; rerun the same command to resume ({_stored_chunks(out)} of {seen['total']} "
                f"chunks are stored in {out})"
            )
        _error_line(f"interrupted{resume}")
        raise typer.Exit(130) from None
