"""The dense per-sample Jacobian: `jacobian`, `jacobian_fn` and the path of one call.

Data flows one way: the call's options are checked (`options`), its inputs normalised (`inputs`),
what the model's outputs are is read once (`state.entry`), the samples are probed for coupling
(`probes`), the planner's measured record (`tuning`, over `plan`) picks the plan, and an executor
(`executor`) runs the compiled kernel (`kernels`, compiled by `jacket.backends`) and gives the result
back the structure of the model's outputs and inputs. `jacket.jacobian` (in `jacket.api`) routes dense
calls here and sparse ones to `jacket.sparse`.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from ..checks import check_model, positive_int
from ..errors import JacketError
from .executor import fast_key, remember_tensor, tensor_key
from .inputs import example_inputs
from .memory import check_result_fits
from .options import Options
from .point import Point, resolve
from .probes import check_independent
from .state import state_of
from .trials import PlanReport
from .tuning import Tuning

__all__ = ["jacobian", "jacobian_fn", "JacobianFn", "tune"]


def jacobian(
    model,
    x,
    *,
    wrt=None,
    of=None,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    per_sample: bool | str = True,
    training: bool = False,
    memory_budget: int | str | None = None,
    strategy: str = "auto",
):
    """The dense per-sample Jacobian: `jacket.jacobian` without `sparse` (see there)."""
    options = Options.checked(
        "jacobian", mode, chunk_size, flatten, per_sample, training, memory_budget, strategy
    )
    return run("jacobian", model, x, options, wrt, of)


def jacobian_fn(
    model,
    *,
    wrt=None,
    of=None,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    per_sample: bool | str = True,
    training: bool = False,
    memory_budget: int | str | None = None,
    strategy: str = "auto",
) -> JacobianFn:
    """The dense prepared Jacobian: `jacket.jacobian_fn` without `sparse` (see there)."""
    check_model("jacobian_fn", model)
    options = Options.checked(
        "jacobian_fn", mode, chunk_size, flatten, per_sample, training, memory_budget, strategy
    )
    return JacobianFn(model, options, wrt, of)


class JacobianFn:
    """`jacobian(model, x, **options)` as a reusable callable; see `jacket.jacobian_fn`."""

    def __init__(self, model, options: Options, wrt=None, of=None):
        self.model = model
        self.options = options
        self.wrt, self.of = wrt, of
        self._calls: dict[tuple, Callable] = {}  # fast key -> the settled plan's `array_call`

    def __call__(self, x):
        """NOTE: [The per-call path]
        Once the plan for a signature has settled, a call with one float NumPy array of that
        signature goes straight to the executor's `array_call`: the finite check, the compiled
        kernel and the result's structure, nothing else. On the seed MLP at batch 1 (JAX, 2-core
        CPU, medians of 15 runs of 3000 calls) that took the call from 37.4 us (2.07x
        `jit(vmap(jacrev))` in the same run) to 25-32 us (1.77-1.82x). What is left is mostly
        the compiled kernel's own dispatch, 16.5-17 us: it takes the weights as arguments, so
        that it stays right when they change, and gives the inputs' `finite` flag; in plain JAX,
        weights as arguments cost 2.7 us a call and one more output 2.6 us on this model, where
        the one-liner closes over the weights as constants. On TensorFlow and PyTorch the
        kernel dominates (TensorFlow 339 us, 1.00x `tf.function(batch_jacobian)`). Anything the
        shortcut cannot take (another signature, a backend tensor, an error other than the
        inputs' own) goes the whole way, through `run`, whose planner recovers from running out
        of memory.
        """
        if type(x) is np.ndarray:
            key = (x.shape, x.dtype.str)
            call = self._calls.get(key)
            if call is not None:
                try:
                    return call(x)
                except JacketError:
                    raise
                except Exception:  # noqa: BLE001 - the whole way, where the planner recovers
                    del self._calls[key]
        result = run("jacobian_fn", self.model, x, self.options, self.wrt, self.of)
        if (self.wrt, self.of) == (None, None) and (key := fast_key(x)) is not None:
            tuning = state_of(self.model, self.options.training).executors.get((key, self.options))
            if tuning is not None and tuning.settled and tuning.executor is not None:
                call = tuning.executor.array_call("jacobian_fn")
                if call is not None:
                    self._calls[key] = call
        return result

    def plan(self, x) -> PlanReport:
        """The plan this callable follows for inputs like `x` (mode, chunks, strategy) and where it
        came from (`.source`, `.describe()`); nothing is compiled or run to tell."""
        return self._tuning(x).report()

    def tune(self, x) -> PlanReport:
        """Measure every candidate plan for inputs like `x` now, instead of over the next calls
        (NOTE: [Measured plans]), keep the fastest (in the plan cache too) and report it."""
        state, inputs, entry, tuning = self._prepared(x, check_finite=True)
        if self.options.per_sample is True:  # (its verdict is kept with the plan it measures)
            check_independent(state, "jacobian_fn", inputs, entry)
        if tuning.executor is None:
            tuning("jacobian_fn", inputs.tensors)
        while not tuning.settled:
            tuning("jacobian_fn", inputs.tensors)
        return tuning.report()

    def _resolve(self, x, check_finite: bool = False):
        return resolve(
            "jacobian_fn", self.model, x, self.wrt, self.of, self.options.training,
            check_finite=check_finite,
        )  # fmt: skip

    def _tuning(self, x) -> Tuning:
        return self._prepared(x)[3]

    def _prepared(self, x, check_finite: bool = False):
        """(state, inputs, entry, the planner's record) for inputs like `x`."""
        target, inputs = self._resolve(x, check_finite)
        state = state_of(target, self.options.training)
        entry = state.entry("jacobian_fn", inputs)
        return state, inputs, entry, tuning_for(state, "jacobian_fn", inputs, entry, self.options)

    @property
    def trace_count(self) -> int:
        """How many times this model's kernels were traced (for TensorFlow and JAX), those of
        its cuts between layers (`wrt`, `of`) included."""
        training = self.options.training
        count = state_of(self.model, training).traces
        for cut in getattr(self.model, "_jacket_cuts", {}).values():
            count += state_of(cut, training).traces
            count += sum(state_of(p, training).traces for p in cut._prefixes.values())
        return count

    def __repr__(self) -> str:
        cut = "" if (self.wrt, self.of) == (None, None) else f", wrt={self.wrt!r}, of={self.of!r}"
        return f"JacobianFn({type(self.model).__name__}, {self.options}{cut})"


def tune(
    model,
    batch_sizes=(1,),
    *,
    input_shape=None,
    seed: int = 0,
    **options,
) -> list[PlanReport]:
    """Measure the plans of `model` ahead of time, one per batch size, and keep them in the plan
    cache (NOTE: [Measured plans], NOTE: [The plan cache]): what `jacket tune` runs.

    Args:
      model: A Keras model or layer.
      batch_sizes: The batch sizes to measure (each is its own input signature).
      input_shape: The per-sample input shape (a list or dict of them for several inputs); by
        default the model's declared one.
      seed: Seed of the standard-normal inputs the plans are measured on.
      **options: As in `jacket.jacobian_fn` (`wrt`, `of`, `mode`, `chunk_size`,
        `memory_budget`, ...).

    Returns:
      One `PlanReport` per batch size: the plan kept, where it came from, what each candidate took.
    """
    check_model("tune", model)
    fn = jacobian_fn(model, **options)
    reports = []
    for batch in batch_sizes:
        batch = positive_int("tune", "batch_sizes", batch)
        x = example_inputs("tune", model, input_shape, batch, seed)
        reports.append(fn.tune(x))
    return reports


def tuning_for(state, fn_name: str, inputs, entry, options: Options) -> Tuning:
    """The planner's record for this input signature and options, made once."""
    key = (inputs.signature, options)
    tuning = state.tunings.get(key)
    if tuning is None:
        tuning = state.tunings[key] = Tuning(state, fn_name, inputs, entry, options)
    return tuning


def run(fn_name: str, model, x, options: Options, wrt=None, of=None):
    """One dense Jacobian call: the fast path for a NumPy array (or a backend tensor) of a
    signature seen before, else the inputs checked (and the model cut between `wrt` and `of`),
    the outputs read, the samples probed, the planner's record made."""
    check_model(fn_name, model)
    own = wrt is None and of is None and not isinstance(x, Point)  # (the fast path's calls)
    key = None
    if own:
        state = state_of(model, options.training)
        key = fast_key(x)
        if key is not None:
            tuning = state.executors.get((key, options))
            if tuning is not None:
                return tuning.call_array(fn_name, x)
        else:  # a backend tensor of a signature seen before: to the kernel as it is
            tuning = state.executors.get((tensor_key(x), options))
            if tuning is not None:
                return tuning(fn_name, [x])
    # the model's inputs are checked inside the kernel; a cut's, before its forward pass to `wrt`
    target, inputs = resolve(fn_name, model, x, wrt, of, options.training)
    own = own and target is model
    state = state_of(target, options.training)
    entry = state.entry(fn_name, inputs, check_cuts=False)  # the result is asked first, below
    check_result_fits(fn_name, inputs, entry.out_leaves, options.per_sample is not False)
    # (before the probe: a plan read from the plan cache brings the probe's verdict with it)
    tuning = tuning_for(state, fn_name, inputs, entry, options)
    if options.per_sample is True:
        check_independent(state, fn_name, inputs, entry)
    result = tuning(fn_name, inputs.tensors)
    state.cuts_checked_by(fn_name, inputs, keras.tree.flatten(result))
    if own and key is None and remember_tensor(x, inputs.tensors):  # `x` went through unchanged
        key = tensor_key(x)
    if own and key is not None:
        state.executors[(key, options)] = tuning
    return result
