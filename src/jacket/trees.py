"""Structures of arrays: a single array, or a list/tuple/dict of them (nested), as Keras's `keras.tree`
sees them; flattening with labels for messages, packing back, mapping, conversion to NumPy, and the
blocks of a Jacobian assembled into one matrix.

Keras is imported on first use, not with this module: the command line and the driver of a Dask run
import it without choosing (or needing) a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def is_leaf_structure(value) -> bool:
    """True when `value` is a single array, not a list/tuple/dict of arrays."""
    if value is None or type(value) in _CONTAINERS:  # (the common cases, without ABC checks)
        return value is None
    return not isinstance(value, (Mapping, list, tuple))


_CONTAINERS = frozenset((list, tuple, dict))


def flatten_with_labels(structure, root: str) -> list[tuple[str, Any]]:
    """`[(label, leaf), ...]` in `keras.tree.flatten` order; labels like `x['a'][0]` for messages."""
    if is_leaf_structure(structure):
        return [(root, structure)]
    import keras

    return [
        (root + "".join(f"[{key!r}]" for key in path), leaf)
        for path, leaf in keras.tree.flatten_with_path(structure)
    ]


def pack(structure, flat):
    if is_leaf_structure(structure):
        (value,) = flat
        return value
    import keras

    return keras.tree.pack_sequence_as(structure, list(flat))


def skeleton(structure):
    """The structure with every leaf replaced by None (kept without holding on to arrays)."""
    if is_leaf_structure(structure):
        return None
    import keras

    return keras.tree.map_structure(lambda _: None, structure)


def map_structure(fn: Callable, structure):
    """`fn` applied to every leaf, the structure (and a dict's order) kept."""
    if is_leaf_structure(structure):
        return fn(structure)
    import keras

    return keras.tree.map_structure(fn, structure)


def to_numpy(t) -> np.ndarray:
    """A backend tensor (or anything array-like) as a NumPy array."""
    import keras

    return np.asarray(keras.ops.convert_to_numpy(t))


def map_to_numpy(structure):
    """Every leaf of a structure of tensors as a NumPy array, the structure kept."""
    return map_structure(to_numpy, structure)


def flat_matrix(blocks: Sequence[np.ndarray], n_inputs: int) -> np.ndarray:
    """Flattened Jacobian blocks -> one matrix `(batch, out_size, in_size)`.

    Args:
      blocks: `(batch, out_size_k, in_size_j)` arrays in `keras.tree.flatten` order of a Jacobian
        (output-major: every input's block of the first output, then of the second, ...).
      n_inputs: How many inputs (blocks per output).

    Returns:
      The rows of all outputs and the columns of all inputs, each concatenated in that order.
    """
    rows = [blocks[k : k + n_inputs] for k in range(0, len(blocks), n_inputs)]
    return np.concatenate([np.concatenate(list(row), axis=2) for row in rows], axis=1)
