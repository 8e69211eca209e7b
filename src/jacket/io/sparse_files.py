"""Sparse Jacobians and sparsity patterns in files: what `jacket jacobian --sparse` and
`jacket sparsity` write (`jacket.io.stream_sparse_jacobian` streams the first). The public functions
are re-exported by `jacket.io`.

NOTE: [The sparse Jacobian file, version 1]
An uncompressed `.npz` archive (`np.load(path)` reads it; no pickles). The pattern is the same for
every sample, so it is stored once, in CSR form, and the values once per sample:

    format   0-d str            "jacket.sparse_jacobian"
    version  0-d int64          1
    shape    int64 `(3,)`       `(samples, out_size, in_size)`
    indptr   int64 `(out_size + 1,)`  row `i` (an output) has the entries
    indices  int64 `(nnz,)`           `indices[indptr[i]:indptr[i + 1]]` (input columns, sorted)
    values   `(samples, nnz)`   the model's float dtype: `values[b, k]` is sample `b`'s Jacobian at
                                the `k`-th entry, in CSR order; entries outside the pattern are 0
    meta     0-d str            JSON: `in_shapes`, `out_shapes` (per sample), `in_names`,
                                `out_names`, `mode` ("forward", "reverse" or "dense"), `n_colors`,
                                `fallback` (why it was computed densely, or null), `flatten`, and
                                what the writer adds (`model`, `inputs`, `backend`)

Rows are the outputs flattened (row-major) and, for several outputs, concatenated in
`keras.tree.flatten` order (`out_names`); columns likewise for the inputs. Sample `b` in SciPy:
`scipy.sparse.csr_array((values[b], indices, indptr), shape=shape[1:])`. `values` is written batch
by batch straight into the archive, so neither the result nor the inputs need to fit in memory.

NOTE: [The pattern file]
What `scipy.sparse.save_npz` writes for a boolean `csr_array` (keys `indices`, `indptr`, `format`,
`shape`, `data`, `_is_array`), so `scipy.sparse.load_npz` reads it, plus `jacket`: a 0-d str of
JSON with `format` "jacket.sparsity", `version` 1, the per-sample `in_shapes` and `out_shapes` it
was detected for, and what the writer adds (`model`, `backend`, colors, ...). `load_sparsity` also
takes any file `scipy.sparse.save_npz` wrote, and a sparse Jacobian file (its pattern).
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JacketValueError
from .files import atomic_output, check_output
from .results import input_names, portable

SPARSE_FORMAT = "jacket.sparse_jacobian"
PATTERN_FORMAT = "jacket.sparsity"
VERSION = 1

__all__ = [
    "load_sparse_jacobian",
    "load_sparsity",
    "read_pattern",
    "save_sparse_jacobian",
    "save_sparsity",
]


# ------------------------------------------------------------------------------ sparse Jacobians


def save_sparse_jacobian(
    path: str | os.PathLike,
    S,
    *,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a `jacket.SparseJacobian` to a `.npz` file, atomically (see the NOTE at the top).

    Args:
      path: The `.npz` file; an existing one is replaced only with `force`.
      S: What `jacket.jacobian(model, x, sparse=True)` returned: `(batch, out_size, in_size)`.
      attrs: JSON-serialisable metadata stored in the file's `meta`.

    Returns:
      `path`. `load_sparse_jacobian(path)` gives `S` back.
    """
    meta = meta_of(S, None, None, dict(attrs or {}))
    with SparseWriter(path, S.batch, S.pattern, force=force) as writer:
        writer.meta = meta
        writer.write(0, portable(S.values))
    return Path(path)


def load_sparse_jacobian(path: str | os.PathLike):
    """Read a sparse Jacobian file written by `jacket jacobian --sparse` or `save_sparse_jacobian`.

    Args:
      path: The `.npz` file.

    Returns:
      A `jacket.SparseJacobian`: `S.pattern` (bool CSR `(out_size, in_size)`), `S.values`
      (`(samples, nnz)`), `S.to_scipy(b)`, `S.to_dense()` (`(samples, *out_shape, *in_shape)` for
      one input and output, else or with `flatten` `(samples, out_size, in_size)`). The names and
      the writer's metadata are in the file's `meta` (`json.loads(np.load(path)["meta"][()])`).

    Raises:
      JacketValueError: for a missing or corrupt file, or one that is no sparse Jacobian.
    """
    import scipy.sparse as sp

    from ..sparse import SparseJacobian

    path = Path(path)
    with _archive(path) as archive:
        kind = _string(archive, "format")
        if kind != SPARSE_FORMAT:
            also = " (it holds a sparsity pattern)" if _is_pattern(archive) else ""
            raise JacketValueError(
                f"{str(path)!r} is not a sparse Jacobian written by jacket{also}: its `format` is "
                f"{kind!r}, not {SPARSE_FORMAT!r}. Write one with `jacket jacobian --sparse`."
            )
        _check_version(path, archive, "version")
        try:
            samples, out_size, in_size = (int(d) for d in archive["shape"])
            indptr, indices = archive["indptr"], archive["indices"]
            values = archive["values"]
            meta = json.loads(_string(archive, "meta"))
        except Exception as error:  # noqa: BLE001 - a damaged file: one clear message
            raise _corrupt(path, error) from None
    nnz = len(indices)
    if (
        indptr.shape != (out_size + 1,)
        or values.shape != (samples, nnz)
        or int(indptr[-1]) != nnz
        or (nnz and (int(indices.min()) < 0 or int(indices.max()) >= in_size))
    ):
        raise _corrupt(
            path,
            f"shape {(samples, out_size, in_size)}, indptr {indptr.shape}, indices "
            f"{indices.shape}, values {values.shape} do not fit together",
        )
    pattern = sp.csr_array(
        (np.ones(nnz, dtype=bool), indices, indptr), shape=(out_size, in_size), dtype=bool
    )
    return SparseJacobian(
        pattern,
        values,
        meta.get("in_shapes") or [(in_size,)],
        meta.get("out_shapes") or [(out_size,)],
        mode=meta.get("mode", "reverse"),
        n_colors=int(meta.get("n_colors", 0)),
        fallback=meta.get("fallback"),
        flatten=bool(meta.get("flatten", False)),
    )


# -------------------------------------------------------------------------------------- patterns


def save_sparsity(
    path: str | os.PathLike,
    pattern,
    *,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sparsity pattern to a `.npz` file that `scipy.sparse.load_npz` reads, atomically.

    Args:
      path: The `.npz` file; an existing one is replaced only with `force`.
      pattern: A boolean `(out_size, in_size)` matrix (scipy sparse or NumPy), e.g. from
        `jacket.sparsity`.
      attrs: JSON-serialisable metadata stored under the key `jacket` (see the NOTE at the top);
        `in_shapes` and `out_shapes` there let `jacket jacobian --sparsity` check the pattern fits.

    Returns:
      `path`.
    """
    import scipy.sparse as sp

    P = sp.csr_array(pattern if sp.issparse(pattern) else np.asarray(pattern) != 0, dtype=bool)
    P.sum_duplicates()
    P.eliminate_zeros()
    P.sort_indices()
    check_output(path, force=force, suffixes=(".npz",))
    meta = {"format": PATTERN_FORMAT, "version": VERSION, **dict(attrs or {})}
    arrays = {
        "indices": P.indices,
        "indptr": P.indptr,
        "format": np.array(b"csr"),
        "shape": np.array(P.shape, dtype=np.int64),
        "data": P.data,
        "_is_array": np.array(True),
        "jacket": np.array(json.dumps(meta)),
    }
    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def load_sparsity(path: str | os.PathLike):
    """Read a sparsity pattern: a file of `jacket sparsity -o` (`save_sparsity`), any
    `scipy.sparse.save_npz` file, or a sparse Jacobian file of `jacket jacobian --sparse`.

    Returns:
      A boolean `scipy.sparse.csr_array` `(out_size, in_size)`, for `jacket.jacobian(...,
      sparsity=P)`.

    Raises:
      JacketValueError: for a missing or corrupt file, or one that holds no 2-D pattern.
    """
    return read_pattern(path)[0]


def read_pattern(path: str | os.PathLike):
    """`(pattern, meta)`: `load_sparsity`'s pattern and the metadata stored with it (`{}` where
    none was)."""
    import scipy.sparse as sp

    path = Path(path)
    with _archive(path) as archive:
        kind = _string(archive, "format")
        if kind == SPARSE_FORMAT:
            _check_version(path, archive, "version")
            try:
                _, out_size, in_size = (int(d) for d in archive["shape"])
                indices, indptr = archive["indices"], archive["indptr"]
                meta = json.loads(_string(archive, "meta"))
                pattern = sp.csr_array(
                    (np.ones(len(indices), dtype=bool), indices, indptr),
                    shape=(out_size, in_size),
                    dtype=bool,
                )
            except Exception as error:  # noqa: BLE001
                raise _corrupt(path, error) from None
            return pattern, meta
        if not _is_pattern(archive):
            raise JacketValueError(
                f"{str(path)!r} holds no sparsity pattern: pass a file of `jacket sparsity -o`, "
                "of `scipy.sparse.save_npz`, or of `jacket jacobian --sparse`. Received: arrays "
                f"{', '.join(archive.files)}."
            )
        meta = {}
        if "jacket" in archive.files:
            meta = json.loads(_string(archive, "jacket"))
            _check_version(path, meta, "version")
    try:
        pattern = sp.load_npz(path)
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, error) from None
    if pattern.ndim != 2:
        raise JacketValueError(
            f"{str(path)!r} holds a {pattern.ndim}-D sparse array; a pattern is 2-D, "
            "`(out_size, in_size)`."
        )
    P = sp.csr_array(pattern, dtype=bool)
    P.sum_duplicates()
    P.eliminate_zeros()
    P.sort_indices()
    return P, meta


# ---------------------------------------------------------------------------------------- writer


class SparseWriter:
    """Writes the sparse Jacobian file (see the NOTE at the top): the pattern when entered, the
    values batch by batch (in order) straight into the archive's `values.npy`, `meta` when done;
    under a temporary name (`jacket.io.atomic_output`), renamed only when complete."""

    def __init__(self, path, samples: int, pattern, *, force: bool):
        self.path = Path(path)
        check_output(self.path, force=force, suffixes=(".npz",))
        self.samples = int(samples)
        self.pattern = pattern
        self.force = force
        self.meta: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self._zip: zipfile.ZipFile | None = None
        self._entry = None
        self._dtype: np.dtype | None = None
        self._written = 0

    def __enter__(self) -> SparseWriter:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_output(self.path, force=self.force))
            self._zip = stack.enter_context(
                zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
            )
            P = self.pattern
            shape = np.array((self.samples, *P.shape), dtype=np.int64)
            self._add("format", np.array(SPARSE_FORMAT))
            self._add("version", np.array(VERSION, dtype=np.int64))
            self._add("shape", shape)
            self._add("indptr", np.asarray(P.indptr, dtype=np.int64))
            self._add("indices", np.asarray(P.indices, dtype=np.int64))
            self._stack = stack.pop_all()
        return self

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows `start : start + len(values)` of `values` `(samples, nnz)`; in order."""
        values = np.ascontiguousarray(values)
        nnz = self.pattern.nnz
        if start != self._written or values.ndim != 2 or values.shape[1] != nnz:
            raise JacketValueError(
                f"sparse writer: expected rows from {self._written} of shape (rows, {nnz}). "
                f"Received: rows from {start} of shape {values.shape}."
            )
        if self._written + len(values) > self.samples:
            raise JacketValueError(
                f"sparse writer: rows {start}:{start + len(values)} lie outside the result's "
                f"{self.samples} samples."
            )
        if self._entry is None:
            self._open_values(values.dtype)
        elif values.dtype != self._dtype:
            raise JacketValueError(
                f"sparse writer: every batch must have dtype {self._dtype}. Received: "
                f"{values.dtype}."
            )
        self._entry.write(memoryview(values).cast("B"))
        self._written += len(values)

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if self._entry is None:
                    self._open_values(np.dtype("float32"))
                self._entry.close()
                self._entry = None
                if self._written != self.samples:
                    raise JacketValueError(
                        f"{str(self.path)!r}: {self._written} of {self.samples} samples were "
                        "written."
                    )
                self._add("meta", np.array(json.dumps(self.meta)))
        except BaseException as error:
            kind, value, traceback = type(error), error, error.__traceback__
            raise
        finally:
            if self._entry is not None:
                self._entry.close()
                self._entry = None
            self._stack.__exit__(kind, value, traceback)

    def _open_values(self, dtype: np.dtype) -> None:
        self._dtype = np.dtype(dtype)
        self._entry = self._zip.open("values.npy", "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(self._dtype),
            "fortran_order": False,
            "shape": (self.samples, self.pattern.nnz),
        }
        np.lib.format.write_array_header_2_0(self._entry, header)

    def _add(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)


# --------------------------------------------------------------------------------------- helpers


def meta_of(S, in_names, out_names, attrs) -> dict[str, Any]:
    """The `meta` of a sparse Jacobian file (NOTE: [The sparse Jacobian file, version 1])."""
    n_in, n_out = len(S.in_shapes), len(S.out_shapes)
    return {
        "in_shapes": [list(s) for s in S.in_shapes],
        "out_shapes": [list(s) for s in S.out_shapes],
        "in_names": in_names or (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)]),
        "out_names": out_names
        or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]),
        "mode": S.mode,
        "n_colors": int(S.n_colors),
        "fallback": S.fallback,
        "flatten": bool(getattr(S, "_flatten", False)),
        **dict(attrs or {}),
    }


def flat_input_names(x, model) -> list[str]:
    """The inputs' names in `keras.tree.flatten` order (a dict's keys sorted)."""
    if isinstance(x, Mapping):
        return sorted(str(key) for key in x)
    return input_names(x, model)


def output_names(model, S) -> list[str]:
    """The outputs' names in `keras.tree.flatten` order, where the model tells them."""
    count = len(S.out_shapes)
    structure = getattr(model, "_outputs_struct", None)  # Functional models
    if isinstance(structure, Mapping) and len(structure) == count:
        return sorted(str(key) for key in structure)
    names = [str(name) for name in (getattr(model, "output_names", None) or [])]
    if len(names) == count:
        return names
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


@contextlib.contextmanager
def _archive(path: Path):
    if not path.exists():
        raise JacketValueError(f"file not found: {str(path)!r}.")
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise JacketValueError(
            f"cannot read {str(path)!r}: sparse Jacobians and patterns are .npz files. "
            f"Received: {path.suffix or 'no suffix'!r}."
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, error) from None
    if not hasattr(archive, "files"):
        raise _corrupt(path, "a single array, not an archive")
    with archive:
        yield archive


def _string(archive, key: str) -> str | None:
    if key not in archive.files:
        return None
    try:
        value = archive[key][()]
    except Exception:  # noqa: BLE001 - unreadable: treated as absent, reported by the caller
        return None
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _is_pattern(archive) -> bool:
    return {"format", "shape"} <= set(archive.files) and _string(archive, "format") in (
        "csr",
        "csc",
        "coo",
        "bsr",
        "dia",
    )


def _check_version(path: Path, source, key: str) -> None:
    try:
        version = int(source[key][()] if hasattr(source, "files") else source[key])
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, error) from None
    if version > VERSION:
        raise JacketValueError(
            f"{str(path)!r} was written in version {version} of jacket's format; this jacket "
            f"reads up to version {VERSION}. Upgrade jacket."
        )


def _corrupt(path: Path, why) -> JacketValueError:
    text = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else str(why)
    return JacketValueError(
        f"cannot read {str(path)!r}: the file is corrupt or truncated ({text})."
    )
