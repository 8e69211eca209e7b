"""Structures of arrays: a single array, or a list/tuple/dict of them (nested), as Keras's `keras.tree`
sees them; flattening with labels for messages, packing back, and conversion to NumPy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np


def is_leaf_structure(value) -> bool:
    """True when `value` is a single array, not a list/tuple/dict of arrays."""
    return not isinstance(value, (Mapping, list, tuple))


def flatten_with_labels(structure, root: str) -> list[tuple[str, Any]]:
    if is_leaf_structure(structure):
        return [(root, structure)]
    return [
        (root + "".join(f"[{key!r}]" for key in path), leaf)
        for path, leaf in keras.tree.flatten_with_path(structure)
    ]


def pack(structure, flat):
    if is_leaf_structure(structure):
        (value,) = flat
        return value
    return keras.tree.pack_sequence_as(structure, list(flat))


def skeleton(structure):
    """The structure with every leaf replaced by None (kept without holding on to arrays)."""
    if is_leaf_structure(structure):
        return None
    return keras.tree.map_structure(lambda _: None, structure)


def to_numpy(t) -> np.ndarray:
    """A backend tensor (or anything array-like) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(t))


def map_to_numpy(structure):
    """Every leaf of a structure of tensors as a NumPy array, the structure kept."""
    return keras.tree.map_structure(to_numpy, structure)
