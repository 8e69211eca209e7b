"""The probes: questions about a model that its layers alone cannot answer, asked by running it once
per input signature. Each returns a verdict and keeps it in the model's state.

- `check_independent`: do samples of a batch stay apart (the batch-sum trick is exact)?
- `tiling_is_safe`: may the batch be repeated ("replicate" plans) at batch 1?
- `forward_method`: which of the backend's forward modes gives right JVPs on this model?
"""

from __future__ import annotations

import dataclasses
import math

import keras
import ml_dtypes
import numpy as np

from ..errors import CouplingError
from . import kernels
from .inputs import Inputs, check_finite_samples, numpy_dtype
from .model import eager_call, keeps_samples_apart
from .state import Entry, ModelState


def forward_method(state: ModelState, fn_name: str, inputs: Inputs, entry: Entry) -> str | None:
    """The name in `backend.JVPS` of a forward mode that is right for this model, or None
    when none is (forward mode is then computed from reverse passes).

    NOTE: [Checked forward mode]
    TensorFlow's `ForwardAccumulator` derives a JVP from each op's gradient, differentiated
    again; where that second derivative is declared missing (`ResizeBilinearGrad`, the backward
    op of bilinear resizing) it gives zeros without an error, and so does the double-VJP form.
    So on a backend whose `TRUSTED_JVP` is False, each candidate in `backend.JVPS` is checked
    once by the dot-product test `<u, J v> == <J^T u, v>` against reverse
    mode, with three pairs of random `u`, `v` over the whole batch. The error allowed is
    `sqrt(eps)` of the dtype times `||u * J v|| + ||J^T u * v||` (norms of the elementwise
    products, whose sums are the two sides): rounding in a right JVP stays orders of magnitude
    below it, while a missing contribution moves a side by about its own norm. A candidate that
    fails to build or run, or gives non-finite values, fails too. The first to pass is kept;
    when none does, `jacobian` runs forward-mode plans in reverse mode and `jvp` contracts the
    reverse-mode Jacobian with `v`: slower, never wrong. The check costs the trace of one
    JVP kernel (kept for `jacket.jvp`) and three eager VJPs (the reference needs no trace),
    once per model, `training` flag and per-sample input shapes (any batch size).
    """
    key = inputs.signature[1]  # the per-sample shapes and dtypes: any batch size
    if key in state.forward:
        return state.forward[key]
    methods = list(state.backend.JVPS)
    if state.backend.TRUSTED_JVP:
        state.forward[key] = methods[0]
        return methods[0]
    # random vectors on NaN inputs prove nothing, and the verdict is kept: refuse them first
    for tensor, leaf in zip(inputs.tensors, inputs.leaves):
        check_finite_samples(fn_name, leaf.label, tensor, inputs.batch)
    if state.backend.EAGER:
        vjp = state.vjp(inputs)
    else:  # the reference runs eagerly: no second kernel to trace
        kernel = kernels.vjp_kernel(state.backend, inputs.structure, len(inputs.leaves))
        call = eager_call(state.model, state.training)

        def vjp(xs, cts):
            return kernel(call, xs, cts)

    chosen = None
    for method in methods:
        try:
            passed = _dot_test(inputs, entry, state.jvp(inputs, method), vjp)
        except Exception:  # noqa: BLE001 - a form of forward mode this model cannot run
            passed = False
        if passed:
            chosen = method
            break
        state.kernels.pop(("jvp", inputs.signature, method), None)
    state.forward[key] = chosen
    return chosen


def _dot_test(inputs: Inputs, entry: Entry, jvp, vjp) -> bool:
    """`<u, J v> == <J^T u, v>` for three random pairs (NOTE: [Checked forward mode])."""
    rng = np.random.default_rng(0)
    leaves = inputs.leaves + entry.out_leaves
    eps = max(float(ml_dtypes.finfo(numpy_dtype(leaf.dtype)).eps) for leaf in leaves)
    batch = inputs.batch

    def draw(leaves):
        arrays = [rng.standard_normal((batch,) + leaf.shape) for leaf in leaves]
        tensors = [
            keras.ops.convert_to_tensor(a.astype(numpy_dtype(leaf.dtype)))
            for a, leaf in zip(arrays, leaves)
        ]
        return arrays, tensors

    def products(arrays, tensors):
        return np.concatenate(
            [
                (a * np.asarray(keras.ops.convert_to_numpy(t), np.float64)).ravel()
                for a, t in zip(arrays, tensors)
            ]
        )

    for _ in range(3):
        v, v_tensors = draw(inputs.leaves)
        u, u_tensors = draw(entry.out_leaves)
        left = products(u, jvp(inputs.tensors, v_tensors))  # u * (J v)
        right = products(v, vjp(inputs.tensors, u_tensors))  # (J^T u) * v
        scale = np.linalg.norm(left) + np.linalg.norm(right)
        gap = abs(left.sum() - right.sum())
        if not (np.isfinite(scale) and np.isfinite(gap)) or gap > math.sqrt(eps) * scale:
            return False
    return True


def check_independent(state: ModelState, fn_name: str, inputs: Inputs, entry: Entry) -> None:
    """Raise `CouplingError` if one sample's outputs depend on another sample's inputs.

    NOTE: [The coupling probe]
    The batch-sum trick is exact iff `d y_b / d x_c = 0` for `b != c`. For each bit of the sample
    index, split the batch into the samples with that bit set (S) and the rest, and pull a random
    cotangent on S back: any nonzero gradient outside S means some output in S depends on an
    input outside S. Both halves of every bit: every pair of samples differs in some bit, so any
    coupling between two samples is caught, with `2 * ceil(log2(batch))` VJPs, once per input
    signature. Gradients across samples that do not interact are exact zeros, not rounding noise.
    Models made only of Keras's built-in layers, in inference, skip it (see
    `jacket.engine.model.keeps_samples_apart`).

    NOTE: [Outputs that do not move]
    The VJP probe costs the compile of a VJP of the batched model, which `jacket.jacobian` does
    not otherwise run: 2.0 s of the keras_hub ViT's 5.2 s first call on JAX (batch 2, 2-core
    CPU). So the probe asks the model's values first, through one compiled forward pass: for the
    same splits, move the inputs of S by a random step (a tenth of each input's root mean square,
    per element) and compare every output outside S, bit for bit, with the unmoved outputs.
    Where none moved for any split, no output depends on another sample's inputs around `x`, so
    no derivative does: the samples are apart. Where one moved (a real coupling, a dependence
    through `stop_gradient` or a flat region, which has no derivative, or a forward pass that is
    not bitwise repeatable), or the moved forward pass failed, the VJP probe decides. What the
    values cannot see: a dependence below rounding at that step (it moves the per-sample
    Jacobian by less than rounding, which the VJP probe's `eps` bound ignores too), and a custom
    gradient that mixes samples in the backward pass only (a gradient that is not the function's
    derivative). Where the VJP kernel is built anyway (`jacket.vjp`), the VJP probe runs
    directly. The forward passes run eagerly where the backend says a few passes cost less so
    (`FEW_PASSES_EAGERLY`): on TensorFlow the ViT's probe took 0.38 s eagerly against 1.05 s
    through a traced forward pass; on JAX eagerly 3.2 s (each new op shape compiles) against
    0.9 s jitted.
    """
    key = inputs.signature
    if key not in state.independent and keeps_samples_apart(state.model, state.training):
        state.independent[key] = True  # built-in layers in inference: no probe needed
    if not state.independent.get(key, False):
        # a probe on NaN inputs proves nothing, and its verdict is kept: refuse them first (and
        # before a kept verdict of coupling, so that the inputs' own fault is named first)
        for tensor, leaf in zip(inputs.tensors, inputs.leaves):
            check_finite_samples(fn_name, leaf.label, tensor, inputs.batch)
    if key not in state.independent:
        state.independent[key] = _probe(state, inputs, entry)
    if not state.independent[key]:
        raise CouplingError(
            f"{fn_name}: the model's output for one sample depends on other samples in the "
            f"batch (batch size {inputs.batch}), so per-sample Jacobians would be wrong. "
            "Received: a model that mixes samples (BatchNormalization with training=True, or a "
            "layer that reduces over the batch). Pass `per_sample=False` for the full "
            "`(batch, *out_shape, batch, *in_shape)` Jacobian, `per_sample='diagonal'` for "
            "its per-sample blocks, or `training=False`."
        )


def _splits(batch: int):
    """The halves of the batch, two per bit of the sample index (NOTE: [The coupling probe])."""
    index = np.arange(batch)
    for bit in range(math.ceil(math.log2(batch))):
        chosen = ((index >> bit) & 1).astype(bool)
        yield chosen
        yield ~chosen


def _probe(state: ModelState, inputs: Inputs, entry: Entry) -> bool:
    if inputs.batch == 1:
        return True
    if ("vjp", inputs.signature) not in state.kernels and _outputs_stay(state, inputs):
        return True
    return _vjp_probe(state, inputs, entry)


def _outputs_stay(state: ModelState, inputs: Inputs) -> bool:
    """Whether moving the inputs of either half of every split leaves each output outside it
    unchanged, bit for bit (NOTE: [Outputs that do not move])."""
    batch, n = inputs.batch, len(inputs.leaves)
    forward = state.few_outputs(inputs)
    rng = np.random.default_rng(0)
    xs = [np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in inputs.tensors[:n]]
    steps = [rng.standard_normal(x.shape) * 0.1 * (np.sqrt(np.mean(x * x)) or 1.0) for x in xs]

    def run(tensors) -> list[np.ndarray]:
        return [np.asarray(keras.ops.convert_to_numpy(y)) for y in forward(tensors)]

    try:
        base = run(inputs.tensors)
        for inside in _splits(batch):
            moved = []
            for x, step, leaf in zip(xs, steps, inputs.leaves):
                mask = inside.reshape((batch,) + (1,) * len(leaf.shape))
                value = (x + step * mask).astype(numpy_dtype(leaf.dtype))
                moved.append(keras.ops.convert_to_tensor(value, dtype=leaf.dtype))
            outs = run(moved + list(inputs.tensors[n:]))
            for y, y0 in zip(outs, base):
                if y[~inside].tobytes() != y0[~inside].tobytes():
                    return False
    except Exception:  # noqa: BLE001 - moved inputs the model cannot take: the VJP probe decides
        return False
    return True


def _vjp_probe(state: ModelState, inputs: Inputs, entry: Entry) -> bool:
    batch = inputs.batch
    vjp = state.vjp(inputs)
    rng = np.random.default_rng(0)
    eps = float(ml_dtypes.finfo(numpy_dtype(inputs.leaves[0].dtype)).eps)
    for inside in _splits(batch):
        cts = []
        for leaf in entry.out_leaves:
            u = rng.standard_normal((batch,) + leaf.shape)
            u *= inside.reshape((batch,) + (1,) * len(leaf.shape))
            cts.append(keras.ops.convert_to_tensor(u.astype(numpy_dtype(leaf.dtype))))
        grads = vjp(inputs.tensors, cts)
        size = np.zeros(batch)
        for g in grads:
            g = np.abs(np.asarray(keras.ops.convert_to_numpy(g), dtype=np.float64))
            size = np.maximum(size, g.reshape(batch, -1).max(axis=1, initial=0.0))
        if not np.all(np.isfinite(size)):
            continue  # overflow in a low-precision model: no evidence either way
        # (an output that does not move inside S gives a zero bound: any leak is coupling)
        if size[~inside].max(initial=0.0) > eps * size[inside].max(initial=0.0):
            return False
    return True


def tileable(state: ModelState, fn_name: str, inputs: Inputs, strategies):
    """`strategies` without "replicate" where tiling the batch would change the model's output
    (`tiling_is_safe`, probed only when "replicate" is reached)."""
    for strategy in strategies:
        if strategy != "replicate" or tiling_is_safe(state, fn_name, inputs):
            yield strategy


def tiling_is_safe(state: ModelState, fn_name: str, inputs: Inputs) -> bool:
    """Whether tiling the batch ("replicate") leaves each copy's output as it was.

    At batch 1 the coupling probe has no second sample to catch a model that mixes samples
    (`z - mean(z, axis=0)` is 0 there, its Jacobian 0), but tiled copies of the sample would
    be mixed: probe a batch of two copies instead. Larger batches are probed as they are.
    """
    if inputs.batch != 1 or keeps_samples_apart(state.model, state.training):
        return True
    doubled = [keras.ops.concatenate([t, t], axis=0) for t in inputs.tensors]
    tiled = dataclasses.replace(inputs, tensors=doubled, batch=2 * inputs.batch)
    key = tiled.signature
    if key not in state.independent:
        for tensor, leaf in zip(tiled.tensors, tiled.leaves):
            check_finite_samples(fn_name, leaf.label, tensor, tiled.batch)
        state.independent[key] = _probe(state, tiled, state.entry(fn_name, tiled, check_cuts=False))
    return state.independent[key]
