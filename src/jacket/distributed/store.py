"""The zarr store of a dataset run: its arrays, and a manifest that makes the run resumable.

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
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import JacketTypeError, JacketValueError
from .skeletons import flatten_skeleton, unflatten

if TYPE_CHECKING:
    from .job import Job
    from .source import Piece

MANIFEST_KEY = "jacket"


def store_path(fn: str, out) -> Path:
    """`out` as the resolved path of a local zarr store, checked."""
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


def open_store(fn: str, store: Path, identity: dict, overwrite: bool):
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


def new_manifest(job: Job, identity: dict, layout: dict) -> dict:
    """The manifest of a fresh store (see NOTE: [Resuming a dataset run])."""
    from .. import __version__

    return {
        "identity": identity,
        "model_path": job.model_path,
        "jacket_version": __version__,
        "layout": layout,
        "chunks": {"count": job.n_chunks, "finished": []},
        "runs": [],
    }


def create_store(store: Path, manifest: dict):
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
    create_arrays(store, layout)
    return root


def create_arrays(store: Path, layout: dict) -> None:
    """The arrays of `layout` the store does not hold yet (NaN until written)."""
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


def write_blocks(store: Path | str, layout: dict, piece: Piece, blocks: list) -> None:
    """One chunk's blocks into their arrays (chunk data only: what a worker writes)."""
    import zarr

    for spec, block in zip(layout["arrays"], blocks):
        if spec["path"]:
            array = zarr.open_array(str(store), path=spec["path"], mode="r+")
        else:
            array = zarr.open_array(str(store), mode="r+")
        array[piece.start : piece.stop] = block.astype(spec["dtype"], copy=False)


def open_result(store: Path, layout: dict):
    """The stored arrays, read-only, in the output structure of the input structure."""
    import zarr

    arrays = []
    for spec in layout["arrays"]:
        if spec["path"]:
            arrays.append(zarr.open_array(str(store), path=spec["path"], mode="r"))
        else:
            arrays.append(zarr.open_array(str(store), mode="r"))
    per_output = []
    n_in = len(flatten_skeleton(layout["in_skeleton"]))
    for k in range(0, len(arrays), n_in):
        per_output.append(unflatten(layout["in_skeleton"], arrays[k : k + n_in]))
    return unflatten(layout["out_skeleton"], per_output)


class Tracker:
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
