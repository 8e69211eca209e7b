"""Independent oracles for the tests: float64 central differences, and each framework's own Jacobian.

Nothing here calls jacket. Both oracles evaluate the model with Keras's float64-to-float32 demotion
lifted (`keras_float64`), so a float64 model is evaluated in float64 on every backend; the tests
themselves run jacket as users do, without it.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np


@contextlib.contextmanager
def keras_float64():
    """Keras keeps float64 on JAX and PyTorch while inside (its `result_type` maps float64 to
    float32 there, even for one float64 operand). The oracles' own switch, not jacket's."""
    from keras.src.backend.common import dtypes

    table = dtypes.BIT64_TO_BIT32_DTYPE
    saved = table["float64"]
    dict.__setitem__(table, "float64", "float64")
    try:
        yield
    finally:
        dict.__setitem__(table, "float64", saved)


def to_numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float64")))


def forward(model, x, training=False) -> np.ndarray:
    """The model on a NumPy batch, as float64 NumPy (float64 kept inside: `keras_float64`)."""
    with keras_float64():
        y = model(x, training=training) if isinstance(model, keras.Layer) else model(x)
    return to_numpy(y)


def central_differences(model, x: np.ndarray, *, eps: float = 1e-6, per_sample: bool = True):
    """Per-sample `(B, *out, *in)` (or full `(B, *out, B, *in)`) Jacobian by central differences.

    `x` is float64; every perturbation is one forward pass of the whole batch.
    """
    x = np.asarray(x, dtype=np.float64)
    B, in_shape = x.shape[0], x.shape[1:]
    n = int(np.prod(in_shape))
    y0 = forward(model, x)
    out_shape = y0.shape[1:]
    flat = x.reshape(B, n)
    if per_sample:
        # every column's +h and -h moves of every sample, evaluated 512 columns at a time
        J = np.zeros((B,) + out_shape + (n,))
        for start in range(0, n, 512):
            cols = np.arange(start, min(n, start + 512))
            h = eps * np.maximum(1.0, np.abs(flat[:, cols]))  # (B, c)
            moved = np.broadcast_to(flat, (2, len(cols), B, n)).copy()
            c_idx, b_idx = np.arange(len(cols))[:, None], np.arange(B)[None]
            moved[0, c_idx, b_idx, cols[:, None]] += h.T
            moved[1, c_idx, b_idx, cols[:, None]] -= h.T
            y = forward(model, moved.reshape((-1,) + in_shape)).reshape(
                (2, len(cols), B) + out_shape
            )
            d = (y[0] - y[1]) / (2 * h.T.reshape((len(cols), B) + (1,) * len(out_shape)))
            J[..., cols] = np.moveaxis(d, 0, -1)
        return J.reshape((B,) + out_shape + in_shape)
    J = np.zeros((B,) + out_shape + (B, n))
    for b in range(B):
        for j in range(n):
            h = eps * max(1.0, abs(flat[b, j]))
            up, down = flat.copy(), flat.copy()
            up[b, j] += h
            down[b, j] -= h
            d = forward(model, up.reshape(x.shape)) - forward(model, down.reshape(x.shape))
            J[..., b, j] = d / (2 * h)
    return J.reshape((B,) + out_shape + (B,) + in_shape)


def native_jacobian(model, x: np.ndarray) -> np.ndarray:
    """Per-sample Jacobian by the active framework's own machinery (single input and output), with
    float64 kept inside (`keras_float64`)."""
    with keras_float64():
        return _native_jacobian(model, x)


def _native_jacobian(model, x: np.ndarray) -> np.ndarray:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = model(xt, training=False)
        return to_numpy(tape.batch_jacobian(y, xt))
    if backend == "jax":
        import jax

        def one(xi):
            return model(xi[None], training=False)[0]

        # compiled: eager jacrev through a deep Keras graph takes tens of seconds
        return to_numpy(jax.jit(jax.vmap(jax.jacrev(one)))(keras.ops.convert_to_tensor(x)))
    import torch

    # torch.func.vmap fails through Keras's layers: the batch is replicated instead, one copy of
    # sample b per output k, and one backward of sum_k y[b, k, k] gives every row of every sample
    # (rows of different copies do not mix: a model in inference keeps samples apart)
    B, n_in = x.shape[0], int(np.prod(x.shape[1:]))
    y0 = model(torch.as_tensor(x[:1]), training=False)
    out_shape, n_out = tuple(y0.shape[1:]), int(np.prod(tuple(y0.shape[1:])))
    xt = torch.as_tensor(np.repeat(x, n_out, axis=0)).requires_grad_(True)  # (B * n_out, *in)
    y = model(xt, training=False).reshape(B, n_out, n_out)
    picked = torch.diagonal(y, dim1=1, dim2=2).sum()
    if not picked.requires_grad:  # every path from the input cut (stop_gradient): all zeros
        return np.zeros((B,) + out_shape + x.shape[1:])
    (grad,) = torch.autograd.grad(picked, xt, allow_unused=True)
    if grad is None:
        return np.zeros((B,) + out_shape + x.shape[1:])
    J = grad.detach().cpu().numpy().reshape((B, n_out, n_in))
    return J.reshape((B,) + out_shape + x.shape[1:])


def assert_close(actual, expected, *, rtol: float, atol: float = 0.0, scale: bool = True):
    """`|actual - expected| <= atol + rtol * max|expected|` (relative to the Jacobian's scale)."""
    if not isinstance(expected, (np.ndarray, float, int)):
        expected = to_numpy(expected)  # a backend tensor, perhaps on a GPU
    actual, expected = to_numpy(actual), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = atol + rtol * (np.abs(expected).max() if scale else np.abs(expected))
    error = np.abs(actual - expected)
    assert np.all(error <= bound), f"max error {error.max():.3g} > bound {np.max(bound):.3g}"
