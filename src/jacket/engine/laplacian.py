"""The Laplacian: the trace of each output's input Hessian, exact or by Hutchinson's estimate.

NOTE: [Which Laplacian]
- "forward": the forward Laplacian (NOTE: [The forward Laplacian]): one pass, no backward pass.
- "hessian": `sum_j e_j^T H_i e_j`, the diagonal of the Hessian by `out_size * in_size` HVPs
  (NOTE: [Hessians by the batch-sum trick]), only the diagonal entry of each kept.
- "hutchinson": `mean_s v_s^T H_i v_s` over `n_samples` Rademacher vectors `v_s` (each sample
  its own), with the standard error of that mean: `n_samples` HVPs per output whatever the input
  width (`jacket.engine.estimates`). `E[v v^T] = I` makes it unbiased; its variance is
  `2 sum_{j != k} H_jk^2 / n_samples`.
- "auto": the first call for an input signature runs "forward" and "hessian" both (each compiled,
  then timed on a second run), checks they agree, and keeps the faster for this model and
  signature. Where they disagree beyond rounding, "hessian" is kept and a `JacketWarning` says so.
"""

from __future__ import annotations

import keras
import numpy as np

from ..checks import check_model, choice
from ..errors import JacketValueError
from . import kernels, probes
from .estimates import Estimate, hutchinson, samples_option, seed_option, unflat
from .forward_laplacian import coordinate_chunk, laplacian_kernel, scoped_kernel
from .hessian import (
    jvp_form,
    outer_modes,
    plan_passes,
    prepared,
    scalars,
    second_order_kernel,
    starts,
    strategy_for,
)
from .hessian_kernels import hessian_kernel
from .inputs import Inputs, numpy_dtype, result_dtype
from .measured import Measured, Prepared, fast_runner, keep_fast, to_numpy
from .memory import default_memory_budget
from .state import Entry, ModelState

__all__ = ["laplacian"]

ops = keras.ops
LAPLACIAN_METHODS = ("auto", "forward", "hessian", "hutchinson")


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
    samples = samples_option("laplacian", method == "hutchinson", n_samples)
    seed = seed_option("laplacian", seed)
    check_model("laplacian", model)
    used = method != "hutchinson" and wrt is None and of is None
    runner, fast = fast_runner(model, x, ("laplacian", method), used)
    if runner is not None:  # a NumPy array of a signature seen before: straight to its runner
        return runner(runner.fast_tensors("laplacian", x))
    state, inputs, entry = prepared("laplacian", model, x, wrt, of)
    if method == "hutchinson":
        value, stderr = hutchinson(state, inputs, entry, samples, seed, order=2)
        return Estimate(unflat(value, entry), unflat(stderr, entry))
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
    keep_fast(state, model, fast, runner)
    return runner(inputs.tensors)


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
        self.starts = starts(state, self.n, self.chunk)

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
        self.arguments = [scalars(state, i, s) for i, s in self.passes]
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
