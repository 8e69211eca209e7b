"""Writing files safely: an output checked before any work, written under a hidden temporary name in
its folder and renamed when complete, so a killed run never leaves a partial file under the final
name; and the optional packages some formats need.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import JacketValueError

OUTPUT_SUFFIXES = (".npy", ".npz", ".zarr")


def check_output(
    path: str | os.PathLike, *, force: bool = False, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES
) -> None:
    """Check that a result can be written to `path`, before any work is done.

    The suffix must be one of `suffixes`; an existing `path` needs `force`; the folder must exist
    and take a new file (tried for real, so read-only file systems and permissions are caught).

    Raises:
      JacketValueError: naming the problem and the fix.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise JacketValueError(
            f"cannot write {str(path)!r}: the output suffix must be one of {', '.join(suffixes)}. "
            f"Received: {path.suffix or 'no suffix'!r}."
        )
    if (path.exists() or path.is_symlink()) and not force:
        raise JacketValueError(
            f"output {str(path)!r} exists: pass --force (`force=True`) to overwrite it."
        )
    folder = path.parent
    if not folder.exists():
        raise JacketValueError(
            f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist. Create it first."
        )
    if not folder.is_dir():
        raise JacketValueError(f"cannot write {str(path)!r}: {str(folder)!r} is not a folder.")
    probe = folder / temporary_name(path, "probe")
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise JacketValueError(
            f"cannot write {str(path)!r}: the folder {str(folder)!r} is not writable "
            f"({error.strerror or error})."
        ) from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Write a file or folder under a temporary name, and give it its final name only when done.

    The temporary path lies in the same folder (so the rename is atomic) and starts with a dot.
    If the block raises, is interrupted or the process is killed, nothing appears under `path`
    (a kill may leave the hidden temporary behind). An existing `path` is replaced only with
    `force`.

    Example:
      >>> with io.atomic_output("figure.png") as tmp:
      ...     figure.savefig(tmp, format="png")
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise JacketValueError(
            f"output {str(path)!r} exists: pass --force (`force=True`) to overwrite it."
        )
    tmp = path.parent / temporary_name(path, "part")
    try:
        yield tmp
        publish(tmp, path, force=force)
    finally:
        remove(tmp)


def temporary_name(path: Path, kind: str) -> str:
    """A hidden name beside `path`, unique to this process and call."""
    return f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def remove(path: Path) -> None:
    """Delete a file or a folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, path: Path, *, force: bool) -> None:
    """Rename `tmp` to `path` (no-clobber unless `force`)."""
    if not tmp.exists():
        raise JacketValueError(f"nothing was written for {str(path)!r}.")
    _fsync(tmp)
    appeared = JacketValueError(
        f"output {str(path)!r} appeared while jacket was writing it: pass --force "
        "(`force=True`) to overwrite it."
    )
    exists = path.exists() or path.is_symlink()
    if exists and not force:
        raise appeared
    if tmp.is_file() and not path.is_dir():
        if not force:
            try:
                os.link(tmp, path)  # atomic, and fails if `path` appeared meanwhile
            except FileExistsError:
                raise appeared from None
            except OSError:  # a file system without hard links: checked just above
                os.replace(tmp, path)
            else:
                tmp.unlink()
            return
        os.replace(tmp, path)  # atomic, even over an existing file
        return
    old = None
    if exists:
        old = path.parent / temporary_name(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        remove(old)


def save_array(path: str | os.PathLike, array, *, force: bool = False) -> Path:
    """One array to an `.npy` file, atomically (see `atomic_output`). Returns `path`."""
    import numpy as np

    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)
    return Path(path)


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, Any], *, force: bool = False) -> Path:
    """Named arrays to an uncompressed `.npz` file, atomically. Returns `path`."""
    import numpy as np

    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{key: np.asarray(value) for key, value in arrays.items()})
    return Path(path)


def save_json(path: str | os.PathLike, data: Mapping[str, Any], *, force: bool = False) -> Path:
    """A JSON object to a file (indented, NaN and infinities as null), atomically. Returns `path`."""
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(json.dumps(_plain(data), indent=2) + "\n")
    return Path(path)


def save_figure(path: str | os.PathLike, figure, *, force: bool = False) -> Path:
    """A matplotlib figure to a PNG file, atomically. Returns `path`."""
    with atomic_output(path, force=force) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def _plain(value):
    """`value` with floats that JSON cannot hold (NaN, infinities) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def optional(module: str, purpose: str, *, package: str | None = None):
    """`import module`, or jacket's error naming the package to install for `purpose`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise JacketValueError(
            f'{purpose} needs {package or module}: pip install "jacket[io]".'
        ) from None
