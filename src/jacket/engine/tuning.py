"""Which plan runs: the planner's candidates measured on the calls themselves, and remembered.

NOTE: [Measured plans]
No strategy wins everywhere (NOTE: [How the plan decides]), and a table keyed by kind of model chose
plans up to 26x slower than the best on real architectures, so the plan is measured per model, input
signature, options, backend and device:
- The first call runs the first candidate (the backend's `PRIOR`): one compile, as a framework's own
  one-liner costs. Nothing else is compiled then.
- Each later call, until every candidate has been tried, times the current plan and tries one more
  candidate on the same input: it is compiled, run, its result compared with the current plan's
  (a candidate that fails or gives another Jacobian is dropped, and `describe()` says why), and
  timed warm; the faster is kept. A candidate costs its compile and a few runs, spread over the
  calls, and the result of every call is computed by a plan that has passed.
- Some candidates are far slower than others (ConvNeXtTiny on TensorFlow, batch 2: one plain
  backward pass through its 7x7 depthwise convolutions took 1.9 s, the vectorised Jacobian of ten
  rows 0.2 s; an unrolled loop of ten pullbacks 21.7 s), and trying them costs their compile and a
  run. So a reverse-mode "replicate" or "loop" candidate is first bounded from below by the time of
  one VJP of the batch (a pass over a tiled batch, or `k` pullbacks after one forward pass, costs
  at least one VJP), and dropped without compiling when that bound is `DROP_FACTOR` times the
  current plan's time; a candidate of several passes runs one pass first, and is dropped when that
  pass times their number is. (A tighter bound, `t + (k - 1) t / 3` for `k` pullbacks, assumed
  that a backward pass costs at least half the forward one; on ResNet50/JAX at batch 2 one VJP
  took 80-96 ms and a loop of ten pullbacks 123 ms, so it dropped the fastest plan.)
- When all have been tried the plan is settled: written to the plan cache on disk
  (`jacket.engine.cache`), so that the next process starts with it, with nothing to try.
- `strategy="autotune"` tries every candidate on the first call; a forced strategy (or
  `chunk_size` with a forced strategy) runs as asked, never measured.
Timings are warm (after the compile), the best of a few runs lasting together at least `TIME_S`,
and the current plan is timed again on every call that tries a candidate, so that both are timed
under the same load.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from ..errors import JacketError, JacketMemoryError, JacketValueError
from . import cache, plan, probes, rules
from .executor import Executor
from .inputs import Inputs, numpy_dtype, result_dtype
from .memory import is_out_of_memory
from .options import Options
from .plan import Plan, Problem, prior
from .state import Entry, ModelState
from .trials import (
    PlanReport,
    Trial,
    difference,
    fits_twice,
    lacks_batching_rule,
    result_bytes,
    timed,
)

DROP_FACTOR = 1.5  # a candidate whose lower bound is this much slower is not compiled


def problem(state: ModelState, inputs: Inputs, entry: Entry, options: Options) -> Problem:
    """What the planner is told of this Jacobian (sizes, options, the verdicts known so far)."""
    itemsize = np.dtype(numpy_dtype(result_dtype(inputs.leaves + entry.out_leaves))).itemsize
    forward = state.forward.get(inputs.signature[1], "unknown")
    ruled = state.rule_layers()
    return Problem(
        batch=inputs.batch,
        in_size=sum(leaf.size for leaf in inputs.leaves),
        out_size=entry.out_size,
        itemsize=itemsize,
        activation_size=entry.activation_size,
        per_sample=options.per_sample is True,  # "diagonal": the full Jacobian, sliced
        training=options.training,
        memory_budget=options.memory_budget,
        mode=options.mode,
        chunk_size=options.chunk_size,
        strategy=options.strategy,
        forward_ok=forward is not None,
        prior=prior(state.backend, entry.kind),
        plain_prior=prior(state.backend, entry.plain_kind),
        rules=bool(ruled),
        plain_first=rules.plain_first(ruled),
    )


class Tuning:
    """The measured plan of one model, input signature and options (NOTE: [Measured plans])."""

    def __init__(
        self, state: ModelState, fn_name: str, inputs: Inputs, entry: Entry, options: Options
    ):
        self.state, self.entry, self.options = state, entry, options
        self.described = dataclasses.replace(inputs, tensors=[])  # the signature, not the data
        self.problem = problem(state, inputs, entry, options)
        self.trials = {p: Trial(p) for p in plan.candidates(self.problem)}
        self.order = list(self.trials)
        self.executor: Executor | None = None
        self.chosen: Plan | None = None  # the plan to run (None: the next candidate)
        self.running: Plan | None = None  # the plan being compiled and run for the first time
        self.cached_ms: dict = {}  # timings read back from the plan cache, for the report
        self.outpaced: set[Plan] = set()  # dropped as unable to win (bounds), not as failing
        self.vjp_seconds: dict = {}  # one VJP of the batch, with layer rules or not: `_lower_bound`
        self.forced = options.strategy in plan.STRATEGIES
        self.source = "forced" if self.forced else "prior"
        self.settled = self.forced or len(self.order) == 1
        self.note = None
        self.cache_key = None
        if not self.settled and not fits_twice(result_bytes(inputs, entry, self.problem)):
            self.settled = True  # trying a candidate holds its result beside the current one's
            self.note = "not measured: two results would not fit in the memory available"
        if not self.settled:
            self.cache_key = cache.key(state, inputs, options)
            self._from_cache(fn_name, inputs)

    # ---------------------------------------------------------------------------------- reports

    @property
    def plan(self) -> Plan:
        return self.executor.plan if self.executor is not None else self._pick()

    def report(self) -> PlanReport:
        source = self.source
        if source == "prior" and any(t.seconds is not None for t in self.trials.values()):
            source = "measuring"
        timings = dict(self.cached_ms)
        timings.update(
            (t.plan.describe(), t.seconds * 1e3)
            for t in self.trials.values()
            if t.seconds is not None
        )
        failures = {t.plan.describe(): t.failure for t in self.trials.values() if t.failure}
        if self.note:
            source = f"{source}, {self.note}"
        return PlanReport(self.plan, source, timings, failures, self.settled)

    # ------------------------------------------------------------------------------------ calls

    def __call__(self, fn_name: str, tensors: list, checked: bool = False):
        """The Jacobian of `tensors` (the structure of the model's outputs of its inputs)."""
        while True:
            try:
                if self.executor is None:
                    result = self._first(fn_name, tensors, checked)
                elif self.settled:
                    return self.executor(fn_name, tensors, checked)
                else:
                    result = self._try_next(fn_name, tensors, checked)
                if self.options.strategy == "autotune":  # every candidate on the first call
                    while not self.settled:
                        self._try_next(fn_name, tensors, checked)
                    result = self.executor(fn_name, tensors, checked)  # the winner's own bytes
                return result
            except Exception as error:  # noqa: BLE001 - recovered from, or raised again
                self._recover(fn_name, error)

    def call_array(self, fn_name: str, x: np.ndarray):
        """The fast path: `x` is one float NumPy array of a signature seen before."""
        tensors = self.executor.as_tensors(fn_name, x)
        return self(fn_name, tensors, checked=True)

    def _first(self, fn_name: str, tensors: list, checked: bool):
        """Compile and run the plan to use (the first candidate on a first call).

        A candidate that cannot run on this model is dropped and the next one tried; when the
        next one fails too, the first error is the model's own and is raised.
        """
        first_error = None
        while True:
            candidate = self._pick()
            self.running = candidate
            try:
                executor = self._executor(fn_name, candidate, tensors)
                result = executor(fn_name, tensors, checked)
            except Exception as error:
                if is_out_of_memory(error) or lacks_batching_rule(error):
                    raise  # the plan is changed by `_recover`
                if isinstance(error, _Unusable):
                    self._drop(candidate, error)
                    continue
                if self.forced and not isinstance(error, JacketError):
                    error.add_note(
                        f"jacket: raised while running strategy={candidate.strategy!r} "
                        f"({candidate.describe()}); strategy='auto' tries the strategies in "
                        "turn and drops those that cannot run on a model."
                    )
                if self.forced or not self._droppable(error):
                    raise
                if first_error is not None:
                    raise first_error from None
                first_error = error
                self._drop(candidate, error)
                continue
            self.executor, self.chosen, self.running = executor, candidate, None
            if not self.settled and not self._untried():
                self._settle()
            return result

    def _try_next(self, fn_name: str, tensors: list, checked: bool):
        """Time the current plan, try one more candidate on the same input, keep the faster."""
        current = self.executor
        result, seconds = timed(lambda: current(fn_name, tensors, checked), self.state.backend)
        trial = self.trials[current.plan]
        trial.seconds = seconds if trial.seconds is None else min(trial.seconds, seconds)
        untried = self._untried()
        if untried:
            candidate = untried[0]
            try:
                bound = self._lower_bound(fn_name, candidate, tensors)
                current_s = self.trials[current.plan].seconds
                if bound is not None and bound > DROP_FACTOR * current_s:
                    raise _Outpaced(
                        f"at least {bound * 1e3:.3g} ms (from one VJP's time) against "
                        f"{current_s * 1e3:.3g} ms"
                    )
                executor = self._executor(fn_name, candidate, tensors)
                if executor.plan.n_chunks > 1:  # one pass first: compiles, and bounds the rest
                    executor.kernel(tensors, executor.starts[0])
                    _, pass_s = timed(
                        lambda: executor.kernel(tensors, executor.starts[0]), self.state.backend
                    )
                    estimate = pass_s * executor.plan.n_chunks
                    if estimate > DROP_FACTOR * current_s:
                        executor.release()
                        raise _Outpaced(
                            f"{estimate * 1e3:.3g} ms ({executor.plan.n_chunks} passes of "
                            f"{pass_s * 1e3:.3g} ms) against {current_s * 1e3:.3g} ms"
                        )
                other = executor(fn_name, tensors, checked)  # compiles (or runs every pass)
                gap = difference(result, other)
                if gap is not None:
                    self._drop(candidate, f"another Jacobian ({gap})")
                    executor.release()
                else:
                    _, candidate_s = timed(
                        lambda: executor(fn_name, tensors, checked), self.state.backend
                    )
                    self.trials[candidate].seconds = candidate_s
                    if candidate_s < self.trials[current.plan].seconds:
                        current.release()
                        self.executor, self.chosen = executor, candidate
                    else:
                        executor.release()
            except Exception as error:
                if is_out_of_memory(error) and candidate.chunk > 1:
                    self._cap(candidate.chunk // 2)  # tried again, with fewer seeds per pass
                elif not self._droppable(error):
                    raise
                else:
                    self._drop(candidate, error)
        if not self._untried():
            self._settle()
        return result

    # ------------------------------------------------------------------------------ candidates

    def _untried(self) -> list[Plan]:
        return [
            p
            for p in self.order
            if self.trials[p].seconds is None
            and self.trials[p].failure is None
            and (self.executor is None or p != self.executor.plan)
            and self._worth_trying(p)
        ]

    def _worth_trying(self, candidate: Plan) -> bool:
        """A plan without layer rules is measured only against its own twin with rules, once that
        twin is the fastest (or could not run), except the first, which the first call runs:
        NOTE: [How the plan decides]."""
        if candidate.rules or not self.problem.rules or candidate == self.order[0]:
            return True
        twin = dataclasses.replace(candidate, rules=True)
        trial = self.trials.get(twin)
        if trial is None or (trial.failure is not None and twin not in self.outpaced):
            return True  # the twin could not run: the plan without rules may
        return self.executor is not None and self.executor.plan == twin

    def _pick(self) -> Plan:
        """The plan to compile next: the chosen one, else the first untried (the first that has
        not failed, once settled)."""
        if self.chosen is not None:
            return self.chosen
        if self.settled:
            pool = [p for p in self.order if self.trials[p].failure is None]
        else:
            pool = self._untried()
        if not pool:  # pragma: no cover - the last candidate's failure is raised instead
            raise AssertionError("no candidate plan left")
        return pool[0]

    def _lower_bound(self, fn_name: str, candidate: Plan, tensors: list) -> float | None:
        """Seconds a reverse-mode "loop" or "replicate" candidate takes at least, from the time of
        one VJP of the batch (NOTE: [Measured plans]); None for the others."""
        if candidate.mode != "reverse" or candidate.strategy == "vmap":
            return None
        if candidate.rules not in self.vjp_seconds:
            inputs = dataclasses.replace(self.described, tensors=tensors)
            kernel = self.state.vjp(inputs, rules=candidate.rules)
            ones = [
                keras.ops.ones((inputs.batch,) + leaf.shape, dtype=leaf.dtype)
                for leaf in self.entry.out_leaves
            ]
            kernel(tensors, ones)  # compiles
            _, seconds = timed(lambda: kernel(tensors, ones), self.state.backend)
            self.vjp_seconds[candidate.rules] = seconds
        t, n = self.vjp_seconds[candidate.rules], candidate.n_chunks
        # a pass over `k * batch`, or of k pullbacks after a forward pass, costs at least one VJP
        return n * t

    def _executor(self, fn_name: str, candidate: Plan, tensors: list) -> Executor:
        """The executor of `candidate`, after the probes it needs (forward-mode check, tiling)."""
        inputs = dataclasses.replace(self.described, tensors=tensors)
        method = None
        if candidate.mode == "forward":
            method = probes.forward_method(self.state, fn_name, inputs, self.entry)
            if method is None:
                self._without_forward()
                raise _Unusable("no forward mode passed the check against reverse mode")
        if candidate.strategy == "replicate" and not probes.tiling_is_safe(
            self.state, fn_name, inputs
        ):
            if self.forced:
                raise JacketValueError(
                    f"{fn_name}: strategy='replicate' tiles the batch, and this model mixes "
                    "the samples of a batch, so the copies would change its output. "
                    "Received: strategy='replicate' with a batch of 1. Use strategy='loop', "
                    "'vmap' or 'auto'."
                )
            raise _Unusable("the model mixes the copies of a tiled batch")
        return Executor(
            self.state,
            inputs,
            self.entry,
            candidate,
            flatten=self.options.flatten,
            diagonal=self.options.per_sample == "diagonal",
            jvp_method=method,
        )

    def _without_forward(self) -> None:
        """No forward mode is exact on this model: forward plans run in reverse mode."""
        self.problem = dataclasses.replace(self.problem, forward_ok=False)
        for p in plan.candidates(self.problem):
            if p not in self.trials:
                self.trials[p] = Trial(p)
                self.order.append(p)
        if self.chosen is not None and self.chosen.mode == "forward":
            self.chosen = None
        for p in self.order:
            if p.mode == "forward":
                self.trials[p].failure = "no forward mode passed its check against reverse mode"

    def _droppable(self, error: BaseException) -> bool:
        """Errors that may rule out a candidate rather than the call (the library's own errors
        are about the call: bad inputs, non-finite values, coupled samples)."""
        return isinstance(error, _Unusable) or not isinstance(error, JacketError)

    def _drop(self, candidate: Plan, error) -> None:
        if isinstance(error, str | _Unusable):
            text = str(error)
        else:
            text = f"{type(error).__name__}: {str(error)[:160]}"
        trial = self.trials[candidate]
        trial.failure = trial.failure or " ".join(text.split())
        if isinstance(error, _Outpaced):
            self.outpaced.add(candidate)
        if self.chosen == candidate:
            self.chosen = None
        if all(self.trials[p].failure for p in self.order):
            raise error if isinstance(error, BaseException) else JacketValueError(text)

    def _recover(self, fn_name: str, error: BaseException) -> None:
        """After a failed run of the plan in use: a smaller chunk when out of memory, another
        strategy when an op has no batching rule; anything else is raised."""
        failed = self.running or (self.executor.plan if self.executor is not None else None)
        if failed is None:
            raise error
        if lacks_batching_rule(error) and failed.strategy == "vmap":
            if self.forced:
                raise JacketValueError(
                    f"{fn_name}: strategy='vmap' cannot run on this model: "
                    f"{type(error).__name__}: {str(error)[:200]}. Received: "
                    "strategy='vmap'. Use strategy='loop' or 'auto'."
                ) from error
            self._reset()
            for p in self.order:
                if p.strategy == "vmap":
                    self.trials[p].failure = "an operation has no batching rule"
            return
        if not is_out_of_memory(error):
            raise error
        if failed.chunk == 1:
            raise JacketMemoryError(
                f"{fn_name}: out of memory even with one seed per pass "
                f"({failed.describe()}; {type(error).__name__}: {str(error)[:200]}). Pass "
                "a smaller batch, or stream the batch in parts (`jacket.io.stream_jacobian`)."
            ) from error
        smaller = plan.with_chunk(failed, max(1, failed.chunk // 2))
        self._reset()
        self.order[self.order.index(failed)] = smaller
        self.trials[smaller] = Trial(smaller, None, self.trials.pop(failed).failure)
        self.chosen = smaller  # kept for later calls
        self._cap(smaller.chunk)  # the memory estimate was wrong for the others too

    def _cap(self, chunk: int) -> None:
        """At most `chunk` seeds per pass for the candidates not run yet (after running out of
        memory with more)."""
        for i, p in enumerate(self.order):
            trial = self.trials[p]
            if p.chunk > chunk and trial.seconds is None and p not in (self.chosen, self.plan_run):
                smaller = plan.with_chunk(p, chunk)
                if smaller in self.trials:
                    continue
                self.order[i] = smaller
                self.trials[smaller] = Trial(smaller, None, None)
                del self.trials[p]

    @property
    def plan_run(self) -> Plan | None:
        return self.executor.plan if self.executor is not None else None

    def _reset(self) -> None:
        if self.executor is not None:
            self.executor.release()
        self.executor = self.running = self.chosen = None

    # ------------------------------------------------------------------------------ settling

    def _settle(self) -> None:
        self.settled = True
        if self.source == "prior":
            measured = [t for t in self.trials.values() if t.seconds is not None]
            if measured:
                self.source = "autotune" if self.options.strategy == "autotune" else "calibrated"
                if self.cache_key is not None:
                    cache.store(
                        self.cache_key,
                        self.state,
                        self.described,
                        self.plan,
                        self.source,
                        [self.trials[p] for p in self.order],
                    )

    def _from_cache(self, fn_name: str, inputs: Inputs) -> None:
        stored = cache.load(self.cache_key)
        if stored is None:
            return
        chosen = next((p for p in self.order if cache.same_plan(p, stored.plan)), None)
        if chosen is None and self.options.default_budget:  # the chunk follows today's memory
            chosen = next((p for p in self.order if cache.same_choice(p, stored.plan)), None)
        if chosen is None:
            return  # not one of today's candidates: measure again
        cache.restore_verdicts(self.state, inputs, stored)
        self.chosen = chosen
        self.cached_ms = {p.describe(): s * 1e3 for p, s in stored.timings(self.order).items()}
        self.source = "cache"
        self.settled = True


class _Unusable(Exception):
    """A candidate plan that cannot run on this model (said in the report)."""


class _Outpaced(_Unusable):
    """A candidate plan that cannot be faster than the current one (its lower bound)."""
