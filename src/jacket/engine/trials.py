"""What the planner measures of its candidates: trials, timings, comparisons, and the report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import keras
import ml_dtypes
import numpy as np

from .inputs import Inputs, numpy_dtype
from .memory import available_memory
from .plan import Plan, Problem
from .state import Entry

# One timing: the best of at least `MIN_RUNS` warm runs lasting together at least `TIME_S` (at most
# `MAX_RUNS`). With a single run per candidate (the former 0.05 s for a 50 ms model) the first warm
# run of the plan in use decided alone: EfficientNetB0 on TensorFlow, batch 2, kept "replicate" at
# 64.7 ms against 47.4 ms for "vmap" in the same benchmark run.
TIME_S = 0.2
MIN_RUNS = 2
MAX_RUNS = 5


@dataclass
class Trial:
    """What was measured of one candidate."""

    plan: Plan
    seconds: float | None = None  # warm seconds per Jacobian, the best run
    failure: str | None = None  # why it cannot be used


@dataclass(frozen=True)
class PlanReport:
    """The plan a prepared Jacobian follows for one input signature, and where it came from.

    Attributes:
      mode, per_sample, strategy, chunk, rows, n_chunks, rules: as in the plan (see `describe`).
      source: "prior" (the backend's first candidate, not yet measured against the others),
        "measuring" (candidates are being tried on the calls), "calibrated" (measured in this
        process), "autotune", "cache" (measured in an earlier process, read from the plan
        cache), or "forced" (`strategy=` given).
      timings: warm milliseconds per Jacobian of each measured candidate, by its description.
      failures: why a candidate was dropped, by its description.
      settled: nothing is left to measure: the next calls run this plan.
    """

    plan: Plan
    source: str
    timings: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    settled: bool = False

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def describe(self) -> str:
        text = f"{self.plan.describe()} (plan from: {self.source}"
        if self.timings:
            shown = ", ".join(f"{k}: {v:.3g} ms" for k, v in self.timings.items())
            text += f"; measured {shown}"
        if self.failures:
            text += "; dropped " + ", ".join(f"{k}: {v}" for k, v in self.failures.items())
        return text + ")"


def lacks_batching_rule(error: BaseException) -> bool:
    """JAX's `NotImplementedError: Batching rule for 'rnn_bwd' not implemented`, or PyTorch's
    `RuntimeError: Batching rule not implemented for aten::...`."""
    return isinstance(error, (NotImplementedError, RuntimeError)) and "atching rule" in str(error)


def timed(run, backend) -> tuple:
    """`(result, seconds)`: the best of at least `MIN_RUNS` warm runs lasting together at least
    `TIME_S` (at most `MAX_RUNS`)."""
    best, spent, runs = math.inf, 0.0, 0
    result = None
    while runs < MAX_RUNS and (runs < MIN_RUNS or spent < TIME_S):
        start = time.perf_counter()
        result = run()
        backend.block_until_ready(result)
        seconds = time.perf_counter() - start
        best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    return result, best


def difference(a, b) -> str | None:
    """None when two Jacobians agree to rounding, else how far apart they are."""
    worst = 0.0
    for x, y in zip(keras.tree.flatten(a), keras.tree.flatten(b)):
        x = np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)
        y = np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)
        if x.shape != y.shape:
            return f"shape {y.shape} instead of {x.shape}"
        scale = max(np.abs(x).max(initial=0.0), np.abs(y).max(initial=0.0), 1e-30)
        worst = max(worst, float(np.abs(x - y).max(initial=0.0) / scale))
    dtype = keras.backend.standardize_dtype(keras.tree.flatten(a)[0].dtype)
    allowed = 100 * math.sqrt(float(ml_dtypes.finfo(numpy_dtype(dtype)).eps))
    return None if worst <= allowed else f"max relative difference {worst:.2g}"


def result_bytes(inputs: Inputs, entry: Entry, problem: Problem) -> int:
    """Bytes of the Jacobian (per-sample, or the full cross-sample one)."""
    elements = problem.batch * problem.out_size * problem.in_size
    return elements * problem.itemsize * (1 if problem.per_sample else problem.batch)


def fits_twice(size_bytes: int) -> bool:
    """Whether two results of this size fit in the memory available (trying a candidate holds
    its result beside the current plan's)."""
    available = available_memory()
    return available is None or 2 * size_bytes <= available
