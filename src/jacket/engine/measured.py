"""Second-order results measured on the first call and kept ready for the next ones.

NOTE: [Measured on the first call]
Where a backend has several ways to a second-order result (forward-over-reverse and
reverse-over-reverse on JAX; the forward Laplacian and the Hessian's trace), the first call for an
input signature compiles and runs each, times a few warm runs of each (the fastest run counts),
and keeps the fastest way for this model and signature; later calls run it alone. The results are
compared too: where two ways disagree beyond rounding (relative 1e-2 of the result's scale: a way
that misses a term is off by about the term's own size, while float32 rounding alone reached 1e-3
on the Hessian of a confident classifier's log probability, whose `p (1 - p)` is computed from `p`
close to 1), the one named `prefer` (the Hessian's trace, for a Laplacian) is kept and a
`JacketWarning` says so. Measured here, the better way changes with the model: reverse-over-reverse
over every output at once was 3x faster on the digits CNN's Hessian on JAX (1.6 against 4.9 ms),
forward-over-reverse 1.4x faster on the trace of a 64-input MLP's (765 against 1099 ms).
"""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np

from ..errors import JacketWarning
from ..trees import pack
from .executor import fast_key
from .inputs import Inputs, check_finite_samples, numpy_dtype
from .state import ModelState, state_of

# warm runs timed per candidate: at least MIN_RUNS, more up to MAX_RUNS while they take under
# RUN_FOR_S in all; the fastest counts (a single run on a loaded machine is noisy)
MIN_RUNS, MAX_RUNS, RUN_FOR_S = 2, 5, 0.2


class Measured:
    """Candidates computing the same thing (NOTE: [Measured on the first call]); the chosen one's
    name is `chosen`, the warm seconds of each `seconds`."""

    def __init__(
        self,
        fn_name: str,
        candidates: dict,
        prefer: str | None = None,
        option: str | None = "method",
    ):
        self.fn_name, self.candidates, self.prefer = fn_name, candidates, prefer
        self.option = option
        self.chosen = next(iter(candidates)) if len(candidates) == 1 else None
        self.seconds: dict[str, float] = {}

    def describe(self) -> str:
        if not self.seconds:
            return str(self.chosen)
        shown = ", ".join(f"{k}: {v * 1e3:.3g} ms" for k, v in self.seconds.items())
        return f"{self.chosen} (measured {shown})"

    def __call__(self, tensors: list):
        if self.chosen is not None:
            return self.candidates[self.chosen](tensors)
        results, failures = {}, {}
        for name, candidate in self.candidates.items():
            try:
                result = candidate(tensors)  # compiles
                wait(result)
                runs: list[float] = []
                while len(runs) < MIN_RUNS or (len(runs) < MAX_RUNS and sum(runs) < RUN_FOR_S):
                    start = time.perf_counter()
                    results[name] = candidate(tensors)
                    wait(results[name])
                    runs.append(time.perf_counter() - start)
                self.seconds[name] = min(runs)
            except Exception as error:  # noqa: BLE001 - a candidate this model cannot run
                if not results and len(failures) == len(self.candidates) - 1:
                    raise
                failures[name] = error
        self.chosen = min(self.seconds, key=self.seconds.get)
        arrays = {
            name: np.concatenate([to_numpy(t).ravel() for t in keras.tree.flatten(r)])
            for name, r in results.items()
        }
        reference = arrays[self.chosen]
        for name, array in arrays.items():
            if not agree(array, reference):
                fallback = self.prefer if self.prefer in arrays else name
                warnings.warn(
                    f"{self.fn_name}: its methods disagree on this model ({name} against "
                    f"{self.chosen}: max difference {np.abs(array - reference).max():.3g}), so "
                    f"'{fallback}' is kept. "
                    + (
                        f"Pass `{self.option}=` to choose, and compare"
                        if self.option
                        else "Compare"
                    )
                    + " with `jacket.check(..., order=2)`.",
                    JacketWarning,
                    stacklevel=3,
                )
                self.chosen = fallback
                break
        return results[self.chosen]


def wait(result) -> None:
    for leaf in keras.tree.flatten(result):
        block = getattr(leaf, "block_until_ready", None)
        if block is not None:
            block()


def to_numpy(tensor) -> np.ndarray:
    # to NumPy first: a cast to float64 by the backend warns on JAX without 64-bit types
    return np.asarray(keras.ops.convert_to_numpy(tensor)).astype(np.float64)


def agree(a: np.ndarray, b: np.ndarray) -> bool:
    # the two sides round differently; a missing term moves a side by about its own size
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-30)
    return bool(np.abs(a - b).max(initial=0.0) <= 1e-2 * scale)


class Prepared:
    """A second-order result for one input signature, ready to run: `run(tensors)`, and the fast
    path's input (`fast_tensors`: one float NumPy array of a signature seen before, checked for
    NaN and inf and cast)."""

    def __init__(self, state: ModelState, inputs: Inputs, run, pack_as=(), packed: bool = False):
        self.backend, self.run, self.pack_as, self.packed = state.backend, run, pack_as, packed
        self.label, self.batch = inputs.leaves[0].label, inputs.batch
        self.dtype, self.dtype_name = numpy_dtype(inputs.leaves[0].dtype), inputs.leaves[0].dtype

    def fast_tensors(self, fn_name: str, x: np.ndarray) -> list:
        if not np.isfinite(x).all():
            check_finite_samples(fn_name, self.label, x, self.batch)
        array = x if x.dtype == self.dtype else x.astype(self.dtype)
        return [self.backend.as_input(array, self.dtype_name)]

    def __call__(self, tensors: list):
        result = self.run(tensors)
        return pack(self.pack_as, list(result)) if self.packed else result


def fast_runner(model, x, key: tuple, used: bool = True) -> tuple[Prepared | None, tuple | None]:
    """`(runner, key)`: the `Prepared` kept for `x` when it is one float NumPy array of a
    signature seen before (None otherwise), and the key to keep the runner under (None where
    the fast path does not apply: `used` False, or `x` not such an array)."""
    fast = fast_key(x) if used else None
    if fast is None:
        return None, None
    key = ("second_order",) + key[:1] + (fast,) + key[1:]
    return state_of(model, False).wrappers.get(key), key


def keep_fast(state: ModelState, model, key: tuple | None, runner: Prepared) -> None:
    """Keep `runner` under the fast path's `key` (`fast_runner`), where the call was of the model
    itself (a cut between layers has its own inputs to check)."""
    if key is not None and state.model is model:
        state.wrappers[key] = runner
