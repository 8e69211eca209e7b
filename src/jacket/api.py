"""The public entry points `jacket.jacobian` and `jacket.jacobian_fn`: each routes a call to the dense
engine (`jacket.engine`) or, with `sparse=True` or a `sparsity` pattern, to `jacket.sparse`, which
wraps the engine (detect the pattern, color it, push compressed seeds through the engine's passes).
"""

from __future__ import annotations

from . import engine as _engine
from . import sparse as _sparse
from .checks import check_flag, check_model
from .engine import JacobianFn
from .errors import JacketValueError
from .sparse import SparseJacobianFn

__all__ = ["jacobian", "jacobian_fn"]


def jacobian(
    model,
    x,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    per_sample: bool | str = True,
    training: bool = False,
    memory_budget: int | str | None = None,
    strategy: str = "auto",
    sparse: bool = False,
    sparsity=None,
):
    """Per-sample Jacobian of `model` at `x`.

    Args:
      model: A Keras model or layer (Sequential, Functional, subclassed) mapping `(batch, *in_shape)`
        to `(batch, *out_shape)`, or any callable doing so with the backend's tensors.
      x: Input of shape `(batch, *in_shape)`: a NumPy array or backend tensor, or a list/tuple/dict of
        them for a model with several inputs. Integer arrays are cast to the model's float dtype.
      mode: "reverse" (one pass per output, VJPs), "forward" (one pass per input, JVPs) or "auto"
        (reverse when `out_size <= in_size`). The result does not depend on it. On TensorFlow
        and PyTorch, forward mode is first checked against reverse mode on random vectors (once
        per model and input signature): some TensorFlow ops have no forward rule and give zeros
        without an error (`UpSampling2D(interpolation="bilinear")`, `Resizing` bilinear), and a
        model whose forward mode fails the check is computed in reverse mode.
      chunk_size: Seeds (output rows or input columns) pushed per pass; bounds memory. Default: as
        many as fit `memory_budget`. A pass that runs out of memory is retried with half as many
        seeds (down to one), and the smaller chunk is kept for later calls.
      flatten: Return `(batch, out_size, in_size)` instead of `(batch, *out_shape, *in_shape)`.
      per_sample: With `False`, the full Jacobian of the batch, `(batch, *out_shape, batch,
        *in_shape)`, for models whose samples interact (BatchNormalization in training mode).
        With `"diagonal"`, the per-sample blocks `J[b, ..., b, ...]` of that full Jacobian,
        shaped like the per-sample result: what each sample's outputs owe to its own inputs
        while the other samples are held fixed, for models whose samples interact (it costs a
        full Jacobian: `batch` times the passes of a per-sample one).
      training: Call the model in training mode. The model itself is never changed.
      memory_budget: Working memory one pass may use, in bytes or as a string ("500MB", "2GiB");
        sets the default `chunk_size`. Default: a quarter of the memory free when jacket first
        needs it (the GPU's where PyTorch or JAX can tell, else the host's), between 64 MiB and
        4 GiB (see NOTE [Memory] in `jacket._plan`).
      strategy: How the seeds of one pass are batched: "replicate" (the batch tiled once per seed,
        one ordinary pass), "vmap" (one forward pass, the pullbacks vectorised), "loop" (one
        forward pass, the pullbacks one after the other), "auto" (the plan's cost model, see
        `jacket._plan`) or "autotune" (each candidate timed once on the first call, the fastest
        kept for this model and input signature). The result does not depend on it.
      sparse: Detect the Jacobian's sparsity pattern (`jacket.sparsity`), color it and compute
        only its nonzeros by compressed passes; returns a `jacket.SparseJacobian` (see
        `jacket.sparse`). `mode` then picks the compressed side ("auto": fewer colors).
      sparsity: A known pattern `(out_size, in_size)` (scipy sparse or NumPy) to use instead of
        the detected one; implies `sparse=True`.

    Returns:
      A tensor of the active Keras backend of shape `(batch, *out_shape, *in_shape)`, where
      `J[b, i..., j...] = d model(x)[b, i...] / d x[b, j...]`. For several inputs or outputs, the
      model's output structure of its input structure: `J["score"]["image"]`, `J[0][1]`.

    Raises:
      CouplingError: if `per_sample=True` and the model's outputs for one sample depend on other
        samples' inputs (the batch-sum trick would give wrong numbers); use `per_sample=False`
        or `per_sample="diagonal"`.
      JacketMemoryError: if the result alone would not fit in the memory available (the message
        gives its size and the ways around it), or a pass runs out of memory one seed at a time.

    Warns:
      JacketWarning: once per model, if an output reaches an input only through operations
        without a derivative (argmax, round, floor, integer casts, comparisons,
        `stop_gradient`): those Jacobian entries are zeros; the warning names where the
        gradient stops.
      JacketValueError, JacketTypeError: for bad arguments, with the received value and the fix.

    Example:
      >>> J = jacket.jacobian(keras.layers.Dense(3), np.ones((2, 4), "float32"))
      >>> tuple(J.shape)
      (2, 3, 4)
    """
    if sparse is not False or sparsity is not None:  # jacket.sparse: detect, color, compress
        check_flag("jacobian", "sparse", sparse)
        _check_not_diagonal("jacobian", per_sample)
        kw = dict(mode=mode, chunk_size=chunk_size, flatten=flatten, per_sample=per_sample)
        kw.update(training=training, memory_budget=memory_budget, sparsity=sparsity)
        return _sparse.prepared("jacobian", model, **kw)(x)
    kw = dict(mode=mode, chunk_size=chunk_size, flatten=flatten, per_sample=per_sample)
    kw.update(training=training, memory_budget=memory_budget, strategy=strategy)
    return _engine.jacobian(model, x, **kw)


def jacobian_fn(
    model,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    per_sample: bool | str = True,
    training: bool = False,
    memory_budget: int | str | None = None,
    strategy: str = "auto",
    sparse: bool = False,
    sparsity=None,
) -> JacobianFn | SparseJacobianFn:
    """A prepared `jacobian(model, ·, **options)`, compiled once per input signature.

    The options are those of `jacket.jacobian`. The compiled kernels live with the model, so
    `jacobian` with the same model and options shares them: repeated calls never re-trace.

    Example:
      >>> jac = jacket.jacobian_fn(model, flatten=True)
      >>> J = jac(x)                      # traces and compiles
      >>> J = jac(x + 1.0)                # same signature: runs the compiled kernel
    """
    check_model("jacobian_fn", model)
    if sparse is not False or sparsity is not None:  # jacket.sparse: detect, color, compress
        check_flag("jacobian_fn", "sparse", sparse)
        _check_not_diagonal("jacobian_fn", per_sample)
        kw = dict(mode=mode, chunk_size=chunk_size, flatten=flatten, per_sample=per_sample)
        kw.update(training=training, memory_budget=memory_budget, sparsity=sparsity)
        return _sparse.prepared("jacobian_fn", model, **kw)
    kw = dict(mode=mode, chunk_size=chunk_size, flatten=flatten, per_sample=per_sample)
    kw.update(training=training, memory_budget=memory_budget, strategy=strategy)
    return _engine.jacobian_fn(model, **kw)


def _check_not_diagonal(fn_name: str, per_sample) -> None:
    if isinstance(per_sample, str) and per_sample == "diagonal":
        raise JacketValueError(
            f"{fn_name}: sparse Jacobians are per sample. Received: per_sample='diagonal' with "
            "sparse=True (or a `sparsity` pattern). Drop one of them."
        )
