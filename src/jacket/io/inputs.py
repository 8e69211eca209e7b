"""Input files: arrays (`.npy` memory-mapped, `.npz`, zarr), CSV tables and images, read into what
`jacket.jacobian(model, x)` accepts and sliced into batches one at a time."""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..batches import Batch, slices
from ..checks import positive_int
from ..errors import JacketValueError
from ..trees import flatten_with_labels
from .files import optional
from .images import IMAGE_SUFFIXES, folder_images, glob_images, is_glob, read_images
from .models import check_archive

INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".zarr")


def check_inputs_source(source: str | os.PathLike) -> None:
    """Check, without importing Keras, that `source` names an input file, folder or glob.

    Raises:
      JacketValueError: for a missing path, an unsupported suffix, or a glob that matches nothing.
    """
    text = str(source)
    if is_glob(text):
        if not glob_images(text):
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
        if not folder_images(path):
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
    if is_glob(text) or (path.is_dir() and path.suffix.lower() != ".zarr"):
        files = glob_images(text) if is_glob(text) else folder_images(path)
        return read_images(files, declared_inputs(model), size, text)
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
        zarr = optional("zarr", "reading .zarr inputs")
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
    declared = declared_inputs(model)
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
    leaves = flatten_with_labels(x, "x")
    lengths = []
    for name, leaf in leaves:
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if len(shape) == 0:
            raise JacketValueError(
                f"input {name} is a scalar: inputs need a leading batch axis, shape "
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
    for batch in _batches("iter_batches", x, batch_size, model, padded=False):
        yield batch.start, batch.stop, batch.x


def padded_batches(x, batch_size: int, *, model=None) -> Iterator[Batch]:
    """`x` in batches of `min(batch_size, samples)`, the last one padded with copies of its last
    sample so that every batch has one shape (one compiled kernel); see `jacket.batches`.

    Args:
      x, batch_size, model: As in `iter_batches`.

    Yields:
      `jacket.batches.Batch`es: `start`, `x` (NumPy arrays in the structure of `x`, of
      `batch_size` rows) and `valid`, the number of real samples in it.
    """
    return _batches("padded_batches", x, batch_size, model, padded=True)


def _batches(fn_name: str, x, batch_size: int, model, *, padded: bool) -> Iterator[Batch]:
    batch_size = positive_int(fn_name, "batch_size", batch_size)
    n = num_samples(x)
    dtypes = _input_dtypes(x, model) if model is not None else None
    cast = None if dtypes is None else (lambda batch: _cast(batch, dtypes))
    size = max(1, min(batch_size, n)) if padded else batch_size
    return slices(x, n, size, padded=padded, cast=cast)


def _input_dtypes(x, model):
    """The float dtype each array of `x` is computed in by `model` (None where not declared)."""
    declared = declared_inputs(model)

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


def declared_inputs(model):
    from ..engine.inputs import declared_inputs

    return declared_inputs(model)


def _match_arrays(arrays: dict, model, source: str):
    """Named arrays -> the structure the model's inputs have."""
    declared = declared_inputs(model)
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
    declared = declared_inputs(model)
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


LABEL_SUFFIXES = (".npy", ".csv")


def read_labels(source: str | os.PathLike, inputs: str | os.PathLike | None = None) -> np.ndarray:
    """Class labels: a `.npy` or `.csv` file, or (when no such file exists) the array of that name
    in the `.npz` file of inputs `inputs`. The array is returned as read (check it for its use).

    Raises:
      JacketValueError: for a file that cannot be read, or labels found nowhere.
    """
    spec, path = str(source), Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LABEL_SUFFIXES:
            raise JacketValueError(
                f"cannot read labels from {spec!r}: the suffix must be .npy or .csv. Received: "
                f"{path.suffix or 'no suffix'!r}."
            )
        try:
            if suffix == ".npy":
                return np.load(path, allow_pickle=False)
            return np.loadtxt(path, delimiter=",", ndmin=1)
        except (OSError, ValueError) as error:
            raise JacketValueError(f"cannot read labels from {spec!r}: {error}") from None
    if inputs is not None and Path(inputs).suffix.lower() == ".npz":
        check_archive(inputs)
        with np.load(inputs, allow_pickle=False) as archive:
            if spec in archive.files:
                return archive[spec]
            held = ", ".join(archive.files)
        raise JacketValueError(
            f"labels not found: no file {spec!r}, and {str(inputs)!r} has no array {spec!r} (it "
            f"holds {held}). Pass a .npy file or the name of an array in the inputs file."
        )
    raise JacketValueError(
        f"labels not found: {spec!r}. Pass a .npy or .csv file of one class index per sample, or "
        "the name of an array in an .npz file of inputs."
    )
