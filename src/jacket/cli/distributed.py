"""`--scheduler` and `--workers` of `jacket jacobian`, `jacket sensitivity` and `jacket norms`: the
same commands on Dask, through `jacket.distributed`.

    jacket jacobian model.keras x.zarr -o J.zarr --scheduler tcp://10.0.0.5:8786
    jacket jacobian model.keras x.zarr -o J.zarr --workers 4          # a local cluster
    jacket norms model.keras x.zarr --scheduler processes

`runs_on_dask` is where a command decides, from these two flags, to run here or on Dask; the
commands in `jacket.cli.jacobian` and `jacket.cli.analysis` then hand over to the functions here,
and keep their own rules: nothing imports Keras before `--backend` is read (the driver of a Dask run
never imports it: the workers load the model), files are checked before any work, errors are one
red line (exit 1), usage errors exit 2. Where the chunks run is the library's `Cluster`'s choice.

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
  what differs; `--force` deletes the store and starts over. See `jacket.distributed.store`'s
  NOTE: [Resuming a dataset run].
- The Keras backend is the workers'. With `--scheduler tcp://...`, a backend asked for on this side
  (`--backend` or `KERAS_BACKEND`) must be the one the workers run: a mismatch is refused before any
  work rather than computed with another framework.
- The progress bar counts chunks as their Dask futures complete (`progress=` of
  `jacket.distributed`); like the other commands' bars it is drawn on stderr, only on a terminal,
  never with `--quiet`. Ctrl-C is one red line that says how to resume, exit code 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import typer

from .shared import Bar, emit, error_line, one_line_errors, usage

CONNECT_TIMEOUT_S = 10
WORKERS_WAIT_S = 60


def runs_on_dask(scheduler: str | None, workers: int | None, *, size, unsafe: bool) -> bool:
    """Whether a command runs on Dask (`--scheduler` or `--workers` given, the flags checked) or
    in this process: the one place the command line decides."""
    if scheduler is None and workers is None:
        return False
    if scheduler is not None and workers is not None:
        usage(
            f"--scheduler and --workers go alone: --workers {workers} starts a local cluster, "
            f"--scheduler {scheduler} names where to run. Pass one of them."
        )
    if workers is not None and workers < 1:
        usage(f"--workers must be a positive number of worker processes. Received: {workers}.")
    if scheduler is not None and not scheduler.strip():
        usage("--scheduler must be tcp://HOST:PORT, 'processes' or 'synchronous'. Received: ''.")
    if size is not None:
        usage(
            "--size resizes images, but with --scheduler or --workers INPUTS is a .zarr store: "
            "leave out --size."
        )
    if unsafe:
        usage(
            "--unsafe does not apply with --scheduler or --workers: every worker loads the model "
            "with Keras's safe_mode. Save a model without Lambda layers, or run without them."
        )
    return True


def only_here(flags: dict[str, bool], instead: str) -> None:
    """A usage error for the first of `flags` (`{flag: given}`) given: it needs this process;
    `instead` says what the command does on Dask."""
    for flag, given in flags.items():
        if given:
            usage(
                f"{flag} runs in this process only: with --scheduler or --workers, {instead}. "
                "Leave out one or the other."
            )


def check_files(model: str, inputs: str) -> None:
    """MODEL a `.keras` file and INPUTS a `.zarr` store, which every worker opens itself."""
    from ..errors import JacketValueError

    path = Path(model)
    if path.suffix.lower() != ".keras":
        raise JacketValueError(
            f"with --scheduler or --workers, MODEL must be a .keras file, which each worker loads "
            f"itself. Received: {model!r}. Save the model once with model.save('model.keras')."
        )
    if not path.is_file():
        raise JacketValueError(f"model file not found: {model!r}. Pass an existing .keras file.")
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


@contextlib.contextmanager
def cluster(command: str, scheduler: str | None, workers: int | None):
    """`jacket.distributed.Cluster` for `--scheduler`/`--workers`, with the command line's time
    limits, connected (and its workers' backend checked against the one asked for) before any
    work; Dask's own log lines kept off the terminal meanwhile (`JACKET_TRACEBACK=1` keeps them)."""
    from ..distributed import Cluster
    from ..errors import JacketValueError

    levels = _quiet_dask_logs(dask=scheduler != "synchronous")
    try:
        with Cluster(
            scheduler=scheduler,
            workers=workers,
            connect_timeout=CONNECT_TIMEOUT_S,
            workers_wait=WORKERS_WAIT_S,
            fn=f"jacket {command}",
        ) as where:
            found, asked = where.backend(), os.environ.get("KERAS_BACKEND")
            if where.remote and asked and found != asked:
                raise JacketValueError(
                    f"the Dask workers at {scheduler} run the Keras backend {found!r}, but this "
                    f"command asks for {asked!r} (--backend or KERAS_BACKEND). Pass --backend "
                    f"{found}, or start the workers with KERAS_BACKEND={asked}."
                )
            yield where
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _quiet_dask_logs(*, dask: bool) -> dict[str, int]:
    """Dask's loggers at CRITICAL (what goes wrong reaches the command as an error); returns the
    levels to restore."""
    levels = {}
    if not os.environ.get("JACKET_TRACEBACK"):
        if dask:
            import distributed  # noqa: F401 - its import sets the levels: set them after it
        for name in ("distributed", "dask"):
            logger = logging.getLogger(name)
            levels[name] = logger.level
            logger.setLevel(logging.CRITICAL)
    return levels


# -------------------------------------------------------------------------------------- commands


def jacobian(
    model: str,
    inputs: str,
    out: Path,
    scheduler: str | None,
    workers: int | None,
    *,
    batch_size: int,
    force: bool,
    quiet: bool,
    as_json: bool,
    **options,
) -> None:
    """`jacket jacobian ... --scheduler/--workers`: `jacket.distributed.jacobian_dataset`."""
    with one_line_errors("jacobian"):
        from .. import io
        from ..distributed import jacobian_dataset
        from ..errors import JacketValueError

        check_files(model, inputs)
        if out.suffix.lower() != ".zarr":
            raise JacketValueError(
                f"cannot write {str(out)!r}: with --scheduler or --workers the result is a "
                "resumable zarr store, written chunk by chunk by the workers. Pass -o OUT.zarr."
            )
        io.check_output(out, force=True, suffixes=(".zarr",))  # the folder exists and is writable
        stored = 0 if force else _stored_chunks(out)
        started = time.perf_counter()
        with cluster("jacobian", scheduler, workers) as where, _resumable(out, quiet) as bar:
            jacobian_dataset(
                model, inputs, out, client=where, batch_size=batch_size, overwrite=force,
                progress=bar, **options,
            )  # fmt: skip
            ran_on = where.describe
        seconds = time.perf_counter() - started
        manifest = _manifest(out)
    identity, count = manifest["identity"], manifest["chunks"]["count"]
    blocks = {
        spec["path"] or "J": {"shape": spec["shape"], "dtype": spec["dtype"]}
        for spec in manifest["layout"]["arrays"]
    }
    summary = {"command": "jacobian", "model": model, "inputs": inputs}
    summary.update(samples=int(identity["inputs"][0]["shape"][0]), batch_size=batch_size)
    summary.update(batches=count, backend=identity["backend"], mode=options["mode"])
    summary.update(flatten=options["flatten"], output=str(out), format="zarr", blocks=blocks)
    summary.update(seconds=round(seconds, 3), scheduler=ran_on)
    summary["chunks"] = {"count": count, "stored_before": stored, "computed": count - stored}
    described = ", ".join(
        f"{item['name'] + ': ' if item['name'] else ''}{tuple(item['shape'])}"
        for item in identity["inputs"]
    )
    resumed = f"; {stored} were stored already (resumed)" if stored else ""
    rows = [("model", model), ("inputs", f"{inputs}: {described}")]
    rows += [("backend", identity["backend"]), ("ran on", ran_on)]
    rows += [(f"Jacobian {key}", f"{tuple(b['shape'])} {b['dtype']}") for key, b in blocks.items()]
    rows += [("chunks", f"{count} of up to {batch_size} samples, {count - stored} computed"
                        f"{resumed}")]  # fmt: skip
    rows += [("time", f"{seconds:.2f} s (start-up, compute, write)"), ("wrote", out)]
    emit(summary, "jacket jacobian", rows, as_json=as_json, quiet=quiet)


def sensitivity(model, inputs, scheduler, workers, *, reduce: str, batch_size: int, quiet: bool):
    """`jacket sensitivity ... --scheduler/--workers`: `jacket.distributed.sensitivity_dataset`.

    Returns:
      `(Sensitivity, backend, where it ran)`.
    """
    from ..distributed import sensitivity_dataset

    with cluster("sensitivity", scheduler, workers) as where:
        with Bar("Sensitivity", "chunks", show=not quiet) as bar:
            result = sensitivity_dataset(
                model, inputs, reduce=reduce, batch_size=batch_size, progress=bar, client=where
            )
        return result, where.backend(), where.describe


def norms(model, inputs, scheduler, workers, *, batch_size: int, quiet: bool):
    """`jacket norms ... --scheduler/--workers`: exact Frobenius norms by
    `jacket.distributed.jacobian_norms_dataset`.

    Returns:
      `(jacket.analysis.JacobianNorms, backend, where it ran)`.
    """
    import numpy as np

    from ..analysis import JacobianNorms
    from ..distributed import jacobian_norms_dataset

    with cluster("norms", scheduler, workers) as where:
        with Bar("Norms", "chunks", show=not quiet) as bar:
            values = jacobian_norms_dataset(
                model, inputs, batch_size=batch_size, progress=bar, client=where
            )
        result = JacobianNorms(
            values={"fro": values},
            errors={"fro": np.zeros(len(values))},
            methods={"fro": "exact"},
            samples=len(values),
        )
        return result, where.backend(), where.describe


# ---------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _resumable(out: Path, quiet: bool):
    """The chunk bar of a run into the store `out`; Ctrl-C is one red line that says how to resume
    (exit code 130)."""
    bar = Bar("Jacobians", "chunks", show=not quiet)
    try:
        with bar:
            yield bar
    except KeyboardInterrupt:
        # the manifest's count: a chunk may be marked but not yet shown
        error_line(
            f"interrupted; rerun the same command to resume ({_stored_chunks(out)} of "
            f"{bar.total if bar.total is not None else '?'} chunks are stored in {out})"
        )
        raise typer.Exit(130) from None


def _stored_chunks(out: Path) -> int:
    """How many chunks a resumable store at `out` holds already (0 when there is none)."""
    try:
        return sum(b - a for a, b in _manifest(out)["chunks"]["finished"])
    except Exception:  # noqa: BLE001 - no store or not one of ours: jacobian_dataset decides
        return 0


def _manifest(out: Path) -> dict:
    import zarr

    return zarr.open(store=str(out), mode="r").attrs["jacket"]
