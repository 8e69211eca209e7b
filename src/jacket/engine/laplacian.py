"""Traces of second and first derivatives: `laplacian` (the trace of each output's input Hessian) and
`divergence` (the trace of each sample's Jacobian), exact or by Hutchinson's estimate.

NOTE: [Which Laplacian]
- "forward": the forward Laplacian (NOTE: [The forward Laplacian]): one pass, no backward pass.
- "hessian": `sum_j e_j^T H_i e_j`, the diagonal of the Hessian by `out_size * in_size` HVPs
  (NOTE: [Hessians by the batch-sum trick]), only the diagonal entry of each kept.
- "hutchinson": `mean_s v_s^T H_i v_s` over `n_samples` Rademacher vectors `v_s` (each sample
  its own), with the standard error of that mean: `n_samples` HVPs per output whatever the input
  width. `E[v v^T] = I` makes it unbiased; its variance is `2 sum_{j != k} H_jk^2 / n_samples`.
- "auto": the first call for an input signature runs "forward" and "hessian" both (each compiled,
  then timed on a second run), checks they agree, and keeps the faster for this model and
  signature. Where they disagree beyond rounding, "hessian" is kept and a `JacketWarning` says so.

NOTE: [Which divergence]
`div f(x) = tr(J)` for a model whose output has its input's shape. "exact": the diagonal entries
`e_j^T J e_j` by `in_size` JVPs (forward) or VJPs (reverse), batched like a Jacobian's seeds
(NOTE: [How the plan decides]); the first call for an input signature times both modes with the
backend's first strategy for the kind of model and keeps the faster. "hutchinson": `mean_s v_s^T
J v_s` over Rademacher vectors, `n_samples` JVPs (or VJPs), with its standard error: unbiased, of
variance `sum_{j != k} (J_jk^2 + J_jk J_kj) / n_samples` (zero for a diagonal Jacobian).

The random vectors are drawn with NumPy from `seed` (the same draws on every backend), so a result
is reproducible and the three backends agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import numpy as np

from ..checks import check_model, choice, positive_int
from ..errors import JacketTypeError, JacketValueError
from ..trees import pack
from . import kernels, probes
from .executor import fast_key
from .forward_laplacian import coordinate_chunk, laplacian_kernel, scoped_kernel
from .hessian import (
    check_apart,
    jvp_form,
    outer_mode,
    outer_modes,
    pair_chunk,
    plan_passes,
    resolved,
    second_order_kernel,
    strategy_for,
)
from .hessian_kernels import hessian_kernel, one_hot, push_hvps
from .inputs import Inputs, Leaf, numpy_dtype, result_dtype
from .measured import Measured, Prepared, to_numpy
from .memory import default_memory_budget
from .plan import prior
from .state import Entry, ModelState, state_of

__all__ = ["Estimate", "laplacian", "divergence"]

ops = keras.ops
LAPLACIAN_METHODS = ("auto", "forward", "hessian", "hutchinson")
DIVERGENCE_METHODS = ("exact", "hutchinson")
DEFAULT_SAMPLES = 32


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error, each `(batch, *out_shape)` (the model's output
    structure for `laplacian`)."""

    value: object
    stderr: object


def laplacian(
    model,
    x,
    *,
    wrt=None,
    of=None,
    method: str = "auto",
    n_samples: int | None = None,
    seed: int = 0,
):
    """Per-sample Laplacian of each output of `model` at `x`: the trace of its input Hessian.

    Args:
      model: As in `jacket.hessian`.
      x: Input of shape `(batch, *in_shape)` (or a structure of them: the Laplacian is then taken
        over all their values together), or a `jacket.engine.Point`.
      wrt, of: As in `jacket.hessian`: the Laplacian of the outputs of the layers `of` in the
        outputs of the layers `wrt` (over all their values together).
      method: "forward" (the forward Laplacian: value, gradient and Laplacian carried through the
        model in one pass), "hessian" (the trace of the Hessian, `in_size` HVPs per output),
        "hutchinson" (a stochastic estimate with its standard error, for very wide inputs) or
        "auto" (the faster exact method, measured on the first call; see NOTE [Which
        Laplacian]).
      n_samples: Random vectors for "hutchinson" (default 32, at least 2).
      seed: Seed of those vectors (NumPy's `default_rng`), for "hutchinson".

    Returns:
      A tensor `(batch, *out_shape)` (the model's output structure), where
      `L[b, i...] = sum_j d^2 model(x)[b, i...] / d x[b, j]^2`; for "hutchinson", an `Estimate`
      `(value, stderr)` of two such tensors.

    Example:
      >>> pinn = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="tanh"),
      ...                          keras.layers.Dense(1)])
      >>> tuple(jacket.laplacian(pinn, np.zeros((8, 2), "float32")).shape)
      (8, 1)
    """
    choice("laplacian", "method", method, LAPLACIAN_METHODS)
    samples = _samples("laplacian", method == "hutchinson", n_samples)
    seed = _seed("laplacian", seed)
    check_model("laplacian", model)
    fast = fast_key(x) if method != "hutchinson" and wrt is None and of is None else None
    if fast is not None:  # a NumPy array of a signature seen before: straight to its runner
        runner = state_of(model, False).wrappers.get(("second_order", "laplacian", fast, method))
        if runner is not None:
            return runner(runner.fast_tensors("laplacian", x))
    state, inputs, entry = _prepared("laplacian", model, x, wrt, of)
    fast = fast if state.model is model else None
    if method == "hutchinson":
        value, stderr = _hutchinson(state, inputs, entry, samples, seed, order=2)
        return Estimate(_unflat(value, entry), _unflat(stderr, entry))
    key = ("second_order", "laplacian", inputs.signature, method)
    runner = state.wrappers.get(key)
    if runner is None:
        candidates = {}
        tiling_ok = probes.tiling_is_safe(state, "laplacian", inputs)
        if method == "forward" and not tiling_ok:
            raise JacketValueError(
                "laplacian: method='forward' runs the layers it has no rule for on the batch "
                "repeated once per input value, which changes what a model that mixes samples "
                f"computes. Received: a model whose output changes when its batch of "
                f"{inputs.batch} is repeated. Pass method='hessian' (or 'auto'), or a batch of "
                "several samples."
            )
        if method in ("auto", "forward") and tiling_ok:
            candidates["forward"] = _ForwardLaplacian(state, inputs, entry)
        if method in ("auto", "hessian"):
            for mode, jvp_method in outer_modes(state, "laplacian", inputs, entry, "auto"):
                name = f"hessian {mode}-over-reverse"
                candidates[name] = _HessianTrace(state, inputs, entry, mode, jvp_method)
        prefer = next((name for name in candidates if name.startswith("hessian")), None)
        measured = Measured("laplacian", candidates, prefer=prefer)
        runner = state.wrappers[key] = Prepared(state, inputs, measured, entry.y_structure, True)
    if fast is not None:
        state.wrappers[("second_order", "laplacian", fast, method)] = runner
    return runner(inputs.tensors)


def divergence(
    model,
    x,
    *,
    wrt=None,
    of=None,
    method: str = "exact",
    n_samples: int | None = None,
    seed: int = 0,
):
    """Per-sample divergence of `model` at `x`: the trace of each sample's Jacobian.

    Args:
      model: As in `jacket.jacobian`, with outputs of the shape of its inputs (a vector field:
        a flow's velocity, a score model).
      x: Input of shape `(batch, *in_shape)`, or a `jacket.engine.Point`.
      wrt, of: As in `jacket.jacobian`: the divergence of the outputs of the layers `of` in the
        outputs of the layers `wrt`, which must have the same shapes (a residual block's
        update `of` its input `wrt`).
      method: "exact" (the Jacobian's diagonal by `in_size` JVPs or VJPs, the faster measured on
        the first call) or "hutchinson" (`mean_s v_s^T J v_s` over Rademacher vectors, with its
        standard error; see NOTE [Which divergence]).
      n_samples: Random vectors for "hutchinson" (default 32, at least 2).
      seed: Seed of those vectors (NumPy's `default_rng`), for "hutchinson".

    Returns:
      A tensor `(batch,)`: `div[b] = sum_j d model(x)[b, j] / d x[b, j]`; for "hutchinson", an
      `Estimate` `(value, stderr)` of two such tensors.

    Example:
      >>> field = keras.layers.Dense(3)
      >>> tuple(jacket.divergence(field, np.ones((4, 3), "float32")).shape)
      (4,)
    """
    choice("divergence", "method", method, DIVERGENCE_METHODS)
    samples = _samples("divergence", method == "hutchinson", n_samples)
    seed = _seed("divergence", seed)
    check_model("divergence", model)
    fast = fast_key(x) if method == "exact" and wrt is None and of is None else None
    if fast is not None:  # a NumPy array of a signature seen before: straight to its runner
        runner = state_of(model, False).wrappers.get(("second_order", "divergence", fast))
        if runner is not None:
            return runner(runner.fast_tensors("divergence", x))
    state, inputs, entry = _prepared("divergence", model, x, wrt, of)
    fast = fast if state.model is model else None
    _check_square(inputs, entry)
    if method == "hutchinson":
        value, stderr = _hutchinson(state, inputs, entry, samples, seed, order=1)
        return Estimate(value[:, 0], stderr[:, 0])
    key = ("second_order", "divergence", inputs.signature)
    runner = state.wrappers.get(key)
    if runner is None:
        candidates = {}
        method_name = probes.forward_method(state, "divergence", inputs, entry)
        modes = ["forward", "reverse"] if method_name is not None else ["reverse"]
        for mode in modes:
            for strategy in _strategies(state, inputs, entry):
                candidates[f"{mode} {strategy}"] = _Diagonal(
                    state, inputs, entry, mode, strategy, method_name
                )
        runner = state.wrappers[key] = Prepared(
            state, inputs, Measured("divergence", candidates, option=None)
        )
    if fast is not None:
        state.wrappers[("second_order", "divergence", fast)] = runner
    return runner(inputs.tensors)


# ------------------------------------------------------------------------------------- checks


def _samples(fn_name: str, used: bool, n_samples) -> int:
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


def _seed(fn_name: str, seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise JacketTypeError(
            f"{fn_name}: `seed` must be a non-negative integer. Received: seed={seed!r}."
        )
    return int(seed)


def _prepared(fn_name: str, model, x, wrt, of) -> tuple[ModelState, Inputs, Entry]:
    state, inputs = resolved(fn_name, model, x, wrt, of)
    entry = state.entry(fn_name, inputs)
    check_apart(state, fn_name, inputs, entry)
    return state, inputs, entry


def _check_square(inputs: Inputs, entry: Entry) -> None:
    shapes_in = [leaf.shape for leaf in inputs.leaves]
    shapes_out = [leaf.shape for leaf in entry.out_leaves]
    if shapes_in != shapes_out:
        shown_in = ", ".join(f"{leaf.label}: {leaf.shape}" for leaf in inputs.leaves)
        shown_out = ", ".join(f"{leaf.label}: {leaf.shape}" for leaf in entry.out_leaves)
        raise JacketValueError(
            "divergence: the model's outputs (of `of`) must have the shapes of its inputs (of "
            "`wrt`), a vector field, so that its Jacobian is square. Received: inputs "
            f"{shown_in}; outputs {shown_out}. Pass a model whose output has its input's shape "
            "(or `wrt` and `of` layers of one shape), or use `jacket.jacobian`."
        )


def _unflat(flat, entry: Entry):
    """`(B, out_size)` -> the model's output structure of `(B, *out_shape)`."""
    return pack(entry.y_structure, kernels.split(flat, (flat.shape[0],), entry.out_leaves))


# ------------------------------------------------------------------------------------ the runs


class _ForwardLaplacian:
    """The forward Laplacian in chunks of input coordinates (NOTE: [The forward Laplacian])."""

    def __init__(self, state: ModelState, inputs: Inputs, entry: Entry):
        self.n = sum(leaf.size for leaf in inputs.leaves)
        self.chunk = coordinate_chunk(inputs, entry, default_memory_budget())
        args = (
            state.backend,
            inputs.structure,
            inputs.leaves,
            entry.out_leaves,
            inputs.batch,
            self.chunk,
        )
        self.kernel = scoped_kernel(
            state,
            ("forward_laplacian", inputs.signature, self.chunk),
            lambda: laplacian_kernel(*args),
        )
        self.starts = _starts(state, self.n, self.chunk)

    def __call__(self, tensors: list):
        total = None
        for start in self.starts:
            part = list(self.kernel(tensors, start))
            total = part if total is None else [ops.add(t, p) for t, p in zip(total, part)]
        return total


class _HessianTrace:
    """`sum_j e_j^T H_i e_j` by HVPs (NOTE: [Which Laplacian])."""

    def __init__(self, state: ModelState, inputs: Inputs, entry: Entry, mode, method):
        self.B, self.m = inputs.batch, entry.out_size
        self.n = sum(leaf.size for leaf in inputs.leaves)
        strategy = strategy_for(state, "laplacian", inputs)
        self.chunk, self.whole = plan_passes(inputs, entry, strategy, default_memory_budget(), None)
        args = (
            state.backend,
            strategy,
            mode,
            jvp_form(state, method),
            inputs.structure,
            inputs.leaves,
            entry.out_leaves,
            inputs.batch,
            self.chunk,
            "diagonal",
            self.whole,
        )
        self.kernel = second_order_kernel(
            state,
            ("hessian_diagonal", inputs.signature, mode, method, strategy, self.chunk, self.whole),
            lambda: hessian_kernel(*args),
        )
        self.passes = [(i, s) for i in range(self.m) for s in range(0, self.n, self.chunk)]
        self.arguments = [_scalars(state, i, s) for i, s in self.passes]
        self.dtype = result_dtype(inputs.leaves + entry.out_leaves)
        self.out_leaves = entry.out_leaves

    def __call__(self, tensors: list):
        if self.whole:
            return list(self.kernel(tensors))  # (B, *out_shape) per output leaf
        total = np.zeros((self.B, self.m))
        for (i, start), arguments in zip(self.passes, self.arguments):
            diagonal = to_numpy(self.kernel(tensors, *arguments))  # (k, B)
            total[:, i] += diagonal[: min(self.chunk, self.n - start)].sum(axis=0)
        total = ops.convert_to_tensor(total.astype(numpy_dtype(self.dtype)), dtype=self.dtype)
        return kernels.split(total, (self.B,), self.out_leaves)


class _Diagonal:
    """`e_j^T J e_j` for every input coordinate, summed: the divergence, `(B,)`."""

    def __init__(self, state, inputs: Inputs, entry: Entry, mode, strategy, method):
        self.n = sum(leaf.size for leaf in inputs.leaves)
        itemsize = np.dtype(numpy_dtype(result_dtype(inputs.leaves + entry.out_leaves))).itemsize
        activations = entry.activation_size or 4 * 2 * self.n
        per_seed = inputs.batch * itemsize * (2 * activations + 3 * self.n)
        if strategy == "replicate":
            per_seed = per_seed * 3 // 2
        chunk = max(1, min(self.n, default_memory_budget() // max(per_seed, 1)))
        if strategy == "loop":
            chunk = min(chunk, 32)
        self.chunk = math.ceil(self.n / math.ceil(self.n / chunk))
        jvp = jvp_form(state, method) if mode == "forward" else None
        args = (state.backend, mode, strategy, jvp, inputs.structure, inputs.leaves)
        self.kernel = state.kernel(
            ("divergence", inputs.signature, mode, strategy, method, self.chunk),
            lambda: _diagonal_kernel(*args, inputs.batch, self.chunk),
        )
        self.starts = _starts(state, self.n, self.chunk)

    def __call__(self, tensors: list):
        total = None
        for start in self.starts:
            part = self.kernel(tensors, start)
            total = part if total is None else ops.add(total, part)
        return total


def _usable(state: ModelState, inputs: Inputs, entry: Entry):
    """The backend's strategies for this kind of model, in order (NOTE: [How the plan decides]),
    without "replicate" where tiling the batch would change the model's output (probed only when
    "replicate" is reached)."""
    for strategy in prior(state.backend, entry.kind):
        if strategy != "replicate" or probes.tiling_is_safe(state, "divergence", inputs):
            yield strategy


def _first_strategy(state: ModelState, inputs: Inputs, entry: Entry) -> str:
    return next(_usable(state, inputs, entry), "vmap")


def _strategies(state: ModelState, inputs: Inputs, entry: Entry) -> list[str]:
    """The strategies the exact divergence measures on its first call: on an eager backend, where
    a candidate costs one pass, every usable one (PyTorch, `div_d64` of
    `benchmarks/second_order.py`: 185 ms replicated, 75 ms mapped, 50 ms looped, 105 ms for
    `torch.func.vmap(jacfwd)`); elsewhere, where each costs a compile, the first."""
    if not state.backend.EAGER:
        return [_first_strategy(state, inputs, entry)]
    return list(_usable(state, inputs, entry)) or ["vmap"]


def _scalars(state: ModelState, *values: int) -> tuple:
    if state.backend.EAGER:
        return values
    return tuple(ops.convert_to_tensor(v, dtype="int32") for v in values)


def _starts(state: ModelState, rows: int, chunk: int) -> list:
    starts = list(range(0, rows, chunk))
    if not state.backend.EAGER:
        starts = [ops.convert_to_tensor(s, dtype="int32") for s in starts]
    return starts


def push_seeds(
    backend, strategy: str, mode: str, jvp, f, xs, seeds: list, k: int, B: int, tiled=None
):
    """`k` JVPs (forward) or VJPs (reverse) of the batched model: `seeds` are `(k, B, *leaf)`;
    returns `(k, B, *leaf)` per output (forward) or input (reverse) leaf. `tiled(k)`: `f` on the
    batch repeated `k` times (`kernels.functions`), for "replicate"."""
    if strategy == "replicate":
        f_tiled = f if tiled is None else tiled(k)
        tiled_xs = [kernels.tile(x, k) for x in xs]
        flat = [ops.reshape(s, (k * B,) + tuple(s.shape[2:])) for s in seeds]
        outs = (jvp or backend.jvp)(f_tiled, tiled_xs, flat) if mode == "forward" else None
        if outs is None:
            outs = backend.vjp(f_tiled, tiled_xs, flat)
        return [ops.reshape(o, (k, B) + tuple(o.shape[1:])) for o in outs]
    over = backend.vmap if strategy == "vmap" else backend.loop
    if mode == "reverse":
        _, pullback = backend.linearize_vjp(f, xs)
        return list(over(pullback, seeds))
    return list(over(lambda ts: (jvp or backend.jvp)(f, xs, ts), seeds))


def _diagonal_kernel(backend, mode, strategy, jvp, in_structure, in_leaves: list[Leaf], B, k):
    """`kernel(call, xs, start) -> (B,)`: `sum_j e_j^T J e_j` over coordinates `start ..
    start + k` (the output leaves have the input leaves' shapes)."""
    n = sum(leaf.size for leaf in in_leaves)
    dtype = result_dtype(in_leaves)

    def kernel(call, xs, start):
        xs, f, tiled = kernels.functions(call, in_structure, xs, len(in_leaves))
        j = ops.arange(k, dtype="int32") + start
        T = ops.cast(ops.equal(j[:, None], ops.arange(n, dtype="int32")[None]), dtype)
        T = ops.broadcast_to(T[:, None], (k, B, n))
        seeds = kernels.split(T, (k, B), in_leaves)
        outs = push_seeds(backend, strategy, mode, jvp, f, xs, seeds, k, B, tiled)
        block = kernels.flat(outs, (k, B), in_leaves, dtype)
        return ops.sum(block * T, axis=(0, 2))

    return kernel


# ------------------------------------------------------------------------------------ Hutchinson


def _hutchinson(state: ModelState, inputs: Inputs, entry: Entry, samples: int, seed: int, order):
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
        strategy = _first_strategy(state, inputs, entry)
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
