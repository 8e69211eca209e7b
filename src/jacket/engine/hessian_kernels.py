"""The Hessian's kernels: Hessian-vector products of the batched model (NOTE: [Hessians by the
batch-sum trick] in `jacket.engine.hessian`), one pass of columns or every pair at once, and the
Hessian's blocks per output and input leaf."""

from __future__ import annotations

import keras

from . import kernels
from .inputs import Leaf, result_dtype

ops = keras.ops


def push_hvps(
    backend, strategy: str, mode: str, jvp, f, xs, us: list, ts: list, k: int, B: int, tiled
):
    """`sum_i u_i H_i t` for one set of cotangents `us` (`(B, *out_leaf)`) and `k` tangents `ts`
    (`(k, B, *in_leaf)`); returns `(k, B, *in_leaf)` per input leaf (NOTE: [Hessians by the
    batch-sum trick]). `tiled(k)`: `f` on the batch repeated `k` times (`kernels.functions`).

    With the cotangents fixed, "vmap" and "loop" run the forward and backward passes once and map
    only the outer derivative over the tangents; "replicate" tiles the batch `k` times and runs
    one HVP over it.
    """
    jvp = jvp or backend.jvp
    if strategy == "replicate":
        f_tiled = tiled(k)
        tiled_xs = [kernels.tile(x, k) for x in xs]
        tiled_us = [kernels.tile(u, k) for u in us]
        flat_ts = [ops.reshape(t, (k * B,) + tuple(t.shape[2:])) for t in ts]

        def tiled_gradient(zs):
            return backend.vjp_differentiable(f_tiled, zs, tiled_us)

        if mode == "forward":
            outs = jvp(tiled_gradient, tiled_xs, flat_ts)
        else:
            outs = backend.vjp(tiled_gradient, tiled_xs, flat_ts)
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

    def columns(f, tiled, xs, i, start):
        us = kernels.split(ops.broadcast_to(one_hot(i, m, dtype)[None], (B, m)), (B,), out_leaves)
        T = directions(start, k, n, B, dtype)
        ts = kernels.split(T, (k, B), in_leaves)
        outs = push_hvps(backend, strategy, mode, jvp, f, xs, us, ts, k, B, tiled)
        block = kernels.flat(outs, (k, B), in_leaves, dtype)  # (k, B, n)
        return ops.sum(block * T, axis=-1) if what == "diagonal" else block

    if not whole:

        def kernel(call, xs, i, start):
            xs, f, tiled = kernels.functions(call, in_structure, xs, len(in_leaves))
            return columns(f, tiled, xs, i, start)

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

    def replicated(tiled, xs):
        """Every `(output, input)` pair at once: the batch tiled `m * n` times, copy `i * n + j`
        with the cotangent `e_i` and the tangent `e_j`, one HVP over it: `(m, n, B, n)`."""
        rows = ops.arange(m * n, dtype="int32")
        U = ops.cast(ops.equal((rows // n)[:, None], ops.arange(m, dtype="int32")[None]), dtype)
        T = ops.cast(ops.equal((rows % n)[:, None], ops.arange(n, dtype="int32")[None]), dtype)
        us = kernels.split(ops.broadcast_to(U[:, None], (m * n, B, m)), (m * n, B), out_leaves)
        ts = kernels.split(ops.broadcast_to(T[:, None], (m * n, B, n)), (m * n, B), in_leaves)
        tiled_xs = [kernels.tile(x, m * n) for x in xs]
        flat_us = [ops.reshape(u, (m * n * B,) + tuple(u.shape[2:])) for u in us]
        flat_ts = [ops.reshape(t, (m * n * B,) + tuple(t.shape[2:])) for t in ts]

        f = tiled(m * n)

        def gradient(zs):
            return backend.vjp_differentiable(f, zs, flat_us)

        if mode == "forward":
            outs = (jvp or backend.jvp)(gradient, tiled_xs, flat_ts)
        else:
            outs = backend.vjp(gradient, tiled_xs, flat_ts)
        block = kernels.flat(outs, (m * n * B,), in_leaves, dtype)
        return ops.reshape(block, (m, n, B, n))

    def whole_kernel(call, xs):
        xs, f, tiled = kernels.functions(call, in_structure, xs, len(in_leaves))
        if strategy == "replicate" or (m > 1 and strategy == "vmap"):
            H = replicated(tiled, xs) if strategy == "replicate" else vectorised(f, xs)
            blocks = [H[i] for i in range(m)]
            if what == "diagonal":
                T = directions(0, n, n, B, dtype)
                blocks = [ops.sum(b * T, axis=-1) for b in blocks]
        else:
            blocks = [columns(f, tiled, xs, i, 0) for i in range(m)]  # each (n, B, n) or (n, B)
        if what == "diagonal":
            traces = ops.transpose(ops.stack([ops.sum(b, axis=0) for b in blocks]))  # (B, m)
            return kernels.split(traces, (B,), out_leaves)
        H = ops.transpose(ops.stack(blocks), (2, 0, 1, 3))  # (B, m, n, n)
        H = (H + ops.transpose(H, (0, 1, 3, 2))) / 2
        return hessian_blocks(H, out_leaves, in_leaves, flatten, ops.reshape)

    return whole_kernel


def hvp_kernel(backend, in_structure, n_in: int, mode: str, jvp):
    """`kernel(call, xs, us, vs) -> sum_i u_i H_i v`: one HVP of the batched model (`xs`: its
    `n_in` differentiated inputs, then a cut's constants)."""

    def kernel(call, xs, us, vs):
        xs, f, _ = kernels.functions(call, in_structure, xs, n_in)

        def gradient(zs):
            return backend.vjp_differentiable(f, zs, us)

        if mode == "forward":
            return (jvp or backend.jvp)(gradient, xs, vs)
        return backend.vjp(gradient, xs, vs)

    return kernel


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
