"""A dataset run's `Job`: what every task needs, small and picklable (paths, options, the inputs'
structure; never the model, the samples of other chunks or a result), and the options it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import positive_int
from ..errors import JacketTypeError, JacketValueError
from .source import Piece, Source, model_file

FORMAT = "jacket.jacobian_dataset/1"
# The options of `jacket.jacobian_fn` a dataset run passes on, with their defaults (a test checks them
# against `jacket.jacobian_fn`'s signature). `per_sample` stays True: chunks hold per-sample blocks.
OPTION_DEFAULTS: dict[str, Any] = {
    "mode": "auto",
    "chunk_size": None,
    "flatten": False,
    "training": False,
    "memory_budget": None,
    "strategy": "auto",
}


@dataclass
class Job:
    """What every task of a run needs: small and picklable (paths, options, no model, no result)."""

    fn: str
    kind: str  # "jacobian", "sensitivity" or "norms"
    model_path: str
    model_sha256: str
    options: dict
    batch_size: int
    source: Source  # stays with the driver (see `__getstate__`)
    n: int
    in_skeleton: Any
    backend: str | None = None
    store: str | None = None
    layout: dict | None = None

    @classmethod
    def prepare(cls, fn, model_path, inputs, batch_size, options, *, kind) -> Job:
        path, sha256 = model_file(fn, model_path)
        source = Source.open(fn, inputs)
        batch_size = positive_int(fn, "batch_size", batch_size)
        options = check_options(fn, options, kind)
        return cls(
            fn, kind, str(path), sha256, options, batch_size, source, source.n, source.skeleton
        )

    def piece(self, index: int) -> Piece:
        """Chunk `index`'s samples: the NumPy data itself, or the zarr arrays to read them from."""
        start = index * self.batch_size
        stop = min(self.n, start + self.batch_size)
        arrays = self.source.arrays
        if all(isinstance(array, np.ndarray) for array in arrays):
            return Piece(start, stop, self.in_skeleton, data=[a[start:stop] for a in arrays])
        return Piece(start, stop, self.in_skeleton, arrays=arrays)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.batch_size)

    def identity(self) -> dict:
        """What must match for a stored run to be resumed (see NOTE: [Resuming a dataset run])."""
        return {
            "format": FORMAT,
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "options": self.options,
            "batch_size": self.batch_size,
            "inputs": self.source.describe(),
        }

    def __getstate__(self):  # the tasks carry their own piece of the inputs, not all of them
        state = dict(self.__dict__)
        state["source"] = None
        return state


def check_options(fn: str, options: dict, kind: str) -> dict:
    """The options of `jacket.jacobian` a run passes on (a reduction: all but `flatten`), with
    their defaults, as the plain values a manifest stores."""
    allowed = dict(OPTION_DEFAULTS)
    if kind != "jacobian":
        del allowed["flatten"]  # reductions see flattened blocks
    checked = dict(allowed)
    for name, value in options.items():
        if name == "per_sample":
            if value is not True:
                raise JacketValueError(
                    f"{fn}: chunks hold per-sample Jacobians, so `per_sample` must stay True. "
                    f"Received: per_sample={value!r}. For the full cross-sample Jacobian of a "
                    "batch, call jacket.jacobian(model, x, per_sample=False)."
                )
            continue
        if name not in allowed:
            raise JacketTypeError(
                f"{fn}: unknown option `{name}`. Received: {name}={value!r}. Options: "
                f"{', '.join(allowed)} (those of jacket.jacobian)."
            )
        if isinstance(value, np.bool_):
            value = bool(value)
        elif isinstance(value, np.integer):
            value = int(value)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise JacketTypeError(
                f"{fn}: option `{name}` must be a plain value (None, a bool, a number or a "
                f"string). Received: {name}={value!r}."
            )
        checked[name] = value
    return checked
