"""`JacobianOperator`: the per-sample Jacobians of a model at a batch, as matrix-free operators.

Built on the public engine only: `op @ v` is `jacket.jvp`, `op.T @ u` is `jacket.vjp`, `op.to_dense()` is
`jacket.jacobian`. Nothing here builds `J` unless asked to.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from .checks import check_flag, check_model
from .engine import jacobian, jvp, vjp
from .errors import JacketTypeError, JacketValueError
from .trees import to_numpy

__all__ = ["JacobianOperator"]

# Tangents pushed in one call when a product takes several vectors per sample (`(batch, size, k)`): the
# batch is tiled `k` times, so one engine call computes them all. Bounds the tiled batch.
_MAX_TILED_ROWS = 2048


class JacobianOperator:
    """The per-sample Jacobians `J_b` of `model` at `x`, as linear operators that never build `J`.

    Args:
      model: A Keras model or layer with one input and one output, mapping `(batch, *in_shape)` to
        `(batch, *out_shape)` (or a callable doing so).
      x: Input of shape `(batch, *in_shape)` (NumPy array or backend tensor).
      training: Call the model in training mode (see `jacket.jacobian`).

    Products (results are tensors of the active Keras backend, like `jacket.jvp`):

    - `op @ v`: `v` of shape `(batch, *in_shape)` gives `(batch, *out_shape)`, `J_b v_b` (one JVP
      pass); a flattened `v`, `(batch, in_size)`, gives `(batch, out_size)` (where `in_shape` has
      several axes; for a flat `in_shape` the two forms are the same); `v` of shape
      `(batch, in_size, k)` gives `(batch, out_size, k)` (`k` vectors per sample, pushed together).
    - `op.T @ u`: the same with `J_b^T` (VJP passes): `(batch, *out_shape)` to `(batch, *in_shape)`,
      a flattened `(batch, out_size)` to `(batch, in_size)`, `(batch, out_size, k)` to
      `(batch, in_size, k)`.
    - `op.to_dense()`: `(batch, out_size, in_size)` (`jacket.jacobian(model, x, flatten=True)`).
    - `op.as_linear_operator(b)`: sample `b`'s `J_b` as a `scipy.sparse.linalg.LinearOperator`.

    Example:
      >>> op = jacket.JacobianOperator(model, x)          # x: (32, 8, 8, 1), 10 logits
      >>> op.shape
      (32, 10, 64)
      >>> Jv = op @ np.ones_like(x)                        # (32, 10)
      >>> s = scipy.sparse.linalg.svds(op.as_linear_operator(0), k=1, return_singular_vectors=False)
    """

    def __init__(self, model, x, *, training: bool = False):
        check_model("JacobianOperator", model)
        if isinstance(x, (list, tuple, dict)):
            raise JacketValueError(
                "JacobianOperator: `x` must be one array `(batch, *in_shape)`; models with several "
                f"inputs are not supported. Received: a {type(x).__name__} of inputs. Use "
                "`jacket.jvp` / `jacket.vjp` with structures instead."
            )
        check_flag("JacobianOperator", "training", training)
        if not keras.ops.is_tensor(x):
            x = np.asarray(x)
        shape = tuple(int(d) for d in x.shape)
        if len(shape) < 2:
            raise JacketValueError(
                "JacobianOperator: `x` must have a leading batch axis, shape `(batch, *in_shape)`. "
                f"Received: x.shape={shape}. For one sample, pass `x[None]`."
            )
        self.model = model
        self.x = x
        self.training = bool(training)
        self.batch = shape[0]
        self.in_shape = shape[1:]
        self.in_size = math.prod(self.in_shape)
        self._out: tuple | None = None  # (out_shape, dtype), from the first forward product
        self._caller = "JacobianOperator"  # the function named in errors (jacket.analysis sets it)

    # ------------------------------------------------------------------------------------ description

    @property
    def out_shape(self) -> tuple:
        """The model's output shape per sample."""
        return self._describe_output()[0]

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the products (the model's output dtype)."""
        return self._describe_output()[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(batch, out_size, in_size)`: a stack of `batch` matrices."""
        return (self.batch, self.out_size, self.in_size)

    @property
    def T(self) -> _Transposed:
        """The transposed operator: `op.T @ u` is `u_b^T J_b` per sample (VJPs)."""
        return _Transposed(self)

    def __repr__(self) -> str:
        out = self.out_shape if self._out is not None else "?"
        return (
            f"JacobianOperator({type(self.model).__name__}, batch={self.batch}, "
            f"in_shape={self.in_shape}, out_shape={out})"
        )

    # --------------------------------------------------------------------------------------- products

    def __matmul__(self, v):
        return self._product(v, transpose=False)

    def to_dense(self, *, flatten: bool = True):
        """The per-sample Jacobians: `(batch, out_size, in_size)`, or `(batch, *out_shape, *in_shape)`
        with `flatten=False` (a backend tensor, from `jacket.jacobian`)."""
        return jacobian(self.model, self.x, flatten=flatten, training=self.training)

    def as_linear_operator(self, b: int = 0):
        """Sample `b`'s Jacobian as a `scipy.sparse.linalg.LinearOperator` of shape
        `(out_size, in_size)`: `matvec` is one JVP, `rmatvec` one VJP, `matmat` pushes all columns
        together. NumPy in, NumPy out.

        Example:
          >>> A = op.as_linear_operator(3)
          >>> scipy.sparse.linalg.svds(A, k=2, return_singular_vectors=False)
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError:  # pragma: no cover - scipy comes with the test extra
            raise ImportError("as_linear_operator needs SciPy: pip install scipy") from None

        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
            raise JacketTypeError(
                f"as_linear_operator: `b` must be a sample index (int). Received: b={b!r}."
            )
        if not -self.batch <= b < self.batch:
            raise JacketValueError(
                f"as_linear_operator: `b` must be a sample index in [0, {self.batch}). "
                f"Received: b={b}."
            )
        b = int(b) % self.batch
        one = JacobianOperator(self.model, self.x[b : b + 1], training=self.training)
        if self._out is not None:
            one._out = self._out
        m, n = self.out_size, self.in_size

        def matmat(V):
            V = np.asarray(V).reshape(n, -1)
            out = to_numpy(one @ V[None].astype(self.dtype))
            return out.reshape(m, V.shape[1]).astype(self.dtype, copy=False)

        def rmatmat(U):
            U = np.asarray(U).reshape(m, -1)
            out = to_numpy(one.T @ U[None].astype(self.dtype))
            return out.reshape(n, U.shape[1]).astype(self.dtype, copy=False)

        return LinearOperator(
            (m, n),
            matvec=lambda v: matmat(v).reshape(m),
            rmatvec=lambda u: rmatmat(u).reshape(n),
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------------------------- internals

    def _describe_output(self) -> tuple:
        if self._out is None:
            # one forward product on a zero tangent: shapes and dtype of the output, and the
            # engine's compiled JVP for this signature, which later products reuse
            y = jvp(
                self.model, self.x, keras.ops.zeros_like(self._tensor()), training=self.training
            )
            if not keras.ops.is_tensor(y):
                raise JacketValueError(
                    f"{self._caller}: `model` must have one output tensor. Received: outputs of "
                    f"type {type(y).__name__}. Wrap the model so that it returns one tensor, e.g. "
                    "`keras.Model(model.inputs, model.outputs[0])`."
                )
            self._out = (
                tuple(int(d) for d in y.shape[1:]),
                np.dtype(keras.backend.standardize_dtype(y.dtype)),
            )
        return self._out

    def _tensor(self):
        return self.x if keras.ops.is_tensor(self.x) else keras.ops.convert_to_tensor(self.x)

    def _product(self, v, *, transpose: bool):
        name = "op.T @ u" if transpose else "op @ v"
        src_shape, src_size = (
            (self.out_shape, self.out_size) if transpose else (self.in_shape, self.in_size)
        )
        dst_shape, dst_size = (
            (self.in_shape, self.in_size) if transpose else (self.out_shape, self.out_size)
        )
        v = v if keras.ops.is_tensor(v) else keras.ops.convert_to_tensor(np.asarray(v))
        shape = tuple(int(d) for d in v.shape)
        B = self.batch
        if shape == (B,) + src_shape:
            return self._push(v, transpose)
        if shape == (B, src_size):
            out = self._push(keras.ops.reshape(v, (B,) + src_shape), transpose)
            return keras.ops.reshape(out, (B, dst_size))
        if len(shape) == 3 and shape[:2] == (B, src_size):
            k = shape[2]
            outs = []
            step = max(1, _MAX_TILED_ROWS // B)
            for start in range(0, k, step):
                cols = v[:, :, start : start + step]  # (B, src_size, c)
                c = int(cols.shape[2])
                # tile the batch c times: row j * B + b is sample b with column j
                x_tiled = keras.ops.tile(self._tensor(), (c,) + (1,) * len(self.in_shape))
                seeds = keras.ops.reshape(
                    keras.ops.transpose(cols, (2, 0, 1)), (c * B,) + src_shape
                )
                push = vjp if transpose else jvp
                out = push(self.model, x_tiled, seeds, training=self.training)
                out = keras.ops.reshape(out, (c, B, dst_size))
                outs.append(keras.ops.transpose(out, (1, 2, 0)))
            return outs[0] if len(outs) == 1 else keras.ops.concatenate(outs, axis=2)
        sym = "u" if transpose else "v"
        raise JacketValueError(
            f"{name}: `{sym}` must have shape {(B,) + src_shape}, {(B, src_size)} or "
            f"{(B, src_size)} + (k,) for k vectors per sample. Received: {sym}.shape={shape}."
        )

    def _push(self, v, transpose: bool):
        push = vjp if transpose else jvp
        return push(self.model, self.x, v, training=self.training)


class _Transposed:
    """`op.T`: products with `J_b^T` (VJPs)."""

    def __init__(self, op: JacobianOperator):
        self._op = op

    @property
    def T(self) -> JacobianOperator:
        return self._op

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self._op.batch, self._op.in_size, self._op.out_size)

    def __matmul__(self, u):
        return self._op._product(u, transpose=True)

    def to_dense(self):
        """`(batch, in_size, out_size)`: the transposed per-sample Jacobians."""
        return keras.ops.transpose(self._op.to_dense(), (0, 2, 1))

    def __repr__(self) -> str:
        return f"{self._op!r}.T"
