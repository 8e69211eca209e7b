"""The divergence: the trace of each sample's Jacobian, exact or by Hutchinson's estimate.

NOTE: [Which divergence]
`div f(x) = tr(J)` for a model whose output has its input's shape. "exact": the diagonal entries
`e_j^T J e_j` by `in_size` JVPs (forward) or VJPs (reverse), batched like a Jacobian's seeds
(NOTE: [How the plan decides]); the first call for an input signature times both modes with the
backend's first strategy for the kind of model (every usable strategy on an eager backend) and
keeps the faster. "hutchinson": `mean_s v_s^T J v_s` over Rademacher vectors, `n_samples` JVPs
(or VJPs), with its standard error: unbiased, of variance `sum_{j != k} (J_jk^2 + J_jk J_kj) /
n_samples` (zero for a diagonal Jacobian).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from ..checks import check_model, choice
from ..errors import JacketValueError
from . import kernels, probes
from .estimates import Estimate, hutchinson, samples_option, seed_option
from .hessian import first_strategy, jvp_form, prepared, starts, usable_strategies
from .inputs import Inputs, Leaf, numpy_dtype, result_dtype
from .kernels import push_seeds
from .measured import Measured, Prepared, fast_runner, keep_fast
from .memory import default_memory_budget
from .state import Entry, ModelState

__all__ = ["divergence"]

ops = keras.ops
DIVERGENCE_METHODS = ("exact", "hutchinson")


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
    samples = samples_option("divergence", method == "hutchinson", n_samples)
    seed = seed_option("divergence", seed)
    check_model("divergence", model)
    used = method == "exact" and wrt is None and of is None
    runner, fast = fast_runner(model, x, ("divergence",), used)
    if runner is not None:  # a NumPy array of a signature seen before: straight to its runner
        return runner(runner.fast_tensors("divergence", x))
    state, inputs, entry = prepared("divergence", model, x, wrt, of)
    _check_square(inputs, entry)
    if method == "hutchinson":
        value, stderr = hutchinson(state, inputs, entry, samples, seed, order=1)
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
    keep_fast(state, model, fast, runner)
    return runner(inputs.tensors)


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
        self.starts = starts(state, self.n, self.chunk)

    def __call__(self, tensors: list):
        total = None
        for start in self.starts:
            part = self.kernel(tensors, start)
            total = part if total is None else ops.add(total, part)
        return total


def _strategies(state: ModelState, inputs: Inputs, entry: Entry) -> list[str]:
    """The strategies the exact divergence measures on its first call: on an eager backend, where
    a candidate costs one pass, every usable one (PyTorch, `div_d64` of
    `benchmarks/second_order.py`: 185 ms replicated, 75 ms mapped, 50 ms looped, 105 ms for
    `torch.func.vmap(jacfwd)`); elsewhere, where each costs a compile, the first."""
    if not state.backend.EAGER:
        return [first_strategy(state, inputs, entry)]
    return list(usable_strategies(state, inputs, entry)) or ["vmap"]


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
