"""The passes, written once in `keras.ops` on the backend primitives (`jacket.backends`).

A kernel is a function `kernel(call, *args)` that a backend compiles (`backend.compile`): `call` is the
model as a function of its input structure. Shapes and sizes are Python ints fixed when the kernel is
built, so a compiled kernel is traced once per input signature.
"""

from __future__ import annotations

import keras
import numpy as np

from ..trees import pack
from .inputs import Leaf, result_dtype
from .plan import Plan

ops = keras.ops


def model_function(call, in_structure, constants=()):
    """`call` as a function of a flat list of inputs returning a flat list of outputs.

    `constants`: the tensors a cut is called with beside its differentiated inputs
    (`jacket.engine.cut`): the cut then takes one argument, `(x, constants)` (one argument, as a
    model takes, so that what the backends wrap around a model's call wraps it too); a model
    has none.
    """

    def f(flat_xs):
        x = pack(in_structure, flat_xs)
        ys = call((x, list(constants))) if constants else call(x)
        return keras.tree.flatten(ys) if not ops.is_tensor(ys) else [ys]

    return f


def split_arguments(xs, n: int):
    """A kernel's tensors: the `n` differentiated inputs, and the constants after them."""
    xs = list(xs)
    return xs[:n], xs[n:]


def functions(call, in_structure, xs, n: int):
    """`(xs, f, tiled)` for a kernel's tensors: the `n` differentiated inputs, the model as a
    function of them with the constants after them held (`model_function`), and `tiled(k)`, the
    same for the batch repeated `k` times (`tile`), its constants repeated with it."""
    xs, constants = split_arguments(xs, n)
    f = model_function(call, in_structure, constants)

    def tiled(k: int):
        if k == 1 or not constants:
            return f
        return model_function(call, in_structure, [tile(c, k) for c in constants])

    return xs, f, tiled


def push_seeds(backend, strategy: str, mode: str, jvp, f, xs, seeds: list, k: int, B: int, tiled):
    """`k` JVPs (forward) or VJPs (reverse) of the batched model: `seeds` are `(k, B, *leaf)`;
    returns `(k, B, *leaf)` per output (forward) or input (reverse) leaf. `tiled(k)`: `f` on the
    batch repeated `k` times (`functions`), for "replicate"."""
    if strategy == "replicate":
        tiled_xs = [tile(x, k) for x in xs]
        flat = [ops.reshape(s, (k * B,) + tuple(s.shape[2:])) for s in seeds]
        push = (jvp or backend.jvp) if mode == "forward" else backend.vjp
        outs = push(tiled(k), tiled_xs, flat)
        return [ops.reshape(o, (k, B) + tuple(o.shape[1:])) for o in outs]
    over = backend.vmap if strategy == "vmap" else backend.loop
    if mode == "reverse":
        _, pullback = backend.linearize_vjp(f, xs)
        return list(over(pullback, seeds))
    return list(over(lambda ts: (jvp or backend.jvp)(f, xs, ts), seeds))


def flat(tensors, leading: tuple[int, ...], leaves: list[Leaf], dtype: str):
    """Concatenate tensors `(*leading, *leaf.shape)` into one `(*leading, sum of sizes)`."""
    parts = [
        ops.cast(ops.reshape(t, leading + (leaf.size,)), dtype) for t, leaf in zip(tensors, leaves)
    ]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def split(matrix, leading: tuple[int, ...], leaves: list[Leaf]):
    """The inverse of `_flat`: `(*leading, sum of sizes)` into tensors `(*leading, *leaf.shape)`."""
    out, offset = [], 0
    for leaf in leaves:
        part = matrix[..., offset : offset + leaf.size]
        out.append(ops.cast(ops.reshape(part, leading + leaf.shape), leaf.dtype))
        offset += leaf.size
    return out


def tile(x, k: int):
    """`(batch, *s)` -> `(k * batch, *s)`: the batch repeated `k` times."""
    if k == 1:
        return x
    return ops.reshape(ops.broadcast_to(x[None], (k,) + tuple(x.shape)), (-1,) + tuple(x.shape[1:]))


def jacobian_kernel(
    backend,
    plan: Plan,
    in_structure,
    in_leaves: list[Leaf],
    out_leaves: list[Leaf],
    batch: int,
    assemble_flatten: bool | None = None,
    jvp=None,
):
    """`kernel(call, xs, start) -> (finite, block)`: seeds `start .. start + k` pushed through.

    A seed is a one-hot over the output rows (reverse) or input columns (forward) of one sample,
    broadcast over the batch (per-sample), or a one-hot over the whole batch (`per_sample=False`).
    `finite` is `(batch,)`: whether each sample's inputs are all finite (None on an eager backend,
    where `jacket._api` checks the inputs before the call). `block` is
    `(k, batch, other_size)`; with `assemble_flatten` set (the plan has one chunk) it is instead the
    finished blocks, `blocks[j][i]` flattened output-major, so that one compiled call does all.
    `jvp` is the forward-mode push to use (default `backend.jvp`; see `backend.JVPS`).
    """
    reverse = plan.mode == "reverse"
    jvp = jvp or backend.jvp
    seed_leaves, other_leaves = (out_leaves, in_leaves) if reverse else (in_leaves, out_leaves)
    seed_size = sum(leaf.size for leaf in seed_leaves)
    k, B = plan.chunk, batch
    other_dtype = result_dtype(other_leaves)
    seed_dtype = result_dtype(seed_leaves)

    def make_seeds(start):
        width = seed_size if plan.per_sample else B * seed_size
        rows = ops.expand_dims(ops.arange(k, dtype="int32") + start, 1)
        basis = ops.cast(ops.equal(rows, ops.arange(width, dtype="int32")[None]), seed_dtype)
        if plan.per_sample:
            return [
                ops.broadcast_to(s, (k, B) + leaf.shape)
                for s, leaf in zip(split(basis, (k, 1), seed_leaves), seed_leaves)
            ]
        return split(ops.reshape(basis, (k, B, seed_size)), (k, B), seed_leaves)

    memo = {}  # eager backends: the seeds of each pass are made once (`start` is a Python int)

    def kernel(call, xs, start):
        xs, f, tiled = functions(call, in_structure, xs, len(in_leaves))
        if isinstance(start, int):
            if start not in memo:
                memo[start] = make_seeds(start)
            seeds = memo[start]
        else:
            seeds = make_seeds(start)

        outs = push_seeds(backend, plan.strategy, plan.mode, jvp, f, xs, seeds, k, B, tiled)
        block = flat(outs, (k, B), other_leaves, other_dtype)
        # compiled backends fuse the finite check into the kernel; eager ones check beforehand
        finite = None if backend.EAGER else _finite(xs, B)
        if assemble_flatten is None:
            return finite, block
        out_size = sum(leaf.size for leaf in out_leaves)
        in_size = sum(leaf.size for leaf in in_leaves)
        J = assemble([block], plan, B, out_size, in_size)
        rows = split_blocks(J, plan.per_sample, B, in_leaves, out_leaves, assemble_flatten)
        return finite, [b for row in rows for b in row]

    return kernel


def _finite(xs, batch: int):
    """`(batch,)` bool: every input value of the sample is finite."""
    flags = [ops.all(ops.isfinite(ops.reshape(x, (batch, -1))), axis=1) for x in xs]
    out = flags[0]
    for flag in flags[1:]:
        out = ops.logical_and(out, flag)
    return out


def vjp_kernel(backend, in_structure, n_in: int | None = None):
    """`kernel(call, xs, cts) -> grads`: one VJP of the batched model (with respect to the first
    `n_in` tensors of `xs`, the rest constants; default all)."""

    def kernel(call, xs, cts):
        xs, constants = split_arguments(xs, len(xs) if n_in is None else n_in)
        return backend.vjp(model_function(call, in_structure, constants), xs, cts)

    return kernel


def value_and_vjp_kernel(backend, in_structure, n_in: int):
    """`kernel(call, xs, cts) -> (ys, grads)`: the outputs and one VJP of the batched model from
    one forward pass (with respect to the first `n_in` tensors of `xs`)."""

    def kernel(call, xs, cts):
        xs, constants = split_arguments(xs, n_in)
        ys, pullback = backend.linearize_vjp(model_function(call, in_structure, constants), xs)
        return list(ys), pullback(list(cts))

    return kernel


def jvp_kernel(backend, in_structure, jvp=None, n_in: int | None = None):
    """`kernel(call, xs, ts) -> tangents`: one JVP of the batched model (`jvp`: as in
    `jacobian_kernel`; `n_in`: as in `vjp_kernel`)."""
    jvp = jvp or backend.jvp

    def kernel(call, xs, ts):
        xs, constants = split_arguments(xs, len(xs) if n_in is None else n_in)
        return jvp(model_function(call, in_structure, constants), xs, ts)

    return kernel


def forward_kernel(in_structure, n_in: int):
    """`kernel(call, xs) -> ys`: the model's outputs, flat (a cut's, from its `n_in` inputs and
    its constants)."""

    def kernel(call, xs):
        xs, constants = split_arguments(xs, n_in)
        return model_function(call, in_structure, constants)(xs)

    return kernel


def assemble(blocks, plan: Plan, batch: int, out_size: int, in_size: int):
    """Kernel blocks `(k, batch, other)` -> the flat Jacobian.

    Per-sample: `(batch, out_size, in_size)`; full: `(batch, out_size, batch, in_size)`.
    """
    full = blocks[0] if len(blocks) == 1 else ops.concatenate(blocks, axis=0)
    full = full[: plan.rows]
    if plan.per_sample:
        # reverse: (out, B, in) ; forward: (in, B, out)
        return ops.transpose(full, (1, 0, 2) if plan.mode == "reverse" else (1, 2, 0))
    if plan.mode == "reverse":
        return ops.reshape(full, (batch, out_size, batch, in_size))
    return ops.transpose(ops.reshape(full, (batch, in_size, batch, out_size)), (2, 3, 0, 1))


class Assembler:
    """The flat Jacobian built in NumPy from the kernel's blocks, one pass at a time.

    Each block `(k, batch, other)` is written into its place as soon as it is computed, so a
    Jacobian of many passes holds one block beside the result, never all the blocks (and no
    concatenated copy). Per-sample: `(batch, out_size, in_size)`; full: `(batch, out_size, batch,
    in_size)`.
    """

    def __init__(self, plan: Plan, batch: int, out_size: int, in_size: int):
        self.plan, self.batch, self.out_size, self.in_size = plan, batch, out_size, in_size
        self.result = None

    def add(self, start: int, block) -> None:
        plan, B = self.plan, self.batch
        n = min(plan.chunk, plan.rows - start)
        block = block[:n]
        if self.result is None:
            if plan.per_sample:
                shape = (B, self.out_size, self.in_size)
            else:
                shape = (plan.rows, B, block.shape[-1])
            self.result = np.empty(shape, block.dtype)
        if not plan.per_sample:
            self.result[start : start + n] = block
        elif plan.mode == "reverse":
            self.result[:, start : start + n, :] = block.transpose(1, 0, 2)
        else:
            self.result[:, :, start : start + n] = block.transpose(1, 2, 0)

    def finish(self):
        B, m, n = self.batch, self.out_size, self.in_size
        if self.plan.per_sample:
            return self.result
        if self.plan.mode == "reverse":
            return self.result.reshape(B, m, B, n)
        return self.result.reshape(B, n, B, m).transpose(2, 3, 0, 1)


class DiagonalAssembler:
    """The per-sample blocks `J[b, :, b, :]` of a full Jacobian, kept from each pass's block as it
    comes, so that `per_sample="diagonal"` never holds the full `(batch, out, batch, in)` Jacobian:
    `(batch, out_size, in_size)`."""

    def __init__(self, plan: Plan, batch: int, out_size: int, in_size: int):
        assert not plan.per_sample
        self.plan, self.batch, self.out_size, self.in_size = plan, batch, out_size, in_size
        self.result = None

    def add(self, start: int, block) -> None:
        plan = self.plan
        n = min(plan.chunk, plan.rows - start)
        seeds = np.arange(start, start + n)
        if self.result is None:
            self.result = np.empty((self.batch, self.out_size, self.in_size), block.dtype)
        if plan.mode == "reverse":  # seed (c, i): row i of sample c's outputs; block (k, B, in)
            c, i = np.divmod(seeds, self.out_size)
            self.result[c, i, :] = block[np.arange(n), c, :]
        else:  # seed (c, j): column j of sample c's inputs; block (k, B, out)
            c, j = np.divmod(seeds, self.in_size)
            self.result[c, :, j] = block[np.arange(n), c, :]

    def finish(self):
        return self.result


def split_blocks(
    J, per_sample: bool, batch: int, in_leaves, out_leaves, flatten: bool, reshape=ops.reshape
):
    """The flat Jacobian -> `blocks[j][i]` for output leaf j and input leaf i (`reshape(a, shape)`
    makes each block)."""
    blocks = []
    o = 0
    for out in out_leaves:
        row = []
        n = 0
        for inp in in_leaves:
            if per_sample:
                block = J[:, o : o + out.size, n : n + inp.size]
                shape = (batch, out.size, inp.size) if flatten else (batch,) + out.shape + inp.shape
            else:
                block = J[:, o : o + out.size, :, n : n + inp.size]
                shape = (
                    (batch, out.size, batch, inp.size)
                    if flatten
                    else (batch,) + out.shape + (batch,) + inp.shape
                )
            row.append(reshape(block, shape))
            n += inp.size
        blocks.append(row)
        o += out.size
    return blocks
