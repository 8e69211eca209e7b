"""`SparseJacobian`: the per-sample sparse Jacobians of a batch."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp


def entries(pattern: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each stored entry of a CSR pattern, in CSR order."""
    rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
    return rows, pattern.indices


class SparseJacobian:
    """Per-sample Jacobians of a batch that share one sparsity pattern.

    The pattern is one boolean CSR matrix `(out_size, in_size)` for every sample (inputs and outputs
    flattened, several of them concatenated in the order `keras.tree.flatten` gives); `values[b, k]`
    is the Jacobian of sample `b` at the pattern's `k`-th stored entry, in CSR order (row by row,
    columns sorted). Entries outside the pattern are zero.

    Attributes:
      pattern: `scipy.sparse.csr_array` of bool, `(out_size, in_size)`.
      values: NumPy array `(batch, nnz)` in the model's float dtype.
      in_shapes, out_shapes: per-sample shapes of the model's inputs and outputs (flat lists).
      mode: "forward" (columns compressed, JVPs), "reverse" (rows compressed, VJPs) or "dense".
      n_colors: compressed passes per chunk of the batch (columns or row colors).
      fallback: None, or why the Jacobian was computed densely (a pattern too dense to gain).

    Example:
      >>> S = jacket.jacobian(model, x, sparse=True)     # x: (batch, 32, 32, 1)
      >>> S.to_scipy(0)                                    # sample 0: (1024, 1024) CSR
      >>> J = S.to_dense()                                 # (batch, 32, 32, 1, 32, 32, 1)
    """

    def __init__(
        self,
        pattern: sp.csr_array,
        values: np.ndarray,
        in_shapes,
        out_shapes,
        *,
        mode: str,
        n_colors: int,
        fallback: str | None = None,
        flatten: bool = False,
    ):
        self.pattern = pattern
        self.values = values
        self.in_shapes = [tuple(s) for s in in_shapes]
        self.out_shapes = [tuple(s) for s in out_shapes]
        self.mode = mode
        self.n_colors = n_colors
        self.fallback = fallback
        self._flatten = flatten

    @property
    def batch(self) -> int:
        return self.values.shape[0]

    @property
    def nnz(self) -> int:
        """Stored entries per sample."""
        return self.pattern.nnz

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(batch, out_size, in_size)`."""
        return (self.batch,) + tuple(self.pattern.shape)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def density(self) -> float:
        """Stored entries over `out_size * in_size`."""
        return self.nnz / max(math.prod(self.pattern.shape), 1)

    @property
    def nbytes(self) -> int:
        """Bytes held: the values and the shared pattern's index arrays."""
        return self.values.nbytes + self.pattern.indices.nbytes + self.pattern.indptr.nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes the dense `(batch, out_size, in_size)` result of the same dtype takes."""
        return self.batch * math.prod(self.pattern.shape) * self.values.dtype.itemsize

    def to_scipy(self, b: int) -> sp.csr_array:
        """Sample `b`'s Jacobian as a `scipy.sparse.csr_array` `(out_size, in_size)`."""
        P = self.pattern
        return sp.csr_array((self.values[b], P.indices, P.indptr), shape=P.shape)

    def to_dense(self, flatten: bool | None = None) -> np.ndarray:
        """The dense NumPy Jacobian.

        Args:
          flatten: `(batch, out_size, in_size)` with True; `(batch, *out_shape, *in_shape)` with
            False (one input and one output only; several always give the flat form). Default: the
            `flatten` option of the call that made it.
        """
        flatten = self._flatten if flatten is None else flatten
        rows, cols = entries(self.pattern)
        dense = np.zeros(self.shape, dtype=self.values.dtype)
        dense[:, rows, cols] = self.values
        if flatten or len(self.in_shapes) != 1 or len(self.out_shapes) != 1:
            return dense
        return dense.reshape((self.batch,) + self.out_shapes[0] + self.in_shapes[0])

    def __repr__(self) -> str:
        return (
            f"SparseJacobian(batch={self.batch}, shape={self.pattern.shape}, nnz={self.nnz} "
            f"({self.density:.2%}), mode={self.mode!r}, n_colors={self.n_colors}"
            + (", dense fallback" if self.fallback else "")
            + ")"
        )
