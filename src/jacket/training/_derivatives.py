"""Input derivatives that are part of a loss: differentiable with respect to the weights.

NOTE: [Derivatives inside a training step]
`jacket.jacobian`, `jvp` and `vjp` compile kernels of their own that read the weights as constants
or arguments and never differentiate them: they are for inspection. A penalty on an input
derivative (Jacobian regularization, a gradient penalty, a PDE residual) must instead be a part
of the user's own traced step, so that the step's gradient with respect to the weights goes
through it. The functions here therefore compile nothing and cache nothing; they run, each time,
inside whatever the framework is tracing or recording, on the primitives of the `# ---- training`
section of each `jacket.backends` module:

- TensorFlow: a persistent `GradientTape` (and `ForwardAccumulator`) inside the step's own tape,
  which records the inner gradient as ordinary ops (nested tapes);
- JAX: `jax.vjp` and `jax.jvp` composed inside the traced step, closing over the traced weights
  that Keras's `StatelessScope` hands the model (`jax.value_and_grad` of a `jax.vjp`);
- PyTorch: `torch.autograd.grad(..., create_graph=True)`, so the derivative is itself a node of
  the graph that `loss.backward()` goes through.

They compose (a pullback of a pullback is a second derivative), and the second-order quantities
are written once on that: forward over forward where forward mode is native and nests under the
step's gradient (JAX: `TRAIN_FORWARD`), reverse over reverse on TensorFlow (whose nested
`ForwardAccumulator`s lose weight gradients under a tape) and PyTorch (whose JVP is itself two
reverse passes).

Per-sample derivatives come from the batch-sum trick (NOTE: [How the plan decides] in the
engine): one pass with the same seed for every sample gives every sample's derivative, which is
exact when samples do not interact. In training mode BatchNormalization mixes the samples of a
batch; a penalty then holds cross-sample terms as well (no probe runs inside a training step).

A Keras model is called statelessly on its current weights (those of the enclosing
`StatelessScope`, when there is one, as in a JAX step): BatchNormalization statistics and seed
generators are read, never changed, so a penalty never moves the model's state.
"""

from __future__ import annotations

import keras

from ..backends import current
from ..errors import JacketValueError
from ..trees import pack
from ._calls import (
    _along,
    _dtype,
    _flat_jacobian,
    _Function,
    _like_inputs,
    _like_outputs,
    _one_hot_seeds,
    _size,
    _squared_frobenius,
    check_projections,
)

__all__ = [
    "Derivatives",
    "derivatives",
    "hvp",
    "jacobian",
    "jvp",
    "laplacian",
    "squared_frobenius",
    "vjp",
]

ops = keras.ops


# ------------------------------------------------------------------------------------ public API


def vjp(model, x, u, *, training: bool = False):
    """Vector-Jacobian product `u^T J` per sample, differentiable with respect to the weights.

    Args:
      model: A Keras model or layer (called statelessly: its state never changes), or a callable
        mapping a batch to a batch.
      x: Input `(batch, *in_shape)` (or a structure of them), floating point.
      u: Cotangent with the structure and shapes of the model's output.
      training: Call the model in training mode.

    Returns:
      The structure of `x`: `out[b] = u[b] @ J_b`, a tensor of the active backend that the
      enclosing training step can differentiate.
    """
    fn = _Function("vjp", model, x, training)
    ys, pullback = current().train_linearize(fn, fn.xs)
    cts = _like_outputs("vjp", "u", u, fn, ys)
    return pack(fn.in_structure, pullback(cts))


def jvp(model, x, v, *, training: bool = False):
    """Jacobian-vector product `J v` per sample, differentiable with respect to the weights.

    Args:
      model, x, training: As in `jacket.training.vjp`.
      v: Tangent with the structure and shapes of `x`.

    Returns:
      The model's output structure: `out[b] = J_b @ v[b]`.
    """
    fn = _Function("jvp", model, x, training)
    vs = _like_inputs("jvp", "v", v, fn)
    _, tangents = current().train_jvp(fn, fn.xs, vs)
    return pack(fn.out_structure, tangents)


def jacobian(model, x, *, training: bool = False):
    """Per-sample Jacobian, differentiable with respect to the weights.

    Reverse mode (`out_size` pullbacks of one forward pass) unless the backend's forward mode is
    native and the inputs are fewer than the outputs.

    Args:
      model, training: As in `jacket.training.vjp`.
      x: Input `(batch, *in_shape)`: one input, one output.

    Returns:
      `(batch, *out_shape, *in_shape)`: `J[b, i..., j...] = d model(x)[b, i...] / d x[b, j...]`.
    """
    fn = _Function("jacobian", model, x, training, single=True)
    _, J = _flat_jacobian(fn, fn.xs)
    return ops.reshape(J, (-1,) + fn.out_shapes[0] + fn.in_shapes[0])


def squared_frobenius(model, x, *, n_projections: int | str = 1, seed=None, training: bool = False):
    """`||J_b||_F^2` per sample, estimated with random projections (Hoffman et al. 2019) or exact.

    With `k` projections, `||J_b||_F^2 ~ m / k * sum_p ||v_p^T J_b||^2`, `v_p` uniform on the unit
    sphere of the `m` outputs (unbiased: `E[v v^T] = I / m`): `k` pullbacks of one forward pass.
    `"exact"` sums the squares of the full Jacobian (`m` pullbacks, or `n` JVPs when the inputs
    are fewer and forward mode is native). Several inputs or outputs count together.

    Args:
      model, x, training: As in `jacket.training.vjp`.
      n_projections: A positive int, or "exact".
      seed: The projections' seed, as `keras.random.normal` takes it: an int, a
        `keras.random.SeedGenerator`, or None (Keras's global generator; inside a traced JAX step
        pass a generator or a key).

    Returns:
      `(batch,)`.

    Example:
      >>> sq = jacket.training.squared_frobenius(model, x, n_projections=1, seed=0)
      >>> penalty = 0.01 * keras.ops.mean(sq)     # inside the loss
    """
    n_projections = check_projections("squared_frobenius", n_projections)
    fn = _Function("squared_frobenius", model, x, training)
    return _squared_frobenius(fn, n_projections, seed)


def hvp(model, x, v, *, training: bool = False):
    """Hessian-vector product of each output, per sample, differentiable with respect to the weights.

    Args:
      model, training: As in `jacket.training.vjp`.
      x: Input `(batch, *in_shape)`: one input, one output.
      v: Direction `(batch, *in_shape)`.

    Returns:
      `(batch, *out_shape, *in_shape)`: `out[b, i...] = H_{b,i} v[b]`, `H_{b,i}` the Hessian of
      output `i` of sample `b` with respect to its input (for a scalar output per sample,
      `out_shape` is `(1,)` or `()`, as the model's).
    """
    fn = _Function("hvp", model, x, training, single=True)
    (vs,) = _like_inputs("hvp", "v", v, fn)
    n = _size(fn.in_shapes[0])
    flat_v = ops.reshape(vs, (-1, n))

    def directional(xs):  # (J(x) v)_i for each output i, v held fixed: (batch, m)
        _, J = _flat_jacobian(fn, xs)
        return [ops.einsum("bmn,bn->bm", J, flat_v)]

    _, H = _flat_jacobian(directional, fn.xs)
    return ops.reshape(H, (-1,) + fn.out_shapes[0] + fn.in_shapes[0])


def laplacian(model, x, *, training: bool = False):
    """Laplacian of each output with respect to the input, per sample, differentiable with respect
    to the weights: `sum_j d^2 y_i / d x_j^2`.

    Args:
      model, training: As in `jacket.training.vjp`.
      x: Input `(batch, *in_shape)`: one input, one output.

    Returns:
      `(batch, *out_shape)`.
    """
    return derivatives(model, x, training=training).laplacian


def derivatives(model, x, *, training: bool = False) -> Derivatives:
    """`u = model(x)` and its derivatives with respect to `x`, each computed on first use.

    Args:
      model, training: As in `jacket.training.vjp`.
      x: Points `(batch, *in_shape)`: one input, one output (`u` of shape `(batch, *out_shape)`).

    Returns:
      A `Derivatives`: `d.u`, `d.u_x`, `d.u_xx`, `d.laplacian`, `d.partial(0, 1)`.

    Example:
      >>> d = jacket.training.derivatives(net, x)        # x: (n, 1), u: (n, 1)
      >>> residual = -d.u_xx[:, 0, 0] - np.pi**2 * keras.ops.sin(np.pi * x[:, 0])
    """
    return Derivatives(_Function("derivatives", model, x, training, single=True))


class Derivatives:
    """`u = model(x)` at points `x` and its input derivatives, each computed once, on first use,
    differentiable with respect to the weights (`jacket.training.derivatives` makes one).

    Input coordinates are counted in the flattened input: for `x` of shape `(batch, n)`,
    coordinate `j` is `x[:, j]`.

    Attributes:
      x: The points, `(batch, *in_shape)`.
      u: `(batch, *out_shape)`.
      u_x: `(batch, *out_shape, *in_shape)`: `d u_i / d x_j`.
      u_xx: `(batch, *out_shape, *in_shape)`: `d^2 u_i / d x_j^2` (the Hessian's diagonal).
      laplacian: `(batch, *out_shape)`: `sum_j d^2 u_i / d x_j^2`.
    """

    def __init__(self, fn: _Function):
        self._fn = fn
        self.x = fn.xs[0]
        self._cache: dict = {}

    @property
    def u(self):
        if "u" not in self._cache:
            if current().TRAIN_FORWARD:
                self._cache["u"] = self._fn(self._fn.xs)[0]
            else:
                self._second_order()
        return self._cache["u"]

    @property
    def u_x(self):
        if "u_x" not in self._cache:
            self._second_order()
        return self._cache["u_x"]

    @property
    def u_xx(self):
        if "u_xx" not in self._cache:
            self._second_order()
        return self._cache["u_xx"]

    @property
    def laplacian(self):
        if "laplacian" not in self._cache:
            u_xx = self.u_xx
            m, n = _size(self._fn.out_shapes[0]), _size(self._fn.in_shapes[0])
            flat = ops.reshape(u_xx, (-1, m, n))
            self._cache["laplacian"] = ops.reshape(
                ops.sum(flat, axis=-1), (-1,) + self._fn.out_shapes[0]
            )
        return self._cache["laplacian"]

    def partial(self, *axes: int):
        """The mixed partial derivative `d^k u / d x_{axes[0]} ... d x_{axes[k-1]}`, `(batch,
        *out_shape)`: nested JVPs along each coordinate where forward mode is native, else nested
        reverse passes.

        Example:
          >>> d.partial(0, 1)        # d^2 u / dx_0 dx_1
        """
        n = _size(self._fn.in_shapes[0])
        if not axes or not all(
            isinstance(a, int) and not isinstance(a, bool) and 0 <= a < n for a in axes
        ):
            raise JacketValueError(
                f"Derivatives.partial: each axis must be an input coordinate, an int in [0, {n}) "
                f"(the flattened input has {n}). Received: axes={axes}. Pass one or more of them, "
                "e.g. `d.partial(0, 1)`."
            )
        key = ("partial",) + tuple(axes)
        if key not in self._cache:
            g = self._fn
            for axis in axes:
                g = _along(g, self.x, axis)
            self._cache[key] = g(self._fn.xs)[0]
        return self._cache[key]

    def _second_order(self):
        """`u`, `u_x` and `u_xx` together: forward over forward (one nested pass per input
        coordinate) where forward mode is native, else reverse over reverse (`m * n` pullbacks of
        the Jacobian's graph, whose forward pass also gives `u`)."""
        backend, fn = current(), self._fn
        in_shape = fn.in_shapes[0]
        n = _size(in_shape)
        x = fn.xs[0]
        if backend.TRAIN_FORWARD:
            out_shape = tuple(self.u.shape[1:])  # the call the nested passes share (CSE)
            m = _size(out_shape)
            (E,) = _one_hot_seeds([x], n)  # (n, batch, *in_shape)

            def along(ts):
                def first(xs):
                    ys, tangents = backend.train_jvp(fn, xs, ts)
                    return [ys[0], tangents[0]]

                (_, t), (_, tt) = backend.train_jvp(first, [x], ts)
                return [t, tt]

            t, tt = backend.train_map(along, [E])  # (n, batch, *out_shape) each
            u_x = ops.transpose(ops.reshape(t, (n, -1, m)), (1, 2, 0))
            u_xx = ops.transpose(ops.reshape(tt, (n, -1, m)), (1, 2, 0))
        else:

            def first(xs):
                ys, J = _flat_jacobian(fn, xs, reverse=True)
                return [ops.reshape(J, (-1, int(J.shape[1]) * n)), ys[0]]

            (G, u), pullback = backend.train_linearize(first, [x])  # G: (batch, m * n)
            out_shape = fn.out_shapes[0]
            m = _size(out_shape)
            self._cache["u"] = u
            (seeds,) = _one_hot_seeds([G], m * n)  # (m * n, batch, m * n)
            (rows,) = backend.train_map(lambda cts: pullback([cts[0], None]), [seeds])
            if n == 1:  # rows: (m, batch, 1), d/dx of each d u_i / dx
                u_xx = ops.transpose(rows, (1, 0, 2))
            else:  # (m * n, batch, n): the row of (i, j), keep its column j
                rows = ops.reshape(rows, (m, n, -1, n))
                mask = ops.eye(n, dtype=_dtype(rows))[None, :, None, :]
                u_xx = ops.transpose(ops.sum(rows * mask, axis=-1), (2, 0, 1))  # (batch, m, n)
            u_x = ops.reshape(G, (-1, m, n))
        shape = (-1,) + out_shape + in_shape
        self._cache["u_x"] = ops.reshape(u_x, shape)
        self._cache["u_xx"] = ops.reshape(u_xx, shape)
