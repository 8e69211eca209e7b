"""`jacket.check`: jacket's Jacobian (or Hessian, `order=2`) against central finite differences computed
in float64."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import keras
import numpy as np

from .. import backends
from ..checks import check_flag
from ..errors import JacketValueError
from .cut import Cut, cut_for
from .dtypes import keep_float64
from .hessian import hessian
from .inputs import FLOAT_DTYPES, prepare_inputs
from .jacobian import jacobian
from .kernels import tile
from .model import eager_call
from .point import Point, resolve

# Default tolerance on `max_rel_error`, by the dtype the model computes in.
RTOL = {"float64": 1e-6, "float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1}
_FD_SAMPLES_PER_CALL = 4096  # perturbed samples evaluated per model call


@dataclass(frozen=True)
class CheckReport:
    """The result of `jacket.check`.

    Attributes:
      ok: True when `max_rel_error <= rtol`.
      max_abs_error: `max |J - J_fd|` over every sample and entry.
      max_rel_error: `max_abs_error / max |J_fd|` (the error relative to the Jacobian's scale).
      rtol: the tolerance `ok` was judged with.
      eps: the relative finite-difference step, `h = eps * max(1, |x|)`.
      reference: what the finite differences evaluated ("float64 copy of the model", or the model
        in its own dtype when no float64 copy can be made).
      shape: `(batch, out_size, in_size)` of the compared Jacobian; `(batch, out_size, in_size,
        in_size)` of the compared Hessian for `order=2`.
      worst: `(sample, output, input)` flat index of the largest error (`(sample, output, input,
        input)` for `order=2`).
      order: 1 for a Jacobian, 2 for a Hessian.
    """

    ok: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    eps: float
    reference: str
    shape: tuple[int, ...]
    worst: tuple[int, ...]
    order: int = 1

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        what = "Jacobian" if self.order == 1 else "Hessian"
        b, i, *inputs = self.worst
        hint = (
            ""
            if self.ok
            else " A mismatch at a kink (ReLU at 0, tied max-pooling inputs) is where no derivative "
            f"exists, not an error of the {what}: move x off it to tell."
        )
        size = " x ".join(str(d) for d in self.shape[1:])
        where = ", ".join(str(j) for j in inputs)
        return (
            f"{what} check {verdict}: max abs error {self.max_abs_error:.3g}, max rel error "
            f"{self.max_rel_error:.3g} (tolerance {self.rtol:.3g}) over {self.shape[0]} sample(s) of "
            f"{size}; worst at sample {b}, output {i}, input {where}; reference: central "
            f"differences (eps={self.eps:.3g}) {'' if self.order == 1 else 'of the gradient '}"
            f"on the {self.reference}.{hint}"
        )


def check(
    model,
    x,
    *,
    wrt=None,
    of=None,
    eps: float | None = None,
    rtol: float | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    training: bool = False,
    order: int = 1,
) -> CheckReport:
    """Compare `jacket.jacobian(model, x)` (or `jacket.hessian`, `order=2`) with central finite
    differences computed in float64.

    The differences are taken on a float64 copy of the model (same weights) where one can be made
    (any model or layer Keras can serialise; on JAX inside a scope with 64-bit types enabled, so
    without `JAX_ENABLE_X64=1` too); otherwise on the model itself, in its own dtype, with
    outputs accumulated in float64. Each of the `2 * in_size` perturbations moves every sample at
    once (samples are independent), so the cost is `2 * in_size` batched forward passes; for
    `order=2`, the differences are of the float64 copy's gradients (`jacket.jacobian` of the
    copy), `2 * in_size` batched Jacobians.

    With `wrt` or `of`, the Jacobian (or Hessian) of the model's cut between them
    (`jacket.jacobian`'s `wrt`, `of`) is compared with differences of the cut of the float64
    copy: its `wrt` values moved one at a time, the constants (integer inputs, other outputs of
    the `wrt` layers) held.

    Args:
      model, x: as in `jacket.jacobian` (per-sample).
      wrt, of: as in `jacket.jacobian`.
      eps: relative step; default `eps_machine ** (1/3)` of the dtype the differences run in.
      rtol: tolerance on `max_rel_error`; default by the model's dtype (1e-6 for float64, 1e-4 for
        float32, 3e-2 for float16, 1e-1 for bfloat16).
      mode, chunk_size, training: passed to `jacket.jacobian` (`mode` and `chunk_size` to
        `jacket.hessian` for `order=2`, which runs the model in inference).
      order: 1 checks the Jacobian, 2 the Hessian.

    Returns:
      A `CheckReport`; `print(report)` gives a one-line summary.
    """
    check_flag("check", "training", training)
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise JacketValueError(
            f"check: `eps` must be a positive finite number or None. Received: eps={eps!r}."
        )
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol >= 0):
        raise JacketValueError(
            f"check: `rtol` must be a non-negative number or None. Received: rtol={rtol!r}."
        )
    if isinstance(order, bool) or order not in (1, 2):
        raise JacketValueError(
            f"check: `order` must be 1 (the Jacobian) or 2 (the Hessian). Received: order={order!r}."
        )
    if order == 2 and training:
        raise JacketValueError(
            "check: `order=2` checks `jacket.hessian`, which runs the model in inference. "
            "Received: order=2 with training=True. Pass training=False."
        )
    if order == 1:
        J = jacobian(
            model, x, wrt=wrt, of=of, mode=mode, chunk_size=chunk_size, flatten=True,
            training=training,
        )  # fmt: skip
    else:
        J = hessian(model, x, wrt=wrt, of=of, mode=mode, chunk_size=chunk_size, flatten=True)
    target, inputs = resolve("check", model, x, wrt, of, training, check_finite=True)
    J = _flat_numpy(J, inputs, order)
    dtype = inputs.leaves[0].dtype
    with _float64_scope():
        if isinstance(target, Cut):
            model_inputs = prepare_inputs("check", model, x, integers=True)
            twin, twin_inputs = None, None
            twin_model = _float64_twin(model, model_inputs)
            if twin_model is not None:
                with keep_float64():
                    twin = cut_for("check", twin_model, *target.canonical())
                    x64 = model_inputs.pack([_to64(t) for t in model_inputs.tensors])
                    _, twin_inputs = resolve(
                        "check", twin_model, x64, *target.canonical(), training
                    )
            if twin is None:
                twin_inputs = inputs
            copy, own = "float64 copy of the model's cut", f"model's cut in {dtype}"
        else:
            twin, twin_inputs = _float64_twin(model, inputs), inputs
            copy, own = "float64 copy of the model", f"model in {dtype}"
        reference = copy if twin is not None else own
        fd_dtype = "float64" if twin is not None else dtype
        if eps is not None:
            steps = [float(eps)]
        elif twin is not None:
            steps = [float(np.finfo(np.float64).eps) ** (1 / 3)]
        else:
            steps = [1e-3, 5e-3, 2e-2]
        # NOTE: [Step choice] Without a float64 copy the differences run in the model's own dtype,
        # where no single step is good: truncation grows with it, rounding shrinks with it. Of a
        # few candidate steps, the one whose differences agree best with J is kept.
        differences = _central_differences if order == 1 else _gradient_differences
        best = None
        for step in steps:
            with keep_float64() if twin is not None else contextlib.nullcontext():
                J_fd = differences(
                    twin if twin is not None else target, twin_inputs, step, training, fd_dtype
                )
            error = np.abs(J - J_fd)
            if best is None or error.max() < best[1].max():
                best = (J_fd, error, step)
    J_fd, error, eps = best
    worst = np.unravel_index(int(np.argmax(error)), error.shape)
    max_abs = float(error.max())
    scale = float(np.abs(J_fd).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    rtol = RTOL.get(dtype, 1e-4) if rtol is None else float(rtol)
    return CheckReport(
        ok=bool(max_rel <= rtol),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        rtol=rtol,
        eps=eps,
        reference=reference,
        shape=tuple(int(d) for d in J.shape),
        worst=tuple(int(i) for i in worst),
        order=order,
    )


def _flat_numpy(J, inputs, order: int = 1) -> np.ndarray:
    """jacket's result (a tensor or a tree of flattened blocks) as one `(batch, out, in)` array
    (`(batch, out, in, in)` for a Hessian, `order=2`)."""
    # The tree is outputs of inputs (of inputs); flattening goes through every level in order.
    n_in = len(inputs.leaves)
    flat = [J] if keras.ops.is_tensor(J) else keras.tree.flatten(J)
    # to NumPy first: a cast to float64 by the backend warns on JAX without 64-bit types
    blocks = [np.asarray(keras.ops.convert_to_numpy(b)).astype(np.float64) for b in flat]
    if order == 2:  # blocks[o][a][c]: join c along axis 3, then a along axis 2
        blocks = [np.concatenate(blocks[k : k + n_in], axis=3) for k in range(0, len(blocks), n_in)]
        axis = 2
    else:
        axis = 1
    rows = [
        np.concatenate(blocks[k : k + n_in], axis=axis + 1) for k in range(0, len(blocks), n_in)
    ]
    return np.concatenate(rows, axis=axis)


def _to_float64(obj):
    """A serialised Keras config with every float dtype policy turned into float64."""
    if isinstance(obj, dict):
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
            obj.get("config"), dict
        ):
            return {**obj, "config": {**obj["config"], "name": "float64"}}
        return {
            key: "float64"
            if key == "dtype" and value in ("float16", "bfloat16", "float32")
            else _to_float64(value)
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [_to_float64(v) for v in obj]
    return obj


def _float64_twin(model, inputs):
    """A float64 copy of a Keras model or layer with the same weights, or None if none can be made.
    It is built and run with Keras's float64 demotion lifted (NOTE: [Keras and float64])."""
    if not isinstance(model, keras.Layer):
        return None
    if not backends.current().has_float64():
        return None  # a JAX without 64-bit types even in a scope (see `_float64_scope`)
    try:
        with keep_float64():
            twin = keras.saving.deserialize_keras_object(
                _to_float64(keras.saving.serialize_keras_object(model))
            )
            x64 = inputs.pack([_to64(t[:1]) for t in inputs.tensors])
            if not twin.built:
                twin(x64)
            twin.set_weights([np.asarray(w, dtype=np.float64) for w in model.get_weights()])
            out = twin(x64)
    except Exception:  # noqa: BLE001 - any model Keras cannot rebuild falls back to its own dtype
        return None
    if any(keras.backend.standardize_dtype(t.dtype) != "float64" for t in keras.tree.flatten(out)):
        return None
    return twin


def _to64(tensor):
    """A float tensor as float64 (integer ones, held constant, as they are)."""
    if keras.backend.standardize_dtype(tensor.dtype) in FLOAT_DTYPES:
        return keras.ops.cast(tensor, "float64")
    return tensor


def _float64_scope():
    """Where float64 is float64: on JAX without `JAX_ENABLE_X64=1`, a scope with 64-bit types
    enabled (`jax.enable_x64`), so that the reference is float64 there too (without it JAX
    truncates float64 to float32, and the differences lose half their digits)."""
    return backends.current().float64_scope()


def _central_differences(model, inputs, eps: float, training: bool, fd_dtype: str) -> np.ndarray:
    """`(batch, out_size, in_size)`: `(f(x + h e_j) - f(x - h e_j)) / 2h` for every input column."""
    B = inputs.batch
    n_in = len(inputs.leaves)
    # to NumPy first: a cast to float64 by the backend warns on JAX without 64-bit types
    xs = [
        np.asarray(keras.ops.convert_to_numpy(t)).astype(np.float64) for t in inputs.tensors[:n_in]
    ]
    constants = [_to64(t) for t in inputs.tensors[n_in:]]  # a cut's: held as they are
    flat = np.concatenate([x.reshape(B, -1) for x in xs], axis=1)  # (B, N)
    sizes = [leaf.size for leaf in inputs.leaves]
    N = flat.shape[1]
    call = eager_call(model, training)

    def evaluate(flat_batch):  # (n, N) float64 -> (n, M) float64
        parts, offset = [], 0
        for leaf, size in zip(inputs.leaves, sizes):
            part = flat_batch[:, offset : offset + size].reshape((-1,) + leaf.shape)
            parts.append(
                keras.ops.convert_to_tensor(
                    part.astype(fd_dtype if fd_dtype != "bfloat16" else "float32"), dtype=fd_dtype
                )
            )
            offset += size
        if constants:  # every perturbed copy of the batch with its samples' constants
            copies = len(flat_batch) // B
            ys = call((inputs.pack(parts), [tile(c, copies) for c in constants]))
        else:
            ys = call(inputs.pack(parts))
        ys = keras.tree.flatten(ys) if not keras.ops.is_tensor(ys) else [ys]
        return np.concatenate(
            [
                np.asarray(keras.ops.convert_to_numpy(y))
                .astype(np.float64)
                .reshape(len(flat_batch), -1)
                for y in ys
            ],
            axis=1,
        )

    step = eps * np.maximum(1.0, np.abs(flat))  # (B, N)
    columns = max(1, _FD_SAMPLES_PER_CALL // (2 * B))
    out = None
    for start in range(0, N, columns):
        cols = np.arange(start, min(N, start + columns))
        c = len(cols)
        h = step[:, cols].T  # (c, B)
        batch = np.broadcast_to(flat, (2, c, B, N)).copy()
        batch[0, np.arange(c)[:, None], np.arange(B)[None], cols[:, None]] += h
        batch[1, np.arange(c)[:, None], np.arange(B)[None], cols[:, None]] -= h
        y = evaluate(batch.reshape(-1, N)).reshape(2, c, B, -1)
        diff = (y[0] - y[1]) / (2 * h[..., None])  # (c, B, M)
        if out is None:
            out = np.empty((B, diff.shape[2], N))
        out[:, :, cols] = diff.transpose(1, 2, 0)
    return out


def _gradient_differences(model, inputs, eps: float, training: bool, fd_dtype: str) -> np.ndarray:
    """`(batch, out_size, in_size, in_size)`: `(g_i(x + h e_j) - g_i(x - h e_j)) / 2h` for every
    output `i` and input column `j`, `g_i` the gradient of output `i` (a row of the Jacobian, by
    `jacket.jacobian` of `model`): every sample moved at once, many columns per call."""
    B = inputs.batch
    n_in = len(inputs.leaves)
    xs = [
        np.asarray(keras.ops.convert_to_numpy(t)).astype(np.float64) for t in inputs.tensors[:n_in]
    ]
    flat = np.concatenate([x.reshape(B, -1) for x in xs], axis=1)  # (B, N)
    N = flat.shape[1]
    np_dtype = "float32" if fd_dtype == "bfloat16" else fd_dtype
    cut = isinstance(model, Cut)

    def gradients(flat_batch):  # (n, N) float64 -> (n, M, N) float64
        parts, offset = [], 0
        for leaf in inputs.leaves:
            part = flat_batch[:, offset : offset + leaf.size].reshape((-1,) + leaf.shape)
            parts.append(keras.ops.convert_to_tensor(part.astype(np_dtype), dtype=fd_dtype))
            offset += leaf.size
        if cut:  # Jacobians at points of the cut, its constants repeated with the batch
            moved = Point(model, inputs).with_values(inputs.pack(parts), len(flat_batch) // B)
            wrt, of = model.spec
            J = jacobian(model.model, moved, wrt=wrt, of=of, flatten=True)
        else:
            J = jacobian(model, inputs.pack(parts), flatten=True)
        return _flat_numpy(J, inputs)

    step = eps * np.maximum(1.0, np.abs(flat))  # (B, N)
    out_size = None
    columns = max(1, _FD_SAMPLES_PER_CALL // (2 * B * max(1, N // 64)))
    out = None
    for start in range(0, N, columns):
        cols = np.arange(start, min(N, start + columns))
        c = len(cols)
        h = step[:, cols].T  # (c, B)
        batch = np.broadcast_to(flat, (2, c, B, N)).copy()
        batch[0, np.arange(c)[:, None], np.arange(B)[None], cols[:, None]] += h
        batch[1, np.arange(c)[:, None], np.arange(B)[None], cols[:, None]] -= h
        g = gradients(batch.reshape(-1, N))
        out_size = g.shape[1]
        g = g.reshape(2, c, B, out_size, N)
        diff = (g[0] - g[1]) / (2 * h[..., None, None])  # (c, B, M, N)
        if out is None:
            out = np.empty((B, out_size, N, N))
        out[..., cols] = diff.transpose(1, 2, 3, 0)
    return out
