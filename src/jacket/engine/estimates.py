"""Hutchinson's estimates of traces: `mean_s v_s^T A v_s` over Rademacher vectors `v_s` (each
sample its own), with the standard error of that mean, for the Laplacian (`A` each output's
Hessian: `n_samples` HVPs per output whatever the input width) and the divergence (`A` the
Jacobian: `n_samples` JVPs or VJPs). `E[v v^T] = I` makes them unbiased (NOTE: [Which Laplacian],
NOTE: [Which divergence]).

The random vectors are drawn with NumPy from `seed` (the same draws on every backend), so a result
is reproducible and the three backends agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import numpy as np

from ..checks import positive_int
from ..errors import JacketTypeError, JacketValueError
from ..trees import pack
from . import kernels, probes
from .hessian import (
    first_strategy,
    jvp_form,
    outer_mode,
    pair_chunk,
    second_order_kernel,
    strategy_for,
)
from .hessian_kernels import one_hot, push_hvps
from .inputs import Inputs, numpy_dtype, result_dtype
from .kernels import push_seeds
from .measured import to_numpy
from .memory import default_memory_budget
from .state import Entry, ModelState

__all__ = ["Estimate", "hutchinson"]

ops = keras.ops
DEFAULT_SAMPLES = 32


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error, each `(batch, *out_shape)` (the model's output
    structure for `laplacian`)."""

    value: object
    stderr: object


def samples_option(fn_name: str, used: bool, n_samples) -> int:
    if n_samples is None:
        return DEFAULT_SAMPLES
    value = positive_int(fn_name, "n_samples", n_samples)
    if value < 2:
        raise JacketValueError(
            f"{fn_name}: `n_samples` must be at least 2, so that the estimate has a standard "
            f"error. Received: n_samples={value}."
        )
    if not used:
        raise JacketValueError(
            f"{fn_name}: `n_samples` is the number of random vectors of method='hutchinson'. "
            f"Received: n_samples={value} with an exact method. Pass method='hutchinson', or "
            "leave n_samples out."
        )
    return value


def seed_option(fn_name: str, seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise JacketTypeError(
            f"{fn_name}: `seed` must be a non-negative integer. Received: seed={seed!r}."
        )
    return int(seed)


def unflat(flat, entry: Entry):
    """`(B, out_size)` -> the model's output structure of `(B, *out_shape)`."""
    return pack(entry.y_structure, kernels.split(flat, (flat.shape[0],), entry.out_leaves))


def hutchinson(state: ModelState, inputs: Inputs, entry: Entry, samples: int, seed: int, order):
    """`(value, stderr)`, each `(B, out_size)` (`(B, 1)` for the divergence, `order=1`): the mean
    of `v^T H_i v` (or `v^T J v`) over Rademacher vectors, and its standard error."""
    B, n = inputs.batch, sum(leaf.size for leaf in inputs.leaves)
    m = entry.out_size if order == 2 else 1
    dtype = result_dtype(inputs.leaves + entry.out_leaves)
    if order == 2:
        mode, method = outer_mode(state, "laplacian", inputs, entry, "auto")
        strategy = strategy_for(state, "laplacian", inputs)
        chunk = pair_chunk(inputs, entry, samples, strategy, default_memory_budget())
    else:
        method = probes.forward_method(state, "divergence", inputs, entry)
        mode = "forward" if method is not None else "reverse"
        strategy = first_strategy(state, inputs, entry)
        chunk = min(samples, pair_chunk(inputs, entry, samples, strategy, default_memory_budget()))
    args = (state.backend, strategy, mode, jvp_form(state, method), inputs.structure)
    kernel = second_order_kernel(
        state,
        ("hutchinson", order, inputs.signature, mode, method, strategy, chunk),
        lambda: _probe_kernel(*args, inputs.leaves, entry.out_leaves, B, chunk, order),
    )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, 2, size=(samples, B, n), dtype=np.int8) * 2 - 1
    values = np.empty((samples, B, m))
    for start in range(0, samples, chunk):
        V = draws[start : start + chunk]
        count = len(V)
        if count < chunk:  # the last pass: padded with zero vectors, left out below
            V = np.concatenate([V, np.zeros((chunk - count, B, n), V.dtype)])
        V = ops.convert_to_tensor(V.astype(numpy_dtype(dtype)), dtype=dtype)
        for i in range(m):
            index = i if state.backend.EAGER else ops.convert_to_tensor(i, dtype="int32")
            q = to_numpy(kernel(inputs.tensors, index, V))  # (chunk, B)
            values[start : start + count, :, i] = q[:count]
    mean = values.mean(axis=0)
    stderr = values.std(axis=0, ddof=1) / math.sqrt(samples)
    np_dtype = numpy_dtype(dtype)
    return (
        ops.convert_to_tensor(mean.astype(np_dtype), dtype=dtype),
        ops.convert_to_tensor(stderr.astype(np_dtype), dtype=dtype),
    )


def _probe_kernel(backend, strategy, mode, jvp, in_structure, in_leaves, out_leaves, B, k, order):
    """`kernel(call, xs, i, V) -> (k, B)`: `v^T H_i v` (`order=2`) or `v^T J v` (`order=1`) for
    the `k` vectors `V`, `(k, B, in_size)`."""
    m = sum(leaf.size for leaf in out_leaves)
    dtype = result_dtype(in_leaves + out_leaves)

    def kernel(call, xs, i, V):
        xs, f, tiled = kernels.functions(call, in_structure, xs, len(in_leaves))
        ts = kernels.split(V, (k, B), in_leaves)
        if order == 2:
            U = ops.broadcast_to(one_hot(i, m, dtype)[None], (B, m))
            us = kernels.split(U, (B,), out_leaves)
            outs = push_hvps(backend, strategy, mode, jvp, f, xs, us, ts, k, B, tiled)
        else:
            outs = push_seeds(backend, strategy, mode, jvp, f, xs, ts, k, B, tiled)
        block = kernels.flat(outs, (k, B), in_leaves, dtype)
        return ops.sum(block * V, axis=-1)

    return kernel
