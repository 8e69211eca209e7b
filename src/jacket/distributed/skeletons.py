"""Structures of arrays in a JSON form a manifest can hold: a skeleton (`{"dict": {...}}`,
`{"list": [...]}`, None for a leaf) and the paths of its leaves. The inputs of a dataset run, and the
output structure of its Jacobians, travel and are stored this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def to_skeleton(value, *, is_leaf: Callable) -> tuple[Any, list]:
    """`(skeleton, [(path, leaf), ...])`: a JSON form of a structure of dicts, lists and tuples
    (leaves replaced by None; dict keys in sorted order, as `keras.tree` flattens them)."""
    leaves: list = []

    def walk(node, path):
        if is_leaf(node):
            leaves.append((path, node))
            return None
        if isinstance(node, Mapping):
            for key in node:
                if not isinstance(key, str) or not key or "/" in key:
                    raise TypeError(
                        f"must use non-empty string names without '/'. Received: key {key!r}"
                    )
            return {"dict": {key: walk(node[key], path + (key,)) for key in sorted(node)}}
        if isinstance(node, (list, tuple)) and node:
            return {"list": [walk(item, path + (i,)) for i, item in enumerate(node)]}
        raise TypeError(
            "must be a NumPy or zarr array (or a zarr store path), or a list, tuple or dict of "
            f"them. Received: {type(node).__name__}. Pass np.asarray(...) or a zarr array"
        )

    return walk(value, ()), leaves


def flatten_skeleton(skeleton) -> list[tuple[tuple, None]]:
    """`[(path, None), ...]` of a skeleton's leaves, in flattening order."""
    return _skeleton_paths(skeleton, ())


def _skeleton_paths(skeleton, path) -> list:
    if skeleton is None:
        return [(path, None)]
    if "dict" in skeleton:
        return [
            item
            for key, child in skeleton["dict"].items()
            for item in _skeleton_paths(child, path + (key,))
        ]
    return [
        item
        for i, child in enumerate(skeleton["list"])
        for item in _skeleton_paths(child, path + (i,))
    ]


def unflatten(skeleton, leaves: list):
    """The structure `skeleton` (from `to_skeleton`) with `leaves` in flattening order."""
    leaves = iter(leaves)

    def build(node):
        if node is None:
            return next(leaves)
        if "dict" in node:
            return {key: build(child) for key, child in node["dict"].items()}
        return [build(child) for child in node["list"]]

    return build(skeleton)


def _matches(node, skeleton) -> bool:
    """Whether `node` has the structure `skeleton` with array leaves."""
    if skeleton is None:
        return not isinstance(node, (Mapping, list, tuple))
    if "dict" in skeleton:
        return (
            isinstance(node, Mapping)
            and set(node) == set(skeleton["dict"])
            and all(_matches(node[k], child) for k, child in skeleton["dict"].items())
        )
    return (
        isinstance(node, (list, tuple))
        and len(node) == len(skeleton["list"])
        and all(_matches(item, child) for item, child in zip(node, skeleton["list"]))
    )


def split(J, in_skeleton) -> tuple[Any, list]:
    """`(out_skeleton, leaves)` of a Jacobian structure (the model's outputs of its inputs): the
    output structure is what lies above the subtrees shaped like the inputs."""
    leaves: list = []

    def walk(node):
        if _matches(node, in_skeleton):
            leaves.extend(_unflatten_leaves(node, in_skeleton))
            return None
        if isinstance(node, Mapping):
            return {"dict": {key: walk(node[key]) for key in sorted(node)}}
        assert isinstance(node, (list, tuple)), type(node)
        return {"list": [walk(item) for item in node]}

    return walk(J), leaves


def _unflatten_leaves(node, skeleton) -> list:
    if skeleton is None:
        return [node]
    if "dict" in skeleton:
        return [
            leaf
            for key, child in skeleton["dict"].items()
            for leaf in _unflatten_leaves(node[key], child)
        ]
    return [
        leaf
        for item, child in zip(node, skeleton["list"])
        for leaf in _unflatten_leaves(item, child)
    ]


def path_label(path: tuple) -> str:
    """A path in a structure as one name, its parts joined with "." (`("score", 0)`: "score.0")."""
    return ".".join(str(part) for part in path)
