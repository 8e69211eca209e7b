"""Dependency sets (`_Dep`) and their algebra: the rows of a boolean sparse matrix saying which model
inputs each element of a tensor may depend on (NOTE: [How the pattern is propagated] in `_detect`),
and the one-dimensional windows the layer rules combine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import scipy.sparse as sp

# ------------------------------------------------------------------------------------ dependency sets


@dataclass
class _Dep:
    """The dependency rows of one tensor (per sample): element `(s, c)` (`s` the flat index over
    all axes but the last, `c` the last axis) depends on the columns of row `s * G + groups[c]`."""

    shape: tuple[int, ...]
    matrix: sp.csr_array  # bool, (S * G, n_in)
    groups: np.ndarray  # int, (C,): channel -> row group

    @property
    def spatial(self) -> int:
        return math.prod(self.shape[:-1]) if self.shape else 1

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_groups(self) -> int:
        return self.matrix.shape[0] // max(self.spatial, 1)

    @property
    def n_in(self) -> int:
        return self.matrix.shape[1]


def _csr(matrix) -> sp.csr_array:
    out = sp.csr_array(matrix, dtype=bool)
    out.sum_duplicates()
    return out


def _rows_to_csr(rows, cols, shape) -> sp.csr_array:
    data = np.ones(len(rows), dtype=bool)
    return _csr(sp.coo_array((data, (np.asarray(rows), np.asarray(cols))), shape=shape))


def _identity(n: int) -> sp.csr_array:
    return sp.eye_array(n, dtype=bool, format="csr")


def _per_element(shape, matrix) -> _Dep:
    channels = shape[-1] if shape else 1
    return _Dep(tuple(shape), _csr(matrix), np.arange(channels))


def _expand(dep: _Dep) -> sp.csr_array:
    """One row per element, `(size, n_in)`, in row-major order of `dep.shape`."""
    G = dep.n_groups
    if G == dep.channels and np.array_equal(dep.groups, np.arange(G)):
        return dep.matrix
    rows = (np.arange(dep.spatial)[:, None] * G + dep.groups[None, :]).ravel()
    return dep.matrix[rows]


def _union(dep: _Dep) -> sp.csr_array:
    """`(1, n_in)`: every column any element depends on."""
    ones = sp.csr_array(np.ones((1, dep.matrix.shape[0]), dtype=bool))
    return _csr(ones @ dep.matrix)


def _broadcast_rows(row: sp.csr_array, shape) -> _Dep:
    """Every element of a tensor of `shape` depends on the columns of `row` (one shared group)."""
    spatial = math.prod(shape[:-1]) if shape else 1
    channels = shape[-1] if shape else 1
    matrix = _csr(sp.kron(sp.csr_array(np.ones((spatial, 1), dtype=bool)), row))
    return _Dep(tuple(shape), matrix, np.zeros(channels, dtype=np.int64))


def _separable(dep: _Dep, P, Cm, out_shape) -> _Dep:
    """A layer whose output pixel `p` reads input pixels `P[p]` and output channel `c` reads input
    channels `Cm[c]` (P: `(S_out, S_in)` sparse or None for the identity; Cm: `(C_out, C_in)` bool
    or None for the identity)."""
    G = dep.n_groups
    if Cm is None:
        groups, Gm = dep.groups, _identity(G)
    else:
        onehot = np.zeros((dep.channels, G), dtype=bool)
        onehot[np.arange(dep.channels), dep.groups] = True
        by_group = (np.asarray(Cm, dtype=np.int64) @ onehot) > 0  # (C_out, G)
        unique, groups = np.unique(by_group, axis=0, return_inverse=True)
        Gm = _csr(unique)
        groups = groups.ravel()
    if P is None:
        if dep.spatial != (math.prod(out_shape[:-1]) if out_shape else 1):
            raise ValueError("the pixel grid changed without a pixel map")
        P = _identity(dep.spatial)
    operator = _csr(sp.kron(_csr(P), Gm))
    return _Dep(tuple(out_shape), _csr(operator @ dep.matrix), np.asarray(groups))


def _gather(dep: _Dep, index: np.ndarray, out_shape) -> _Dep:
    """Output element `k` is input element `index[k]` (or depends on nothing where `index < 0`)."""
    index = np.asarray(index).ravel()
    keep = np.flatnonzero(index >= 0)
    size = math.prod(dep.shape)
    select = _rows_to_csr(keep, index[keep], (len(index), size))
    return _per_element(out_shape, select @ _expand(dep))


def _merge(deps: list[_Dep], out_shape) -> _Dep:
    """Elementwise n-ary op (Add, Multiply, ...): each output element unites its inputs' rows."""
    if all(d.shape == tuple(out_shape) for d in deps):
        pairs = np.stack([d.groups for d in deps], axis=1)  # (C, n)
        unique, groups = np.unique(pairs, axis=0, return_inverse=True)
        S = math.prod(out_shape[:-1]) if out_shape else 1
        total = None
        for k, d in enumerate(deps):
            rows = (np.arange(S)[:, None] * d.n_groups + unique[None, :, k]).ravel()
            part = d.matrix[rows]
            total = part if total is None else total + part
        return _Dep(tuple(out_shape), _csr(total), np.asarray(groups).ravel())
    total = None
    for d in deps:  # broadcasting: each input's element index, broadcast to the output's shape
        shape = (1,) * (len(out_shape) - len(d.shape)) + tuple(d.shape)
        index = np.broadcast_to(np.arange(math.prod(d.shape)).reshape(shape), out_shape)
        part = _expand(_gather(d, index, out_shape))
        total = part if total is None else total + part
    return _per_element(out_shape, total)


def _concatenate(deps: list[_Dep], axis: int, out_shape) -> _Dep:
    rank = len(out_shape)
    if axis == rank - 1:
        S = math.prod(out_shape[:-1])
        blocks, offset, groups = [], 0, []
        for d in deps:
            G = d.n_groups
            blocks.append(np.arange(S)[:, None] * G + np.arange(G)[None, :] + offset)
            groups.append(d.groups + sum(g.n_groups for g in deps[: len(groups)]))
            offset += d.matrix.shape[0]
        rows = np.concatenate(blocks, axis=1).ravel()
        stacked = sp.vstack([d.matrix for d in deps], format="csr")
        return _Dep(tuple(out_shape), _csr(stacked[rows]), np.concatenate(groups))
    ids, offset = [], 0
    for d in deps:
        size = math.prod(d.shape)
        ids.append(np.arange(offset, offset + size).reshape(d.shape))
        offset += size
    index = np.concatenate(ids, axis=axis).ravel()
    stacked = sp.vstack([_expand(d) for d in deps], format="csr")
    return _per_element(out_shape, stacked[index])


def _reshape(dep: _Dep, out_shape) -> _Dep:
    out_shape = tuple(out_shape)
    if out_shape and dep.shape and out_shape[-1] == dep.channels:
        return _Dep(out_shape, dep.matrix, dep.groups)  # the last axis kept: the same rows
    return _per_element(out_shape, _expand(dep))


def _transpose(dep: _Dep, perm) -> _Dep:
    ids = np.arange(math.prod(dep.shape)).reshape(dep.shape)
    moved = np.transpose(ids, perm)
    return _gather(dep, moved.ravel(), moved.shape)


def _mix_all(deps: list[_Dep], out_shapes) -> list[_Dep]:
    """The conservative rule: every output element depends on every input of the layer."""
    row = None
    for d in deps:
        u = _union(d)
        row = u if row is None else _csr(row + u)
    return [_broadcast_rows(row, shape) for shape in out_shapes]


# ---------------------------------------------------------------------------------- 1-D windows


def _window(n_in: int, n_out: int, k: int, stride: int, dilation: int, padding: str):
    """`(n_out, n_in)`: output position `o` reads `o * stride - before + j * dilation`, `j < k`
    (Keras's padding: "same" pads `total // 2` before, as TensorFlow, JAX and Keras's PyTorch
    backend all do)."""
    span = (k - 1) * dilation + 1
    if padding == "valid":
        before, expected = 0, max((n_in - span) // stride + 1, 0)
    elif padding == "same":
        expected = -(-n_in // stride)
        before = max((expected - 1) * stride + span - n_in, 0) // 2
    elif padding == "causal":
        before, expected = span - 1, (n_in - 1) // stride + 1
    else:
        raise ValueError(f"unknown padding {padding!r}")
    if expected != n_out:
        raise ValueError(f"window output {expected} != layer output {n_out}")
    o = np.arange(n_out)[:, None]
    i = o * stride - before + np.arange(k)[None, :] * dilation
    o = np.broadcast_to(o, i.shape)
    inside = (i >= 0) & (i < n_in)
    return _rows_to_csr(o[inside], i[inside], (n_out, n_in))


def _shift(n_in: int, n_out: int, before: int):
    """`(n_out, n_in)`: output `o` is input `o - before` (padding: before > 0; cropping: < 0)."""
    o = np.arange(n_out)
    i = o - before
    inside = (i >= 0) & (i < n_in)
    return _rows_to_csr(o[inside], i[inside], (n_out, n_in))


def _repeat(n_in: int, n_out: int, size: int):
    o = np.arange(n_out)
    return _rows_to_csr(o, o // size, (n_out, n_in))


def _probe_1d(n_in: int, n_out: int, fn):
    """`(n_out, n_in)` from running a 1-D op on the one-hot batch `(n_in, n_in, 1)`: exact for ops
    whose weights are all nonzero where they act (all-ones kernels, interpolation weights)."""
    onehot = keras.ops.convert_to_tensor(np.eye(n_in, dtype="float32")[:, :, None])
    out = np.asarray(keras.ops.convert_to_numpy(fn(onehot)))
    out = out.reshape(n_in, -1)
    if out.shape[1] != n_out:
        raise ValueError(f"probe output {out.shape[1]} != layer output {n_out}")
    return _csr(out.T != 0)


def _kron_all(factors):
    out = None
    for factor in factors:
        out = factor if out is None else _csr(sp.kron(out, factor))
    return out if out is not None else _identity(1)
