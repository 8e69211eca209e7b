"""`jacket.check`: jacket's Jacobian against central finite differences computed in float64."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import keras
import numpy as np

from ..checks import check_flag
from ..errors import JacketValueError
from .dtypes import keep_float64
from .inputs import prepare_inputs
from .jacobian import jacobian
from .model import eager_call

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
      shape: `(batch, out_size, in_size)` of the compared Jacobian.
      worst: `(sample, output, input)` flat index of the largest error.
    """

    ok: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    eps: float
    reference: str
    shape: tuple[int, int, int]
    worst: tuple[int, int, int]

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        b, i, j = self.worst
        hint = (
            ""
            if self.ok
            else " A mismatch at a kink (ReLU at 0, tied max-pooling inputs) is where no derivative "
            "exists, not an error of J: move x off it to tell."
        )
        return (
            f"Jacobian check {verdict}: max abs error {self.max_abs_error:.3g}, max rel error "
            f"{self.max_rel_error:.3g} (tolerance {self.rtol:.3g}) over {self.shape[0]} sample(s) of "
            f"{self.shape[1]} x {self.shape[2]}; worst at sample {b}, output {i}, input {j}; "
            f"reference: central differences (eps={self.eps:.3g}) on the {self.reference}.{hint}"
        )


def check(
    model,
    x,
    *,
    eps: float | None = None,
    rtol: float | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    training: bool = False,
) -> CheckReport:
    """Compare `jacket.jacobian(model, x)` with central finite differences computed in float64.

    The differences are taken on a float64 copy of the model (same weights) where one can be made
    (any model or layer Keras can serialise); otherwise on the model itself, in its own dtype, with
    outputs accumulated in float64. Each of the `2 * in_size` perturbations moves every sample at
    once (samples are independent), so the cost is `2 * in_size` batched forward passes.

    Args:
      model, x: as in `jacket.jacobian` (per-sample).
      eps: relative step; default `eps_machine ** (1/3)` of the dtype the differences run in.
      rtol: tolerance on `max_rel_error`; default by the model's dtype (1e-6 for float64, 1e-4 for
        float32, 3e-2 for float16, 1e-1 for bfloat16).
      mode, chunk_size, training: passed to `jacket.jacobian`.

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
    J = jacobian(model, x, mode=mode, chunk_size=chunk_size, flatten=True, training=training)
    inputs = prepare_inputs("check", model, x)
    J = _flat_numpy(J, inputs)
    dtype = inputs.leaves[0].dtype
    twin = _float64_twin(model, inputs)
    reference = "float64 copy of the model" if twin is not None else f"model in {dtype}"
    fd_dtype = "float64" if twin is not None else dtype
    if eps is not None:
        steps = [float(eps)]
    elif twin is not None:
        steps = [float(np.finfo(np.float64).eps) ** (1 / 3)]
    else:
        steps = [1e-3, 5e-3, 2e-2]
    # NOTE: [Step choice] Without a float64 copy the differences run in the model's own dtype,
    # where no single step is good: truncation grows with it, rounding shrinks with it. Of a few
    # candidate steps, the one whose differences agree best with J over the whole matrix is kept.
    best = None
    for step in steps:
        with keep_float64() if twin is not None else contextlib.nullcontext():
            J_fd = _central_differences(
                twin if twin is not None else model, inputs, step, training, fd_dtype
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
    )


def _flat_numpy(J, inputs) -> np.ndarray:
    """jacket's result (a tensor or a tree of flattened blocks) as one `(batch, out, in)` array."""
    # The tree is outputs of inputs; flattening goes through both levels in the leaves' order.
    n_in = len(inputs.leaves)
    flat = [J] if keras.ops.is_tensor(J) else keras.tree.flatten(J)
    blocks = [np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(b, "float64"))) for b in flat]
    rows = [np.concatenate(blocks[k : k + n_in], axis=2) for k in range(0, len(blocks), n_in)]
    return np.concatenate(rows, axis=1)


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
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.read("jax_enable_x64"):
            return None  # JAX computes float64 only with JAX_ENABLE_X64=1
    try:
        with keep_float64():
            twin = keras.saving.deserialize_keras_object(
                _to_float64(keras.saving.serialize_keras_object(model))
            )
            x64 = inputs.pack([keras.ops.cast(t[:1], "float64") for t in inputs.tensors])
            if not twin.built:
                twin(x64)
            twin.set_weights([np.asarray(w, dtype=np.float64) for w in model.get_weights()])
            out = twin(x64)
    except Exception:  # noqa: BLE001 - any model Keras cannot rebuild falls back to its own dtype
        return None
    if any(keras.backend.standardize_dtype(t.dtype) != "float64" for t in keras.tree.flatten(out)):
        return None
    return twin


def _central_differences(model, inputs, eps: float, training: bool, fd_dtype: str) -> np.ndarray:
    """`(batch, out_size, in_size)`: `(f(x + h e_j) - f(x - h e_j)) / 2h` for every input column."""
    B = inputs.batch
    xs = [
        np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float64"))) for t in inputs.tensors
    ]
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
        ys = call(inputs.pack(parts))
        ys = keras.tree.flatten(ys) if not keras.ops.is_tensor(ys) else [ys]
        return np.concatenate(
            [
                np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(y, "float64"))).reshape(
                    len(flat_batch), -1
                )
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
