"""`jvp` and `vjp`: one Jacobian-vector product per sample, without building the Jacobian."""

from __future__ import annotations

import keras
import numpy as np

from ..checks import check_flag, check_model
from ..errors import JacketTypeError, JacketValueError
from ..trees import flatten_with_labels, is_leaf_structure, pack, skeleton
from . import kernels, plan, probes
from .inputs import Inputs, Leaf, numpy_dtype, result_dtype, to_array
from .memory import default_memory_budget
from .point import resolve
from .state import Entry, ModelState, state_of

__all__ = ["forward_mode_is_exact", "jvp", "value_and_vjp", "vjp"]


def jvp(model, x, v, *, wrt=None, of=None, per_sample: bool = True, training: bool = False):
    """Jacobian-vector product `J v`, per sample, without building `J`.

    Args:
      model: As in `jacket.jacobian`.
      x: Input `(batch, *in_shape)` (or a structure of them), or a `jacket.engine.Point`.
      v: Tangent with the structure and shapes of `x` (of the `wrt` values, with `wrt`).
      wrt, of: As in `jacket.jacobian`: the product of the Jacobian of `of` with respect to
        `wrt`.
      per_sample: Check (once per model and shape) that samples do not interact, so that the result
        is `J_b v_b` for every sample `b`. With `False`, the product of the batch's full Jacobian.
      training: Call the model in training mode.

    Returns:
      `(batch, *out_shape)` (the model's output structure, or `of`'s): `out[b] = J_b @ v[b]`.

    Forward mode is checked against reverse mode once per model and input shape on the
    backends whose forward mode can be silently wrong (TensorFlow, PyTorch); where it fails, the
    product is computed from reverse passes (see `jacket.jacobian`'s `mode`).
    """
    check_flag("jvp", "per_sample", per_sample)
    check_flag("jvp", "training", training)
    check_model("jvp", model)
    target, inputs = resolve("jvp", model, x, wrt, of, training, check_finite=True)
    state = state_of(target, training)
    tangents = like_leaves("jvp", "v", v, inputs.structure, inputs.leaves, inputs.batch)
    entry = state.entry("jvp", inputs)
    if per_sample:
        probes.check_independent(state, "jvp", inputs, entry)
    method = probes.forward_method(state, "jvp", inputs, entry)
    if method is None:  # no forward mode passed the check: `J v` from reverse passes
        outs = jvp_by_reverse(state, inputs, entry, tangents, per_sample)
    else:
        outs = state.jvp(inputs, method)(inputs.tensors, tangents)
    return pack(entry.y_structure, list(outs))


def vjp(model, x, u, *, wrt=None, of=None, per_sample: bool = True, training: bool = False):
    """Vector-Jacobian product `u^T J`, per sample, without building `J`.

    Args:
      model: As in `jacket.jacobian`.
      x: Input `(batch, *in_shape)` (or a structure of them), or a `jacket.engine.Point`.
      u: Cotangent with the structure and shapes of the model's output, `(batch, *out_shape)`
        (of `of`'s values, with `of`).
      wrt, of: As in `jacket.jacobian`.
      per_sample: As in `jacket.jvp`.
      training: Call the model in training mode.

    Returns:
      `(batch, *in_shape)` (the structure of `x`, or of `wrt`'s values): `out[b] = u[b] @ J_b`.
    """
    check_flag("vjp", "per_sample", per_sample)
    check_flag("vjp", "training", training)
    check_model("vjp", model)
    target, inputs = resolve("vjp", model, x, wrt, of, training, check_finite=True)
    state = state_of(target, training)
    entry = state.entry("vjp", inputs)
    cotangents = like_leaves("vjp", "u", u, entry.y_structure, entry.out_leaves, inputs.batch)
    pullback = state.vjp(inputs)  # built first: the probe then runs on it
    if per_sample:
        probes.check_independent(state, "vjp", inputs, entry)
    grads = pullback(inputs.tensors, cotangents)
    return inputs.pack(list(grads))


def value_and_vjp(
    model, x, u, *, wrt=None, of=None, per_sample: bool = True, training: bool = False
):
    """`(y, u^T J)`: the outputs and the vector-Jacobian product of `jacket.vjp`, from one forward
    pass (what an attribution that needs both the outputs and the gradients runs).

    Args and shapes: as in `jacket.vjp`.

    Returns:
      `(y, grads)`: `y` in the structure of the model's outputs (of `of`), `grads` in that of `x`
      (of `wrt`'s values).
    """
    check_flag("value_and_vjp", "per_sample", per_sample)
    check_flag("value_and_vjp", "training", training)
    check_model("value_and_vjp", model)
    target, inputs = resolve("value_and_vjp", model, x, wrt, of, training, check_finite=True)
    state = state_of(target, training)
    entry = state.entry("value_and_vjp", inputs)
    cotangents = like_leaves(
        "value_and_vjp", "u", u, entry.y_structure, entry.out_leaves, inputs.batch
    )
    if per_sample:
        probes.check_independent(state, "value_and_vjp", inputs, entry)
    ys, grads = state.value_and_vjp(inputs)(inputs.tensors, cotangents)
    return pack(entry.y_structure, list(ys)), inputs.pack(list(grads))


def forward_mode_is_exact(model, x, *, wrt=None, of=None, training: bool = False) -> bool:
    """Whether one of the backend's forward modes passed its check against reverse mode on this
    model and these input shapes (NOTE: [Checked forward mode]; kept per model and shapes)."""
    target, inputs = resolve("jvp", model, x, wrt, of, training, check_finite=True)
    state = state_of(target, training)
    entry = state.entry("jvp", inputs)
    return probes.forward_method(state, "jvp", inputs, entry) is not None


def jvp_by_reverse(
    state: ModelState, inputs: Inputs, entry: Entry, tangents: list, per_sample: bool
) -> list:
    """`J v` from reverse passes, for models whose forward mode failed its check (NOTE: [Checked
    forward mode]): the output rows of every sample (of each sample when `per_sample` is False)
    pulled back in chunks that fit the memory budget, each contracted with `v` at once, so that
    no more than one chunk of `J` is ever held."""
    B = inputs.batch
    in_size = sum(leaf.size for leaf in inputs.leaves)
    itemsize = np.dtype(numpy_dtype(result_dtype(inputs.leaves + entry.out_leaves))).itemsize
    problem = plan.Problem(
        batch=B,
        in_size=in_size,
        out_size=entry.out_size,
        itemsize=itemsize,
        activation_size=entry.activation_size,
        per_sample=per_sample,
        training=state.training,
        memory_budget=default_memory_budget(),
        mode="reverse",
        prior=plan.prior(state.backend, entry.kind),
    )
    # "replicate" tiles the batch, which at batch 1 may hide a coupling (NOTE: [The coupling
    # probe]): `x - mean(x, axis=0)` gave `J v = v` instead of 0 on PyTorch
    strategy = next(probes.tileable(state, "jvp", inputs, plan.strategies(problem)), "vmap")
    chosen = plan.plan_for(problem, "reverse", strategy)
    kernel = state.kernel(
        ("jacobian", inputs.signature, chosen, None),
        lambda: kernels.jacobian_kernel(
            state.backend, chosen, inputs.structure, inputs.leaves, entry.out_leaves, B
        ),
    )
    dtype = result_dtype(inputs.leaves + entry.out_leaves)
    v = kernels.flat(tangents, (B,), inputs.leaves, dtype)  # (B, in_size)
    parts = []
    for start in state.starts_for(chosen):
        _, block = kernel(inputs.tensors, start)  # (k, B, in_size): rows of J
        if per_sample:  # seed i: row i of every J_b -> (J_b v_b)_i
            parts.append(keras.ops.einsum("kbn,bn->kb", block, v))
        else:  # seed (c, i): d y_c,i / d x_b for every b -> sum_b of them times v_b
            parts.append(keras.ops.einsum("kbn,bn->k", block, v))
    flat = keras.ops.concatenate(parts, axis=0)[: chosen.rows]
    if per_sample:
        flat = keras.ops.transpose(flat)  # (B, out_size)
    else:
        flat = keras.ops.reshape(flat, (B, entry.out_size))
    return kernels.split(flat, (B,), entry.out_leaves)


def _in_key_order(structure, value) -> bool:
    """Whether `value` is a list of one array per key of the flat dict `structure` whose keys
    are in sorted order (so the list's order is the keys' and their flattened order)."""
    if not isinstance(structure, dict) or not isinstance(value, (list, tuple)):
        return False
    keys = list(structure)
    return (
        keys == sorted(keys)
        and len(value) == len(keys)
        and all(is_leaf_structure(s) for s in structure.values())
        and all(is_leaf_structure(item) for item in value)
    )


def like_leaves(fn_name, name, value, structure, leaves: list[Leaf], batch: int) -> list:
    if value is None:
        like = "`x`" if name == "v" else "the model's output"
        raise JacketTypeError(
            f"{fn_name}: `{name}` must be given. Received: {name}=None. Pass an array (or "
            f"structure of arrays) shaped like {like}."
        )
    if is_leaf_structure(structure):
        flat = [(name, value)] if is_leaf_structure(value) else None
    elif _in_key_order(structure, value):
        # as for `x`: a list in the order of a dict's keys, when that order is the sorted one
        flat = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
    else:
        try:
            keras.tree.assert_same_structure(structure, skeleton(value))
            flat = flatten_with_labels(value, name)
        except (ValueError, TypeError):
            flat = None
    if flat is None or len(flat) != len(leaves):
        raise JacketValueError(
            f"{fn_name}: `{name}` must have the structure of "
            f"{'x' if name == 'v' else 'the model output'} ({len(leaves)} array(s): "
            f"{', '.join(leaf.label for leaf in leaves)}). Received: {type(value).__name__}. "
            "Pass one array per leaf, in that structure."
        )
    out = []
    for (label, item), leaf in zip(flat, leaves):
        array, _ = to_array(fn_name, label, item)  # refuses complex, strings, objects
        tensor = array if keras.ops.is_tensor(array) else keras.ops.convert_to_tensor(array)
        shape = tuple(int(d) for d in tensor.shape)
        if shape != (batch,) + leaf.shape:
            raise JacketValueError(
                f"{fn_name}: `{label}` must have shape {(batch,) + leaf.shape}, like "
                f"`{leaf.label}`. Received: {label}.shape={shape}. Pass an array of that shape."
            )
        out.append(keras.ops.cast(tensor, leaf.dtype))
    return out
