"""Model files, loaded safely: `.keras` (Keras 3), `.h5`/`.hdf5` (legacy), or `module:function` /
`file.py:function` naming a function that returns a model. Files load with Keras's `safe_mode`, which
refuses a Lambda layer's Python code unless `unsafe=True`; nothing is unpickled.

NOTE: [Untrusted files]
Model and input files may come from anyone, so before Keras or NumPy opens one: a zip archive
(`.keras`, `.npz`) is refused when it has more than `MAX_ARCHIVE_MEMBERS` members, a member whose
name is absolute or climbs out with `..`, a member over 16 MiB that decompresses to more than
`MAX_COMPRESSION_RATIO` times its stored size (a zip bomb), or more than `max_archive_bytes()`
uncompressed in all (4 GiB, or the environment variable `JACKET_MAX_ARCHIVE_BYTES`, e.g. "16GiB").
Python's `zipfile` never inflates a member past the size its directory declares, so checking the
declared sizes bounds what is read. An HDF5 model is refused when it links to other files
(external links, external or virtual datasets) or declares more than that many bytes of datasets.
Arrays are read with `allow_pickle=False` always. Names that come from a model or a caller (output
and input names in result keys) are made into one plain path component each, and a key that still
names a path outside the result (`..`, an absolute path) is refused (`jacket.io.results`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import zipfile
from pathlib import Path

from ..checks import format_bytes, parse_bytes
from ..errors import JacketTypeError, JacketValueError
from .files import optional

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
MAX_ARCHIVE_MEMBERS = 10_000
MAX_COMPRESSION_RATIO = 100  # for members over _RATIO_FLOOR bytes uncompressed
DEFAULT_MAX_ARCHIVE_BYTES = 4 << 30
_RATIO_FLOOR = 16 << 20
_FUNCTION_SPEC = re.compile(r"^(?P<module>[\w.\-/\\]+):(?P<function>[A-Za-z_]\w*)$")


def is_model_function(source: str | os.PathLike) -> bool:
    """True when `source` reads `module:function` (or `file.py:function`) and is no existing file."""
    text = str(source)
    return bool(_FUNCTION_SPEC.match(text)) and not Path(text).exists()


def check_model_source(source: str | os.PathLike) -> None:
    """Check, without importing Keras, that `source` names a model file that exists, or a function.

    Raises:
      JacketValueError: for a missing file or an unsupported suffix.
    """
    if is_model_function(source):
        return
    path = Path(source)
    if not path.exists():
        raise JacketValueError(
            f"model file not found: {str(path)!r}. Pass a .keras or .h5 file, or "
            "`module:function` naming a function that returns a Keras model."
        )
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise JacketValueError(
            f"cannot load a model from {str(path)!r}: the suffix must be one of "
            f"{', '.join(MODEL_SUFFIXES)}. Received: {path.suffix or 'no suffix'!r}. "
            "For a model built in code, pass `module:function`."
        )
    if not path.is_file():
        raise JacketValueError(f"model {str(path)!r} is a folder; pass a .keras or .h5 file.")


def load_model(source: str | os.PathLike, *, unsafe: bool = False):
    """Load a Keras model from a file, or build one by calling a function.

    Args:
      source: A `.keras` file (Keras 3), a `.h5`/`.hdf5` file (legacy Keras), or
        `"module:function"` / `"path/to/file.py:function"`: a function called without arguments
        that returns a model (for custom layers, which it can import or register first).
      unsafe: Load with Keras's `safe_mode` off. A Lambda layer saved as Python bytecode runs that
        code on loading, so only pass True for files you trust.

    Returns:
      The model (a `keras.Model`, or whatever callable the function returned).

    Raises:
      JacketValueError: for a missing, corrupt or truncated file, a refused Lambda layer (the
        message names `--unsafe`), or a function that fails.
      JacketTypeError: if the function returns something that is not callable.
    """
    text = str(source)
    if is_model_function(text):
        return _model_from_function(text)
    check_model_source(text)
    path = Path(text)
    if path.suffix.lower() == ".keras":
        if not zipfile.is_zipfile(path):
            raise _corrupt_model(path, "not a zip archive: a .keras file is one")
        check_archive(path)
    else:
        h5py = optional("h5py", "reading .h5 models")
        if not h5py.is_hdf5(path):
            raise _corrupt_model(path, "not an HDF5 file")
        _check_hdf5(path, h5py)
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
    except Exception as error:  # noqa: BLE001 - every failure to load becomes one clear message
        raise _load_error(path, error) from None


def max_archive_bytes() -> int:
    """The most bytes an archive or HDF5 file may declare (NOTE [Untrusted files])."""
    value = os.environ.get("JACKET_MAX_ARCHIVE_BYTES")
    if not value:
        return DEFAULT_MAX_ARCHIVE_BYTES
    return parse_bytes("jacket", "JACKET_MAX_ARCHIVE_BYTES", value)


def check_archive(path: str | os.PathLike) -> None:
    """Refuse a zip archive (`.keras`, `.npz`) that is not safe to open: too many members, a
    member named outside the archive's folder, a zip bomb, or too much data in all.

    Raises:
      JacketValueError: naming the archive, what was found and the limit (see NOTE [Untrusted
        files] in `jacket.io.models`).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise JacketValueError(
            f"cannot open {str(path)!r}: the file is corrupt or truncated, not a zip archive "
            f"({type(error).__name__}: {error})."
        ) from None
    refused = f"refused to open {str(path)!r}"
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise JacketValueError(
            f"{refused}: it has {len(members)} members, more than the {MAX_ARCHIVE_MEMBERS} "
            "a model or an array file needs."
        )
    limit = max_archive_bytes()
    total = 0
    for member in members:
        if _escapes(member.filename):
            raise JacketValueError(
                f"{refused}: member {member.filename!r} has an absolute path or climbs out of "
                "its folder with '..'."
            )
        size = member.file_size
        if size > _RATIO_FLOOR and size > MAX_COMPRESSION_RATIO * max(member.compress_size, 1):
            raise JacketValueError(
                f"{refused}: member {member.filename!r} would inflate from "
                f"{format_bytes(member.compress_size)} to {format_bytes(size)}, more than "
                f"{MAX_COMPRESSION_RATIO} times (a zip bomb)."
            )
        total += size
    if total > limit:
        raise JacketValueError(
            f"{refused}: it holds {format_bytes(total)} uncompressed, more than the limit of "
            f"{format_bytes(limit)}. If you trust the file, raise the limit with the environment "
            f"variable JACKET_MAX_ARCHIVE_BYTES (e.g. JACKET_MAX_ARCHIVE_BYTES=16GiB)."
        )


def _escapes(name: str) -> bool:
    """True for a path that is absolute (`/x`, `\\x`, `C:x`) or has a `..` component."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _check_hdf5(path: Path, h5py) -> None:
    """Refuse an HDF5 model that reads other files or declares too much data."""
    refused = f"refused to open {str(path)!r}"
    limit = max_archive_bytes()
    total = 0
    try:
        with h5py.File(path, "r") as file:
            found: list[str] = []

            def visit(name, link):
                if isinstance(link, h5py.ExternalLink):
                    found.append(f"{name!r} links to the file {link.filename!r}")
                    return None
                if isinstance(link, h5py.SoftLink):
                    return None
                node = file.get(name, getlink=False)
                if isinstance(node, h5py.Dataset):
                    if node.external or node.is_virtual:
                        found.append(f"dataset {name!r} stores its data in other files")
                    nonlocal total
                    total += int(node.size) * node.dtype.itemsize
                return None

            file.visititems_links(visit)
    except (OSError, ValueError, KeyError) as error:
        raise _corrupt_model(path, f"{type(error).__name__}: {error}") from None
    if found:
        raise JacketValueError(
            f"{refused}: {found[0]}; a model file must hold its own data. Save it again "
            "with `model.save(...)`."
        )
    if total > limit:
        raise JacketValueError(
            f"{refused}: its datasets declare {format_bytes(total)}, more than the limit of "
            f"{format_bytes(limit)}. If you trust the file, raise the limit with the environment "
            f"variable JACKET_MAX_ARCHIVE_BYTES (e.g. JACKET_MAX_ARCHIVE_BYTES=16GiB)."
        )


def _corrupt_model(path: Path, why: str) -> JacketValueError:
    return JacketValueError(
        f"cannot load model {str(path)!r}: the file is corrupt, truncated or not a Keras model "
        f"({why}). Save it again with `model.save(...)`."
    )


def _load_error(path: Path, error: Exception) -> JacketValueError:
    message = " ".join(str(error).split())
    if "safe_mode" in message or "unsafe_deserialization" in message:
        what = "a Lambda layer" if "Lambda" in message else "an object"
        return JacketValueError(
            f"refused to load model {str(path)!r}: it holds {what} whose Python code would run "
            "on loading, which Keras's safe_mode forbids. If you trust the file, load it with "
            "`--unsafe` (`unsafe=True`)."
        )
    if "Could not locate" in message or "Unknown layer" in message:
        return JacketValueError(
            f"cannot load model {str(path)!r}: it uses a custom class Keras does not know "
            f"({message[:300]}). Pass `module:function` naming a function that imports or "
            "registers the class and loads the model."
        )
    return _corrupt_model(path, f"{type(error).__name__}: {message[:300]}")


def _model_from_function(spec: str):
    match = _FUNCTION_SPEC.match(spec)
    module_name, function_name = match["module"], match["function"]
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise JacketValueError(
                f"cannot build the model from {spec!r}: file {module_name!r} not found."
            )
        module_spec = importlib.util.spec_from_file_location(f"_jacket_model_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001
            raise JacketValueError(
                f"cannot build the model from {spec!r}: running {module_name} raised "
                f"{type(error).__name__}: {error}"
            ) from None
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current folder
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise JacketValueError(
                f"cannot build the model from {spec!r}: no module {error.name!r}. Run from the "
                "folder that holds it, set PYTHONPATH, or pass `path/to/file.py:function`."
            ) from None
        except Exception as error:  # noqa: BLE001
            raise JacketValueError(
                f"cannot build the model from {spec!r}: importing {module_name} raised "
                f"{type(error).__name__}: {error}"
            ) from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        raise JacketValueError(
            f"cannot build the model from {spec!r}: {module_name} has no function "
            f"{function_name!r}."
        )
    try:
        model = function()
    except Exception as error:  # noqa: BLE001
        raise JacketValueError(
            f"cannot build the model from {spec!r}: {function_name}() raised "
            f"{type(error).__name__}: {error}"
        ) from None
    if not callable(model):
        raise JacketTypeError(
            f"{spec!r} must return a Keras model. Received: {type(model).__name__}."
        )
    return model
