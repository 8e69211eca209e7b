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

import keras
import numpy as np

from ..checks import check_model, format_bytes
from ..errors import CouplingError, JacketMemoryError, JacketValueError
from ..trees import pack
from . import probes
from .hessian_kernels import hessian_blocks, hessian_kernel, hvp_kernel
from .inputs import Inputs, Leaf, dtype_name, numpy_dtype, result_dtype
from .measured import Measured, Prepared, fast_runner, keep_fast
from .memory import available_memory
from .options import Options
from .plan import prior
from .point import resolve
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
    wrt=None,
    of=None,
    mode: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    flatten: bool = False,
):
    """Per-sample input Hessians of `model` at `x`.

    Args:
      model: As in `jacket.jacobian`: a Keras model or layer, or a callable mapping a batch to a
        batch (called in inference).
      x: Input of shape `(batch, *in_shape)` (or a list/dict of them for several inputs), or a
        `jacket.engine.Point`.
      wrt, of: As in `jacket.jacobian`: the Hessian of the outputs of the layers `of` with
        respect to the outputs of the layers `wrt` (a layer name, a layer, a model input name, or
        a structure of them), at the values `x` produces there; the other inputs of the cut
        (integer inputs, a residual path from the input) are held constant. Default: the model's
        own inputs and outputs.
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
      input structure: `H["score"]["image"]["meta"]` (with `wrt`/`of`, their structures and
      the shapes of their layers' outputs). The dtype is that of `jacket.jacobian`.

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
    runner, fast = fast_runner(model, x, ("hessian", options), wrt is None and of is None)
    if runner is not None:  # a NumPy array of a signature seen before: straight to its runner
        return runner(runner.fast_tensors("hessian", x))
    state, inputs = resolved("hessian", model, x, wrt, of)
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
        runner = state.wrappers[key] = Prepared(
            state, inputs, Measured("hessian", candidates, option="mode")
        )
    keep_fast(state, model, fast, runner)
    return runner(inputs.tensors)


def hvp(model, x, v, *, u=None, wrt=None, of=None):
    """Per-sample Hessian-vector products `H v`, without building `H`.

    Args:
      model: As in `jacket.hessian`.
      x: Input `(batch, *in_shape)` (or a structure of them).
      v: Tangent with the structure and shapes of `x` (of the `wrt` values, with `wrt`).
      u: Weights of the outputs, with the structure and shapes of the model's output `(batch,
        *out_shape)` (of `of`'s values, with `of`): the product is `sum_i u[b, i] H_i[b] v[b]`.
        May be left out only when the model has one output value per sample.
      wrt, of: As in `jacket.hessian`.

    Returns:
      `(batch, *in_shape)` (the structure of `x`, or of `wrt`'s values):
      `out[b] = sum_i u[b, i] H_i[b] @ v[b]`.

    Example:
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="tanh")])
      >>> x = np.ones((4, 3), "float32")
      >>> tuple(jacket.hvp(model, x, x).shape)
      (4, 3)
    """
    check_model("hvp", model)
    state, inputs = resolved("hvp", model, x, wrt, of)
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
    kernel = second_order_kernel(
        state,
        ("hvp", inputs.signature, mode, method),
        lambda: hvp_kernel(
            state.backend, inputs.structure, len(inputs.leaves), mode, jvp_form(state, method)
        ),
    )
    return inputs.pack(list(kernel(inputs.tensors, cotangents, tangents)))


# ------------------------------------------------------------------------------------ the plan


def resolved(fn_name: str, model, x, wrt, of) -> tuple[ModelState, Inputs]:
    """The state of what is differentiated (the model, or its cut between `wrt` and `of`:
    `jacket.engine.point.resolve`) and its inputs at `x`, checked for NaN and inf."""
    target, inputs = resolve(fn_name, model, x, wrt, of, False, check_finite=True)
    return state_of(target, False), inputs


def prepared(fn_name: str, model, x, wrt, of) -> tuple[ModelState, Inputs, Entry]:
    """`resolved`, the outputs read (`state.entry`) and the samples probed for coupling."""
    state, inputs = resolved(fn_name, model, x, wrt, of)
    entry = state.entry(fn_name, inputs)
    check_apart(state, fn_name, inputs, entry)
    return state, inputs, entry


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


def usable_strategies(state: ModelState, inputs: Inputs, entry: Entry):
    """The backend's strategies for this kind of model, in order (NOTE: [How the plan decides]),
    without "replicate" where tiling the batch would change the model's output (probed only when
    "replicate" is reached)."""
    yield from probes.tileable(state, "divergence", inputs, prior(state.backend, entry.kind))


def first_strategy(state: ModelState, inputs: Inputs, entry: Entry) -> str:
    """The first of `usable_strategies` ("vmap" where none is)."""
    return next(usable_strategies(state, inputs, entry), "vmap")


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


def second_order_kernel(state: ModelState, key: tuple, build):
    """`state.kernel`, traced (and, on PyTorch, run) in the backend's `second_order_scope`
    (NOTE: [Moments with a second derivative] in `jacket.backends.tensorflow`)."""

    def scoped():
        kernel = build()

        def run(call, *args):
            with state.backend.second_order_scope():
                return kernel(call, *args)

        return run

    return state.kernel(key, scoped)


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
        self.kernel = second_order_kernel(
            state,
            ("hessian", *key, options.flatten if self.whole else None),
            lambda: hessian_kernel(*args),
        )
        self.passes = [(i, start) for i in range(self.m) for start in range(0, self.n, self.chunk)]
        self.arguments = [scalars(state, i, start) for i, start in self.passes]

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


def scalars(state: ModelState, *values: int) -> tuple:
    """Python ints as kernel arguments: backend scalars on compiled backends (one trace for every
    pass), plain ints on eager ones."""
    if state.backend.EAGER:
        return values
    return tuple(ops.convert_to_tensor(v, dtype="int32") for v in values)


def starts(state: ModelState, rows: int, chunk: int) -> list:
    """The first row of each pass of `chunk` rows, as kernel arguments (`scalars`)."""
    return list(scalars(state, *range(0, rows, chunk)))


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
