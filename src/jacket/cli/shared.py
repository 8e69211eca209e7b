"""What every command shares: its options, one red line for any error, progress bars and summaries.

Nothing here imports Keras: `--backend` sets `KERAS_BACKEND` before the first import. Library and
file errors become one red line and exit code 1, in the command line's words (`one_line_errors`);
usage errors exit with 2; `JACKET_TRACEBACK=1` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

BACKENDS = ("tensorflow", "jax", "torch")

console = Console()
errors = Console(stderr=True)


class Mode(StrEnum):
    auto = "auto"
    reverse = "reverse"
    forward = "forward"


# ---------------------------------------------------------------------------------------- options

BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help="Keras backend: tensorflow, jax or torch (default: KERAS_BACKEND or tensorflow).",
    ),
]
ModelArgument = Annotated[
    str,
    typer.Argument(
        help="A .keras or .h5 model file, or module:function (a function returning a model).",
        show_default=False,
    ),
]
InputsArgument = Annotated[
    str,
    typer.Argument(
        help="Inputs: .npy, .npz (one array per input name), .csv, .zarr, or a folder or glob "
        "of images.",
        show_default=False,
    ),
]
SizeOption = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="Resize images to HEIGHTxWIDTH (default: the model's input size).",
        show_default=False,
    ),
]
UnsafeOption = Annotated[
    bool,
    typer.Option(
        "--unsafe",
        help="Load with Keras safe_mode off (runs a Lambda layer's saved code): trusted files only.",
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No summary and no progress bar; errors only.")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print a JSON summary on stdout instead of a table.")
]
BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, help="Samples per batch streamed through.")
]
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


def set_backend(backend: str | None) -> None:
    """`--backend`: set `KERAS_BACKEND` before Keras is imported."""
    if backend is None:
        return
    if backend not in BACKENDS:
        usage(f"--backend must be one of {', '.join(BACKENDS)}. Received: {backend!r}.")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            fail(RuntimeError(f"Keras is already loaded with {keras.backend.backend()}."))
    os.environ["KERAS_BACKEND"] = backend


def parse_size(value: str | None) -> tuple[int, int] | None:
    """`--size HEIGHTxWIDTH` (or one side for both)."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1:
        usage(f"--size must be HEIGHTxWIDTH (like 28x28) or one side. Received: {value!r}.")
    return numbers[0], numbers[1]


def parse_memory_budget(value: str | None) -> str | None:
    """`--memory-budget`, checked before any work (a usage error names the option)."""
    if value is not None:
        from ..checks import parse_bytes
        from ..errors import JacketError

        try:
            parse_bytes("jacket", "--memory-budget", value)
        except JacketError:
            usage(
                "--memory-budget must be a number of bytes of at least 1, like 500MB, 2GiB or "
                f"1073741824. Received: {value!r}."
            )
    return value


# --------------------------------------------------------------------------------------- errors


class OneLineUsage(typer.core.TyperGroup):
    """Usage errors (a bad option value, a missing argument) as one red line and exit code 2,
    like every other error of the command, instead of click's usage box. (typer carries its own
    copy of click, so its exceptions are told by what they have: `exit_code`, `format_message`.)
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except Exception as error:
            kind = type(error).__name__
            if kind == "Abort":
                error_line("aborted")
                sys.exit(1)
            if not (hasattr(error, "exit_code") and hasattr(error, "format_message")):
                raise
            if kind == "NoArgsIsHelpError":
                error.show()  # `jacket` alone, `jacket attack`: the help
                sys.exit(error.exit_code)
            message = error.format_message().rstrip()
            message += "" if message.endswith((".", "!", "?")) else "."
            context = getattr(error, "ctx", None)
            if context is not None and error.exit_code == 2:
                message += f" See `{context.command_path} --help`."
            error_line(message)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def error_line(message: str) -> None:
    """One red line on stderr."""
    line = " ".join(str(message).split())
    errors.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)


def fail(error: BaseException) -> None:
    """`error` as one red line, exit code 1."""
    from ..errors import JacketError

    known = isinstance(error, (JacketError, RuntimeError, OSError))
    error_line(str(error) if known else f"{type(error).__name__}: {error}")
    raise typer.Exit(1)


def usage(message: str) -> None:
    """A usage error: one red line, exit code 2."""
    error_line(message)
    raise typer.Exit(2)


@contextlib.contextmanager
def one_line_errors(command: str):
    """Any error inside: one red line on stderr and exit code 1 (130 when interrupted); the
    library's errors in the words of `jacket {command}` (see `command_words`)."""
    from ..errors import JacketError

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - one red line, no traceback
        if os.environ.get("JACKET_TRACEBACK"):
            raise
        if isinstance(error, JacketError):
            error = type(error)(command_words(str(error), command))
        fail(error)


# The library functions a command calls, whose names start the library's messages
_LIBRARY_PREFIX = re.compile(
    r"^(?:jacobian_fn|jacobian|jvp|vjp|check|sparsity|verify|sensitivity|saliency|"
    r"jacobian_norms?|spectral_norm|logdet|lipschitz|JacobianOperator|fgsm|jsma|deepfool|"
    r"jacobian_dataset|sensitivity_dataset|jacobian_norms_dataset|Cluster|iter_batches|"
    r"padded_batches): "
)
# The library's words for what the command line calls otherwise (the arguments of
# `jacket.distributed`, which its commands set with options of other names), in order
_WORDS = (
    ("overwrite=True", "--force"),
    ("Pass a new `out`", "Pass another -o"),
    ("`out`", "OUT"),
    ("pass scheduler=None for a local cluster", "run on this machine with --workers N"),
    ("`scheduler` must", "--scheduler must"),
    ("Received: scheduler=", "Received: --scheduler "),
    ("option chunk_size", "--chunk-size"),
    ("option memory_budget", "--memory-budget"),
    ("option mode", "--mode"),
    ("option flatten", "--flatten"),
    ("batch_size (", "--batch-size ("),
)


def command_words(message: str, command: str) -> str:
    """A library error message as `jacket {command}` says it: the library function's name it
    starts with replaced by the command's, and the arguments that the command sets with options of
    other names by those options (`overwrite=True` is `--force`). Argument names that are options
    too stay as the library writes them: `` `output` `` is `--output`."""
    message = _LIBRARY_PREFIX.sub(f"jacket {command}: ", message, count=1)
    for library, words in _WORDS:
        message = message.replace(library, words)
    return message


# --------------------------------------------------------------------------------------- output


class Bar:
    """A rich progress bar on stderr, fed as a library's `progress(done, total)` callback: drawn
    only on a terminal and when `show`, from the first call that leaves work to do (a single batch
    draws nothing). `total` stands in for a library's unknown total."""

    def __init__(self, label: str, unit: str, *, show: bool, total: int | None = None):
        self.label, self.unit, self.show, self.known = label, unit, show, total
        self.done, self.total = 0, total
        self._bar = self._task = None

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total if total is not None else self.known
        if self._bar is None and self.show and errors.is_terminal and done < (self.total or 0):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=errors,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=done)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def emit(summary: dict, title: str | None, rows, *, as_json: bool, quiet: bool) -> None:
    """The summary: as one JSON object on stdout with `--json`, else a table of `rows`
    (`(name, value)` pairs) unless `--quiet`."""
    if as_json:
        print(json.dumps(summary), flush=True)
        return
    if quiet:
        return
    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(Text(str(name)), Text(str(value)))  # Text: file names with [brackets] stay
    console.print(table)


def number(value) -> float | None:
    """A float for JSON: None for NaN and infinities (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def need_matplotlib(what: str) -> None:
    """Refuse, before any work, a command that draws when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError(f'{what} draws with matplotlib: pip install "jacket[plot]".') from None


@contextlib.contextmanager
def output_folder(folder: Path, names: list[str], *, force: bool):
    """Check the files a command writes into `folder` before any work; yields `{name: path}`.

    The folder is created if missing (its parent must exist) and removed again if the command fails
    before writing anything into it.
    """
    from .. import io
    from ..errors import JacketValueError

    if folder.exists() and not folder.is_dir():
        raise JacketValueError(
            f"cannot write into {str(folder)!r}: it is a file. Pass a folder to -o (--out)."
        )
    created = not folder.exists()
    if created:
        if not folder.parent.is_dir():
            raise JacketValueError(
                f"cannot create folder {str(folder)!r}: {str(folder.parent)!r} does not exist. "
                "Create it first."
            )
        try:
            folder.mkdir()
        except OSError as error:
            raise JacketValueError(
                f"cannot create folder {str(folder)!r} ({error.strerror or error})."
            ) from None
    try:
        paths = {name: folder / name for name in names}
        for path in paths.values():
            io.check_output(path, force=force, suffixes=(path.suffix,))
        yield paths
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while it is still empty
        raise


def save_all(paths: dict, arrays: dict, figures: dict, summary: dict, *, force: bool) -> None:
    """Write a command's folder: `.npy` arrays, `.png` figures, then `summary.json` (by name)."""
    from .. import io

    for name, array in arrays.items():
        io.save_array(paths[name], array, force=force)
    for name, figure in figures.items():
        io.save_figure(paths[name], figure, force=force)
    io.save_json(paths["summary.json"], summary, force=force)
