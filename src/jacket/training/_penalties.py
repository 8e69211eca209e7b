"""Penalties on input derivatives, added to a model's loss by `jacket.training.regularize`."""

from __future__ import annotations

import keras
import numpy as np

from ..checks import positive_float
from ..errors import JacketTypeError, JacketValueError
from ..trees import is_leaf_structure, pack, skeleton
from ._calls import _Function, _squared_frobenius, check_projections
from ._derivatives import Derivatives

__all__ = ["Contractive", "GradientPenalty", "JacobianNorm", "PDEResidual", "Penalty"]

ops = keras.ops
_NORM_EPS = 1e-12  # inside the square root of a gradient norm: a finite derivative at zero


@keras.saving.register_keras_serializable(package="jacket")
class Penalty:
    """A term `weight * value` added to the loss of the model `regularize` returns, and logged as
    a metric named `name` (the value before the weight).

    Subclass it for a penalty of your own: `value` receives the Keras model, the batch's inputs
    and targets, the step's `training` flag and a `keras.random.SeedGenerator`, and returns a
    scalar built with `jacket.training`'s functions (or any `keras.ops`), which the step then
    differentiates with respect to the weights.

    Example:
      >>> class OutputJacobian(jacket.training.Penalty):
      ...     def value(self, model, x, y, *, training, seed):
      ...         J = jacket.training.jacobian(model, x, training=training)
      ...         return keras.ops.mean(keras.ops.abs(J))
    """

    default_name = "penalty"

    def __init__(self, weight: float, *, name: str | None = None):
        cls = type(self).__name__
        self.weight = positive_float(cls, "weight", weight, allow_zero=True)
        if name is not None and (not isinstance(name, str) or not name.isidentifier()):
            raise JacketValueError(
                f"{cls}: `name` must be a metric name, a Python identifier. Received: "
                f"name={name!r}. Pass e.g. name='jacobian_norm'."
            )
        self.name = name or self.default_name

    def value(self, model, x, y, *, training: bool, seed):
        """The penalty's value on one batch, a scalar (before `weight`)."""
        raise NotImplementedError(f"{type(self).__name__} must define `value`.")

    def get_config(self) -> dict:
        return {"weight": self.weight, "name": self.name}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "points")
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="jacket")
class JacobianNorm(Penalty):
    """Jacobian regularization (Hoffman, Roberts and Yaida 2019): `weight * mean_b ||J_b||_F^2`,
    `J_b` the Jacobian of the model's outputs with respect to its inputs at sample `b`.

    With `n_projections=k`, `||J_b||_F^2` is estimated from `k` random projections
    (`jacket.training.squared_frobenius`): `k` extra backward passes, whatever the number of
    outputs. `"exact"` computes the full norm. The reference implementation
    (facebookresearch/jacobian_regularizer) adds `lambda_JR / 2` times the same estimate, so its
    `lambda_JR` is twice this `weight`. With `weight=0` the norm is only measured and logged.

    Args:
      weight: The penalty's factor in the loss (0 or more).
      n_projections: A positive int, or "exact".
      name: The metric's name.
    """

    default_name = "jacobian_norm"

    def __init__(self, weight: float, n_projections: int | str = 1, *, name: str | None = None):
        super().__init__(weight, name=name)
        self.n_projections = check_projections("JacobianNorm", n_projections)

    def value(self, model, x, y, *, training: bool, seed):
        fn = _Function(self.name, model, x, training)
        return ops.mean(_squared_frobenius(fn, self.n_projections, seed))

    def get_config(self) -> dict:
        return {**super().get_config(), "n_projections": self.n_projections}


@keras.saving.register_keras_serializable(package="jacket")
class GradientPenalty(Penalty):
    """The gradient penalty of WGAN-GP (Gulrajani et al. 2017): `weight * mean_b (||d f / d x||_b -
    target)^2`, the norm of each sample's input gradient (for several outputs, the Frobenius norm
    of its Jacobian), taken at the batch's inputs.

    With `interpolate=True` it is taken at `x_b + eps_b (x_p - x_b)` instead, `eps_b` uniform in
    `[0, 1]`, sample `b` joined to a partner `p` of the same batch: with targets, the batch sorted
    by target and paired first with last, second with second last, ..., so that a critic's batch
    of real (`y = -1`) and generated (`y = +1`) samples joins real to generated wherever it can,
    as WGAN-GP's interpolates do (a shuffled batch of 256 from equal halves: about 94% of them);
    without targets, each sample with the one before it.

    Args:
      weight: The penalty's factor in the loss (WGAN-GP: 10).
      target: The norm aimed at.
      interpolate: Take the penalty between pairs of samples instead of at the samples.
      name: The metric's name.
    """

    default_name = "gradient_penalty"

    def __init__(
        self,
        weight: float,
        target: float = 1.0,
        *,
        interpolate: bool = False,
        name: str | None = None,
    ):
        super().__init__(weight, name=name)
        self.target = positive_float("GradientPenalty", "target", target, allow_zero=True)
        if not isinstance(interpolate, bool):
            raise JacketTypeError(
                f"GradientPenalty: `interpolate` must be True or False. Received: "
                f"interpolate={interpolate!r}."
            )
        self.interpolate = interpolate

    def value(self, model, x, y, *, training: bool, seed):
        points = interpolates(x, y, seed) if self.interpolate else x
        fn = _Function(self.name, model, points, training)
        norm = ops.sqrt(_squared_frobenius(fn, "exact", None) + _NORM_EPS)
        return ops.mean(ops.square(norm - self.target))

    def get_config(self) -> dict:
        return {**super().get_config(), "target": self.target, "interpolate": self.interpolate}


@keras.saving.register_keras_serializable(package="jacket")
class Contractive(Penalty):
    """The contractive autoencoder's penalty (Rifai et al. 2011): `weight * mean_b ||J_b||_F^2`,
    `J_b` the Jacobian of the encoder's code with respect to the model's inputs.

    Args:
      weight: The penalty's factor in the loss.
      encoder: The encoder, a layer or model inside the regularized model that takes the model's
        inputs (or its name); None: the whole model.
      n_projections: "exact" (Rifai et al.), or a positive int to estimate the norm as
        `JacobianNorm` does.
      name: The metric's name.
    """

    default_name = "contractive"

    def __init__(
        self,
        weight: float,
        encoder=None,
        *,
        n_projections: int | str = "exact",
        name: str | None = None,
    ):
        super().__init__(weight, name=name)
        if encoder is not None and not isinstance(encoder, (str, keras.Layer)):
            raise JacketTypeError(
                "Contractive: `encoder` must be a Keras layer or model inside the regularized "
                f"model, or its name. Received: encoder of type {type(encoder).__name__}."
            )
        self.encoder = encoder
        self.n_projections = check_projections("Contractive", n_projections)

    def value(self, model, x, y, *, training: bool, seed):
        encoder = self._find(model)
        fn = _Function(self.name, encoder, x, training)
        return ops.mean(_squared_frobenius(fn, self.n_projections, seed))

    def _find(self, model):
        if self.encoder is None:
            return model
        if isinstance(self.encoder, keras.Layer):
            return self.encoder
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if layer.name == self.encoder:
                return layer
        raise JacketValueError(
            f"Contractive: the model has no layer named {self.encoder!r}. Received: "
            f"encoder={self.encoder!r}. Pass the encoder itself, or the name of a layer of "
            f"`{model.name}`."
        )

    def get_config(self) -> dict:
        encoder = self.encoder.name if isinstance(self.encoder, keras.Layer) else self.encoder
        return {**super().get_config(), "encoder": encoder, "n_projections": self.n_projections}


@keras.saving.register_keras_serializable(package="jacket")
class PDEResidual(Penalty):
    """A physics-informed penalty: `weight * mean(residual(x, d)^2)` over collocation points.

    `residual(x, d)` is your function of the points `x` (`(n, *in_shape)`) and of `d`, a
    `jacket.training.Derivatives` of the model there: `d.u`, `d.u_x`, `d.u_xx`, `d.laplacian`,
    `d.partial(...)`, each computed on first use and differentiable with respect to the weights.
    It returns the residual at each point (any shape).

    Args:
      residual: `(x, d) -> tensor`, written in `keras.ops`.
      points: The collocation points `(n, *in_shape)`, all of them used at every step (cast to
        the dtype of the batch's inputs); None: the batch's inputs.
      weight: The penalty's factor in the loss.
      name: The metric's name.

    Example:
      >>> def poisson(x, d):                        # -u'' = pi^2 sin(pi x)
      ...     return -d.u_xx[:, 0, 0] - np.pi**2 * keras.ops.sin(np.pi * x[:, 0])
      >>> pde = jacket.training.PDEResidual(poisson, points=np.linspace(0, 1, 16)[:, None])
    """

    default_name = "pde_residual"

    def __init__(self, residual, *, points=None, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name=name)
        if not callable(residual):
            raise JacketTypeError(
                "PDEResidual: `residual` must be a function `(x, d) -> residual`. Received: "
                f"residual of type {type(residual).__name__}."
            )
        self.residual = residual
        if points is not None:
            points = np.asarray(points)
            if points.ndim < 2 or not np.issubdtype(points.dtype, np.floating):
                raise JacketValueError(
                    "PDEResidual: `points` must be a float array of collocation points, shape "
                    f"`(n, *in_shape)`. Received: points of shape {points.shape} and dtype "
                    f"{points.dtype}. For 1-D points pass `points[:, None]`."
                )
        self.points = points

    def value(self, model, x, y, *, training: bool, seed):
        points = x
        if self.points is not None:
            points = ops.convert_to_tensor(self.points, dtype=_data_dtype(x))
        d = Derivatives(_Function(self.name, model, points, training, single=True))
        return ops.mean(ops.square(self.residual(d.x, d)))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "residual": keras.saving.serialize_keras_object(self.residual),
            "points": None if self.points is None else self.points.tolist(),
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["residual"] = keras.saving.deserialize_keras_object(config["residual"])
        return cls(**config)


def interpolates(x, y, seed):
    """`x_b + eps_b (x_pair(b) - x_b)` for every leaf of `x`, `eps_b` uniform in `[0, 1]` (the same
    for all leaves of a sample). With targets `y`, the samples sorted by their (first) target are
    paired first with last, second with second last, ...: a sample with another target wherever
    the batch has one. Without, each sample with the one before it."""
    flat = [x] if is_leaf_structure(x) else keras.tree.flatten(x)
    flat = [t if ops.is_tensor(t) else ops.convert_to_tensor(t) for t in flat]
    first = flat[0]
    eps = keras.random.uniform(
        ops.shape(first)[:1], dtype=keras.backend.standardize_dtype(first.dtype), seed=seed
    )
    targets = None if y is None else ([y] if is_leaf_structure(y) else keras.tree.flatten(y))
    if targets:
        key = ops.reshape(ops.convert_to_tensor(targets[0]), (ops.shape(first)[0], -1))[:, 0]
        order = ops.argsort(key)
        position = ops.argsort(order)  # of each sample, in the sorted batch
        partner = ops.take(ops.flip(order, 0), position, axis=0)  # at the mirror position
    out = []
    for t in flat:
        other = ops.roll(t, 1, axis=0) if not targets else ops.take(t, partner, axis=0)
        e = ops.reshape(ops.cast(eps, t.dtype), (-1,) + (1,) * (len(t.shape) - 1))
        out.append(t + e * (other - t))
    return pack(skeleton(x), out)


def _data_dtype(x) -> str:
    """The dtype of the batch's (first floating) inputs, else Keras's float type."""
    flat = [x] if is_leaf_structure(x) else keras.tree.flatten(x)
    for leaf in flat:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None:
            name = keras.backend.standardize_dtype(dtype)
            if name.startswith(("float", "bfloat")):
                return name
    return keras.backend.floatx()
