"""Files in and out: safe model loading, input files, and result files written atomically.

The command line is built from these functions, and so can other commands and scripts:

    >>> from jacket import io
    >>> model = io.load_model("model.keras")                 # Keras safe_mode on
    >>> x = io.read_inputs("inputs.npz", model)               # what `jacket.jacobian` accepts
    >>> blocks = io.stream_jacobian(model, x, "J.zarr", batch_size=64)

- Models: `.keras` (Keras 3), `.h5`/`.hdf5` (legacy), or `module:function` / `file.py:function`
  naming a function that returns a model. Files load with Keras's `safe_mode`, which refuses a
  Lambda layer's Python code unless `unsafe=True`; nothing is unpickled.

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
names a path outside the result (`..`, an absolute path) is refused.
- Inputs: `.npy` (memory-mapped), `.npz` or a zarr group (named arrays, matched to the model's
  input names), a `.zarr` array, a CSV table (one sample per row), or a folder or glob of images.
- Results: `.npy` (one array), `.npz` or `.zarr` (one array per output x input block, keys `"J"`
  for a single block, `"<output>/<input>"` otherwise), written under a temporary name in the same
  folder and renamed when complete, so a killed run never leaves a partial file under the final name.

Nothing here imports Keras at module level (the command line chooses the backend first).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import math
import os
import re
import secrets
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JacketTypeError, JacketValueError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".zarr")
OUTPUT_SUFFIXES = (".npy", ".npz", ".zarr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SINGLE_KEY = "J"  # the key of a result with one output and one input

MAX_ARCHIVE_MEMBERS = 10_000
MAX_COMPRESSION_RATIO = 100  # for members over _RATIO_FLOOR bytes uncompressed
DEFAULT_MAX_ARCHIVE_BYTES = 4 << 30
_RATIO_FLOOR = 16 << 20
_FUNCTION_SPEC = re.compile(r"^(?P<module>[\w.\-/\\]+):(?P<function>[A-Za-z_]\w*)$")
_ZARR_CHUNK_BYTES = 64 * 2**20  # upper bound on one zarr chunk

__all__ = [
    "ImageStack",
    "ResultWriter",
    "assemble_flat",
    "atomic_output",
    "check_inputs_source",
    "check_model_source",
    "check_output",
    "is_model_function",
    "iter_batches",
    "jacobian_blocks",
    "load_model",
    "num_samples",
    "read_inputs",
    "read_result",
    "stream_jacobian",
    "write_result",
]


# ---------------------------------------------------------------------------------------- models


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
        h5py = _optional("h5py", "reading .h5 models")
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
    from ..checks import parse_bytes

    return parse_bytes("jacket", "JACKET_MAX_ARCHIVE_BYTES", value)


def check_archive(path: str | os.PathLike) -> None:
    """Refuse a zip archive (`.keras`, `.npz`) that is not safe to open: too many members, a
    member named outside the archive's folder, a zip bomb, or too much data in all.

    Raises:
      JacketValueError: naming the archive, what was found and the limit (see NOTE [Untrusted
        files] in `jacket.io`).
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
                f"{_human(member.compress_size)} to {_human(size)}, more than "
                f"{MAX_COMPRESSION_RATIO} times (a zip bomb)."
            )
        total += size
    if total > limit:
        raise JacketValueError(
            f"{refused}: it holds {_human(total)} uncompressed, more than the limit of "
            f"{_human(limit)}. If you trust the file, raise the limit with the environment "
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
            f"{refused}: its datasets declare {_human(total)}, more than the limit of "
            f"{_human(limit)}. If you trust the file, raise the limit with the environment "
            f"variable JACKET_MAX_ARCHIVE_BYTES (e.g. JACKET_MAX_ARCHIVE_BYTES=16GiB)."
        )


def _human(n: int) -> str:
    from ..checks import format_bytes

    return format_bytes(n)


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


# ---------------------------------------------------------------------------------------- inputs


class ImageStack:
    """A folder of images as a lazy array `(n, height, width[, channels])` of float32 in [0, 1].

    Images are read (and resized when their size differs) only when sliced, so `iter_batches`
    streams a large folder through without holding it in memory. `np.asarray(stack)` reads all.

    Attributes:
      files: the image paths, sorted by name (sample `i` is `files[i]`).
      shape: `(n, height, width, channels)`, or `(n, height, width)` for a 2-D model input.
    """

    def __init__(self, files: list[Path], size: tuple[int, int], mode: str, channel_axis: bool):
        self.files = list(files)
        self.size = size
        self.mode = mode
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        self.shape = (len(files), *size) + ((channels,) if channel_axis else ())
        self.dtype = np.dtype("float32")
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self._read(f) for f in self.files[index]]).reshape(
                (-1,) + self.shape[1:]
            )
        return self._read(self.files[index])

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(file) as image:
                image = image.convert(self.mode)
                height, width = self.size
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError) as error:
            raise JacketValueError(f"cannot read image {str(file)!r}: {error}") from None
        return array.reshape(self.shape[1:])


def check_inputs_source(source: str | os.PathLike) -> None:
    """Check, without importing Keras, that `source` names an input file, folder or glob.

    Raises:
      JacketValueError: for a missing path, an unsupported suffix, or a glob that matches nothing.
    """
    text = str(source)
    if _is_glob(text):
        if not _glob_images(text):
            raise JacketValueError(
                f"no images match {text!r} (looked for {', '.join(IMAGE_SUFFIXES)})."
            )
        return
    path = Path(text)
    if not path.exists():
        raise JacketValueError(
            f"inputs not found: {text!r}. Pass a .npy, .npz, .csv or .zarr file, or a folder or "
            "glob of images."
        )
    if path.is_dir() and path.suffix.lower() != ".zarr":
        if not _folder_images(path):
            raise JacketValueError(
                f"no images in folder {text!r} (looked for {', '.join(IMAGE_SUFFIXES)})."
            )
        return
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise JacketValueError(
            f"cannot read inputs from {text!r}: the suffix must be one of "
            f"{', '.join(INPUT_SUFFIXES)}, or pass a folder or glob of images. "
            f"Received: {path.suffix or 'no suffix'!r}."
        )


def read_inputs(source: str | os.PathLike, model, *, size: tuple[int, int] | None = None):
    """Read a file of inputs into what `jacket.jacobian(model, x)` accepts.

    Args:
      source: `.npy` (one array `(batch, *in_shape)`, memory-mapped); `.npz` or a zarr group
        (named arrays: for a model with several inputs, one per input name, or `arr_0, arr_1, ...`
        in input order; arrays that name no input are left out); a `.zarr` array; a CSV table
        (comma-separated, one sample per row, an optional header line; each row is reshaped to the
        model's input shape); or a folder or glob of images (read as float32 in [0, 1], grey,
        RGB or RGBA to match the model's channels).
      model: The model the inputs are for (its declared input names and shapes guide the reading).
      size: `(height, width)` to resize images to. Default: the model's input size; images of
        another size are refused without it.

    Returns:
      An array-like `(batch, *in_shape)`, or a list/dict of them matching the model's inputs.
      Arrays may be lazy (a memory map, a zarr array, an `ImageStack`): slice them in batches
      with `iter_batches`.

    Raises:
      JacketValueError: for a missing, unreadable or corrupt file, or data that cannot fit the
        model (the wrong number of arrays or columns).
    """
    check_inputs_source(source)
    text = str(source)
    path = Path(text)
    if _is_glob(text) or (path.is_dir() and path.suffix.lower() != ".zarr"):
        files = _glob_images(text) if _is_glob(text) else _folder_images(path)
        return _read_images(files, model, size, text)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise JacketValueError(
                f"cannot read {text!r}: {error}. Save a numeric array with `np.save`."
            ) from None
        except (OSError, EOFError) as error:
            raise JacketValueError(
                f"cannot read {text!r}: the file is corrupt, truncated or empty ({error}). "
                "Save a numeric array with `np.save`."
            ) from None
        return _check_fits(_match_arrays({"arr_0": array}, model, text), model, text)
    if suffix == ".npz":
        check_archive(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise JacketValueError(
                f"cannot read {text!r}: the file is corrupt, truncated or holds non-numeric "
                f"arrays ({type(error).__name__}: {error})."
            ) from None
        if not arrays:
            raise JacketValueError(f"{text!r} holds no arrays.")
        return _check_fits(_match_arrays(arrays, model, text), model, text)
    if suffix == ".zarr":
        zarr = _optional("zarr", "reading .zarr inputs")
        try:
            node = zarr.open(store=str(path), mode="r")
        except Exception as error:  # noqa: BLE001
            raise JacketValueError(
                f"cannot read {text!r}: not a readable zarr array or group ({error})."
            ) from None
        if hasattr(node, "shape"):
            return _check_fits(_match_arrays({"arr_0": node}, model, text), model, text)
        arrays = {name: array for name, array in node.arrays()}
        if not arrays:
            raise JacketValueError(f"zarr group {text!r} holds no arrays.")
        return _check_fits(_match_arrays(arrays, model, text), model, text)
    return _read_csv(path, model)


def _check_fits(x, model, source: str):
    """Each array's per-sample shape against the model's declared input shape (None: any)."""
    declared = _declared(model)
    if declared is None:
        return x
    if isinstance(x, Mapping):
        pairs = [(str(k), x[k], declared[k]) for k in x]
    elif isinstance(x, (list, tuple)):
        pairs = [(spec.name, value, spec) for value, spec in zip(x, declared)]
    else:
        pairs = [(getattr(declared, "name", "x"), x, declared)]
    for name, value, spec in pairs:
        shape = tuple(int(d) for d in value.shape)
        want = tuple(spec.shape[1:])
        fits = len(shape) == len(want) + 1 and all(
            w is None or w == d for w, d in zip(want, shape[1:])
        )
        if not fits:
            shown = "(batch, " + ", ".join("?" if d is None else str(d) for d in want) + ")"
            raise JacketValueError(
                f"inputs {source!r} do not fit the model: its input {name!r} takes shape "
                f"{shown}. Received: an array of shape {shape}. Reshape the data to "
                "`(samples, *in_shape)`."
            )
    return x


def num_samples(x) -> int:
    """The number of samples (length of the batch axis) of `x`, checked equal across its arrays.

    Raises:
      JacketValueError: if an array has no batch axis, or the arrays' lengths differ.
    """
    leaves = _leaves(x)
    lengths = []
    for name, leaf in leaves:
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if len(shape) == 0:
            raise JacketValueError(
                f"input {name!r} is a scalar: inputs need a leading batch axis, shape "
                "`(batch, *in_shape)`."
            )
        lengths.append(int(shape[0]))
    if len(set(lengths)) != 1:
        received = ", ".join(f"{name}: {n}" for (name, _), n in zip(leaves, lengths))
        raise JacketValueError(
            f"every input must have the same number of samples. Received: {received}."
        )
    return lengths[0]


def iter_batches(x, batch_size: int, *, model=None) -> Iterator[tuple[int, int, Any]]:
    """Slice `x` (an array-like or a list/dict of them) into batches along the first axis.

    Args:
      x: inputs, as `read_inputs` returns them.
      batch_size: samples per batch (the last batch may be shorter).
      model: if given, each array is cast to the float dtype of the model input it feeds (as
        Keras would cast it), so a float64 table reaches a float32 model as float32.

    Yields:
      `(start, stop, batch)`, where `batch` has the structure of `x` and holds NumPy arrays of
      samples `start:stop`. Lazy arrays (memory maps, zarr, `ImageStack`) are read one batch at
      a time.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise JacketValueError(
            f"iter_batches: `batch_size` must be a positive integer. Received: {batch_size!r}."
        )
    n = num_samples(x)
    dtypes = _input_dtypes(x, model) if model is not None else None
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        batch = _map(x, lambda a, rows=slice(start, stop): np.ascontiguousarray(a[rows]))
        if dtypes is not None:
            batch = _cast(batch, dtypes)
        yield start, stop, batch


def _input_dtypes(x, model):
    """The float dtype each array of `x` is computed in by `model` (None where not declared)."""
    declared = _declared(model)

    def dtype_of(spec):
        dtype = str(getattr(spec, "dtype", "") or "")
        return dtype if dtype in ("float16", "float32", "float64") else None

    if isinstance(x, Mapping):
        specs = declared if isinstance(declared, Mapping) else {}
        return {key: dtype_of(specs.get(key)) for key in x}
    if isinstance(x, (list, tuple)):
        specs = declared if isinstance(declared, (list, tuple)) else [None] * len(x)
        return [dtype_of(spec) for spec in specs]
    return dtype_of(declared)


def _cast(batch, dtypes):
    if isinstance(batch, Mapping):
        return {key: _cast(value, dtypes[key]) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast(value, dtype) for value, dtype in zip(batch, dtypes))
    if dtypes is None or batch.dtype.kind not in "biuf" or batch.dtype == dtypes:
        return batch
    return batch.astype(dtypes)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _glob_images(pattern: str) -> list[Path]:
    return sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if _is_image(p))


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _declared(model):
    from ..engine.inputs import declared_inputs

    return declared_inputs(model)


def _match_arrays(arrays: dict, model, source: str):
    """Named arrays -> the structure the model's inputs have."""
    declared = _declared(model)
    names = list(arrays)
    if declared is None or not isinstance(declared, (Mapping, list, tuple)):
        if len(arrays) == 1:
            return arrays[names[0]]
        wanted = getattr(declared, "name", None)
        if wanted in arrays:
            return arrays[wanted]
        raise JacketValueError(
            f"{source!r} holds {len(arrays)} arrays ({', '.join(names)}), but the model takes "
            f"one input{f' ({wanted!r})' if wanted else ''}. Pass a file with one array"
            f"{f', or name it {wanted!r}' if wanted else ''}."
        )
    if isinstance(declared, Mapping):
        wanted = list(declared)
        if all(name in arrays for name in wanted):
            return {name: arrays[name] for name in wanted}
    else:
        wanted = [tensor.name for tensor in declared]
        if all(name in arrays for name in wanted):
            return [arrays[name] for name in wanted]
        positional = [f"arr_{i}" for i in range(len(wanted))]
        if all(name in arrays for name in positional):
            return [arrays[name] for name in positional]
    missing = [name for name in wanted if name not in arrays]
    raise JacketValueError(
        f"{source!r} does not fit the model, which takes {len(wanted)} inputs named "
        f"{', '.join(map(repr, wanted))}. Received: arrays {', '.join(map(repr, names))} "
        f"(missing {', '.join(map(repr, missing))}). Save one array per input under its name, "
        "e.g. `np.savez(path, **{name: array})`."
    )


def _read_csv(path: Path, model):
    declared = _declared(model)
    if isinstance(declared, (Mapping, list, tuple)):
        raise JacketValueError(
            f"a CSV table holds one input, but the model takes {len(declared)}. Pass an .npz file "
            "with one array per input name."
        )
    try:
        with open(path, newline="") as handle:
            lines = [line for line in handle if line.strip()]
        header = bool(lines) and not all(_is_number(c) for c in lines[0].strip().split(","))
        if len(lines) <= int(header):  # nothing to read (np.loadtxt would only warn)
            what = "only a header line" if lines else "no rows"
            raise JacketValueError(
                f"CSV {str(path)!r} has no rows of data ({what}; a line that is not "
                "comma-separated numbers is taken for a header). Pass comma-separated numbers, "
                "one sample per row."
            )
        table = np.loadtxt(lines[int(header) :], delimiter=",", ndmin=2, dtype=np.float64)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        if isinstance(error, JacketValueError):
            raise
        raise JacketValueError(
            f"cannot read CSV {str(path)!r}: {error}. Pass comma-separated numbers, one sample "
            "per row (one header line allowed)."
        ) from None
    if table.shape[0] == 0:
        raise JacketValueError(f"CSV {str(path)!r} has no rows of data.")
    shape = tuple(declared.shape[1:]) if declared is not None else None
    if shape is None or (len(shape) == 1 and shape[0] is None):
        return table
    if any(d is None for d in shape) or math.prod(shape) != table.shape[1]:
        shown = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise JacketValueError(
            f"CSV {str(path)!r} does not fit the model: each row must hold one sample of shape "
            f"{shown}. Received: {table.shape[1]} columns. Pass a table with "
            f"{math.prod(d or 1 for d in shape) if None not in shape else 'matching'} columns."
        )
    return table.reshape((table.shape[0], *shape))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_images(files: list[Path], model, size, source: str) -> ImageStack:
    _optional("PIL", "reading images", package="pillow")
    from PIL import Image, UnidentifiedImageError

    declared = _declared(model)
    if isinstance(declared, (Mapping, list, tuple)):
        raise JacketValueError(
            f"images make one input, but the model takes {len(declared)}. Pass an .npz file with "
            "one array per input name."
        )
    sizes, modes = [], []
    for file in files:  # headers only: a broken file is found before any work
        try:
            with Image.open(file) as image:
                sizes.append((image.height, image.width))
                modes.append(image.mode)
        except (UnidentifiedImageError, OSError) as error:
            raise JacketValueError(
                f"cannot read image {str(file)!r}: the file is corrupt or not an image ({error})."
            ) from None
    shape = tuple(declared.shape[1:]) if declared is not None else None
    if shape is None:
        channel_axis = True
        mode = "L" if modes[0] in ("L", "1", "I", "I;16", "F") else "RGB"
        target = size
    elif len(shape) in (2, 3):
        channel_axis = len(shape) == 3
        channels = shape[2] if channel_axis else 1
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if channels not in modes:
            raise JacketValueError(
                f"the model's input shape {shape} is not an image with 1, 3 or 4 channels, so "
                f"images ({source!r}) cannot feed it. Pass an .npy file instead."
            )
        mode = modes[channels]
        known = shape[0] is not None and shape[1] is not None
        target = size if size is not None else (tuple(shape[:2]) if known else None)
        if size is not None and known and tuple(size) != tuple(shape[:2]):
            raise JacketValueError(
                f"--size {size[0]}x{size[1]} does not fit the model, which takes images of "
                f"{shape[0]}x{shape[1]}. Pass --size {shape[0]}x{shape[1]}."
            )
    else:
        raise JacketValueError(
            f"the model's input shape {shape} is not an image shape (height, width[, channels]), "
            f"so images ({source!r}) cannot feed it. Pass an .npy file instead."
        )
    if target is None:
        raise JacketValueError(
            f"the model does not fix its input size: pass --size HEIGHTxWIDTH to read {source!r}."
        )
    if size is None:
        for file, found in zip(files, sizes):
            if found != tuple(target):
                raise JacketValueError(
                    f"image {str(file)!r} is {found[0]}x{found[1]}, but the model takes "
                    f"{target[0]}x{target[1]}. Pass --size {target[0]}x{target[1]} to resize."
                )
    return ImageStack(files, (int(target[0]), int(target[1])), mode, channel_axis)


# -------------------------------------------------------------------------------------- results


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
    probe = folder / _temporary_name(path, "probe")
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
    tmp = path.parent / _temporary_name(path, "part")
    try:
        yield tmp
        _publish(tmp, path, force=force)
    finally:
        _remove(tmp)


def _temporary_name(path: Path, kind: str) -> str:
    return f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _remove(path: Path) -> None:
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


def _publish(tmp: Path, path: Path, *, force: bool) -> None:
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
        old = path.parent / _temporary_name(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        _remove(old)


def _block_name(name: Any) -> str:
    """One plain path component from an input or output name: path separators and control
    characters become "_", and a name of dots alone (".", "..") or none gets a "_" in front."""
    text = re.sub(r"[/\\\x00-\x1f]", "_", str(name))
    return "_" + text if set(text) <= {"."} else text


def _check_key(key: str) -> None:
    """Refuse a result key that names a path outside the result (NOTE [Untrusted files])."""
    if (
        not isinstance(key, str)
        or "\\" in key
        or re.match(r"^[A-Za-z]:", key)
        or any(part in ("", ".", "..") for part in key.split("/"))
        or re.search(r"[\x00-\x1f]", key)
    ):
        raise JacketValueError(
            f"ResultWriter.write: block key {key!r} must be one or more plain names joined by "
            "'/' (no '..', '.', empty or absolute parts, backslashes or control characters), so "
            "that every block stays inside the result."
        )


def jacobian_blocks(J, x, model=None) -> dict[str, np.ndarray]:
    """A Jacobian as NumPy arrays, one per output x input block, keyed for a file.

    Args:
      J: what `jacket.jacobian(model, x)` returned (a tensor, or the model's output structure of
        the input structure).
      x: the inputs it was computed at (their structure tells the two levels of `J` apart).
      model: the model, for the names of list-structured inputs and outputs.

    Returns:
      `{"J": array}` for a single output and input; otherwise `{"<output>/<input>": array}` in
      output-major order, names from the dict keys or the model's input and output names
      (`output_0`, `input_0`, ... where it has none). bfloat16 becomes float32.
    """
    import keras

    def numpy(value):
        array = np.asarray(keras.ops.convert_to_numpy(value))
        if array.dtype.name not in ("float16", "float32", "float64"):
            array = array.astype(np.float32)  # bfloat16: no portable .npy type
        return array

    x_single = not isinstance(x, (Mapping, list, tuple))
    declared = _declared(model) if model is not None else None
    in_names = _names(x, declared, "input", lambda t: t.name)
    out_structure = J
    if not x_single:
        single_output = isinstance(J, type(x)) and all(
            not isinstance(v, (Mapping, list, tuple)) for v in _values(J)
        )
        if single_output:
            out_structure = None
    elif not isinstance(J, (Mapping, list, tuple)):
        return {SINGLE_KEY: numpy(J)}
    output_names = list(getattr(model, "output_names", None) or [])
    if out_structure is None:
        out_name = output_names[0] if len(output_names) == 1 else "output"
        rows = [(out_name, J)]
    else:
        keys = list(J) if isinstance(J, Mapping) else None
        if keys is None:
            names = (
                output_names
                if len(output_names) == len(J)
                else [f"output_{i}" for i in range(len(J))]
            )
            rows = list(zip(names, J))
        else:
            rows = [(key, J[key]) for key in keys]
    blocks = {}
    for out_name, row in rows:
        if x_single:
            blocks[f"{_block_name(out_name)}/{_block_name(in_names[0])}"] = numpy(row)
        else:
            for in_name, value in zip(in_names, _values(row)):
                blocks[f"{_block_name(out_name)}/{_block_name(in_name)}"] = numpy(value)
    return blocks


def _values(structure) -> list:
    return list(structure.values()) if isinstance(structure, Mapping) else list(structure)


def _names(x, declared, prefix: str, name_of: Callable) -> list[str]:
    if isinstance(x, Mapping):
        return [str(key) for key in x]
    if isinstance(x, (list, tuple)):
        if isinstance(declared, (list, tuple)) and len(declared) == len(x):
            return [name_of(t) for t in declared]
        return [f"{prefix}_{i}" for i in range(len(x))]
    name = getattr(declared, "name", None)
    return [name or prefix]


def assemble_flat(blocks: Mapping[str, np.ndarray]) -> np.ndarray:
    """Flattened blocks `(batch, out_i, in_j)` keyed `"<output>/<input>"` -> one `(batch, M, N)`.

    The rows are the outputs and the columns the inputs, each in the order of the keys: the
    Jacobian of all outputs, flattened and concatenated, with respect to all inputs likewise.
    """
    outs: dict[str, dict[str, np.ndarray]] = {}
    for key, block in blocks.items():
        out_name, _, in_name = key.partition("/")
        if block.ndim != 3:
            raise JacketValueError(
                f"assemble_flat: block {key!r} must be `(batch, out_size, in_size)`. "
                f"Received: shape {block.shape}. Compute it with `flatten=True`."
            )
        outs.setdefault(out_name, {})[in_name] = block
    return np.concatenate(
        [np.concatenate(list(row.values()), axis=2) for row in outs.values()], axis=1
    )


class ResultWriter:
    """Writes a result of `samples` rows, batch by batch, to `.npy`, `.npz` or `.zarr`, atomically.

    Blocks go to disk as they come (memory-mapped `.npy` files, or zarr chunks), under a hidden
    temporary name in the output's folder; `commit` renames the finished result to `path`. Used as
    a context manager it commits on success and discards everything on an error.

    Args:
      path: `.npy` (a single block), `.npz` or `.zarr` (one array per block).
      samples: rows of every block (the batch axis of the whole result).
      force: replace an existing `path`.
      attrs: JSON-serialisable metadata stored in a zarr group's attributes.

    Example:
      >>> with io.ResultWriter("J.npz", samples=1000) as out:
      ...     for start, stop, xb in io.iter_batches(x, 100):
      ...         out.write(start, io.jacobian_blocks(jacket.jacobian(model, xb), xb, model))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        samples: int,
        *,
        force: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ):
        self.path = Path(path)
        check_output(self.path, force=force)
        self.format = self.path.suffix.lower()
        if self.format == ".zarr":
            _optional("zarr", "writing .zarr results")
        self.samples = int(samples)
        self.force = force
        self.attrs = dict(attrs or {})
        self._tmp = self.path.parent / _temporary_name(self.path, "part")
        self._arrays: dict[str, Any] = {}
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._written = 0

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """`{key: (shape, dtype)}` of the whole result, once the first batch is written."""
        return {
            key: ((self.samples, *shape), dtype.name)
            for key, (shape, dtype) in (self._layout or {}).items()
        }

    def write(self, start: int, blocks: Mapping[str, np.ndarray]) -> None:
        """Store rows `start : start + len(block)` of every block (the same keys every time)."""
        blocks = {key: np.asarray(value) for key, value in blocks.items()}
        if self._layout is None:
            self._open(blocks)
        layout = {key: (value.shape[1:], value.dtype) for key, value in blocks.items()}
        if layout != self._layout:
            received = {key: (value.shape, value.dtype.name) for key, value in blocks.items()}
            raise JacketValueError(
                f"ResultWriter.write: every batch must have the blocks of the first, "
                f"{self.layout}. Received: {received}."
            )
        for key, value in blocks.items():
            stop = start + value.shape[0]
            if start < 0 or stop > self.samples:
                raise JacketValueError(
                    f"ResultWriter.write: rows {start}:{stop} lie outside the result's "
                    f"{self.samples} samples."
                )
            self._arrays[key][start:stop] = value
        self._written += next(iter(blocks.values())).shape[0]

    def commit(self) -> Path:
        """Finish the file and give it its final name. Returns `path`."""
        if self._layout is None:
            raise JacketValueError(f"nothing was written for {str(self.path)!r}.")
        if self.format == ".npz":
            self._close_arrays()
            archive = self.path.parent / _temporary_name(self.path, "zip")
            try:
                with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for i, key in enumerate(self._layout):
                        zf.write(self._tmp / f"{i}.npy", arcname=f"{key}.npy")
                _remove(self._tmp)
                self._tmp = archive
            except BaseException:
                _remove(archive)
                raise
        else:
            self._close_arrays()
        _publish(self._tmp, self.path, force=self.force)
        return self.path

    def discard(self) -> None:
        """Remove everything written so far."""
        self._arrays.clear()
        _remove(self._tmp)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()

    def _open(self, blocks: dict[str, np.ndarray]) -> None:
        if not blocks:
            raise JacketValueError("ResultWriter.write: no blocks given.")
        for key in blocks:
            _check_key(key)
        if self.format == ".npy" and len(blocks) != 1:
            raise JacketValueError(
                f"cannot write {len(blocks)} blocks ({', '.join(blocks)}) to {str(self.path)!r}: "
                "an .npy file holds one array. Write .npz or .zarr, or pass --flatten "
                "(`flatten=True`) to store them as one `(batch, out_size, in_size)` matrix."
            )
        self._layout = {key: (value.shape[1:], value.dtype) for key, value in blocks.items()}
        if self.format == ".npy":
            ((shape, dtype),) = self._layout.values()
            self._arrays[next(iter(blocks))] = np.lib.format.open_memmap(
                self._tmp, mode="w+", dtype=dtype, shape=(self.samples, *shape)
            )
        elif self.format == ".npz":
            self._tmp.mkdir()
            for i, (key, (shape, dtype)) in enumerate(self._layout.items()):
                self._arrays[key] = np.lib.format.open_memmap(
                    self._tmp / f"{i}.npy", mode="w+", dtype=dtype, shape=(self.samples, *shape)
                )
        else:
            import zarr

            group = zarr.open_group(store=str(self._tmp), mode="w", zarr_format=3)
            group.attrs.update({**self.attrs, "jacket_blocks": list(self._layout)})
            batch = max(value.shape[0] for value in blocks.values())
            for key, (shape, dtype) in self._layout.items():
                row_bytes = max(1, math.prod(shape) * dtype.itemsize)
                rows = max(1, min(batch, self.samples, _ZARR_CHUNK_BYTES // row_bytes))
                self._arrays[key] = group.create_array(
                    name=key,
                    shape=(self.samples, *shape),
                    chunks=(rows, *shape),
                    dtype=dtype,
                    fill_value=0,
                )

    def _close_arrays(self) -> None:
        if self._written != self.samples:
            raise JacketValueError(
                f"{str(self.path)!r}: {self._written} of {self.samples} rows were written."
            )
        for array in self._arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        self._arrays.clear()


def write_result(
    path: str | os.PathLike,
    blocks: Mapping[str, np.ndarray] | np.ndarray,
    *,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a whole result at once (see `ResultWriter`); an array is stored under `"J"`.

    Returns:
      `path`, written atomically.
    """
    if not isinstance(blocks, Mapping):
        blocks = {SINGLE_KEY: np.asarray(blocks)}
    samples = {np.shape(block)[0] for block in blocks.values()}
    if len(samples) != 1:
        shapes = {key: np.shape(block) for key, block in blocks.items()}
        raise JacketValueError(
            f"write_result: every block must have the same batch axis. Received: {shapes}."
        )
    with ResultWriter(path, samples.pop(), force=force, attrs=attrs) as writer:
        writer.write(0, blocks)
    return Path(path)


def read_result(path: str | os.PathLike, key: str | None = None):
    """Open one block of a result written by jacket (or any `.npy`, `.npz`, zarr file).

    Args:
      path: `.npy` (memory-mapped), `.npz`, or a `.zarr` array or group.
      key: which array of an `.npz` or zarr group; default: the only one, else an error that
        lists the keys.

    Returns:
      `(array, key)`: an array-like (sliceable, lazy for `.npy` and zarr) and the key read
      (`None` for a lone array).
    """
    path = Path(path)
    if not path.exists():
        raise JacketValueError(f"file not found: {str(path)!r}.")
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise JacketValueError(
            f"cannot read {str(path)!r}: the suffix must be one of {', '.join(OUTPUT_SUFFIXES)}."
        )
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        if suffix == ".npz":
            check_archive(path)
            with np.load(path, allow_pickle=False) as archive:
                key = _choose_key(path, list(archive.files), key)
                return archive[key], key
        zarr = _optional("zarr", "reading .zarr results")
        node = zarr.open(store=str(path), mode="r")
    except JacketValueError:
        raise
    except Exception as error:  # noqa: BLE001
        raise JacketValueError(
            f"cannot read {str(path)!r}: the file is corrupt, truncated or not an array "
            f"({type(error).__name__}: {error})."
        ) from None
    if hasattr(node, "shape"):
        return node, None
    keys = list(node.attrs.get("jacket_blocks", [])) or _zarr_keys(node)
    key = _choose_key(path, keys, key)
    return node[key], key


def _zarr_keys(group, prefix: str = "") -> list[str]:
    keys = [prefix + name for name, _ in group.arrays()]
    for name, sub in group.groups():
        keys += _zarr_keys(sub, f"{prefix}{name}/")
    return keys


def _choose_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is None:
        if len(keys) == 1:
            return keys[0]
        raise JacketValueError(
            f"{str(path)!r} holds {len(keys)} arrays: pick one with --key (`key=`): "
            f"{', '.join(keys)}."
        )
    if key not in keys:
        raise JacketValueError(
            f"{str(path)!r} has no array {key!r}. Received: key={key!r}; it holds "
            f"{', '.join(keys)}."
        )
    return key


# ------------------------------------------------------------------------------------- streaming


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
    import jacket

    samples = num_samples(x)
    check_output(path, force=force)
    jac = jacket.jacobian_fn(
        model, mode=mode, chunk_size=chunk_size, flatten=flatten, memory_budget=memory_budget
    )
    single_npy = Path(path).suffix.lower() == ".npy"
    with ResultWriter(path, samples, force=force, attrs=attrs) as writer:
        for start, stop, batch in iter_batches(x, batch_size, model=model):
            n = stop - start
            if n < batch_size and start > 0:
                batch = _map(batch, lambda a: _pad_rows(a, batch_size))
            blocks = jacobian_blocks(jac(batch), batch, model)
            if n < batch_size and start > 0:
                blocks = {key: value[:n] for key, value in blocks.items()}
            if single_npy and len(blocks) > 1 and flatten:
                blocks = {SINGLE_KEY: assemble_flat(blocks)}
            writer.write(start, blocks)
            if on_batch is not None:
                on_batch(stop, samples)
        layout = writer.layout
    return layout


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    pad = np.repeat(array[-1:], rows - array.shape[0], axis=0)
    return np.concatenate([array, pad], axis=0)


# -------------------------------------------------------------------------------------- helpers


def _leaves(x) -> list[tuple[str, Any]]:
    if isinstance(x, Mapping):
        return [(str(k), v) for k, v in x.items()]
    if isinstance(x, (list, tuple)):
        return [(f"input_{i}", v) for i, v in enumerate(x)]
    return [("x", x)]


def _map(x, fn):
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(fn(v) for v in x)
    return fn(x)


def _optional(module: str, purpose: str, *, package: str | None = None):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise JacketValueError(
            f'{purpose} needs {package or module}: pip install "jacket[io]".'
        ) from None


# ------------------------------------------------------------------ sparse Jacobians and patterns
# `jacket jacobian --sparse` and `jacket sparsity`'s files; the format is `jacket._sparse_io`'s
from .sparse_files import load_sparse_jacobian as load_sparse_jacobian  # noqa: E402
from .sparse_files import load_sparsity as load_sparsity  # noqa: E402
from .sparse_files import save_sparse_jacobian as save_sparse_jacobian  # noqa: E402
from .sparse_files import save_sparsity as save_sparsity  # noqa: E402
from .sparse_files import stream_sparse_jacobian as stream_sparse_jacobian  # noqa: E402

__all__ += [
    "load_sparse_jacobian",
    "load_sparsity",
    "save_sparse_jacobian",
    "save_sparsity",
    "stream_sparse_jacobian",
]
