"""Second derivatives with respect to the inputs: `hessian` (per-sample input Hessians) and `hvp`
(Hessian-vector products without the Hessian), on the engine's state, probes and memory rules.

NOTE: [Hessians by the batch-sum trick]
The per-sample Hessian of output `i` is the Jacobian of the per-sample gradient `g_i(x) = d y_i /
dx`. Since sample `b`'s output depends on sample `b`'s input only (the coupling probe checks it,
NOTE: [The coupling probe]), the gradient of `sum_b y_{b,i}` holds every sample's `g_i` at once, and
so does its derivative along a tangent broadcast over the batch: one Hessian-vector product (HVP)
with the cotangent `e_i` and the tangent `e_j` gives column `j` of every sample's `H_i`. A Hessian
is then `out_size * in_size` HVPs over the whole batch, each one backward pass differentiated once
more: forward-over-reverse (a JVP of the gradient: `mode="forward"`) or reverse-over-reverse (a VJP
of the gradient, equal by symmetry: `mode="reverse"`). `mode="auto"` takes the backend's faster form
(`SECOND_ORDER_MODE` in `jacket.backends`), forward-over-reverse only where the model's forward mode
passed its check (NOTE: [Checked forward mode]). The pairs `(i, j)` go through in chunks that fit
`memory_budget`, batched like a Jacobian's seeds (NOTE: [How the plan decides]): "replicate" tiles
the batch once per pair and runs one HVP over it; "vmap" and "loop" keep one forward pass and map
the pairs over it. The result is symmetrised, `(H + H^T) / 2`, which leaves a true Hessian as it is
and halves the rounding of its two triangles.

NOTE: [Memory of a Hessian pass]
One pair keeps, per sample, the forward activations, their cotangents, and the tangents of both
(four copies of the activations where a Jacobian's seed keeps two), plus its seeds and result row:
`batch * itemsize * (4 * activations + 3 * in_size + out_size)` bytes, half again for "replicate"
(each copy keeps its own forward pass). The chunk is the largest number of pairs whose estimate
fits `memory_budget`, evened out over the passes. The Hessian itself, `batch * out_size * in_size^2`
values, is refused before any work when it cannot fit in the memory available, with the ways
around it (`hvp`, `laplacian`, a smaller batch).
"""

from __future__ import annotations

import math
import time
import warnings

import keras
import numpy as np

from ..checks import check_model, format_bytes
from ..errors import CouplingError, JacketMemoryError, JacketValueError, JacketWarning
from ..trees import pack
from . import kernels, probes
from .executor import fast_key
from .inputs import (
    Inputs,
    Leaf,
    check_finite_samples,
    dtype_name,
    numpy_dtype,
    prepare_inputs,
    result_dtype,
)
from .memory import available_memory
from .options import Options
from .products import like_leaves
from .state import Entry, ModelState, state_of

__all__ = ["hessian", "hvp"]

ops = keras.ops
MAX_LOOPED = 32  # pairs per pass of a "loop" plan (TensorFlow unrolls up to 16 of them)
MAX_UNROLLED_OUTPUTS = 16  # outputs traced into one kernel when every pair fits one pass


def hessian(
    model,
    x,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    flatten: bool = False,
):
    """Per-sample input Hessians of `model` at `x`.

    Args:
      model: As in `jacket.jacobian`: a Keras model or layer, or a callable mapping a batch to a
        batch (called in inference).
      x: Input of shape `(batch, *in_shape)` (or a list/dict of them for several inputs).
      mode: "forward" (forward-over-reverse: a JVP of the gradient), "reverse"
        (reverse-over-reverse: a VJP of the gradient) or "auto" (the backend's faster form; see
        NOTE [Hessians by the batch-sum trick]). The result does not depend on it.
      chunk_size: `(output, input)` pairs pushed per pass; bounds memory. Default: as many as fit
        `memory_budget`.
      memory_budget: Working memory one pass may use, in bytes or as a string ("500MB"), as in
        `jacket.jacobian`.
      flatten: Return `(batch, out_size, in_size, in_size)` instead of
        `(batch, *out_shape, *in_shape, *in_shape)`.

    Returns:
      A tensor of shape `(batch, *out_shape, *in_shape, *in_shape)`, symmetric in its two input
      groups, where `H[b, i..., j..., k...] = d^2 model(x)[b, i...] / d x[b, j...] d x[b, k...]`.
      For several inputs or outputs, the model's output structure of its input structure of its
      input structure: `H["score"]["image"]["meta"]`. The dtype is that of `jacket.jacobian`.

    Raises:
      CouplingError: if one sample's outputs depend on another sample's inputs.
      JacketMemoryError: if the Hessians alone would not fit in the memory available (use
        `jacket.hvp` or `jacket.laplacian`, or a smaller batch).

    Example:
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
      ...                           keras.layers.Dense(2)])
      >>> H = jacket.hessian(model, np.ones((5, 3), "float32"))
      >>> tuple(H.shape)
      (5, 2, 3, 3)
    """
    options = Options.checked("hessian", mode, chunk_size, flatten, True, False, memory_budget)
    check_model("hessian", model)
    state = state_of(model, False)
    fast = fast_key(x)
    if fast is not None:  # a NumPy array of a signature seen before: straight to its runner
        runner = state.wrappers.get(("second_order", "hessian", fast, options))
        if runner is not None:
            return runner(runner.fast_tensors("hessian", x))
    inputs = prepare_inputs("hessian", model, x)
    entry = state.entry("hessian", inputs)
    check_apart(state, "hessian", inputs, entry)
    key = ("second_order", "hessian", inputs.signature, options)
    runner = state.wrappers.get(key)
    if runner is None:
        check_hessian_fits("hessian", inputs, entry)
        candidates = {
            f"{mode}-over-reverse": HessianRunner(state, inputs, entry, options, mode, method)
            for mode, method in outer_modes(state, "hessian", inputs, entry, options.mode)
        }
        runner = state.wrappers[key] = Prepared(state, inputs, Measured("hessian", candidates))
    if fast is not None:
        state.wrappers[("second_order", "hessian", fast, options)] = runner
    return runner(inputs.tensors)


def hvp(model, x, v, *, u=None):
    """Per-sample Hessian-vector products `H v`, without building `H`.

    Args:
      model: As in `jacket.hessian`.
      x: Input `(batch, *in_shape)` (or a structure of them).
      v: Tangent with the structure and shapes of `x`.
      u: Weights of the outputs, with the structure and shapes of the model's output `(batch,
        *out_shape)`: the product is `sum_i u[b, i] H_i[b] v[b]`. May be left out only when the
        model has one output value per sample.

    Returns:
      `(batch, *in_shape)` (the structure of `x`): `out[b] = sum_i u[b, i] H_i[b] @ v[b]`.

    Example:
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="tanh")])
      >>> x = np.ones((4, 3), "float32")
      >>> tuple(jacket.hvp(model, x, x).shape)
      (4, 3)
    """
    check_model("hvp", model)
    state = state_of(model, False)
    inputs = prepare_inputs("hvp", model, x)
    tangents = like_leaves("hvp", "v", v, inputs.structure, inputs.leaves, inputs.batch)
    entry = state.entry("hvp", inputs)
    if u is None:
        if entry.out_size != 1:
            raise JacketValueError(
                f"hvp: `u` must be given for a model with {entry.out_size} output values per "
                f"sample ({', '.join(f'{leaf.label}: {leaf.shape}' for leaf in entry.out_leaves)}"
                "). Received: u=None. Pass `u` shaped like the model's output, weighting each "
                "output's Hessian (a one-hot for one output's)."
            )
        cotangents = [
            ops.ones((inputs.batch,) + leaf.shape, dtype=leaf.dtype) for leaf in entry.out_leaves
        ]
    else:
        cotangents = like_leaves("hvp", "u", u, entry.y_structure, entry.out_leaves, inputs.batch)
    check_apart(state, "hvp", inputs, entry)
    mode, method = outer_mode(state, "hvp", inputs, entry, "auto")
    kernel = state.kernel(
        ("hvp", inputs.signature, mode, method),
        lambda: hvp_kernel(state.backend, inputs.structure, mode, jvp_form(state, method)),
    )
    return inputs.pack(list(kernel(inputs.tensors, cotangents, tangents)))


# ------------------------------------------------------------------------------------ the plan


def check_apart(state: ModelState, fn_name: str, inputs: Inputs, entry: Entry) -> None:
    """The coupling probe (NOTE: [The coupling probe]), with the way around it for second order."""
    try:
        probes.check_independent(state, fn_name, inputs, entry)
    except CouplingError:
        raise CouplingError(
            f"{fn_name}: the model's output for one sample depends on other samples in the batch "
            f"(batch size {inputs.batch}), so per-sample second derivatives by the batch-sum "
            "trick would be wrong. Received: a model that mixes samples (a layer that reduces over "
            "the batch). Pass one sample at a time (`x[b:b + 1]`), where nothing is mixed, or a "
            "model that keeps samples apart."
        ) from None


def outer_modes(
    state: ModelState, fn_name: str, inputs: Inputs, entry: Entry, mode: str
) -> list[tuple[str, str | None]]:
    """The `(mode, jvp method)` of the outer derivative that may run, the backend's first choice
    first: "forward" with the name in `backend.JVPS` of a forward mode that passed its check, or
    "reverse" (NOTE: [Hessians by the batch-sum trick])."""
    wanted = list(state.backend.SECOND_ORDER_MODES) if mode == "auto" else [mode]
    out = []
    for name in wanted:
        if name == "forward":
            method = probes.forward_method(state, fn_name, inputs, entry)
            if method is not None:
                out.append(("forward", method))
                continue
        if ("reverse", None) not in out:
            out.append(("reverse", None))
    return out


def outer_mode(
    state: ModelState, fn_name: str, inputs: Inputs, entry: Entry, mode: str
) -> tuple[str, str | None]:
    """The first of `outer_modes`."""
    return outer_modes(state, fn_name, inputs, entry, mode)[0]


def jvp_form(state: ModelState, method: str | None):
    return None if method is None else state.backend.JVPS[method]


def strategy_for(state: ModelState, fn_name: str, inputs: Inputs) -> str:
    """The backend's measured way of batching the pairs of one pass (`SECOND_ORDER_STRATEGY`),
    "vmap" where tiling the batch would change the model's output (`probes.tiling_is_safe`)."""
    strategy = state.backend.SECOND_ORDER_STRATEGY
    if strategy == "replicate" and not probes.tiling_is_safe(state, fn_name, inputs):
        return "vmap"
    return strategy


def pair_chunk(
    inputs: Inputs,
    entry: Entry,
    rows: int,
    strategy: str,
    memory_budget: int,
    chunk_size: int | None = None,
) -> int:
    """Pairs per pass: `chunk_size`, else what fits `memory_budget` (NOTE: [Memory of a Hessian
    pass]), evened out over the passes."""
    if chunk_size is not None:
        return max(1, min(chunk_size, rows))
    in_size = sum(leaf.size for leaf in inputs.leaves)
    itemsize = np.dtype(numpy_dtype(result_dtype(inputs.leaves + entry.out_leaves))).itemsize
    activations = entry.activation_size or 4 * (in_size + entry.out_size)
    per_pair = inputs.batch * itemsize * (4 * activations + 3 * in_size + entry.out_size)
    if strategy == "replicate":
        per_pair = per_pair * 3 // 2
    chunk = max(1, min(rows, memory_budget // max(per_pair, 1)))
    if strategy == "loop":
        chunk = min(chunk, MAX_LOOPED)
    return math.ceil(rows / math.ceil(rows / chunk))


def plan_passes(
    inputs: Inputs, entry: Entry, strategy: str, memory_budget: int, chunk_size: int | None
) -> tuple[int, bool]:
    """`(chunk, whole)`: input directions per pass of one output, and whether every pair goes
    through one call (all of them fit the budget, and the outputs are few enough to trace into
    one kernel)."""
    m, n = entry.out_size, sum(leaf.size for leaf in inputs.leaves)
    chunk = pair_chunk(inputs, entry, n, strategy, memory_budget, chunk_size)
    if chunk < n or m > MAX_UNROLLED_OUTPUTS:
        return chunk, False
    if m > 1 and strategy in ("vmap", "replicate") and chunk_size is None:
        # every output at once holds the pairs of all of them
        every = pair_chunk(inputs, entry, m * n, strategy, memory_budget)
        return chunk, every >= m * n
    return chunk, True


def check_hessian_fits(fn_name: str, inputs: Inputs, entry: Entry) -> None:
    """Refuse Hessians larger than the host memory available (NOTE: [Memory of a Hessian pass])."""
    in_size = sum(leaf.size for leaf in inputs.leaves)
    dtype = result_dtype(inputs.leaves + entry.out_leaves)
    size = inputs.batch * entry.out_size * in_size * in_size * np.dtype(numpy_dtype(dtype)).itemsize
    available = available_memory()
    if available is None or size <= available:
        return
    raise JacketMemoryError(
        f"{fn_name}: the result would take {format_bytes(size)} (per-sample Hessians of "
        f"{entry.out_size} outputs x {in_size} x {in_size} inputs per sample, batch "
        f"{inputs.batch}, {dtype}), more than the {format_bytes(available)} of memory available. "
        "Pass a smaller batch, or compute what you need without the Hessian: `jacket.hvp` "
        "(H v), `jacket.laplacian` (its trace), or a model of fewer outputs."
    )


# ---------------------------------------------------------------------------------- the kernels


def push_hvps(backend, strategy: str, mode: str, jvp, f, xs, us: list, ts: list, k: int, B: int):
    """`sum_i u_i H_i t` for one set of cotangents `us` (`(B, *out_leaf)`) and `k` tangents `ts`
    (`(k, B, *in_leaf)`); returns `(k, B, *in_leaf)` per input leaf (NOTE: [Hessians by the
    batch-sum trick]).

    With the cotangents fixed, "vmap" and "loop" run the forward and backward passes once and map
    only the outer derivative over the tangents; "replicate" tiles the batch `k` times and runs
    one HVP over it.
    """
    jvp = jvp or backend.jvp
    if strategy == "replicate":
        tiled = [kernels.tile(x, k) for x in xs]
        tiled_us = [kernels.tile(u, k) for u in us]
        flat_ts = [ops.reshape(t, (k * B,) + tuple(t.shape[2:])) for t in ts]

        def tiled_gradient(zs):
            return backend.vjp_differentiable(f, zs, tiled_us)

        if mode == "forward":
            outs = jvp(tiled_gradient, tiled, flat_ts)
        else:
            outs = backend.vjp(tiled_gradient, tiled, flat_ts)
        return [ops.reshape(o, (k, B) + tuple(o.shape[1:])) for o in outs]

    def gradient(zs):
        return backend.vjp_differentiable(f, zs, us)

    over = backend.vmap if strategy == "vmap" else backend.loop
    if mode == "reverse":  # the gradient's VJP, equal to its JVP (H is symmetric)
        _, pullback = backend.linearize_vjp(gradient, xs)
        return list(over(pullback, list(ts)))
    return list(over(lambda tangents: list(jvp(gradient, xs, tangents)), list(ts)))


def one_hot(index, size: int, dtype: str):
    """`(size,)`: 1 at `index` (a scalar, or past `size` for none), 0 elsewhere."""
    return ops.cast(ops.equal(ops.arange(size, dtype="int32"), index), dtype)


def directions(start, k: int, n: int, B: int, dtype: str):
    """The tangents `e_j` for `j = start .. start + k` (past `n`: zero), `(k, B, n)`."""
    j = ops.arange(k, dtype="int32") + start
    T = ops.cast(ops.equal(ops.expand_dims(j, 1), ops.arange(n, dtype="int32")[None]), dtype)
    return ops.broadcast_to(T[:, None], (k, B, n))


def hessian_kernel(
    backend,
    strategy: str,
    mode: str,
    jvp,
    in_structure,
    in_leaves: list[Leaf],
    out_leaves: list[Leaf],
    B: int,
    k: int,
    what: str,
    whole: bool = False,
    flatten: bool = False,
):
    """The Hessian's kernel.

    Passes: `kernel(call, xs, i, start)`, output `i` and the input directions `start .. start +
    k`: with `what="hessian"` the HVPs `(k, B, in_size)` (columns of `H_i`), with
    `what="diagonal"` their diagonal entries `e_j^T H_i e_j`, `(k, B)`. With `whole` (every pair in
    one call: `k = in_size`), `kernel(call, xs)` does every output at once and returns the finished
    Hessian, symmetrised, as `hessian_blocks` (shaped as `flatten` says), or the traces as one
    `(B, *out_shape)` tensor per output leaf.
    """
    m = sum(leaf.size for leaf in out_leaves)
    n = sum(leaf.size for leaf in in_leaves)
    dtype = result_dtype(in_leaves + out_leaves)

    def columns(f, xs, i, start):
        us = kernels.split(ops.broadcast_to(one_hot(i, m, dtype)[None], (B, m)), (B,), out_leaves)
        T = directions(start, k, n, B, dtype)
        outs = push_hvps(
            backend, strategy, mode, jvp, f, xs, us, kernels.split(T, (k, B), in_leaves), k, B
        )
        block = kernels.flat(outs, (k, B), in_leaves, dtype)  # (k, B, n)
        return ops.sum(block * T, axis=-1) if what == "diagonal" else block

    if not whole:

        def kernel(call, xs, i, start):
            return columns(kernels.model_function(call, in_structure), xs, i, start)

        return kernel

    def vectorised(f, xs):
        """Every output at once: the outer derivative of the per-sample Jacobian, whose rows are
        the gradients of the outputs (`backend.vmap` over one-hot cotangents): `(m, n, B, n)`."""
        U = ops.broadcast_to(ops.eye(m, dtype=dtype)[:, None], (m, B, m))
        us = kernels.split(U, (m, B), out_leaves)

        def rows(zs):
            return list(backend.vmap(lambda u: backend.vjp_differentiable(f, zs, u), us))

        T = directions(0, n, n, B, dtype)  # (n, B, n)
        if mode == "reverse":  # seeds e_i x e_j on the rows: (m * n, m, B, n)
            eye_m = ops.eye(m, dtype=dtype)
            seeds = eye_m[:, None, :, None, None] * T[None, :, None]  # (m, n, m, B, n)
            seeds = ops.reshape(seeds, (m * n, m, B, n))
            _, pullback = backend.linearize_vjp(rows, xs)
            over = backend.vmap if strategy == "vmap" else backend.loop
            outs = over(pullback, kernels.split(seeds, (m * n, m, B), in_leaves))
            block = kernels.flat(outs, (m * n, B), in_leaves, dtype)
            return ops.reshape(block, (m, n, B, n))
        outs = backend.vmap(
            lambda t: list((jvp or backend.jvp)(rows, xs, t)), kernels.split(T, (n, B), in_leaves)
        )  # (n, m, B, in_leaf) per input leaf
        block = kernels.flat(outs, (n, m, B), in_leaves, dtype)
        return ops.transpose(block, (1, 0, 2, 3))

    def replicated(f, xs):
        """Every `(output, input)` pair at once: the batch tiled `m * n` times, copy `i * n + j`
        with the cotangent `e_i` and the tangent `e_j`, one HVP over it: `(m, n, B, n)`."""
        rows = ops.arange(m * n, dtype="int32")
        U = ops.cast(ops.equal((rows // n)[:, None], ops.arange(m, dtype="int32")[None]), dtype)
        T = ops.cast(ops.equal((rows % n)[:, None], ops.arange(n, dtype="int32")[None]), dtype)
        us = kernels.split(ops.broadcast_to(U[:, None], (m * n, B, m)), (m * n, B), out_leaves)
        ts = kernels.split(ops.broadcast_to(T[:, None], (m * n, B, n)), (m * n, B), in_leaves)
        tiled = [kernels.tile(x, m * n) for x in xs]
        flat_us = [ops.reshape(u, (m * n * B,) + tuple(u.shape[2:])) for u in us]
        flat_ts = [ops.reshape(t, (m * n * B,) + tuple(t.shape[2:])) for t in ts]

        def gradient(zs):
            return backend.vjp_differentiable(f, zs, flat_us)

        if mode == "forward":
            outs = (jvp or backend.jvp)(gradient, tiled, flat_ts)
        else:
            outs = backend.vjp(gradient, tiled, flat_ts)
        block = kernels.flat(outs, (m * n * B,), in_leaves, dtype)
        return ops.reshape(block, (m, n, B, n))

    def whole_kernel(call, xs):
        f = kernels.model_function(call, in_structure)
        if strategy == "replicate" or (m > 1 and strategy == "vmap"):
            H = replicated(f, xs) if strategy == "replicate" else vectorised(f, xs)
            blocks = [H[i] for i in range(m)]
            if what == "diagonal":
                T = directions(0, n, n, B, dtype)
                blocks = [ops.sum(b * T, axis=-1) for b in blocks]
        else:
            blocks = [columns(f, xs, i, 0) for i in range(m)]  # each (n, B, n) or (n, B)
        if what == "diagonal":
            traces = ops.transpose(ops.stack([ops.sum(b, axis=0) for b in blocks]))  # (B, m)
            return kernels.split(traces, (B,), out_leaves)
        H = ops.transpose(ops.stack(blocks), (2, 0, 1, 3))  # (B, m, n, n)
        H = (H + ops.transpose(H, (0, 1, 3, 2))) / 2
        return hessian_blocks(H, out_leaves, in_leaves, flatten, ops.reshape)

    return whole_kernel


def hvp_kernel(backend, in_structure, mode: str, jvp):
    """`kernel(call, xs, us, vs) -> sum_i u_i H_i v`: one HVP of the batched model."""

    def kernel(call, xs, us, vs):
        f = kernels.model_function(call, in_structure)

        def gradient(zs):
            return backend.vjp_differentiable(f, zs, us)

        if mode == "forward":
            return (jvp or backend.jvp)(gradient, xs, vs)
        return backend.vjp(gradient, xs, vs)

    return kernel


# ------------------------------------------------------------------------------------- measured

# NOTE: [Measured on the first call]
# Where a backend has several ways to a second-order result (forward-over-reverse and
# reverse-over-reverse on JAX; the forward Laplacian and the Hessian's trace), the first call for an
# input signature compiles and runs each, times each on a second run, and keeps the fastest for this
# model and signature; later calls run it alone. The results are compared too: where two ways
# disagree beyond rounding (relative 1e-3 of the result's scale), the one named `prefer` (the
# Hessian's trace, for a Laplacian) is kept and a `JacketWarning` says so. Measured here, the better
# way changes with the model: reverse-over-reverse over every output at once was 3x faster on the
# digits CNN's Hessian on JAX (1.6 against 4.9 ms), forward-over-reverse 1.4x faster on the trace of
# a 64-input MLP's (765 against 1099 ms).


class Measured:
    """Candidates computing the same thing (NOTE: [Measured on the first call]); the chosen one's
    name is `chosen`, the warm seconds of each `seconds`."""

    def __init__(self, fn_name: str, candidates: dict, prefer: str | None = None):
        self.fn_name, self.candidates, self.prefer = fn_name, candidates, prefer
        self.chosen = next(iter(candidates)) if len(candidates) == 1 else None
        self.seconds: dict[str, float] = {}

    def describe(self) -> str:
        if not self.seconds:
            return str(self.chosen)
        shown = ", ".join(f"{k}: {v * 1e3:.3g} ms" for k, v in self.seconds.items())
        return f"{self.chosen} (measured {shown})"

    def __call__(self, tensors: list):
        if self.chosen is not None:
            return self.candidates[self.chosen](tensors)
        results, failures = {}, {}
        for name, candidate in self.candidates.items():
            try:
                result = candidate(tensors)  # compiles
                wait(result)
                start = time.perf_counter()
                results[name] = candidate(tensors)
                wait(results[name])
                self.seconds[name] = time.perf_counter() - start
            except Exception as error:  # noqa: BLE001 - a candidate this model cannot run
                if not results and len(failures) == len(self.candidates) - 1:
                    raise
                failures[name] = error
        self.chosen = min(self.seconds, key=self.seconds.get)
        arrays = {
            name: np.concatenate([to_numpy(t).ravel() for t in keras.tree.flatten(r)])
            for name, r in results.items()
        }
        reference = arrays[self.chosen]
        for name, array in arrays.items():
            if not agree(array, reference):
                fallback = self.prefer if self.prefer in arrays else name
                warnings.warn(
                    f"{self.fn_name}: its methods disagree on this model ({name} against "
                    f"{self.chosen}: max difference {np.abs(array - reference).max():.3g}), so "
                    f"'{fallback}' is kept. Pass `method=` to choose, and compare with "
                    "`jacket.check(..., order=2)`.",
                    JacketWarning,
                    stacklevel=3,
                )
                self.chosen = fallback
                break
        return results[self.chosen]


def wait(result) -> None:
    for leaf in keras.tree.flatten(result):
        block = getattr(leaf, "block_until_ready", None)
        if block is not None:
            block()


def to_numpy(tensor) -> np.ndarray:
    # to NumPy first: a cast to float64 by the backend warns on JAX without 64-bit types
    return np.asarray(keras.ops.convert_to_numpy(tensor)).astype(np.float64)


def agree(a: np.ndarray, b: np.ndarray) -> bool:
    # the two sides round differently; a missing term moves a side by about its own size
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-30)
    return bool(np.abs(a - b).max(initial=0.0) <= 1e-3 * scale)


# ---------------------------------------------------------------------------------- the runner


class HessianRunner:
    """The Hessian of one model, input signature and options: the plan made once, then only runs."""

    def __init__(
        self,
        state: ModelState,
        inputs: Inputs,
        entry: Entry,
        options: Options,
        mode: str,
        method: str | None,
    ):
        self.state, self.entry, self.options = state, entry, options
        self.structure, self.leaves, self.batch = inputs.structure, inputs.leaves, inputs.batch
        self.m, self.n = entry.out_size, sum(leaf.size for leaf in inputs.leaves)
        self.mode = mode
        self.strategy = strategy_for(state, "hessian", inputs)
        self.chunk, self.whole = plan_passes(
            inputs, entry, self.strategy, options.memory_budget, options.chunk_size
        )
        args = (
            state.backend,
            self.strategy,
            self.mode,
            jvp_form(state, method),
            inputs.structure,
            inputs.leaves,
            entry.out_leaves,
            inputs.batch,
            self.chunk,
            "hessian",
            self.whole,
            options.flatten,
        )
        key = (inputs.signature, self.mode, method, self.strategy, self.chunk, self.whole)
        self.kernel = state.kernel(
            ("hessian", *key, options.flatten if self.whole else None),
            lambda: hessian_kernel(*args),
        )
        self.passes = [(i, start) for i in range(self.m) for start in range(0, self.n, self.chunk)]
        self.arguments = [_scalars(state, i, start) for i, start in self.passes]

    def describe(self) -> str:
        return (
            f"{self.mode}-over-reverse, {self.m} output(s) x {self.n} directions in "
            f"{len(self.passes)} pass(es) of {self.chunk}, {self.strategy}"
        )

    def __call__(self, tensors: list):
        B, m, n = self.batch, self.m, self.n
        if self.whole:
            return pack_hessian(
                list(self.kernel(tensors)), self.entry.y_structure, self.structure, self.leaves
            )
        else:
            H = None
            for (i, start), arguments in zip(self.passes, self.arguments):
                block = np.asarray(keras.ops.convert_to_numpy(self.kernel(tensors, *arguments)))
                if H is None:
                    H = np.empty((B, m, n, n), block.dtype)
                count = min(self.chunk, n - start)
                H[:, i, start : start + count] = block[:count].transpose(1, 0, 2)
            H = (H + H.transpose(0, 1, 3, 2)) / 2
            blocks = hessian_blocks(
                H, self.entry.out_leaves, self.leaves, self.options.flatten, _to_backend
            )
            return pack_hessian(blocks, self.entry.y_structure, self.structure, self.leaves)


class Prepared:
    """A second-order result for one input signature, ready to run: `run(tensors)`, and the fast
    path's input (`fast_tensors`: one float NumPy array of a signature seen before, checked for
    NaN and inf and cast)."""

    def __init__(self, state: ModelState, inputs: Inputs, run, pack_as=(), packed: bool = False):
        self.backend, self.run, self.pack_as, self.packed = state.backend, run, pack_as, packed
        self.label, self.batch = inputs.leaves[0].label, inputs.batch
        self.dtype, self.dtype_name = numpy_dtype(inputs.leaves[0].dtype), inputs.leaves[0].dtype

    def fast_tensors(self, fn_name: str, x: np.ndarray) -> list:
        if not np.isfinite(x).all():
            check_finite_samples(fn_name, self.label, x, self.batch)
        array = x if x.dtype == self.dtype else x.astype(self.dtype)
        return [self.backend.as_input(array, self.dtype_name)]

    def __call__(self, tensors: list):
        result = self.run(tensors)
        return pack(self.pack_as, list(result)) if self.packed else result


def _scalars(state: ModelState, *values: int) -> tuple:
    """Python ints as kernel arguments: backend scalars on compiled backends (one trace for every
    pass), plain ints on eager ones."""
    if state.backend.EAGER:
        return values
    return tuple(ops.convert_to_tensor(v, dtype="int32") for v in values)


def hessian_blocks(H, out_leaves: list[Leaf], in_leaves: list[Leaf], flatten: bool, reshape):
    """The flat `(B, out_size, in_size, in_size)` Hessian -> its blocks, output leaf by input leaf
    by input leaf, in that order, each `(B, *out, *in, *in)` (or flattened)."""
    B = H.shape[0]
    blocks, o = [], 0
    for out in out_leaves:
        a = 0
        for left in in_leaves:
            c = 0
            for right in in_leaves:
                block = H[:, o : o + out.size, a : a + left.size, c : c + right.size]
                shape = (
                    (B, out.size, left.size, right.size)
                    if flatten
                    else (B,) + out.shape + left.shape + right.shape
                )
                blocks.append(reshape(block, shape))
                c += right.size
            a += left.size
        o += out.size
    return blocks


def pack_hessian(blocks: list, y_structure, in_structure, in_leaves: list[Leaf]):
    """`hessian_blocks` -> the model's output structure of its input structure of its input
    structure (a plain tensor for one input and one output)."""
    n_in = len(in_leaves)
    rows = []
    for o in range(0, len(blocks), n_in * n_in):
        outer = [pack(in_structure, blocks[o + a * n_in : o + (a + 1) * n_in]) for a in range(n_in)]
        rows.append(pack(in_structure, outer))
    return pack(y_structure, rows)


def _to_backend(array: np.ndarray, shape: tuple):
    array = np.ascontiguousarray(np.reshape(array, shape))
    return keras.ops.convert_to_tensor(array, dtype=dtype_name(array.dtype))
